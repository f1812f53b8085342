"""Fail-closed protection for model servers: never return raw probabilities by accident.

`protect` asks the sidecar; if the sidecar is unreachable, too slow or answers with an
error, it returns label-only rows (one-hot of each row's top-1) — or raises, with
`on_error="raise"` — and returns the raw probabilities only when the caller passed
`fail_open=True`, explicitly accepting the leak.

Invalid rows are the caller's error, not the sidecar's: whatever `on_error` and `fail_open`
say, rows the sidecar rejects (INVALID_ARGUMENT) and rows holding NaN or infinity raise
`SidecarError` with code INVALID_ARGUMENT naming the row. A label taken from NaN would be
an answer made up from nothing.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
from stealguard.client.defense import AsyncDefenseClient, DefenseClient, SidecarError

log = logging.getLogger("stealguard.client")

_ON_ERROR = ("labels", "raise")


def label_only(probs: np.ndarray) -> np.ndarray:
    """One-hot rows of each row's argmax (same shape and float dtype as `probs`)."""
    array = np.asarray(probs)
    dtype = array.dtype if array.dtype.kind == "f" else np.float64
    rows = np.atleast_2d(array)
    out = np.zeros(rows.shape, dtype=dtype)
    if rows.shape[0] and rows.shape[1]:
        out[np.arange(rows.shape[0]), np.argmax(rows, axis=1)] = 1
    return out.reshape(array.shape)


def _non_finite(probs: np.ndarray) -> SidecarError | None:
    """The INVALID_ARGUMENT error for the first row holding NaN or infinity, else None."""
    rows = np.atleast_2d(np.asarray(probs))
    if rows.dtype.kind not in "fc":
        return None
    finite = np.isfinite(rows)
    if finite.all():
        return None
    i, j = np.argwhere(~finite)[0]
    return SidecarError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"row {i}: value {rows[i, j]} at column {j} is not finite")


def _fallback(error: SidecarError, probs: np.ndarray, model: str, fail_open: bool,
              on_error: str) -> np.ndarray:
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        raise error  # the rows are wrong: no fallback can answer for them
    invalid = _non_finite(probs)
    if invalid is not None:
        raise invalid from error
    if fail_open:
        log.warning("sidecar failed (%s) for model %r: returning RAW probabilities "
                    "(fail_open=True)", error, model)
        return np.array(probs, copy=True)
    if on_error == "raise":
        raise error
    log.warning("sidecar failed (%s) for model %r: returning label-only rows", error, model)
    return label_only(probs)


def _as_sidecar_error(error: Exception) -> SidecarError:
    if isinstance(error, SidecarError):
        return error
    return SidecarError(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")


def _check(on_error: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")


def protect(client: DefenseClient, probs: np.ndarray, model: str = "", logits: bool = False,
            *, fail_open: bool = False, on_error: str = "labels",
            timeout: float | None = None, principal: str = "",
            charged: bool = False) -> np.ndarray:
    """The sidecar's protection of `probs`, failing closed (see module docstring).

    Raises `SidecarError` (INVALID_ARGUMENT) for invalid rows, in every mode.
    With `logits=True` the fallback's top-1 is taken from the logits, which is the same.
    `timeout`: seconds for this call (default: the client's); none left fails closed.
    `principal`: the end client to charge (believed from a gateway token only);
    `charged`: this caller has charged it already, under limits of its own.
    """
    _check(on_error)
    try:
        return client.perturb(probs, model=model, logits=logits, timeout=timeout,
                              principal=principal, charged=charged)
    except Exception as error:  # noqa: BLE001 - whatever broke, fail closed
        return _fallback(_as_sidecar_error(error), probs, model, fail_open, on_error)


async def protect_async(client: AsyncDefenseClient, probs: np.ndarray, model: str = "",
                        logits: bool = False, *, fail_open: bool = False,
                        on_error: str = "labels", timeout: float | None = None,
                        principal: str = "", charged: bool = False) -> np.ndarray:
    """`protect` for asyncio model servers."""
    _check(on_error)
    try:
        return await client.perturb(probs, model=model, logits=logits, timeout=timeout,
                                    principal=principal, charged=charged)
    except Exception as error:  # noqa: BLE001 - whatever broke, fail closed
        return _fallback(_as_sidecar_error(error), probs, model, fail_open, on_error)
