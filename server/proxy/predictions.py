"""TorchServe's JSON `prediction` -> the same JSON with protected probabilities.

Recognised shapes (what TorchServe's handlers return):

- a probability vector `[p0, p1, ...]` (one request, one row);
- a list of them `[[...], [...]]` (a batch in one request);
- the image classifier's top-k dict `{"tabby": 0.41, "tiger_cat": 0.27, ...}`, a partial
  distribution: the missing mass `1 - sum` joins as one extra "other" class while the
  defense runs and is dropped after; labels and their order are kept;
- a list of top-k dicts.

Probabilities are JSON numbers, at least one of them written as a fraction or with an
exponent (`0.0`, `1e-05`): a list or object of integers only (`{"label": 3}`, `[0, 1]`)
holds labels, indices or counts, not probabilities, and is unrecognised.
Values are float64 on the way in and out (JSON numbers), so the answer is exactly the
defense applied to the upstream's numbers. Anything else, including vectors the defense's
validation rejects, is unrecognised and follows the policy's `on_unrecognized`.

The rows are protected by `perturb` (the protect core, `ProxyServicer.perturber`): one
call for all rows of one width, so a batch or a list of equal top-k dicts is one query.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from stealguard.server.errors import InvalidInput
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicy

_SUM_TOLERANCE = 1e-3  # the defenses' own tolerance on a row's sum

Perturb = Callable[[np.ndarray], Awaitable[np.ndarray]]
Rebuild = Callable[[list[np.ndarray]], Any]


class _NotProbabilities(ValueError):
    """Why a prediction is not one of the recognised shapes (becomes `Unrecognized`)."""


async def protect_prediction(prediction: bytes, policy: ProxyPolicy, model: str,
                             perturb: Perturb) -> bytes:
    """The protected JSON of `prediction` under `policy`, its rows protected by `perturb`.

    With `on_unrecognized: pass` an unrecognised prediction is returned unchanged; with
    `reject` it raises `Unrecognized` naming the model and the reason. The core's other
    refusals (too many rows, a rate limit, draining) pass through.
    """
    try:
        rows, rebuild = _read(_load(prediction))
        return _dump(rebuild(await _protect_rows(rows, perturb)))
    except _NotProbabilities as reason:
        if policy.passes_unrecognized:
            return prediction
        raise Unrecognized(model, policy.name, str(reason)) from None


async def _protect_rows(rows: list[list[float]], perturb: Perturb) -> list[np.ndarray]:
    """Every row protected, in order: one `perturb` call per distinct row width."""
    by_width: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_width.setdefault(len(row), []).append(index)
    protected: list[Any] = [None] * len(rows)
    for indices in by_width.values():
        block = np.array([rows[i] for i in indices], dtype=np.float64)
        try:
            out = await perturb(block)
        except InvalidInput as error:  # the defenses' validation: not probabilities
            raise _NotProbabilities(f"not probabilities: {error}") from None
        for position, index in enumerate(indices):
            protected[index] = out[position]
    return protected


def _load(prediction: bytes) -> Any:
    try:
        return json.loads(prediction)
    except (UnicodeDecodeError, ValueError):
        raise _NotProbabilities(
            f"the prediction ({len(prediction)} bytes) is not JSON"
        ) from None


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def _read(value: Any) -> tuple[list[list[float]], Rebuild]:
    """The probability rows of a prediction, and how to build the protected prediction
    from the protected rows."""
    if isinstance(value, dict):
        row, rebuild_one = _read_top_k(value)
        return [row], lambda out: rebuild_one(out[0])
    if not isinstance(value, list):
        raise _NotProbabilities(f"the prediction is a JSON {_kind(value)}")
    if not value:
        return [], lambda out: value  # an empty batch holds no probabilities
    if _are_probability_numbers(value):
        return [value], lambda out: out[0].tolist()
    if all(isinstance(v, list) for v in value):
        widths = {len(row) for row in value}
        if len(widths) != 1 or not _are_probability_numbers([v for row in value for v in row]):
            raise _NotProbabilities(
                "the prediction is a list of lists that are not all probabilities (numbers, "
                f"not only integers) of one length (lengths {sorted(widths)})"
            )
        return value, lambda out: [row.tolist() for row in out]
    if all(isinstance(v, dict) for v in value):
        read = [_read_top_k(v) for v in value]
        return ([row for row, _ in read],
                lambda out: [rebuild(row) for (_, rebuild), row in zip(read, out, strict=True)])
    if all(type(v) is int for v in value):
        raise _NotProbabilities(
            "the prediction is a list of integers: labels, indices or counts, not probabilities"
        )
    raise _NotProbabilities(
        "the prediction is a list that is not all probabilities, all lists or all "
        "{label: probability} objects "
        f"objects (first item: a JSON {_kind(value[0])})"
    )


def _read_top_k(top_k: dict[str, Any]) -> tuple[list[float], Callable[[np.ndarray], Any]]:
    values = list(top_k.values())
    if not _are_probability_numbers(values):
        raise _NotProbabilities(
            "the prediction is a JSON object that is not {label: probability} (values "
            "must be numbers, not only integers)"
            + (f" (key {next(iter(top_k))!r})" if top_k else " (empty)")
        )
    total = float(np.array(values, dtype=np.float64).sum())
    if not total <= 1.0 + _SUM_TOLERANCE:
        raise _NotProbabilities(
            f"the {{label: probability}} object sums to {total:.6g}, more than 1"
        )
    other = max(0.0, 1.0 - total)  # the classes the top-k left out, as one class
    return ([*values, other],
            lambda row: dict(zip(top_k.keys(), row[:-1].tolist(), strict=True)))


def _are_probability_numbers(values: list) -> bool:
    """All numbers (bool is not one here), and not integers only."""
    floats = 0
    for value in values:
        kind = type(value)
        if kind is float:
            floats += 1
        elif kind is not int:
            return False
    return floats > 0


def _kind(value: Any) -> str:
    return {str: "string", bool: "boolean", type(None): "null", dict: "object",
            list: "array"}.get(type(value), "number")
