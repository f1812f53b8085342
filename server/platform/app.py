"""`GrpcApp`: the one place that assembles a stealguard gRPC server.

A `grpc.aio` server with the message-size and concurrency limits, SO_REUSEPORT for
workers, TLS, the interceptors that the settings call for, health (NOT_SERVING until the
lifecycle says otherwise) and reflection. What it serves is added by the front end; when
it serves is `stealguard.server.platform.lifecycle`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from stealguard.server.platform.credentials import Certificates, Tokens
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.interceptors import (
    AuthInterceptor,
    CallMetricsInterceptor,
    RequestBytesInterceptor,
)
from stealguard.server.settings import ConfigError

log = logging.getLogger("stealguard.platform")


class GrpcApp:
    """A grpc.aio server with health and reflection; `identity` names its callers."""

    def __init__(self, listen: str, services: Iterable[str], *, max_message_bytes: int,
                 logger: logging.Logger = log, reuse_port: bool = False, grace: float = 5.0,
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                 max_in_flight: int | None = None, identity: Identity | None = None,
                 certificates: Certificates | None = None, reflect: bool = True,
                 bounded: bool = False):
        self.listen = listen
        self.log = logger
        self.services = list(services)
        self.grace = grace
        self.credentials = credentials
        self.certificates = certificates  # reloadable TLS (`credentials` comes from it)
        self.identity = identity or Identity()
        self.server = grpc.aio.server(
            interceptors=list(interceptors) or None,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # with a bound on request bytes, a call waiting to be read must not have
                # its message buffered anyway: no window growth beyond gRPC's 64 KiB
                *([("grpc.http2.bdp_probe", 0)] if bounded else []),
            ],
            # beyond this many concurrent calls gRPC answers RESOURCE_EXHAUSTED at once;
            # None or 0: no limit (gRPC's limiter creates one task per call)
            maximum_concurrent_rpcs=max_in_flight or None,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflect:  # --reflection (default on: the schema is the public .proto files)
            reflection.enable_server_reflection(
                [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )

    @classmethod
    def from_settings(cls, settings, services: Iterable[str], *, reuse_port: bool = False,
                      logger: logging.Logger = log) -> GrpcApp:
        """A server with the listener, limits, TLS, tokens and metrics of `settings` (any
        object with the attributes of `stealguard.server.settings.ServerSettings`)."""
        tokens = Tokens.from_file(settings.token_file) if settings.token_file else None
        identity = Identity(tokens, settings.client_header, mtls=bool(settings.tls_ca),
                            trust_client_header=settings.trust_client_header)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tokens is not None:
            interceptors.append(AuthInterceptor(identity))
        if settings.metrics_port:
            interceptors.append(CallMetricsInterceptor())
        bound = getattr(settings, "max_request_bytes", 0)
        if bound:  # last: it reads the message, after the others have let the call in
            interceptors.append(RequestBytesInterceptor(bound, settings.max_message_bytes))
        certificates = Certificates.from_settings(settings)
        return cls(settings.listen, services, max_message_bytes=settings.max_message_bytes,
                   logger=logger, reuse_port=reuse_port, grace=settings.grace,
                   credentials=certificates.credentials() if certificates else None,
                   interceptors=interceptors, max_in_flight=settings.max_in_flight,
                   identity=identity, certificates=certificates,
                   reflect=getattr(settings, "reflection", True), bounded=bool(bound))

    def prepare_reload(self, settings):
        """Read the token file and certificates of new `settings` (SIGHUP); returns
        `install() -> str`, which swaps them in (from the next call, the next handshake)
        and says what it did. Raises `ConfigError` and keeps the old ones if a file is
        bad, or if tokens or TLS would be turned on or off (that needs a restart)."""
        installs, notes = [], []
        if bool(settings.token_file) != (self.identity.tokens is not None):
            raise ConfigError("turning bearer tokens on or off needs a restart; SIGHUP only "
                              "reloads the token file")
        if settings.token_file:
            tokens = Tokens.from_file(settings.token_file)
            installs.append(lambda: setattr(self.identity, "tokens", tokens))
            notes.append(f"{len(tokens)} token(s)")
        if self.certificates is not None or settings.tls_cert:
            if self.certificates is None:
                raise ConfigError("turning TLS on needs a restart")
            installs.append(self.certificates.prepare(settings))
            notes.append("certificates")

        def install() -> str:
            for each in installs:
                each()
            return ", ".join(notes)

        return install

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start, NOT_SERVING until `set_serving(True)`. Returns the bound port."""
        await self.set_serving(False)
        try:
            if self.credentials is not None:
                port = self.server.add_secure_port(self.listen, self.credentials)
            else:
                port = self.server.add_insecure_port(self.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or not valid")
        await self.server.start()
        return port

    async def stop(self) -> None:
        """NOT_SERVING, refuse new calls, give calls in flight `grace` seconds, stop."""
        await self.set_serving(False)
        await self.server.stop(self.grace)
