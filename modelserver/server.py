"""Assemble and run the model server: store → handlers → TorchServe gRPC API.

The gRPC plumbing (health, reflection, signals, graceful drain) is the sidecar's
`GrpcApp`, the one place that starts a stealguard server.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from stealguard.client import AsyncDefenseClient, channel_credentials
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.config import DEFAULT_METRICS_PORT, ServerConfig
from stealguard.modelserver.handler import Models
from stealguard.modelserver.metrics import Recorder
from stealguard.modelserver.servicer import InferenceServicer
from stealguard.modelserver.store import ensure_default_models, read_store
from stealguard.server import metrics
from stealguard.server.lenient import add_lenient
from stealguard.server.server import GrpcApp

log = logging.getLogger("stealguard.modelserver")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name


def prepare_store(config: ServerConfig) -> dict:
    """Fill an empty store with the default models (training if needed); read its manifests."""
    ensure_default_models(config.model_store, log=log.info)
    specs = read_store(config.model_store)
    for spec in specs.values():
        log.info("model %s: %s from %s, %s", spec.name, spec.architecture, spec.weights.name,
                 f"protected by sidecar policy {spec.policy!r}" if spec.protected
                 else "unprotected (policy none)")
    return specs


def serve_metrics(config: ServerConfig) -> int:
    """Start /metrics; the port it serves on, 0 for none.

    A port that was asked for must be free (OSError otherwise); the default one is
    skipped with a warning when taken, so several model servers on one host all start.
    """
    port = DEFAULT_METRICS_PORT if config.metrics_port is None else config.metrics_port
    if port == 0:
        return 0
    try:
        metrics.serve(port)
    except OSError as error:
        if config.metrics_port is not None:
            raise OSError(f"--metrics-port {port}: cannot serve metrics: {error.strerror}") \
                from None
        log.warning("metrics off: default port %d is taken (%s); pass --metrics-port",
                    port, error.strerror)
        return 0
    log.info("metrics on :%d/metrics", port)
    return port


def sidecar_client(config: ServerConfig) -> AsyncDefenseClient:
    """The sidecar client, with the configured TLS and token."""
    credentials = channel_credentials(config.sidecar_tls_ca or None,
                                      config.sidecar_tls_cert or None,
                                      config.sidecar_tls_key or None)
    return AsyncDefenseClient(config.sidecar, timeout=config.sidecar_timeout,
                              token=config.read_sidecar_token(), credentials=credentials,
                              stream=config.sidecar_transport == "stream")


async def run_modelserver(config: ServerConfig) -> None:
    """Serve the store's models until SIGTERM/SIGINT, then drain."""
    torch.set_num_threads(config.torch_threads)
    config = dataclasses.replace(config, metrics_port=serve_metrics(config))
    specs = prepare_store(config)
    recorder = Recorder(enabled=config.metrics_port > 0, models=specs)
    sidecar = sidecar_client(config)
    # one inference thread: each forward pass already uses torch_threads cores
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as executor:
        models = Models(specs, sidecar, executor, config.max_batch, recorder)
        models.warm_up()
        app = GrpcApp.from_config(config, [INFERENCE_SERVICE], logger=log)
        add_lenient(inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server,
                    InferenceServicer(models, recorder), app.server)
        port = await app.start()
        # torch, the models and grpc live as long as the process: keep their objects out
        # of every later garbage collection pass (as the sidecar does)
        gc.collect()
        gc.freeze()
        await app.set_serving(True)
        host = config.listen.rsplit(":", 1)[0]
        log.info("listening on %s:%d (pid %d)%s%s, sidecar %s (%s)%s%s, models: %s", host,
                 port, os.getpid(), " with TLS" if config.tls_cert else "",
                 " and client certificates" if config.tls_ca else "", config.sidecar,
                 config.sidecar_transport,
                 " over TLS" if config.sidecar_tls_ca or config.sidecar_tls_cert else "",
                 " with a token" if config.sidecar_token_file else "",
                 ", ".join(sorted(specs)))
        try:
            await app.wait_and_drain()
        finally:
            await sidecar.close()
