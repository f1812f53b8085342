"""Who is calling: the principal that limits, metering and per-client metrics charge.

The rules (kept behind `Identity`, so that they change in one place):

1. with a token file, the name of the presented bearer token (a call without a valid one
   is refused: `Unauthenticated`);
2. else the common name of the mTLS client certificate;
3. else the value of the client header (`--client-header`, default `x-client-id`),
   cut to 128 characters;
4. else `anonymous`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from stealguard.server.core import ANONYMOUS
from stealguard.server.errors import Unauthenticated
from stealguard.server.platform.credentials import Tokens

MAX_PRINCIPAL = 128
UNAUTHENTICATED_MESSAGE = ("missing or wrong bearer token: send metadata "
                           "'authorization: Bearer <token>' with a token from the server's "
                           "token file")


class Identity:
    """Authenticates callers and names them (see the module docstring)."""

    def __init__(self, tokens: Tokens | None = None, client_header: str = "x-client-id",
                 mtls: bool = False):
        self.tokens = tokens
        self.client_header = client_header.lower()
        self.mtls = mtls

    def authenticate(self, metadata: Mapping[str, str]) -> str | None:
        """The token's name; None when no token file is configured. Raises
        `Unauthenticated` when one is and the call has no valid token."""
        if self.tokens is None:
            return None
        name = self.tokens.client_of(metadata.get("authorization"))
        if name is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return name

    def principal(self, metadata: Mapping[str, str], subject: str | None = None) -> str:
        """The caller's principal from its request metadata and mTLS `subject` (the
        certificate's common name, if any). Raises `Unauthenticated` like `authenticate`."""
        name = self.authenticate(metadata)
        if name is None and subject:
            name = subject
        if name is None:
            name = str(metadata.get(self.client_header) or ANONYMOUS)[:MAX_PRINCIPAL]
        return name

    def of(self, context) -> str:
        """The principal of a gRPC call (`grpc.aio.ServicerContext`)."""
        metadata = _as_dict(context.invocation_metadata())
        subject = None
        if self.mtls:
            names = context.auth_context().get("x509_common_name")
            if names:
                subject = names[0].decode(errors="replace")
        return self.principal(metadata, subject)


def _as_dict(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict:
    return {key: value for key, value in (metadata or ())}
