"""`stealguard-sidecar`: start the sidecar (or, with `proxy`, the proxy).

Configuration comes from `--config FILE` (YAML), `STEALGUARD_*` environment variables and
flags; flags win. A mistake in any of them is one line naming the flag or key, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from stealguard.server.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stealguard-sidecar",
        description="Serve the stealguard Defense gRPC API: model servers send class "
        "probabilities, the sidecar answers with protected ones.",
        epilog="Subcommands: 'stealguard-sidecar proxy --help' for proxy mode, "
        "'stealguard-sidecar usage --help' for each principal's metered rows.",
    )
    parser.add_argument("--listen", help="address to serve on (default 127.0.0.1:50051)")
    parser.add_argument("--config", help="YAML config file (also STEALGUARD_CONFIG)")
    parser.add_argument("--defense", help="defense of the default policy (e.g. reverse_sigmoid)")
    parser.add_argument("--beta", type=float, help="beta of the default policy")
    parser.add_argument("--gamma", type=float, help="gamma of the default policy")
    parser.add_argument("--workers", type=int, help="processes serving one port (default 1)")
    parser.add_argument("--metrics-port", type=int, dest="metrics_port",
                        help="Prometheus metrics port (0 disables; default 0)")
    parser.add_argument("--max-rows", type=int, dest="max_rows",
                        help="most rows in one request (default 65536)")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"], help="default info")
    add_server_flags(parser)
    return parser


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """Security, limit and logging flags shared by the sidecar and the proxy."""
    group = parser.add_argument_group("security and limits")
    group.add_argument("--tls-cert", dest="tls_cert", help="server certificate (PEM) for TLS")
    group.add_argument("--tls-key", dest="tls_key", help="server private key (PEM) for TLS")
    group.add_argument("--tls-ca", dest="tls_ca",
                       help="CA (PEM) whose client certificates are required: mutual TLS")
    group.add_argument("--token-file", dest="token_file",
                       help="accepted bearer tokens, one 'name:token' per line")
    group.add_argument("--max-in-flight", type=int, dest="max_in_flight",
                       help="concurrent calls before RESOURCE_EXHAUSTED (default 1024; 0: none)")
    group.add_argument("--max-message-bytes", type=int, dest="max_message_bytes",
                       help="largest request in bytes (default 67108864)")
    group.add_argument("--grace", type=float,
                       help="seconds calls in flight get to finish after SIGTERM (default 10)")
    group.add_argument("--rate-limit", type=float, dest="rate_limit",
                       help="requests per second per client (default 0: no limit)")
    group.add_argument("--rate-burst", type=int, dest="rate_burst",
                       help="burst of the per-client rate limit (default: the rate)")
    group.add_argument("--client-header", dest="client_header",
                       help="metadata key naming the client when no token or mTLS "
                       "identifies it (default x-client-id)")
    group.add_argument("--json-logs", dest="json_logs", action="store_const", const=True,
                       help="one JSON object per log line")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, json_logs: bool = False) -> None:
    """Log to stderr at `level`, as text or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if json_logs
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def check_before_fork(config, build_policies) -> None:
    """Fail before any worker exists: policies (built with `build_policies(specs, secret)`),
    certificates and tokens must all be readable and valid (ConfigError otherwise)."""
    from stealguard.server.platform.credentials import Tokens, server_credentials

    build_policies(config.policies, config.secret_bytes())
    server_credentials(config)
    if config.token_file:
        Tokens.from_file(config.token_file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-sidecar`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["proxy"]:
        from stealguard.server.proxy.cli import main as proxy_main

        return proxy_main(argv[1:])
    if argv[:1] == ["usage"]:
        from stealguard.server.metering.usage import main as usage_main

        return usage_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load_config(args.config, overrides=flags)
        config.ensure_secret()
        configure_logging(config.log_level, config.json_logs)
        # Imported here: numba and grpc load only once the arguments are known to be good.
        from stealguard.server.platform.lifecycle import serve_workers
        from stealguard.server.policies import PolicySet
        from stealguard.server.sidecar import run_sidecar

        check_before_fork(config, PolicySet.from_config)

        def reload():
            """The same sources again (file, environment, flags) for SIGHUP."""
            return load_config(args.config, overrides=flags)

        return serve_workers(
            config, lambda c, reuse: run_sidecar(c, reuse_port=reuse, reload=reload)
        )
    except (ConfigError, OSError) as error:
        parser.exit(2, f"stealguard-sidecar: error: {error}\n")
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
