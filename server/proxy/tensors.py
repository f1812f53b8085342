"""Open Inference Protocol (v2) output tensors <-> arrays, and protecting the named ones.

An output holds probabilities when the policy's `outputs` names it. It must be FP32 or
FP64 with shape [..., classes] (all leading dimensions are rows); its values come either in
`contents.fp32_contents` / `fp64_contents` or, when the response uses them, in
`raw_output_contents[i]` (little-endian, row-major). The protected values go back in the
same place, dtype and shape; every other output is untouched.
"""

from __future__ import annotations

import math

import numpy as np
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.server.errors import InvalidInput
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicy
from stealguard.server.proxy.predictions import Perturb

# datatype -> (field of InferTensorContents, little-endian dtype of raw contents)
_FLOATS = {
    "FP32": ("fp32_contents", np.dtype("<f4")),
    "FP64": ("fp64_contents", np.dtype("<f8")),
}


class _NotProbabilities(ValueError):
    """Why one output cannot be protected (becomes `Unrecognized`, or passes)."""


async def protect_outputs(response: v2.ModelInferResponse, policy: ProxyPolicy, model: str,
                          perturb: Perturb) -> None:
    """Protect, in `response` itself, every output that `policy.outputs` names, each with
    one `perturb` call (the protect core).

    A named output that cannot be protected (wrong datatype, bad shape, values that are not
    probabilities), or an answer with no named output at all, raises `Unrecognized` under
    `on_unrecognized: reject`; under `pass` that output (or the answer) stays as it is.
    """
    outputs = response.outputs
    raw = response.raw_output_contents
    if raw and len(raw) != len(outputs):
        return _unrecognized(
            policy, model,
            f"the answer has {len(outputs)} outputs but {len(raw)} raw_output_contents",
        )
    named = [i for i, output in enumerate(outputs) if output.name in policy.outputs]
    if not named:
        return _unrecognized(
            policy, model,
            f"none of its outputs {[o.name for o in outputs]} is named in the policy's "
            f"outputs {list(policy.outputs)}",
        )
    protected = {}  # computed for all before any is written back
    for index in named:
        try:
            protected[index] = await _protect_one(outputs[index], raw[index] if raw else None,
                                                  perturb)
        except _NotProbabilities as reason:
            _unrecognized(policy, model, f"output {outputs[index].name!r}: {reason}")
    for index, array in protected.items():
        if raw:
            raw[index] = array.tobytes()
        else:
            field = getattr(outputs[index].contents, _FLOATS[outputs[index].datatype][0])
            del field[:]
            field.extend(array.ravel().tolist())


def _unrecognized(policy: ProxyPolicy, model: str, reason: str) -> None:
    if not policy.passes_unrecognized:
        raise Unrecognized(model, policy.name, reason)


async def _protect_one(
    output: v2.ModelInferResponse.InferOutputTensor, raw: bytes | None, perturb: Perturb
) -> np.ndarray:
    """The protected values of one output, as a 2-D array of its own little-endian dtype."""
    kind = _FLOATS.get(output.datatype)
    if kind is None:
        raise _NotProbabilities(
            f"datatype {output.datatype or '(empty)'}: probabilities must be FP32 or FP64"
        )
    field, dtype = kind
    shape = list(output.shape)
    if not shape or any(d < 0 for d in shape):
        raise _NotProbabilities(f"shape {shape}: expected [classes] or [rows, ..., classes]")
    size = math.prod(shape)
    if raw is not None:
        if len(raw) != size * dtype.itemsize:
            raise _NotProbabilities(
                f"raw_output_contents has {len(raw)} bytes but shape {shape} of "
                f"{output.datatype} needs {size * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
        if not values.flags.aligned:
            values = values.copy()
    else:
        contents = getattr(output.contents, field)
        if len(contents) != size:
            raise _NotProbabilities(
                f"contents.{field} has {len(contents)} values but shape {shape} needs {size}"
            )
        values = np.array(contents, dtype=dtype)
    if size == 0:
        return values
    rows = values.reshape(-1, shape[-1])
    try:
        return (await perturb(rows)).astype(dtype, copy=False)
    except InvalidInput as error:  # the defenses' validation: not probabilities
        raise _NotProbabilities(f"not probabilities: {error}") from None
