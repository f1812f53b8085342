"""Assemble and run the model server: store → handlers → TorchServe's gRPC and REST APIs.

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
from stealguard.modelserver.config import DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, ServerConfig
from stealguard.modelserver.handler import Models
from stealguard.modelserver.metrics import Recorder
from stealguard.modelserver.rest import InferenceRest, RestListener, load_certificates, server_ssl
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


async def start_rest(config: ServerConfig, api: InferenceRest) -> RestListener | None:
    """The REST API on the --listen host at --http-port; None when off. The default port
    is skipped with a warning when taken; one asked for must be free (OSError)."""
    asked = config.http_port is not None
    port = DEFAULT_HTTP_PORT if config.http_port is None else config.http_port
    if not port:
        return None
    host = config.listen.rsplit(":", 1)[0]
    listener = RestListener(api, host, port, ssl_context=server_ssl(config), grace=config.grace)
    try:
        await listener.start()
    except OSError as error:
        if asked:
            raise OSError(f"--http-port {port}: cannot serve REST on {host}: "
                          f"{error.strerror or error}") from None
        log.warning("REST API off: default port %d is taken (%s); pass --http-port",
                    port, error.strerror or error)
        return None
    return listener


class ModelServer(lifecycle.Service):
    """The model server's lifecycle hooks: a first forward pass per model before SERVING;
    the REST listener stopped with the gRPC server."""

    draining = DRAINING

    def __init__(self, models: Models, sidecar: AsyncDefenseClient, app: GrpcApp | None = None,
                 reload=None, rest: RestListener | None = None):
        self.models = models
        self.sidecar = sidecar
        self.core = models.core
        self.app = app
        self.rest = rest
        self._reload = reload
        self.reloadable = reload is not None and app is not None

    def reload(self) -> str:
        """SIGHUP: the token file and TLS certificates of both listeners (the models stay)."""
        settings = self._reload()
        install = self.app.prepare_reload(settings)  # checks every file first
        if self.rest is not None and self.rest.ssl_context is not None:
            load_certificates(self.rest.ssl_context, settings)
        return install() or "nothing to reload"

    async def stop(self) -> None:
        if self.rest is not None:
            rest, self.rest = self.rest, None
            await rest.stop()

    def warm_up(self) -> str:
        started = time.perf_counter()
        self.models.warm_up()
        return f"ready: models warm in {time.perf_counter() - started:.2f}s"

    async def close(self) -> None:
        await self.stop()
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
        streams = stream_guard(config, core)  # one per-principal call count for both APIs
        add_lenient(inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server,
                    InferenceServicer(models, recorder, app.identity, streams), app.server)
        rest = await start_rest(config, InferenceRest(
            models, recorder, app.identity, streams, max_body_bytes=config.max_message_bytes))

        details = (f"{' and client certificates' if config.tls_ca else ''}, sidecar "
                   f"{config.sidecar} ({config.sidecar_transport})"
                   f"{' over TLS' if config.sidecar_tls_ca or config.sidecar_tls_cert else ''}"
                   f"{' with a token' if config.sidecar_token_file else ''}, models: "
                   f"{', '.join(sorted(specs))}")
        if rest is not None:
            details += (f", REST on {'https' if rest.ssl_context else 'http'}://"
                        f"{rest.host}:{rest.port}")
        await lifecycle.run(app, ModelServer(models, sidecar, app, reload, rest),
                            details=details)
