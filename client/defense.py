"""Clients of the sidecar's Defense API: `DefenseClient` (blocking) and `AsyncDefenseClient`.

Each holds one channel for its lifetime and puts a deadline on every call. Errors are
`SidecarError` with the gRPC status code, so callers can tell a bad request
(INVALID_ARGUMENT) from a sidecar that is down (UNAVAILABLE, DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from stealguard.client.stream import BlockingPerturbStream, PerturbStream, StreamBroken
from stealguard.server.codec import array_to_tensor, tensor_to_array
from stealguard.v1 import defense_pb2, defense_pb2_grpc

_MAX_MESSAGE = 64 * 1024 * 1024
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# After the shared stream could not reach the sidecar (UNAVAILABLE: down, restarting,
# draining), perturb calls go unary for this many seconds, so that an outage does not cost
# every call a failed stream first.
STREAM_PAUSE = 1.0
# A sidecar that is warming up or draining answers UNAVAILABLE: try another connection
# (another worker or replica) within the call's deadline before giving up.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "stealguard.v1.Defense"}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


class SidecarError(RuntimeError):
    """A Defense call failed; `code` is the `grpc.StatusCode`, `details` the server's text."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def read_token_file(path: str | os.PathLike[str], flag: str) -> str:
    """The one bearer token in the file at `path` (blank lines and `#` comments skipped);
    ValueError starting with `flag` when it cannot be read or does not hold exactly one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag}: cannot read {path}: {error}") from None
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1:
        raise ValueError(f"{flag}: {path} must hold exactly one token (found {len(lines)} "
                         "non-comment lines)")
    return lines[0]


def channel_credentials(
    tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (CA to trust; client cert and key for mutual TLS)."""
    if not (tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together: give both for mutual TLS, or neither")
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def _channel_args(options: list[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.service_config", _SERVICE_CONFIG),
        *(options or []),
    ]


def _request(probs: np.ndarray, model: str, logits: bool, request_id: str,
             principal: str = "", charged: bool = False):
    array = np.asarray(probs)
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    return defense_pb2.PerturbRequest(
        probabilities=array_to_tensor(array), model=model, logits=logits,
        request_id=request_id, principal=principal, charged=charged
    )


def status_code(number: int) -> grpc.StatusCode:
    """The `grpc.StatusCode` of a `google.rpc.Status` code number; UNKNOWN for none."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def _answer(response: defense_pb2.PerturbResponse) -> np.ndarray:
    """The probabilities of a reply, or `SidecarError` for a stream reply that carries the
    error its request was rejected with (keep_stream_on_error)."""
    if response.HasField("error"):
        raise SidecarError(status_code(response.error.code), response.error.message)
    return tensor_to_array(response.probabilities)


def _policies(response: defense_pb2.ListPoliciesResponse) -> list[dict[str, Any]]:
    return [
        {"name": p.name, "defense": p.defense, "params": dict(p.params)}
        for p in response.policies
    ]


class _Base:
    def __init__(self, target: str, timeout: float, token: str | None,
                 credentials: grpc.ChannelCredentials | None):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._credentials = credentials
        self._stream = None
        self._stream_paused_until = 0.0

    def _stream_usable(self) -> bool:
        return self._stream is not None and time.monotonic() >= self._stream_paused_until

    def _stream_broke(self, broken: StreamBroken) -> None:
        if broken.code == grpc.StatusCode.UNAVAILABLE:
            self._stream_paused_until = time.monotonic() + STREAM_PAUSE

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        if not timeout > 0:
            raise SidecarError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no time left for the sidecar call (timeout {timeout:.3f}s)")
        return timeout


class DefenseClient(_Base):
    """Blocking client: `perturb(probs, model="", logits=False) -> np.ndarray`.

    `stream=True`: every `perturb` is one message on a long-lived `PerturbStream` shared by
    the threads that call it (as `AsyncDefenseClient(stream=True)`; a reader thread hands
    out the answers). Create it in the process that uses it, after any fork.
    """

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 1.0, *,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, Any]] | None = None, stream: bool = False):
        super().__init__(target, timeout, token, credentials)
        args = _channel_args(options)
        self.channel = (
            grpc.secure_channel(target, credentials, options=args)
            if credentials
            else grpc.insecure_channel(target, options=args)
        )
        self._stub = defense_pb2_grpc.DefenseStub(self.channel)
        self._stream = BlockingPerturbStream(self._stub, self._metadata) if stream else None

    def perturb(self, probs: np.ndarray, model: str = "", logits: bool = False, *,
                request_id: str = "", timeout: float | None = None,
                principal: str = "", charged: bool = False) -> np.ndarray:
        """The protected copy of `probs` (1-D or 2-D float); raises `SidecarError`.

        `timeout`: seconds for this call (default: the client's), e.g. what is left of the
        caller's own deadline. `principal`: the end client the rows are charged to (the
        sidecar believes it only from a gateway token); `charged`: this caller has charged
        them to `principal` already, under limits of its own (believed likewise)."""
        request = _request(probs, model, logits, request_id, principal, charged)
        seconds = self._timeout(timeout)
        deadline = time.monotonic() + seconds
        try:
            if self._stream_usable():
                try:
                    return _answer(self._stream.send(request, seconds))
                except StreamBroken as broken:
                    # one retry of this request alone, within what is left of its deadline
                    self._stream_broke(broken)
                    seconds = self._timeout(deadline - time.monotonic())
            response = self._stub.Perturb(request, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as error:
            raise SidecarError(error.code(), error.details() or "") from None
        except TimeoutError as error:
            raise SidecarError(grpc.StatusCode.DEADLINE_EXCEEDED, str(error)) from None
        return tensor_to_array(response.probabilities)

    def policies(self) -> list[dict[str, Any]]:
        """Every policy the sidecar holds: [{"name", "defense", "params"}]."""
        try:
            response = self._stub.ListPolicies(
                defense_pb2.ListPoliciesRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise SidecarError(error.code(), error.details() or "") from None
        return _policies(response)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.channel.close()

    def __enter__(self) -> DefenseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDefenseClient(_Base):
    """asyncio client with the same methods as `DefenseClient`, awaited.

    `stream=True` sends every `perturb` over one long-lived `PerturbStream` that concurrent
    calls share, instead of one unary `Perturb` each: the same answers in about half the
    round trip (see stealguard.client.stream). Create it inside the event loop that
    will use it.
    """

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float = 1.0, *,
                 token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, Any]] | None = None, stream: bool = False):
        super().__init__(target, timeout, token, credentials)
        args = _channel_args(options)
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options=args)
            if credentials
            else grpc.aio.insecure_channel(target, options=args)
        )
        self._stub = defense_pb2_grpc.DefenseStub(self.channel)
        self._stream = PerturbStream(self._stub, self._metadata) if stream else None

    async def perturb(self, probs: np.ndarray, model: str = "", logits: bool = False, *,
                      request_id: str = "", timeout: float | None = None,
                      principal: str = "", charged: bool = False) -> np.ndarray:
        """The protected copy of `probs`; raises `SidecarError` (`timeout`, `principal`
        and `charged` as the sync one)."""
        request = _request(probs, model, logits, request_id, principal, charged)
        seconds = self._timeout(timeout)
        deadline = time.monotonic() + seconds
        try:
            if self._stream_usable():
                try:
                    async with asyncio.timeout(seconds):
                        response = await self._stream.send(request)
                    return _answer(response)
                except StreamBroken as broken:
                    # one retry of this request alone, within what is left of its deadline
                    self._stream_broke(broken)
                    seconds = self._timeout(deadline - time.monotonic())
            response = await self._stub.Perturb(request, timeout=seconds,
                                                metadata=self._metadata)
        except grpc.RpcError as error:
            raise SidecarError(error.code(), error.details() or "") from None
        except TimeoutError:
            raise SidecarError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no answer on the stream within {seconds:.3f}s") from None
        return tensor_to_array(response.probabilities)

    async def policies(self) -> list[dict[str, Any]]:
        try:
            response = await self._stub.ListPolicies(
                defense_pb2.ListPoliciesRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise SidecarError(error.code(), error.details() or "") from None
        return _policies(response)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        await self.channel.close()

    async def __aenter__(self) -> AsyncDefenseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
