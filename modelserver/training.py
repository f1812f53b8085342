"""The default model: the paper's "Simple" CNN trained by the model owner on MNIST.

The owner trains on the base part of the paper's split (`load_dataset("mnist")`): 33% of the
training data is held out for the attacker and a test part is trained on by nobody; the
test accuracy printed here is measured on that test part. Training is cached on disk under
a key that hashes the training recipe, so a machine (or a CI run) trains once:

    python -m stealguard.modelserver.training          # train if not cached, print accuracy
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE_VERSION = 1  # bump when the training code changes what it produces


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights."""

    dataset: str = "mnist"
    architecture: str = "simple"
    seed: int = 0
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 1e-3

    def key(self) -> str:
        """A short hash of the recipe (and of RECIPE_VERSION) naming its cache entry."""
        text = json.dumps({**dataclasses.asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainedModel:
    """A cached training result: the state_dict file and what it scored."""

    recipe: Recipe
    weights: Path
    input_shape: tuple[int, ...]
    num_classes: int
    test_accuracy: float
    train_seconds: float


def cache_root() -> Path:
    """Where trained models are cached: $STEALGUARD_CACHE, else ~/.cache/stealguard."""
    return Path(os.environ.get("STEALGUARD_CACHE") or Path.home() / ".cache" / "stealguard")


def trained_model(
    recipe: Recipe = Recipe(), cache_dir: Path | None = None, log=print
) -> TrainedModel:
    """Return the model trained by `recipe`, training it first if it is not in the cache.

    Safe to call from several processes at once: one trains, the others wait for it."""
    name = f"{recipe.architecture}-{recipe.dataset}-{recipe.key()}"
    entry = (cache_dir or cache_root()) / "models" / name
    entry.mkdir(parents=True, exist_ok=True)
    with _locked(entry / ".lock"):
        meta_path = entry / "meta.json"
        if not meta_path.exists():
            log(f"training the {recipe.architecture} model on {recipe.dataset} "
                f"({recipe.epochs} epochs; cached in {entry})")
            meta = _train(recipe, entry / "weights.pt", log)
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            tmp.replace(meta_path)
        meta = json.loads(meta_path.read_text())
    return TrainedModel(
        recipe=recipe,
        weights=entry / "weights.pt",
        input_shape=tuple(meta["input_shape"]),
        num_classes=meta["num_classes"],
        test_accuracy=meta["test_accuracy"],
        train_seconds=meta["train_seconds"],
    )


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(recipe: Recipe, weights: Path, log) -> dict:
    import torch
    import torch.nn.functional as F
    from stealguard.modelserver.architectures import build_model
    from stealguard.modelserver.datasets import load_dataset

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    ds = load_dataset(recipe.dataset, seed=recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.architecture, ds.input_shape, ds.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    steps_per_epoch = -(-len(ds.base_x) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch
    )
    x, y = torch.from_numpy(ds.base_x), torch.from_numpy(ds.base_y)
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"  epoch {epoch + 1}/{recipe.epochs}: loss {loss.item():.3f} "
            f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(ds.test_x)).double(), dim=1).numpy()
    seconds = time.perf_counter() - started
    tmp = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights)
    return {
        "recipe": dataclasses.asdict(recipe),
        "input_shape": list(ds.input_shape),
        "num_classes": ds.num_classes,
        "test_accuracy": float((probs.argmax(1) == ds.test_y).mean()),
        "test_mean_top_probability": float(probs.max(1).mean()),
        "test_samples": len(ds.test_y),
        "train_samples": len(ds.base_y),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    """Train (or read from the cache) the default model and print what it scored."""
    parser = argparse.ArgumentParser(
        prog="python -m stealguard.modelserver.training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default $STEALGUARD_CACHE or ~/.cache/stealguard)")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    model = trained_model(Recipe(epochs=args.epochs, seed=args.seed), args.cache_dir)
    print(f"weights: {model.weights}")
    print(f"test accuracy: {model.test_accuracy:.4f} (held-out test part, never trained on)")
    print(f"training time: {model.train_seconds:.1f} s (when it was trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
