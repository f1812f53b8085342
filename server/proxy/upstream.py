"""The channel to the real model server: forwards a call with its metadata and deadline.

Plaintext, or TLS when `credentials` are given (`upstream_credentials`: the CA that signed
the upstream's certificate, and a client certificate for mutual TLS).

Request metadata goes upstream unchanged (authorization included) except the headers
that belong to one hop (user-agent, pseudo-headers, grpc-timeout...); the caller's
remaining deadline becomes the upstream call's timeout. The upstream's initial and trailing
metadata come back to the caller by the same rule. An error status of the upstream
becomes `UpstreamError` with the same code, message and trailing metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from stealguard.server.proxy.errors import Metadata, UpstreamError

# Metadata that describes one hop of the call, not the call: never forwarded.
_HOP_KEYS = frozenset(
    {"user-agent", "te", "content-type", "host", "grpc-timeout", "grpc-encoding",
     "grpc-accept-encoding", "grpc-status", "grpc-message"}
)


def forwardable(metadata: Metadata | None) -> tuple[tuple[str, Any], ...]:
    """The entries of `metadata` that go on to the next hop."""
    return tuple(
        (key, value)
        for key, value in (metadata or ())
        if not key.startswith(":") and key not in _HOP_KEYS
    )


def upstream_credentials(ca: str = "", cert: str = "",
                         key: str = "") -> grpc.ChannelCredentials | None:
    """TLS credentials for the upstream channel from PEM files; None (plaintext) without a
    CA. OSError naming the flag of a file that cannot be read."""
    if not (ca or cert or key):
        return None
    if not ca:
        raise OSError("--upstream-tls-cert/--upstream-tls-key need --upstream-tls-ca: the CA "
                      "that signed the upstream's certificate")
    pems = {}
    for flag, path in (("--upstream-tls-ca", ca), ("--upstream-tls-cert", cert),
                       ("--upstream-tls-key", key)):
        try:
            pems[flag] = Path(path).read_bytes() if path else None
        except OSError as error:
            raise OSError(f"{flag}: cannot read {path}: {error.strerror}") from None
    return grpc.ssl_channel_credentials(pems["--upstream-tls-ca"], pems["--upstream-tls-key"],
                                        pems["--upstream-tls-cert"])


async def _send_initial(call, context) -> None:
    """The upstream's initial metadata, on to the caller (nothing sent when none is left)."""
    initial = forwardable(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)


def _set_trailing(trailing: Metadata | None, context) -> None:
    kept = forwardable(trailing)
    if kept:
        context.set_trailing_metadata(kept)


class Upstream:
    """One grpc.aio channel to `address` (TLS with `credentials`), created inside the
    running event loop."""

    def __init__(self, address: str, *, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.channel = (grpc.aio.secure_channel(address, credentials, options=options)
                        if credentials else grpc.aio.insecure_channel(address, options=options))

    def _options(self, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        return {
            "metadata": forwardable(context.invocation_metadata()) or None,
            "timeout": context.time_remaining(),
        }

    def error(self, rpc_error: grpc.aio.AioRpcError) -> UpstreamError:
        """The `UpstreamError` for a failed upstream call (UNAVAILABLE names the upstream)."""
        code, details = rpc_error.code(), rpc_error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"upstream {self.address} is unavailable: {details}"
        return UpstreamError(code, details, forwardable(rpc_error.trailing_metadata()))

    async def unary(self, method: Callable, request: Any, context) -> Any:
        """Call a unary-response `method` of a stub on this channel, as `context`'s caller did."""
        call = method(request, **self._options(context))
        try:
            response = await call
        except grpc.aio.AioRpcError as rpc_error:
            raise self.error(rpc_error) from None
        await _send_initial(call, context)
        _set_trailing(await call.trailing_metadata(), context)
        return response

    async def stream(self, method: Callable, request: Any, context) -> AsyncIterator[Any]:
        """Call a stream-response `method` (request may be an async iterator); yield replies."""
        call = method(request, **self._options(context))
        try:
            await _send_initial(call, context)
            async for response in call:
                yield response
            _set_trailing(await call.trailing_metadata(), context)
        except grpc.aio.AioRpcError as rpc_error:
            raise self.error(rpc_error) from None
        finally:
            call.cancel()  # no-op once finished; stops the upstream call if the caller left

    async def probe(self, method: Callable, request: Any, timeout: float) -> Any:
        """A call of the proxy's own (health), no caller metadata; raises `UpstreamError`."""
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as rpc_error:
            raise self.error(rpc_error) from None

    async def close(self) -> None:
        await self.channel.close()
