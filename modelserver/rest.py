"""TorchServe's REST inference API over the model handlers: the HTTP twin of
`stealguard.modelserver.servicer`.

    GET  /ping                                  {"status": "Healthy"}; 503 "Unhealthy"
                                                while warming up or draining
    POST /predictions/{model}[/{version}]       the request body is the input `data`
    PUT  /predictions/{model}[/{version}]       (PNG or .npy, as over gRPC); a
                                                multipart form gives one input per field

An answer is the handler's JSON (a probability vector, or a list of them for a batch),
after the same protect step as over gRPC: the sidecar's perturbation, label-only rows
when the sidecar cannot answer. Errors are JSON, `{"code", "type", "message"}` as
TorchServe sends them, with the HTTP status of the error's kind
(`stealguard.server.errors.HTTP_STATUS`) and `Retry-After` when a limit knows when.

Callers are named by the same `Identity` as over gRPC: the bearer token in
`Authorization`, the mTLS subject, the client header from a gateway, else the peer's
address. Bodies are bounded by `--max-message-bytes` (413 above it).
"""

from __future__ import annotations

import logging
import ssl

from aiohttp import web
from stealguard.modelserver.handler import Models
from stealguard.modelserver.metrics import Recorder
from stealguard.server import errors
from stealguard.server.errors import Unavailable
from stealguard.server.metering.inflight import StreamGuard
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.status import GRPC_CODE

log = logging.getLogger("stealguard.modelserver")

ROUTES = ("POST or PUT /predictions/{model}[/{version}] with the input as the body, "
          "or GET /ping")


class InferenceRest:
    """The REST API's request handlers over `Models` (see the module docstring)."""

    def __init__(self, models: Models, recorder: Recorder | None = None,
                 identity: Identity | None = None, streams: StreamGuard | None = None, *,
                 max_body_bytes: int = 64 << 20):
        self.models = models
        self.recorder = recorder or Recorder(enabled=False)
        self.identity = identity or Identity()
        self.streams = streams or StreamGuard()
        self.max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes,
                              middlewares=[self._as_json_errors])
        app.router.add_get("/ping", self.ping, allow_head=True)
        for path in ("/predictions/{model}", "/predictions/{model}/{version}"):
            app.router.add_post(path, self.predictions)
            app.router.add_put(path, self.predictions)
        return app

    async def ping(self, request: web.Request) -> web.Response:
        if self.models.core.unavailable is not None:
            return web.json_response({"status": "Unhealthy",
                                      "message": self.models.core.unavailable}, status=503)
        return web.json_response({"status": "Healthy"})

    async def predictions(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        version = request.match_info.get("version", "")
        principal = self.identity.principal(_metadata(request), _subject(request),
                                            _peer(request))
        with self.recorder.prediction(model, principal) as outcome:
            try:
                if self.models.core.unavailable is not None:
                    raise Unavailable(self.models.core.unavailable)
                handler = self.models.get(model, version)
                inputs = await _inputs(request)
                with self.streams.call(principal):  # --max-calls-per-principal
                    prediction = await handler.handle(inputs, None, principal)
            except Exception as error:
                outcome.code = GRPC_CODE[errors.kind_of(error)].name
                outcome.limited = isinstance(error, errors.Exhausted)
                raise
        return web.Response(body=prediction, content_type="application/json")

    @web.middleware
    async def _as_json_errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure as TorchServe's JSON error; a bug as a generic 500, logged."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "too_large",
                                  f"request body over {self.max_body_bytes} bytes "
                                  "(the server's --max-message-bytes)")
        except web.HTTPNotFound:
            return error_response(404, "not_found",
                                  f"no endpoint {request.path}; the inference API serves "
                                  f"{ROUTES}")
        except web.HTTPMethodNotAllowed as refused:
            return error_response(405, "method_not_allowed",
                                  f"{request.method} {request.path} is not served; use "
                                  f"{' or '.join(sorted(refused.allowed_methods))}",
                                  {"allow": ",".join(sorted(refused.allowed_methods))})
        except web.HTTPException:
            raise
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            if not isinstance(error, errors.ProtectError):
                log.error("internal error on %s %s", request.method, request.path,
                          exc_info=error)
            headers = errors.http_headers(error)
            if isinstance(error, errors.Unauthenticated):
                headers["www-authenticate"] = "Bearer"
            return error_response(errors.http_status(error), errors.kind_of(error).name.lower(),
                                  errors.public_message(error), headers)


def error_response(status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """TorchServe's error body: {"code": status, "type": kind, "message": message}."""
    return web.json_response({"code": status, "type": kind, "message": message},
                             status=status, headers=headers)


async def _inputs(request: web.Request) -> dict[str, bytes]:
    """The handler's inputs: a multipart form's fields by name, else the body as `data`."""
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        return {name: value.file.read() if hasattr(value, "file") else str(value).encode()
                for name, value in form.items()}
    return {"data": await request.read()}


def _metadata(request: web.Request) -> dict[str, str]:
    return {key.lower(): value for key, value in request.headers.items()}


def _peer(request: web.Request) -> str:
    """The peer in gRPC's form (`ipv4:1.2.3.4:5`), which the principal rules read."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return ""
    host, port = peer[0], peer[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _subject(request: web.Request) -> str | None:
    """The common name of a verified client certificate (mutual TLS), else None."""
    certificate = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def server_ssl(settings) -> ssl.SSLContext | None:
    """The REST listener's TLS from the same `--tls-cert`/`--tls-key` (and `--tls-ca` for
    client certificates) as the gRPC listener; None without TLS."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificates(context, settings)
    return context


def load_certificates(context: ssl.SSLContext, settings) -> None:
    """(Re)load the certificate files into `context`: new handshakes use them (SIGHUP)."""
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca:
        context.load_verify_locations(settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED


class RestListener:
    """The REST API's listener: bound before warm-up (so /ping answers "Unhealthy"),
    stopped after the drain with the same grace for requests in flight."""

    def __init__(self, api: InferenceRest, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, grace: float = 5.0):
        self.api, self.host, self.port = api, host.strip("[]"), port
        self.ssl_context = ssl_context
        self.runner = web.AppRunner(api.application(), handle_signals=False,
                                    access_log=None, shutdown_timeout=grace)

    async def start(self) -> int:
        """Bind and serve; returns the bound port. OSError when the port is taken."""
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            raise
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        await self.runner.cleanup()

