"""`envoy.service.ext_proc.v3.ExternalProcessor`: protect inference answers inside Envoy.

Envoy opens one `Process` stream per HTTP request and sends, in order, the request
headers, (for TorchServe gRPC) the request body, the response headers and the BUFFERED
response body. Each stream is an `_Exchange`:

- request headers: the route (`bodies.route_of`) and the end principal (the configured
  header, which the gateway sets, else the caller of this stream); the answer sets the
  processing mode for this request, so calls that carry no probabilities pass untouched.
  Envoy may skip them (`request_header_mode: SKIP`, as deploy/envoy/envoy.yaml does on
  every route but TorchServe gRPC's): the same facts then come with the response headers
  as `response_attributes` (`request.path`, `request.method` and the request's
  `content-type` and principal header), one message fewer per request. Response headers
  with neither are refused (503): the route is unknown, so nothing may pass;
- response headers: a non-2xx answer carries an error, not probabilities, and passes (the
  body is not sent to the processor);
- response body: parsed, its rows protected by the protect core (limits, metering and
  metrics for the end principal), the body rewritten with `content-length` fixed. Fail
  closed: rows that parsed but cannot be protected now (warming up, draining, a bug) are
  answered label-only; a body that holds no probabilities the policy can read is a 503
  with a JSON error (unless the policy says `on_unrecognized: pass`); the core's other
  refusals (a limit, no policy) get their HTTP status from `stealguard.server.errors`.
  Errors to gRPC calls are `ImmediateResponse`s with the gRPC status of
  `stealguard.server.platform.status`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from stealguard.server import errors
from stealguard.server.config import Config
from stealguard.server.core import ANONYMOUS, ProtectCore
from stealguard.server.extproc import bodies
from stealguard.server.extproc.frames import FrameError, gunzip
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.platform.status import grpc_status
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicies, ProxyPolicy

log = logging.getLogger("stealguard.extproc")

#: `async (rows, model, principal) -> (protected rows, policy name)`: `ProtectCore.protect`.
Protect = Callable[[np.ndarray, str, str], Awaitable[tuple[np.ndarray, str]]]
#: The core's refusals that mean "not now", not "not this": answered label-only.
_LABEL_ONLY = (errors.Kind.UNAVAILABLE, errors.Kind.INTERNAL)
#: An answer that holds no probabilities the policy can read.
INVALID = "invalid"

SERVICE = ext.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
LABEL_ONLY_HEADER = "x-stealguard-label-only"
#: Where Envoy puts the `request_attributes`/`response_attributes` of its ext_proc filter.
ATTRIBUTES = "envoy.filters.http.ext_proc"
_HEADER_ATTRIBUTE = re.compile(r"""request\.headers\[\s*['"]([^'"]+)['"]\s*\]""")
NO_ROUTE = ("stealguard cannot tell which API this answer belongs to: Envoy sent neither "
            "the request headers nor the request.path and request.method response "
            "attributes; configure the ext_proc filter as deploy/envoy/envoy.yaml does")

_Mode = processing_mode_pb2.ProcessingMode
# Calls with no probabilities: nothing more is sent to the processor.
_PASS = _Mode(request_header_mode=_Mode.SEND, response_header_mode=_Mode.SKIP,
              request_body_mode=_Mode.NONE, response_body_mode=_Mode.NONE,
              request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP)
# An answer that passes, told at its response headers: its body is not sent.
_PASS_BODY = _Mode(request_header_mode=_Mode.SKIP, response_header_mode=_Mode.SEND,
                   request_body_mode=_Mode.NONE, response_body_mode=_Mode.NONE,
                   request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP)
_PROTECT = _Mode(request_header_mode=_Mode.SEND, response_header_mode=_Mode.SEND,
                 request_body_mode=_Mode.NONE, response_body_mode=_Mode.BUFFERED,
                 request_trailer_mode=_Mode.SKIP, response_trailer_mode=_Mode.SKIP)
# TorchServe's gRPC answer does not name its model: the request does.
_PROTECT_WITH_REQUEST = _Mode(request_header_mode=_Mode.SEND,
                              response_header_mode=_Mode.SEND,
                              request_body_mode=_Mode.BUFFERED,
                              response_body_mode=_Mode.BUFFERED,
                              request_trailer_mode=_Mode.SKIP,
                              response_trailer_mode=_Mode.SKIP)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    """Serves `Process` with a `Protect` callable and each model's `ProxyPolicy` options
    (`on_unrecognized`, v2 `outputs`)."""

    def __init__(self, protect: Protect, options: Callable[[str], ProxyPolicy], *,
                 principal_header: str, max_bytes: int, identity: Identity | None = None):
        self.protect = protect
        self.options = options
        self.principal_header = principal_header.lower()
        self.max_bytes = max_bytes
        self.identity = identity

    async def Process(self, request_iterator, context) -> AsyncIterator[ext.ProcessingResponse]:
        # the stream's caller (Envoy) speaks for the end principal its header names
        caller = self.identity.of(context) if self.identity is not None else ANONYMOUS
        exchange = _Exchange(self, caller)
        async for request in request_iterator:
            try:
                yield await exchange.answer(request)
            except Exception:  # noqa: BLE001 - fail closed, never pass what is unread
                log.exception("internal error while processing %s", exchange.route)
                yield _refusal(exchange.route, errors.Internal(errors.INTERNAL_MESSAGE),
                               errors.INTERNAL_MESSAGE)


class _Exchange:
    """One HTTP request and its answer, as Envoy shows them to the processor."""

    def __init__(self, service: ExternalProcessorServicer, caller: str):
        self.service = service
        self.principal = caller
        self.route: bodies.Route | None = None
        self.seen_request = False  # Envoy sent the request headers (not skipped)
        self.passes = False  # the answer is an error: it passes unchanged
        self.headers: dict[str, str] = {}

    async def answer(self, request: ext.ProcessingRequest) -> ext.ProcessingResponse:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            self.seen_request = True
            refusal = self._learn_request(_headers(request.request_headers))
            if refusal is not None:
                return refusal
            return ext.ProcessingResponse(request_headers=ext.HeadersResponse(),
                                          mode_override=self._request_mode())
        if kind == "request_body":
            if self.route is not None and self.route.api == bodies.TORCHSERVE_GRPC:
                model = bodies.request_model(request.request_body.body,
                                             self.headers.get("grpc-encoding", "identity"),
                                             max_bytes=self.service.max_bytes)
                self.route = bodies.Route(self.route.api, model)
            return ext.ProcessingResponse(request_body=ext.BodyResponse())
        if kind == "response_headers":
            return self._response_headers(request)
        if kind == "response_body":
            return await self._response_body(request.response_body.body)
        return ext.ProcessingResponse(**{kind: ext.TrailersResponse()})

    def _learn_request(self, headers: dict[str, str]) -> ext.ProcessingResponse | None:
        """The route and end principal from the request's headers (or the attributes that
        stand for them); a refusal for a call that is never protected here."""
        self.principal = headers.get(self.service.principal_header) or self.principal
        self.route = bodies.route_of(headers.get(":method", ""), headers.get(":path", ""),
                                     headers.get("content-type", ""))
        if self.route is not None and self.route.api in bodies.STREAMING_METHODS:
            return _grpc_error(grpc.StatusCode.UNIMPLEMENTED,
                               f"{self.route.api}: streaming inference is not protected "
                               "through Envoy ext_proc; call the unary method")
        if self.route is not None:
            # kept for gRPC's grpc-encoding of the request message
            self.headers = headers
        return None

    def _request_mode(self) -> _Mode:
        return (_PASS if self.route is None
                else _PROTECT_WITH_REQUEST if self.route.api == bodies.TORCHSERVE_GRPC
                else _PROTECT)

    def _response_headers(self, request: ext.ProcessingRequest) -> ext.ProcessingResponse:
        headers = _headers(request.response_headers)
        if not self.seen_request:  # Envoy skipped them: the attributes stand for them
            facts = _request_facts(request, headers)
            if facts is None:
                log.error("%s", NO_ROUTE)
                if headers.get("content-type", "").startswith("application/grpc"):
                    return _grpc_error(grpc.StatusCode.FAILED_PRECONDITION, NO_ROUTE)
                return _refusal(None, INVALID, NO_ROUTE)
            refusal = self._learn_request(facts)
            if refusal is not None:
                return refusal
        self.headers = headers
        self.passes = not headers.get(":status", "200").startswith("2")
        if self.route is None or self.passes:  # nothing to protect: the body goes by
            return ext.ProcessingResponse(response_headers=ext.HeadersResponse(),
                                          mode_override=_PASS_BODY)
        return ext.ProcessingResponse(response_headers=ext.HeadersResponse())

    async def _response_body(self, body: bytes) -> ext.ProcessingResponse:
        route = self.route
        if route is None or self.passes:
            return ext.ProcessingResponse(response_body=ext.BodyResponse())
        try:
            options = self.service.options(route.model)
        except errors.ProtectError as error:  # NotFound: no policy and no default
            return _refusal(route, error, str(error))
        decompressed = False
        try:
            encoding = self.headers.get("grpc-encoding", "identity")
            if not route.grpc:
                body, decompressed = self._decoded(body)
            answer = bodies.Answer(route, body, options, encoding=encoding,
                                   max_bytes=self.service.max_bytes)
        except (FrameError, Unrecognized) as error:
            return _refusal(route, INVALID, str(error))

        async def perturb(rows: np.ndarray) -> np.ndarray:
            return (await self.service.protect(rows, answer.model, self.principal))[0]

        try:
            rewritten = await answer.rewrite(perturb)
        except Unrecognized as error:
            return _refusal(route, INVALID, str(error))
        except Exception as error:  # noqa: BLE001 - each kind has its answer
            if errors.kind_of(error) not in _LABEL_ONLY:  # a limit, no policy: refused
                return _refusal(route, error, errors.public_message(error))
            if not isinstance(error, errors.ProtectError):
                log.error("protecting %s failed; answering label-only", route, exc_info=error)
            return self._label_only(route, await answer.rewrite(bodies.label_only),
                                    errors.public_message(error))
        if answer.passed or rewritten == body:
            return self._replaced(body if decompressed else None, decompressed)
        return self._replaced(rewritten, decompressed)

    def _decoded(self, body: bytes) -> tuple[bytes, bool]:
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("identity", ""):
            return body, False
        if encoding != "gzip":
            raise FrameError(f"the answer is compressed with {encoding!r}: only gzip can be "
                             "read")
        return gunzip(body, max_bytes=self.service.max_bytes), True

    def _replaced(self, body: bytes | None, decompressed: bool) -> ext.ProcessingResponse:
        """Continue, with `body` (None: unchanged) and the headers that go with it."""
        if body is None:
            return ext.ProcessingResponse(response_body=ext.BodyResponse())
        mutation = ext.HeaderMutation()
        if "content-length" in self.headers:
            mutation.set_headers.append(_header("content-length", str(len(body))))
        if decompressed:
            mutation.remove_headers.append("content-encoding")
        return ext.ProcessingResponse(response_body=ext.BodyResponse(
            response=ext.CommonResponse(header_mutation=mutation,
                                        body_mutation=ext.BodyMutation(body=body))))

    def _label_only(self, route: bodies.Route, body: bytes,
                    reason: str) -> ext.ProcessingResponse:
        """The answer with each row as its label only: a rewritten gRPC body (Envoy cannot
        send a gRPC message in an immediate response), or an immediate JSON answer."""
        log.warning("answering label-only (%s): %s", route, reason)
        if route.grpc:
            response = self._replaced(body, False)
            response.response_body.response.header_mutation.set_headers.append(
                _header(LABEL_ONLY_HEADER, _one_line(reason)))
            return response
        return ext.ProcessingResponse(immediate_response=ext.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=200),
            headers=ext.HeaderMutation(set_headers=[
                _header("content-type", "application/json"),
                _header(LABEL_ONLY_HEADER, _one_line(reason))]),
            body=body, details="stealguard_label_only"))


def _refusal(route: bodies.Route | None, cause: str | BaseException,
             message: str) -> ext.ProcessingResponse:
    """An immediate error answer: a gRPC status, or an HTTP status with a JSON error.
    `cause` is INVALID (an answer that holds no probabilities the policy can read: 503,
    the upstream's or operator's to fix, not the caller's) or the core's error."""
    if cause == INVALID:
        code, status, kind, headers = grpc.StatusCode.FAILED_PRECONDITION, 503, INVALID, {}
    else:
        code, status = grpc_status(cause).code, errors.http_status(cause)
        kind, headers = errors.kind_of(cause).name.lower(), errors.http_headers(cause)
    if route is not None and route.grpc:
        return _grpc_error(code, message)
    body = json.dumps({"error": message, "code": status, "kind": kind,
                       "source": "stealguard"}).encode()
    return ext.ProcessingResponse(immediate_response=ext.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ext.HeaderMutation(set_headers=[
            _header("content-type", "application/json"),
            *(_header(k, v) for k, v in headers.items())]),
        body=body, details=f"stealguard_{kind}"))


def _grpc_error(code: grpc.StatusCode, message: str) -> ext.ProcessingResponse:
    return ext.ProcessingResponse(immediate_response=ext.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=200),
        grpc_status=ext.GrpcStatus(status=code.value[0]),
        body=message.encode(), details=f"stealguard_{code.name.lower()}"))


def _request_facts(request: ext.ProcessingRequest,
                   response_headers: dict[str, str]) -> dict[str, str] | None:
    """The request's `:path`, `:method` and headers from the attributes Envoy sent with
    this message (`request.path`, `request.method`, `request.headers['name']`), or None
    without the path or the method (every request has both: the filter is not configured
    to send them). A header the request lacked is absent, as Envoy leaves it out; so is
    one the filter was not asked for, which is why a missing content type is taken from
    the answer (a gRPC answer is application/grpc): an inference call is never mistaken
    for one without probabilities and passed."""
    if ATTRIBUTES not in request.attributes:
        return None
    fields = request.attributes[ATTRIBUTES].fields
    if "request.path" not in fields or "request.method" not in fields:
        return None
    facts = {":path": fields["request.path"].string_value,
             ":method": fields["request.method"].string_value}
    for key, value in fields.items():
        header = _HEADER_ATTRIBUTE.fullmatch(key)
        if header is not None and value.HasField("string_value"):
            facts[header.group(1).lower()] = value.string_value
    if "content-type" not in facts and "content-type" in response_headers:
        facts["content-type"] = response_headers["content-type"]
    return facts


def _headers(message: ext.HttpHeaders) -> dict[str, str]:
    """Lower-cased header names to values (Envoy sends raw_value, older Envoys value)."""
    return {h.key.lower(): h.raw_value.decode("latin-1") if h.raw_value else h.value
            for h in message.headers.headers}


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1", "replace")),
        append_action=_OVERWRITE)


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def add_extproc(server: grpc.aio.Server, core: ProtectCore, policies: ProxyPolicies,
                identity: Identity, config: Config) -> ExternalProcessorServicer:
    """Serve ExternalProcessor on `server` beside the `Defense` servicer, over the same
    protect core; the end principal is the request's `client_header`, which the gateway in
    front sets. Swap `options` on reload (with the core's policies)."""
    service = ExternalProcessorServicer(core.protect, policies.resolve,
                                        principal_header=config.client_header,
                                        max_bytes=config.max_message_bytes, identity=identity)
    add_lenient(external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server, service,
                server)
    return service
