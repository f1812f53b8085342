"""Assemble and run the model server: store → handlers → TorchServe gRPC API.

The gRPC plumbing (health, reflection, interceptors) is the platform's `GrpcApp` and the
lifecycle (warm-up -> SERVING -> drain) the platform's `lifecycle.run`, as for the sidecar
and the proxy. The platform imports no defense, so this process does not load numba.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from stealguard.client import AsyncDefenseClient, channel_credentials
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.config import DEFAULT_METRICS_PORT, ServerConfig
from stealguard.modelserver.handler import Models
from stealguard.modelserver.metrics import Recorder
from stealguard.modelserver.servicer import InferenceServicer
from stealguard.modelserver.store import ensure_default_models, read_store
from stealguard.modelserver.watch import class_mix_of, watch_of
from stealguard.server.core import ProtectCore
from stealguard.server.metering.settings import meter_of, stream_guard
from stealguard.server.platform import lifecycle
from stealguard.server.platform import metrics as platform_metrics
from stealguard.server.platform.app import GrpcApp
from stealguard.server.platform.lenient import add_lenient

log = logging.getLogger("stealguard.modelserver")

WARMING_UP = "the model server is warming up its models; retry shortly"
DRAINING = "the model server is draining; retry on another instance"

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
    """Start /metrics (the platform's endpoint); the port it serves on, 0 for none. The
    default port is skipped with a warning when taken; one asked for must be free."""
    return platform_metrics.serve_metrics(config.metrics_port, log,
                                          default=DEFAULT_METRICS_PORT, settings=config)


def sidecar_client(config: ServerConfig) -> AsyncDefenseClient:
    """The sidecar client, with the configured TLS and token."""
    credentials = channel_credentials(config.sidecar_tls_ca or None,
                                      config.sidecar_tls_cert or None,
                                      config.sidecar_tls_key or None)
    return AsyncDefenseClient(config.sidecar, timeout=config.sidecar_timeout,
                              token=config.read_sidecar_token(), credentials=credentials,
                              stream=config.sidecar_transport == "stream")


class ModelServer(lifecycle.Service):
    """The model server's lifecycle hooks: a first forward pass per model before SERVING."""

    draining = DRAINING

    def __init__(self, models: Models, sidecar: AsyncDefenseClient, app: GrpcApp | None = None,
                 reload=None):
        self.models = models
        self.sidecar = sidecar
        self.core = models.core
        self.app = app
        self._reload = reload
        self.reloadable = reload is not None and app is not None

    def reload(self) -> str:
        """SIGHUP: the token file and TLS certificates (the models stay)."""
        return self.app.prepare_reload(self._reload())() or "nothing to reload"

    def warm_up(self) -> str:
        started = time.perf_counter()
        self.models.warm_up()
        return f"ready: models warm in {time.perf_counter() - started:.2f}s"

    async def close(self) -> None:
        await self.sidecar.close()
        if self.models.core.limiter is not None:
            await self.models.core.limiter.close()  # unspent leases back to the store


async def run_modelserver(config: ServerConfig, reload=None) -> None:
    """Serve the store's models until SIGTERM/SIGINT, then drain; SIGHUP calls `reload`
    for a new config and swaps in its token file and certificates."""
    torch.set_num_threads(config.torch_threads)
    config = dataclasses.replace(config, metrics_port=serve_metrics(config))
    specs = prepare_store(config)
    recorder = Recorder(enabled=config.metrics_port > 0, models=specs,
                        protected=[name for name, spec in specs.items() if spec.protected])
    limiter = meter_of(config)
    sidecar = sidecar_client(config)
    watch = watch_of(config, specs.values())  # PRADA, on the inputs the handlers see
    class_mix = class_mix_of(config)  # on the answers, in the core
    observers = [o for o in (recorder if recorder.enabled else None, class_mix) if o]
    # one inference thread: each forward pass already uses torch_threads cores
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as executor:
        core = ProtectCore(None, limiter=limiter, observers=observers,
                           escalation=watch or class_mix)
        core.refuse(WARMING_UP)
        models = Models(specs, sidecar, executor, config.max_batch, recorder, core, watch)
        app = GrpcApp.from_settings(config, [INFERENCE_SERVICE], logger=log)
        add_lenient(inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server,
                    InferenceServicer(models, recorder, app.identity,
                                      stream_guard(config, core)), app.server)

        details = (f"{' and client certificates' if config.tls_ca else ''}, sidecar "
                   f"{config.sidecar} ({config.sidecar_transport})"
                   f"{' over TLS' if config.sidecar_tls_ca or config.sidecar_tls_cert else ''}"
                   f"{' with a token' if config.sidecar_token_file else ''}, models: "
                   f"{', '.join(sorted(specs))}")
        await lifecycle.run(app, ModelServer(models, sidecar, app, reload), details=details)
