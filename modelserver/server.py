"""Assemble and run the model server: store → handlers → TorchServe gRPC API.

The gRPC plumbing (health, reflection, signals, graceful drain) is the sidecar's
`GrpcApp`, the one place that starts a stealguard server.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from stealguard.client import AsyncDefenseClient
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.config import ServerConfig
from stealguard.modelserver.handler import Models
from stealguard.modelserver.servicer import InferenceServicer
from stealguard.modelserver.store import ensure_default_models, read_store
from stealguard.server.server import GrpcApp

log = logging.getLogger("stealguard.modelserver")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch of 5,000 float64 MNIST images is 31 MB


def prepare_store(config: ServerConfig) -> dict:
    """Fill an empty store with the default models (training if needed); read its manifests."""
    ensure_default_models(config.model_store, log=log.info)
    specs = read_store(config.model_store)
    for spec in specs.values():
        log.info("model %s: %s from %s, %s", spec.name, spec.architecture, spec.weights.name,
                 f"protected by sidecar policy {spec.policy!r}" if spec.protected
                 else "unprotected (policy none)")
    return specs


async def run_modelserver(config: ServerConfig) -> None:
    """Serve the store's models until SIGTERM/SIGINT, then drain."""
    torch.set_num_threads(config.torch_threads)
    specs = prepare_store(config)
    sidecar = AsyncDefenseClient(config.sidecar, timeout=config.sidecar_timeout)
    # one inference thread: each forward pass already uses torch_threads cores
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as executor:
        models = Models(specs, sidecar, executor, config.max_batch)
        models.warm_up()
        app = GrpcApp(config.listen, [INFERENCE_SERVICE], max_message_bytes=MAX_MESSAGE_BYTES)
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
            InferenceServicer(models), app.server
        )
        port = await app.start()
        await app.set_serving(True)
        host = config.listen.rsplit(":", 1)[0]
        log.info("listening on %s:%d (pid %d), sidecar %s, models: %s", host, port,
                 os.getpid(), config.sidecar, ", ".join(sorted(specs)))
        try:
            await app.wait_and_drain()
        finally:
            await sidecar.close()
