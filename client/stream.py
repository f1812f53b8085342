"""One long-lived `PerturbStream` that concurrent `perturb` calls share: `PerturbStream`
for `AsyncDefenseClient(stream=True)`, `BlockingPerturbStream` for `DefenseClient(stream=True)`.

A unary `Perturb` pays for a new HTTP/2 stream, its headers and its trailers on every call;
on an open `PerturbStream` each request is one message each way. On this project's 2-core
test machine a unary round trip to the sidecar takes 0.6-0.8 ms at p50 and a message on an
open stream 0.25-0.35 ms (README, Performance).

Answers are matched to requests by `request_id`, which the sidecar echoes, so a caller that
gave up can never be handed another caller's probabilities. Every message asks for
`keep_stream_on_error`: a request the sidecar rejects gets a reply carrying the error
status (the clients raise it as `SidecarError`) and the stream goes on for its neighbours.
When the stream itself ends (the sidecar restarts or drains, or is too old to know the
flag and ends the stream on a bad message), every request still waiting on it raises
`StreamBroken`, and the client retries it once as a unary `Perturb` within its own
deadline. The next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import Future

import grpc
from stealguard.v1 import defense_pb2


class StreamBroken(Exception):
    """The stream ended before this request's answer came; `reason` says how, `code` is the
    stream's gRPC status when it ended with one."""

    def __init__(self, reason: str, code: grpc.StatusCode | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Stream:
    """One open call, its reader task and the requests waiting for an answer on it."""

    def __init__(self, call):
        self.call = call
        self.waiting: dict[str, asyncio.Future] = {}
        self.ended = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        reason, code = "the sidecar closed the stream", None
        try:
            async for response in self.call:
                future = self.waiting.get(response.request_id)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as error:
            reason, code = f"{error.code().name}: {error.details() or ''}", error.code()
        except asyncio.CancelledError:
            reason = "the client closed the stream"
        finally:
            self.ended = True
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(StreamBroken(reason, code))

    def cancel(self) -> None:
        self.call.cancel()
        self.reader.cancel()


class PerturbStream:
    """Sends `PerturbRequest`s over one shared stream, opened on first use and reopened
    after it ends. Create and use it inside one event loop."""

    def __init__(self, stub, metadata):
        self._stub = stub
        self._metadata = metadata
        self._stream: _Stream | None = None
        self._write = asyncio.Lock()  # one write at a time on a call
        self._ids = itertools.count()

    def _current(self) -> _Stream:
        if self._stream is None or self._stream.ended or self._stream.call.done():
            self._stream = _Stream(self._stub.PerturbStream(metadata=self._metadata))
        return self._stream

    async def send(self, request: defense_pb2.PerturbRequest) -> defense_pb2.PerturbResponse:
        """The sidecar's answer to `request`. Raises `StreamBroken`; a caller's timeout
        cancels only this request. On the wire `request_id` carries a key unique on the
        stream; the request and the answer keep the caller's."""
        caller_id = request.request_id
        key = f"{next(self._ids)}/{caller_id}"
        future = asyncio.get_running_loop().create_future()
        async with self._write:
            stream = self._current()
            stream.waiting[key] = future
            request.request_id = key
            request.keep_stream_on_error = True
            try:
                await stream.call.write(request)
            except asyncio.CancelledError:
                # half a message may be on the wire: this stream cannot be trusted further
                stream.cancel()
                raise
            except (grpc.RpcError, asyncio.InvalidStateError) as error:
                stream.waiting.pop(key, None)
                code = error.code() if isinstance(error, grpc.RpcError) else None
                raise StreamBroken(f"the stream ended before the request was sent: {error}",
                                   code) from None
            finally:
                request.request_id = caller_id
                request.keep_stream_on_error = False
        try:
            response = await future
        finally:
            stream.waiting.pop(key, None)
        response.request_id = caller_id
        return response

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            await asyncio.gather(self._stream.reader, return_exceptions=True)
            self._stream = None


class _BlockingStream:
    """One open call of the blocking client: a queue feeds its request iterator, a reader
    thread hands each answer to the thread waiting for it."""

    def __init__(self, stub, metadata, lock: threading.Lock):
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: dict[str, Future] = {}
        self.ended = False
        self._lock = lock  # the owner's: registering a request and ending exclude each other
        self.call = stub.PerturbStream(self._send(), metadata=metadata)
        self.reader = threading.Thread(target=self._read, name="stealguard-stream", daemon=True)
        self.reader.start()

    def _send(self):
        while (request := self.requests.get()) is not None:
            yield request

    def _read(self) -> None:
        reason, code = "the sidecar closed the stream", None
        try:
            for response in self.call:
                future = self.waiting.get(response.request_id)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as error:
            reason, code = f"{error.code().name}: {error.details() or ''}", error.code()
        finally:
            with self._lock:
                self.ended = True
                waiting = list(self.waiting.values())
            for future in waiting:
                if not future.done():
                    future.set_exception(StreamBroken(reason, code))
            self.requests.put(None)  # ends the request iterator

    def cancel(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class BlockingPerturbStream:
    """`PerturbStream`'s blocking form, safe to share between threads. The same sharing,
    matching by key and `StreamBroken` rule; create it in the process that uses it."""

    def __init__(self, stub, metadata):
        self._stub = stub
        self._metadata = metadata
        self._stream: _BlockingStream | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def send(self, request: defense_pb2.PerturbRequest,
             timeout: float) -> defense_pb2.PerturbResponse:
        """The sidecar's answer to `request` within `timeout` seconds (TimeoutError after
        that, StreamBroken if the stream ends first). The request is not changed."""
        wire = defense_pb2.PerturbRequest()
        wire.CopyFrom(request)  # the sending thread serialises it later
        wire.request_id = key = f"{next(self._ids)}/{request.request_id}"
        wire.keep_stream_on_error = True
        future: Future = Future()
        with self._lock:
            if self._stream is None or self._stream.ended:
                self._stream = _BlockingStream(self._stub, self._metadata, self._lock)
            stream = self._stream
            stream.waiting[key] = future
            stream.requests.put(wire)
        try:
            response = future.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer on the stream within {timeout:.3f}s") from None
        finally:
            stream.waiting.pop(key, None)
        response.request_id = request.request_id
        return response

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
            stream.reader.join(5)
