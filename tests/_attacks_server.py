"""A tiny real TorchServe-gRPC prediction server for the attack tests.

    python tests/_attacks_server.py --listen 127.0.0.1:PORT

Serves a scikit-learn logistic regression trained on the owner's part of sklearn digits
(load_dataset("digits")) through org.pytorch.serve.grpc.inference.InferenceAPIsService:
model `digits` behind stealguard's default defense (coarse_confidence on its defaults),
`digits-rs` behind the paper's Reverse Sigmoid (beta 1.5, gamma 0.3, preserve_top1) and
`digits-open` unprotected. Input "data" is a float32 .npy batch (N, 1, 8, 8); the
prediction is a JSON list of probability vectors. Unknown models get NOT_FOUND.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import threading
from concurrent import futures

import grpc
import numpy as np
from sklearn.linear_model import LogisticRegression
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.datasets import load_dataset
from stealguard.server.defenses import make_defense

BETA, GAMMA = 1.5, 0.3


def train_model() -> LogisticRegression:
    ds = load_dataset("digits", seed=0)
    return LogisticRegression(max_iter=2000).fit(ds.base_x.reshape(len(ds.base_x), -1), ds.base_y)


class Servicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def __init__(self, model: LogisticRegression):
        self.model = model
        self.defenses = {
            "digits": make_defense("coarse_confidence", secret=b"the server's own"),
            "digits-rs": make_defense("reverse_sigmoid", beta=BETA, gamma=GAMMA,
                                      preserve_top1=True),
            "digits-open": None,
        }

    def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health='{"status": "Healthy"}')

    def Predictions(self, request, context):
        if request.model_name not in self.defenses:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} not found")
        try:
            x = np.load(io.BytesIO(request.input["data"]), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input 'data': {e}")
        probs = self.model.predict_proba(x.reshape(len(x), -1).astype(np.float64))
        defense = self.defenses[request.model_name]
        if defense is not None:
            probs = defense(probs)
        return inference_pb2.PredictionResponse(prediction=json.dumps(probs.tolist()).encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(train_model()), server)
    server.add_insecure_port(args.listen)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
