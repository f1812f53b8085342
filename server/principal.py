"""Who a caller is, for limits and counts: the trust model, with no gRPC in it.

The principal is, in order:
1. the name of the caller's bearer token (`name:token` in the token file);
2. else the common name of its mTLS client certificate;
3. else its peer address: the IP (never the port, which changes with every connection),
   an IPv6 address by its /64 network (one host is given a /64), `peer:` in front.

A client-supplied `x-client-id` (the `--client-header`) is believed only from callers
trusted to speak for their users: a token marked as a gateway in the token file
(`name:token:gateway`), or anyone when `--trust-client-header` says the server sits behind
an authenticating gateway. Then the asserted name is the principal, the same budget as
that name has anywhere else, so a query entering through the model server or the proxy is
charged once, to its end principal. From anyone else the header is ignored: rotating it
does not make a new principal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

GATEWAY_MARK = ":gateway"
MAX_NAME = 128


@dataclass(frozen=True)
class Caller:
    """What the transport knows about a caller (every field may be empty)."""

    token_name: str | None = None  # the bearer token's name, when one was accepted
    gateway: bool = False  # that token is marked as a gateway
    mtls_subject: str | None = None  # the client certificate's common name
    peer: str = ""  # the transport's peer, e.g. gRPC's "ipv4:10.0.0.7:53122"
    asserted: str | None = None  # the client header's value


def speaks_for_others(caller: Caller, trust_client_header: bool = False) -> bool:
    """Whether `caller` may name the end client it is charged as (and say it has charged
    it already): a gateway token, or anyone with --trust-client-header."""
    return trust_client_header or bool(caller.token_name and caller.gateway)


def principal_of(caller: Caller, trust_client_header: bool = False) -> str:
    """The principal `caller` is charged as (see the module docstring)."""
    asserted = (caller.asserted or "").strip()[:MAX_NAME]
    if asserted and speaks_for_others(caller, trust_client_header):
        return asserted
    if caller.token_name:
        return caller.token_name
    if caller.mtls_subject:
        return caller.mtls_subject[:MAX_NAME]
    return "peer:" + peer_host(caller.peer)


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: `ipv4:1.2.3.4:5` → `1.2.3.4`, an IPv6 peer
    → its /64 (`2001:db8:1:2::/64`; loopback stays `::1`), `unix:...` → `unix`."""
    kind, _, rest = unquote(peer or "").partition(":")
    if kind == "unix" or kind == "unix-abstract":
        return "unix"
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]") if rest.startswith("[") else rest
        try:
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host or "unknown"
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.is_loopback:
            return str(address)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return peer or "unknown"


def split_gateway_mark(token: str) -> tuple[str, bool]:
    """A token-file token without its `:gateway` mark, and whether it had one."""
    if token.endswith(GATEWAY_MARK):
        return token[: -len(GATEWAY_MARK)], True
    return token, False
