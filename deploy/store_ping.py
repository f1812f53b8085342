"""Health check of the metering store: exit 0 when a Redis/Valkey server answers at HOST:PORT.

Usage: python3 store_ping.py HOST:PORT

Any RESP reply to PING counts, `-NOAUTH` included: the server is up and serving; the
password is the clients' business. No dependencies beyond the standard library (the store
image has no redis client).
"""

import socket
import sys


def answers(address: str, timeout: float = 1.0) -> bool:
    """Whether the server at `address` ("host:port") replies to PING within `timeout`."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 store_ping.py HOST:PORT")
    sys.exit(0 if answers(sys.argv[1]) else 1)
