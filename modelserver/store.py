"""The model store: one YAML manifest per model, beside the weights it names.

    <store>/mnist.yaml          the model `mnist` (the file name is the model name)
    <store>/mnist-open.yaml
    <store>/simple-mnist.pt     a state_dict, shared by both manifests

A manifest:

    version: "1.0"
    architecture: simple        # stealguard.modelserver.architectures name, or "torchscript"
    weights: simple-mnist.pt    # relative to the store
    input_shape: [1, 28, 28]
    labels: ["0", "1", ..., "9"]
    policy: mnist               # the name sent to the sidecar (it picks the sidecar's policy
                                # of that name, else its default); "none": no protect step

An empty store gets the default models (`ensure_default_models`): the paper's Simple CNN
trained on MNIST, served as `mnist` (protected) and `mnist-open` (policy none).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from stealguard.modelserver.training import Recipe, trained_model
from stealguard.server.errors import NotFound

NO_POLICY = "none"
DEFAULT_VERSION = "1.0"


class ManifestError(ValueError):
    """A manifest in the model store is unusable; the message names the file and field."""


class UnknownModel(NotFound, LookupError):
    """No model (or no such version of it) in the store."""


@dataclass(frozen=True)
class ModelSpec:
    """One model as its manifest describes it."""

    name: str
    version: str
    architecture: str
    weights: Path
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    policy: str  # sent to the sidecar as `model`; NO_POLICY means no protect step

    @property
    def protected(self) -> bool:
        return self.policy != NO_POLICY


def read_manifest(path: Path) -> ModelSpec:
    """Parse one manifest file. Raises ManifestError naming the file and the bad field."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: a manifest is a YAML mapping")
    name = path.stem

    def field(key: str, kind: type):
        if key not in doc:
            raise ManifestError(f"{path}: field '{key}' is missing")
        if not isinstance(doc[key], kind):
            raise ManifestError(f"{path}: field '{key}' must be a {kind.__name__}")
        return doc[key]

    shape = field("input_shape", list)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ManifestError(f"{path}: field 'input_shape' must be a list of positive integers")
    labels = [str(label) for label in field("labels", list)]
    if len(labels) < 2:
        raise ManifestError(f"{path}: field 'labels' must name at least 2 classes")
    weights = path.parent / field("weights", str)
    if not weights.is_file():
        raise ManifestError(f"{path}: weights file {weights} does not exist")
    policy = str(doc.get("policy", name))
    if not policy:
        raise ManifestError(f"{path}: field 'policy' is empty (use 'none' for no protection)")
    return ModelSpec(
        name=name,
        version=str(doc.get("version", DEFAULT_VERSION)),
        architecture=field("architecture", str),
        weights=weights,
        input_shape=tuple(shape),
        labels=tuple(labels),
        policy=policy,
    )


def read_store(store: Path) -> dict[str, ModelSpec]:
    """All manifests (`*.yaml`) in `store`, by model name."""
    return {path.stem: read_manifest(path) for path in sorted(store.glob("*.yaml"))}


def ensure_default_models(store: Path, log=print) -> None:
    """Give an empty (or missing) store the default models `mnist` and `mnist-open`.

    Trains the Simple CNN first if the training cache does not hold it (see training.py).
    A store that already holds manifests is left alone."""
    store.mkdir(parents=True, exist_ok=True)
    if any(store.glob("*.yaml")):
        return
    model = trained_model(Recipe(), log=log)
    log(f"default model: {model.recipe.architecture} on {model.recipe.dataset}, "
        f"test accuracy {model.test_accuracy:.4f}")
    weights_name = f"{model.recipe.architecture}-{model.recipe.dataset}-{model.recipe.key()}.pt"
    shutil.copyfile(model.weights, store / weights_name)
    common = {
        "version": DEFAULT_VERSION,
        "architecture": model.recipe.architecture,
        "weights": weights_name,
        "input_shape": list(model.input_shape),
        "labels": [str(k) for k in range(model.num_classes)],
        "test_accuracy": model.test_accuracy,
    }
    for name, policy in (("mnist", "mnist"), ("mnist-open", NO_POLICY)):
        manifest = {**common, "policy": policy}
        (store / f"{name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
