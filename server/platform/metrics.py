"""The Prometheus registry every stealguard server shares, the per-call and per-client
series, and the one `/metrics` endpoint (`serve_metrics`).

Front ends add their own series to `REGISTRY` (the sidecar's in `stealguard.server.metrics`,
the model server's in `stealguard.modelserver.metrics`). With `--workers N`, worker i
serves its own metrics on metrics_port + i.

Exposure: /metrics binds to the host the settings say (`ServerSettings.metrics_host`: the
`--listen` host unless `--metrics-listen`), answers 401 without the bearer token of
`--metrics-token-file` when one is set, and names clients only with
`--metrics-per-client` (otherwise every client is `_all`: the page does not list who calls).
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

REGISTRY = CollectorRegistry()

LATENCY = Histogram("stealguard_request_seconds", "Time to answer a call, by method.",
                    ["method"], registry=REGISTRY,
                    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))
IN_FLIGHT = Gauge("stealguard_in_flight", "Calls being served now.", registry=REGISTRY)
CLIENT_QUERIES = Counter("stealguard_client_queries", "Calls by client.", ["client"],
                         registry=REGISTRY)
CLIENT_ROWS = Counter("stealguard_client_rows", "Rows by client.", ["client"],
                      registry=REGISTRY)
RATE_LIMITED = Counter("stealguard_rate_limited", "Calls refused by a client's rate limit.",
                       ["client"], registry=REGISTRY)

#: Distinct client names that get series of their own; later ones share OTHER_CLIENTS.
#: Without tokens a client's name is whatever its `x-client-id` header says, so unbounded
#: per-client series would let a caller grow /metrics and the process's memory at will.
MAX_CLIENT_SERIES = 1000
OTHER_CLIENTS = "_other"
ALL_CLIENTS = "_all"
_client_series: set[str] = set()
#: Per-client series on (`--metrics-per-client`); off, every client is ALL_CLIENTS.
per_client = False


def client_label(client: str) -> str:
    """The per-client label value for `client`: ALL_CLIENTS unless per-client series are
    on; then its name, or OTHER_CLIENTS once MAX_CLIENT_SERIES other names have series."""
    if not per_client:
        return ALL_CLIENTS
    if client in _client_series:
        return client
    if len(_client_series) < MAX_CLIENT_SERIES:
        _client_series.add(client)
        return client
    return OTHER_CLIENTS


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def _guarded(app, token: bytes):
    """`app` answering 401 unless the request carries `Authorization: Bearer <token>`."""
    def guarded(environ, start_response):
        presented = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(presented, b"Bearer " + token):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"),
                                                ("Content-Type", "text/plain")])
            return [b"metrics need 'Authorization: Bearer <token>' (--metrics-token-file)\n"]
        return app(environ, start_response)
    return guarded


def _metrics_token(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            token = file.read().strip()
    except OSError as error:
        raise OSError(f"--metrics-token-file {path}: {error.strerror}") from None
    if not token or b"\n" in token:
        raise OSError(f"--metrics-token-file {path}: expected one token on one line")
    return token


def serve_metrics(port: int, log: logging.Logger, *, default: int | None = None,
                  settings=None) -> int:
    """Serve /metrics at `port` (a daemon thread); the port served, 0 for none.

    `port` 0 is off. None means `default`: tried, and skipped with a warning when taken
    (so that several model servers on one host all start); a port that was asked for
    must be free (OSError naming `--metrics-port` otherwise). `settings` (a
    `ServerSettings`) gives the host, the token file and the per-client switch; without
    them, loopback, no token, no per-client series.
    """
    global per_client
    asked = port is not None
    port = default if port is None else port
    if not port:
        return 0
    host = settings.metrics_host if settings is not None else "127.0.0.1"
    token_file = getattr(settings, "metrics_token_file", "")
    per_client = bool(getattr(settings, "metrics_per_client", False))
    app = make_wsgi_app(REGISTRY)
    if token_file:
        app = _guarded(app, _metrics_token(token_file))
    try:
        server = make_server(host or "0.0.0.0", port, app,
                             _Server6 if ":" in host else _Server, handler_class=_Quiet)
    except OSError as error:
        if asked:
            raise OSError(f"--metrics-port {port}: cannot serve metrics on {host}: "
                          f"{error.strerror}") from None
        log.warning("metrics off: default port %d is taken (%s); pass --metrics-port",
                    port, error.strerror)
        return 0
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    log.info("metrics on %s:%d/metrics%s%s", host or "0.0.0.0", port,
             " (bearer token)" if token_file else "",
             ", per client" if per_client else "")
    return port
