"""Who is calling: the principal that limits, metering and per-client metrics charge.

`Identity` authenticates a call and gathers what the transport knows (token, mTLS subject,
peer, client header); the rules that turn that into a principal are the trust model of
`stealguard.server.principal`, in one place:

1. with a token file, the name of the presented bearer token (a call without a valid one
   is refused: `Unauthenticated`);
2. else the common name of the mTLS client certificate;
3. else the peer's IP address (`peer:10.0.0.7`).

The client header (`--client-header`, default `x-client-id`) and a message's own
`principal` field name the end client only for a gateway token (`name:token:gateway`)
or with `--trust-client-header`; from anyone else they are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from stealguard.server.errors import Unauthenticated
from stealguard.server.platform.credentials import Tokens
from stealguard.server.principal import Caller, principal_of, speaks_for_others

UNAUTHENTICATED_MESSAGE = ("missing or wrong bearer token: send metadata "
                           "'authorization: Bearer <token>' with a token from the server's "
                           "token file")


class Identity:
    """Authenticates callers and names them (see the module docstring)."""

    def __init__(self, tokens: Tokens | None = None, client_header: str = "x-client-id",
                 mtls: bool = False, trust_client_header: bool = False):
        self.tokens = tokens
        self.client_header = client_header.lower()
        self.mtls = mtls
        self.trust_client_header = trust_client_header

    def authenticate(self, metadata: Mapping[str, str]) -> str | None:
        """The token's name; None when no token file is configured. Raises
        `Unauthenticated` when one is and the call has no valid token."""
        if self.tokens is None:
            return None
        name = self.tokens.client_of(metadata.get("authorization"))
        if name is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return name

    def caller_of(self, metadata: Mapping[str, str], subject: str | None = None,
                  peer: str = "") -> Caller:
        """What is known of a caller from its metadata, mTLS `subject` and `peer`.
        Raises `Unauthenticated` like `authenticate`."""
        name = self.authenticate(metadata)
        asserted = metadata.get(self.client_header)
        return Caller(token_name=name,
                      gateway=bool(name and self.tokens and name in self.tokens.gateways),
                      mtls_subject=subject, peer=peer,
                      asserted=asserted if isinstance(asserted, str) else None)

    def principal(self, metadata: Mapping[str, str], subject: str | None = None,
                  peer: str = "") -> str:
        """The caller's principal (see the module docstring)."""
        return principal_of(self.caller_of(metadata, subject, peer), self.trust_client_header)

    def caller(self, context) -> Caller:
        """What is known of the caller of a gRPC call (`grpc.aio.ServicerContext`)."""
        metadata = _as_dict(context.invocation_metadata())
        subject = None
        if self.mtls:
            names = context.auth_context().get("x509_common_name")
            if names:
                subject = names[0].decode(errors="replace")
        return self.caller_of(metadata, subject, context.peer())

    def of(self, context) -> str:
        """The principal of a gRPC call."""
        return principal_of(self.caller(context), self.trust_client_header)

    def speaks_for_others(self, caller: Caller | None) -> bool:
        """Whether `caller` is believed when it names its end client (`speaks_for_others`)."""
        return caller is not None and speaks_for_others(caller, self.trust_client_header)

    def end_principal(self, caller: Caller, asserted: str) -> str:
        """The principal of one message that names its end client `asserted` (a gateway's
        shared stream): believed as the client header would be, else the caller's own."""
        if asserted:
            caller = Caller(caller.token_name, caller.gateway, caller.mtls_subject,
                            caller.peer, asserted)
        return principal_of(caller, self.trust_client_header)


def _as_dict(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict:
    return {key: value for key, value in (metadata or ())}
