"""``--responses FILE.jsonl``: every measured call's outcome and decoded reply, one JSON line
each, for checks that need the answers and not only their timing (e.g. that a model server
never returns raw probabilities while its sidecar is down).

A line: ``{"t": seconds from the start of the run to the send, "request": index of the
request in the pool, "code": "OK" | status name, "reply": ...}`` (``"details"`` instead of
``"reply"`` for an error). With ``--payload``, request ``i`` carries rows (or samples)
``i*batch .. (i+1)*batch - 1`` of the file, wrapping around its end.
"""

from __future__ import annotations

import json
from typing import IO

from stealguard.compat.torchserve import inference_pb2
from stealguard.server.codec import tensor_to_array
from stealguard.v1 import defense_pb2

from .calls import OK


def _perturb_reply(data: bytes) -> dict:
    msg = defense_pb2.PerturbResponse.FromString(data)
    return {"policy": msg.policy, "probabilities": tensor_to_array(msg.probabilities).tolist()}


def _prediction_reply(data: bytes):
    text = inference_pb2.PredictionResponse.FromString(data).prediction.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: kept as the server sent it


class ResponseLog:
    """Writes one JSON line per call; called by the load loop after every measured call."""

    def __init__(self, path: str, method: str, start: float) -> None:
        self.file: IO[str] = open(path, "w")  # noqa: SIM115 - closed by close()
        self.decode = _prediction_reply if method == "predictions" else _perturb_reply
        self.start = start

    def __call__(self, caller, code: str, sent: float) -> None:
        line: dict = {"t": round(sent - self.start, 6), "request": caller.index, "code": code}
        if code == OK:
            line["reply"] = self.decode(caller.reply)
        else:
            line["details"] = caller.details
        self.file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.file.close()
