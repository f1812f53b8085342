"""The channel to the real model server: forwards a call with its metadata and deadline.

Request metadata goes upstream unchanged (authorization included) except the headers
that belong to one hop (user-agent, pseudo-headers, grpc-timeout...); the caller's
remaining deadline becomes the upstream call's timeout. An error status of the upstream
becomes `UpstreamError` with the same code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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


class Upstream:
    """One grpc.aio channel to `address`, created inside the running event loop."""

    def __init__(self, address: str, *, max_message_bytes: int):
        self.address = address
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )

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
        try:
            return await method(request, **self._options(context))
        except grpc.aio.AioRpcError as rpc_error:
            raise self.error(rpc_error) from None

    async def stream(self, method: Callable, request: Any, context) -> AsyncIterator[Any]:
        """Call a stream-response `method` (request may be an async iterator); yield replies."""
        call = method(request, **self._options(context))
        try:
            async for response in call:
                yield response
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
