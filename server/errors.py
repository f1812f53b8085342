"""Domain errors: what went wrong, as a kind, with a message a person can act on.

Every stealguard component raises these instead of protocol errors; each front end maps
the kind to its protocol in one place: `stealguard.server.platform.status` for gRPC,
`HTTP_STATUS` here for HTTP (the Envoy ext_proc front end answers HTTP). Nothing here
imports grpc, numpy or numba.

    kind                 gRPC                  HTTP   raised for
    INVALID_INPUT        INVALID_ARGUMENT      400    rows or a request the caller must fix
    NOT_FOUND            NOT_FOUND             404    no policy (or model) by that name
    EXHAUSTED            RESOURCE_EXHAUSTED    429    over max_rows, a rate limit or a quota
    UNAVAILABLE          UNAVAILABLE           503    warming up, draining; retry elsewhere
    UNAUTHENTICATED      UNAUTHENTICATED       401    missing or wrong credentials
    FAILED_PRECONDITION  FAILED_PRECONDITION   400    the operator must fix a policy or model
    INTERNAL             INTERNAL              500    a bug: generic message, traceback logged

An exception that is not a `ProtectError` is a bug, whatever its type (a `ValueError` from
deep inside numpy included): front ends report it as INTERNAL with `INTERNAL_MESSAGE` and
log its traceback, never its text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Kind(enum.Enum):
    """What kind of failure an error is; decides the status code of every protocol."""

    INVALID_INPUT = "invalid input"
    NOT_FOUND = "not found"
    EXHAUSTED = "exhausted"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    FAILED_PRECONDITION = "failed precondition"
    INTERNAL = "internal"


HTTP_STATUS: Mapping[Kind, int] = {
    Kind.INVALID_INPUT: 400,
    Kind.NOT_FOUND: 404,
    Kind.EXHAUSTED: 429,
    Kind.UNAVAILABLE: 503,
    Kind.UNAUTHENTICATED: 401,
    Kind.FAILED_PRECONDITION: 400,
    Kind.INTERNAL: 500,
}

#: What a caller is told about an unexpected exception (its text may hold internals).
INTERNAL_MESSAGE = "internal error; the server logged the details"


class ProtectError(Exception):
    """A failure with a `kind`; `str(error)` is the message the caller gets."""

    kind: Kind = Kind.INTERNAL


class InvalidInput(ProtectError):
    """The caller's rows or request are not valid (the message says which row and why)."""

    kind = Kind.INVALID_INPUT


class NotFound(ProtectError):
    """No policy (or model) of that name, and no default to fall back on."""

    kind = Kind.NOT_FOUND


class Exhausted(ProtectError):
    """Over a limit: too many rows, a rate limit or a quota.

    `retry_after`: seconds after which the same request may succeed (None: not known or
    never, e.g. more rows than any request may hold). `quota`: which limits were broken,
    as {subject: description}, e.g. {"client:shop": "2 requests/s"} (gRPC sends both as
    `google.rpc.RetryInfo` and `google.rpc.QuotaFailure` details; HTTP as Retry-After).
    """

    kind = Kind.EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None,
                 quota: Mapping[str, str] | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.quota = dict(quota or {})


class Unavailable(ProtectError):
    """The server cannot answer now (warming up, draining): retry, maybe elsewhere."""

    kind = Kind.UNAVAILABLE


class Unauthenticated(ProtectError):
    """The caller did not prove who it is (missing or wrong token)."""

    kind = Kind.UNAUTHENTICATED


class FailedPrecondition(ProtectError):
    """The request cannot succeed until an operator changes something (retrying won't)."""

    kind = Kind.FAILED_PRECONDITION


class Internal(ProtectError):
    """A failure the caller cannot fix, with a message that is safe to show."""

    kind = Kind.INTERNAL


def kind_of(error: BaseException) -> Kind:
    """The kind of `error`: its own for a `ProtectError`, INTERNAL for anything else."""
    return error.kind if isinstance(error, ProtectError) else Kind.INTERNAL


def public_message(error: BaseException) -> str:
    """What the caller may be told: the message of a `ProtectError`, else the generic one."""
    return str(error) if isinstance(error, ProtectError) else INTERNAL_MESSAGE


def http_status(error: BaseException) -> int:
    """The HTTP status code for `error` (500 for anything that is not a `ProtectError`)."""
    return HTTP_STATUS[kind_of(error)]


def http_headers(error: BaseException) -> dict[str, str]:
    """HTTP headers that go with `error`'s status: `Retry-After` (whole seconds, rounded
    up) for an `Exhausted` error that knows when to retry."""
    if isinstance(error, Exhausted) and error.retry_after is not None:
        return {"retry-after": str(max(0, -int(-error.retry_after // 1)))}
    return {}
