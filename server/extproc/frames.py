"""gRPC's length-prefixed messages in an HTTP/2 body, as Envoy buffers them for ext_proc.

Each message is a 1-byte compressed flag, a 4-byte big-endian length and the message
bytes. A compressed message is decompressed when its `grpc-encoding` is gzip (or
identity, which compresses nothing) and refused otherwise; the messages are framed back
uncompressed, which gRPC allows whatever `grpc-encoding` says.
"""

from __future__ import annotations

import struct
import zlib

_PREFIX = struct.Struct(">?I")


class FrameError(ValueError):
    """A body that is not whole gRPC messages, or one compressed with an unknown encoding."""


def deframe(body: bytes, encoding: str = "identity", *, max_bytes: int) -> list[bytes]:
    """The messages of `body`, decompressed; no message may be larger than `max_bytes`."""
    messages = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _PREFIX.size:
            raise FrameError(f"the body ends in {len(body) - offset} bytes that are not a "
                             "whole gRPC message prefix (5 bytes)")
        compressed, length = _PREFIX.unpack_from(body, offset)
        offset += _PREFIX.size
        if length > len(body) - offset:
            raise FrameError(f"a gRPC message says it has {length} bytes but the body holds "
                             f"{len(body) - offset} more")
        message = body[offset:offset + length]
        offset += length
        messages.append(_decompress(message, encoding, max_bytes) if compressed else message)
    return messages


def frame(messages: list[bytes]) -> bytes:
    """The uncompressed gRPC body of `messages`."""
    return b"".join(_PREFIX.pack(False, len(m)) + m for m in messages)


def _decompress(message: bytes, encoding: str, max_bytes: int) -> bytes:
    if encoding not in ("gzip", "identity", ""):
        raise FrameError(f"a gRPC message is compressed with {encoding!r}: only gzip can be "
                         "read; ask the client or upstream for gzip or no compression")
    if encoding != "gzip":
        raise FrameError("a gRPC message is flagged compressed but grpc-encoding is identity")
    return gunzip(message, max_bytes=max_bytes, what="a gzip gRPC message")


def gunzip(data: bytes, *, max_bytes: int, what: str = "a gzip body") -> bytes:
    """`data` decompressed, refused (FrameError) past `max_bytes` so a bomb stays small."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(data, max_bytes + 1)
    except zlib.error as error:
        raise FrameError(f"{what} does not decompress: {error}") from None
    if len(plain) > max_bytes or inflater.unconsumed_tail:
        raise FrameError(f"{what} decompresses to more than {max_bytes} bytes")
    return plain
