"""Channels and the one-call coroutines the load loops drive.

Requests go out as pre-serialised bytes and replies are not parsed (no serializer on the
multicallable): the client spends its CPU on the transport, not on protobuf.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from stealguard.client.defense import status_code
from stealguard.v1 import defense_pb2

from .config import LoadConfig, Security

METHOD_PATHS = {
    "perturb": "/stealguard.v1.Defense/Perturb",
    "perturb-stream": "/stealguard.v1.Defense/PerturbStream",
    "predictions": "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
}

OK = "OK"


class TargetUnreachable(RuntimeError):
    """The target did not accept a connection; the message is one line for the user."""


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from None


def call_metadata(security: Security) -> tuple[tuple[str, str], ...] | None:
    """Per-call metadata: ``authorization: Bearer <token>`` when a token file is given."""
    if not security.token_file:
        return None
    token = _read(security.token_file, "--token-file").decode().strip()
    if not token:
        raise ValueError(f"--token-file {security.token_file}: the file is empty")
    return (("authorization", f"Bearer {token}"),)


def open_channel(cfg: LoadConfig) -> grpc.aio.Channel:
    """A channel with its own TCP connection (no subchannel sharing between channels)."""
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        ("grpc.primary_user_agent", "stealguard-load"),
    ]
    sec = cfg.security
    if sec.tls_ca is None:
        return grpc.aio.insecure_channel(cfg.target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(sec.tls_ca, "--tls-ca"),
        private_key=_read(sec.tls_key, "--tls-key") if sec.tls_key else None,
        certificate_chain=_read(sec.tls_cert, "--tls-cert") if sec.tls_cert else None,
    )
    if sec.tls_server_name:
        options.append(("grpc.ssl_target_name_override", sec.tls_server_name))
    return grpc.aio.secure_channel(cfg.target, creds, options=options)


async def wait_reachable(channel: grpc.aio.Channel, cfg: LoadConfig) -> None:
    """Return once ``channel`` is connected; TargetUnreachable (one line) when the connection
    is refused or not made within ``cfg.connect_timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.connect_timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            break
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        except asyncio.TimeoutError:
            break
        state = channel.get_state(try_to_connect=True)
    else:
        return
    # The connectivity state says nothing about why; one fail-fast call carries gRPC's reason.
    detail = "no connection"
    try:
        probe = channel.unary_unary(METHOD_PATHS[cfg.method])
        await probe(b"", timeout=min(1.0, cfg.connect_timeout), wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return  # it answered after all: slow to connect, not unreachable
        detail = (exc.details() or detail).splitlines()[0]
    raise TargetUnreachable(f"cannot reach {cfg.target}: {detail}")


async def _within(seconds: float, coro):
    """``await coro`` or asyncio.TimeoutError after ``seconds``."""
    if sys.version_info >= (3, 11):  # asyncio.timeout: no extra task per call
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


class _EndedBeforeWrite(Exception):
    """The server had ended the stream when a message was written to it."""


#: What grpc.aio reports for a write to a call the server had just ended, in place of the
#: server's own status (grpc/grpc#36066).
_CORE_WRITE_ERROR = "Internal error from Core"


async def _exchange(stream, request: bytes):
    try:
        await stream.write(request)
    except asyncio.InvalidStateError:
        raise _EndedBeforeWrite from None
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == _CORE_WRITE_ERROR:
            raise _EndedBeforeWrite from None
        raise
    return await stream.read()


class UnaryCaller:
    """Sends the next request of the pool as one unary call; returns the status code name."""

    def __init__(self, channel, cfg: LoadConfig, requests: list[bytes], start: int, metadata):
        self._call = channel.unary_unary(METHOD_PATHS[cfg.method])
        self._requests = requests
        self._i = start
        self.index, self.reply, self.details = 0, b"", ""  # of the last call (--responses)
        self._timeout = cfg.timeout
        self._metadata = metadata

    async def __call__(self) -> str:
        self.index = self._i % len(self._requests)
        self._i += 1
        try:
            self.reply = await self._call(self._requests[self.index], timeout=self._timeout,
                                          metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.details = exc.details()
            return exc.code().name
        return OK

    async def aclose(self) -> None:
        return None


# A PerturbResponse that answers starts with field 1 (probabilities); one that refuses its
# request (keep_stream_on_error) has none and carries the status in `error`.
_PROBABILITIES_TAG = b"\x0a"


class StreamCaller:
    """One request is one message on a long-lived bidirectional stream, timed to its reply.

    A message the sidecar refuses is answered with its status (the requests ask for
    keep_stream_on_error), counted by that code, and the stream goes on. A broken stream
    (error, timeout, early end) counts one error and is reopened on the next call, so one
    failure never poisons the replies that follow.
    """

    def __init__(self, channel, cfg: LoadConfig, requests: list[bytes], start: int, metadata):
        self._open = channel.stream_stream(METHOD_PATHS[cfg.method])
        self._requests = requests
        self._i = start
        self.index, self.reply, self.details = 0, b"", ""  # of the last call (--responses)
        self._timeout = cfg.timeout
        self._metadata = metadata
        self._stream = None

    async def __call__(self) -> str:
        self.index = self._i % len(self._requests)
        self._i += 1
        if self._stream is None:
            self._stream = self._open(metadata=self._metadata)
        stream = self._stream
        try:
            reply = await _within(self._timeout, _exchange(stream, self._requests[self.index]))
        except asyncio.TimeoutError:
            self._drop()
            self.details = f"no reply on the stream within {self._timeout:g}s"
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        except grpc.aio.AioRpcError as exc:
            self._drop()
            self.details = exc.details()
            return exc.code().name
        except _EndedBeforeWrite:  # ended by the server before this write (refused)
            return await self._ended(stream)
        if reply is grpc.aio.EOF:
            return await self._ended(stream)
        self.reply = reply
        if not reply.startswith(_PROBABILITIES_TAG):  # not an answer: perhaps a refusal
            error = defense_pb2.PerturbResponse.FromString(reply).error
            if error.code:
                self.details = error.message
                return status_code(error.code).name
        return OK

    async def _ended(self, stream) -> str:
        """The server ended the stream: its status says why; the next call opens another."""
        self._stream = None
        code, details = await stream.code(), await stream.details()
        if code == grpc.StatusCode.INTERNAL and details == _CORE_WRITE_ERROR:
            code, details = grpc.StatusCode.OK, ("the server ended the stream before this "
                                                 "message; grpc.aio hides its status "
                                                 "(grpc/grpc#36066)")
        self.details = details or "the server ended the stream"
        return "STREAM_ENDED" if code == grpc.StatusCode.OK else code.name

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            await stream.done_writing()
            await _within(1.0, stream.code())
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            stream.cancel()


def make_caller(channel, cfg: LoadConfig, requests: list[bytes], start: int, metadata):
    """The caller for ``cfg.method`` over ``channel``."""
    cls = StreamCaller if cfg.method == "perturb-stream" else UnaryCaller
    return cls(channel, cfg, requests, start, metadata)
