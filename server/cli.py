"""`stealguard-sidecar`: start the sidecar (or, with `proxy`, the proxy); and what every
stealguard server command shares: the common flags, logging, and how a command starts.

Configuration comes from `--config FILE` (YAML), environment variables and flags; flags
win (`stealguard.server.settings`). A mistake in any of them is one line naming the flag or
key, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from stealguard.server.config import Config, ConfigError, load_config
from stealguard.server.metering.settings import add_metering_flags, check_metering
from stealguard.server.settings import DETECTORS

LOG_LEVELS = ["debug", "info", "warning", "error"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stealguard-sidecar",
        description="Serve the stealguard Defense gRPC API: model servers send class "
        "probabilities, the sidecar answers with protected ones.",
        epilog="Subcommands: 'stealguard-sidecar proxy --help' for proxy mode, "
        "'stealguard-sidecar usage --help' for each principal's metered rows.",
    )
    add_server_flags(parser, listen="127.0.0.1:50051", config_env="STEALGUARD_CONFIG")
    add_policy_flags(parser)
    parser.add_argument("--max-rows", dest="max_rows",
                        help="most rows in one request (default 65536)")
    return parser


def add_server_flags(parser: argparse.ArgumentParser, *, listen: str, config_env: str,
                     metrics: str = "default 0: off") -> None:
    """The flags of `ServerSettings`, the same on every server: listener, config file,
    logging, metrics, security and limits."""
    parser.add_argument("--listen", help=f"address to serve on (default {listen})")
    parser.add_argument("--config", help=f"YAML config file (also {config_env})")
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS,
                        help="default info")
    parser.add_argument("--json-logs", dest="json_logs", action="store_const", const=True,
                        help="one JSON object per log line")
    parser.add_argument("--metrics-port", dest="metrics_port",
                        help=f"Prometheus metrics port ({metrics})")
    parser.add_argument("--metrics-listen", dest="metrics_listen", metavar="HOST:PORT",
                        help="where /metrics listens (default: the --listen host, at "
                        "--metrics-port)")
    parser.add_argument("--metrics-token-file", dest="metrics_token_file",
                        help="/metrics wants 'Authorization: Bearer <token>' with a token "
                        "from this file (default: no token)")
    parser.add_argument("--metrics-per-client", dest="metrics_per_client",
                        action="store_const", const=True,
                        help="a metrics series per client name (default off: client=\"_all\")")
    group = parser.add_argument_group("security and limits")
    group.add_argument("--tls-cert", dest="tls_cert", help="server certificate (PEM) for TLS")
    group.add_argument("--tls-key", dest="tls_key", help="server private key (PEM) for TLS")
    group.add_argument("--tls-ca", dest="tls_ca",
                       help="CA (PEM) whose client certificates are required: mutual TLS")
    group.add_argument("--token-file", dest="token_file",
                       help="accepted bearer tokens, one 'name:token' per line")
    group.add_argument("--max-in-flight", dest="max_in_flight",
                       help="concurrent calls before RESOURCE_EXHAUSTED (default 1024; 0: none)")
    group.add_argument("--max-message-bytes", dest="max_message_bytes",
                       help="largest request in bytes (default 67108864)")
    group.add_argument("--max-request-bytes", dest="max_request_bytes",
                       help="request bytes held at once before RESOURCE_EXHAUSTED "
                       "(default: a quarter of the memory; 0: no bound)")
    group.add_argument("--reflection", choices=["on", "off"],
                       help="gRPC server reflection (default on; needs a token when "
                       "--token-file is set)")
    group.add_argument("--grace",
                       help="seconds calls in flight get to finish after SIGTERM (default 10)")
    group.add_argument("--client-header", dest="client_header",
                       help="metadata key naming the end client, believed only from a "
                       "gateway token or with --trust-client-header (default x-client-id)")
    add_metering_flags(parser)
    add_detection_flags(parser)


def add_detection_flags(parser: argparse.ArgumentParser) -> None:
    """Extraction detection and escalation, the same flags on every server."""
    group = parser.add_argument_group("extraction detection (off by default)")
    group.add_argument("--detect", choices=DETECTORS,
                       help="classmix: the classes each principal is answered (any server); "
                       "prada: the protected models' inputs (the model server only); "
                       "default off")
    group.add_argument("--detect-threshold", dest="detect_threshold",
                       help="classmix alarms when G is above this (default 23, what "
                       "attacks/results/detection chose for MNIST's 10 classes)")
    group.add_argument("--detect-prior", dest="detect_prior", action="append",
                       help="classmix's reference class mix, one number per class in class "
                       "order, comma separated or repeated (default uniform)")
    group.add_argument("--detect-delta", dest="detect_delta",
                       help="prada alarms when W is below this, in (0, 1] (default 0.94)")
    group.add_argument("--escalate",
                       help="escalation ladder, comma separated: watch, labels, refuse or a "
                       "policy name (default watch)")
    group.add_argument("--escalate-after", dest="escalate_after",
                       help="alarmed queries for each step after the first (default 100)")
    group.add_argument("--detect-cooldown", dest="detect_cooldown",
                       help="seconds without an alarm for each step down; 0: never "
                       "(default 600)")
    group.add_argument("--detect-allow", dest="detect_allow", action="append",
                       help="a principal that never escalates (repeatable)")
    group.add_argument("--detect-dry-run", dest="detect_dry_run", action="store_const",
                       const=True, help="detect, log and count, but change no answer")
    group.add_argument("--detect-principals", dest="detect_principals",
                       help="principals each detector keeps, least recently seen dropped "
                       "first (default 10000; prada keeps at most 64, about 3 MB each)")


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The sidecar's and the proxy's flags for the default policy and the workers."""
    parser.add_argument("--defense", help="defense of the default policy (e.g. reverse_sigmoid)")
    parser.add_argument("--beta", type=float, help="beta of the default policy")
    parser.add_argument("--gamma", type=float, help="gamma of the default policy")
    parser.add_argument("--workers", help="processes serving one port (default 1)")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "message": record.getMessage()}
        event = getattr(record, "event", None)  # structured fields: log(..., extra={"event": {}})
        if event is not None:
            entry["event"] = event
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


def flags_of(args: argparse.Namespace, *skip: str) -> dict:
    """The settings the command line gives (None: not given), without `config` and `skip`."""
    return {k: v for k, v in vars(args).items() if k not in ("config", *skip)}


def serve_command(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
                  build_policies, run_one, check: Callable[[Config], None] | None = None,
                  skip: tuple[str, ...] = ()) -> int:
    """Start the sidecar or the proxy: load the config (exit 2 naming the mistake),
    `check` it, log, check policies, certificates and tokens before forking, and serve
    `run_one(config, reuse_port, reload)` on `config.workers` processes; SIGHUP reloads
    from the same sources."""
    flags = flags_of(args, *skip)
    try:
        config = load_config(args.config, overrides=flags)
        if check is not None:
            check(config)
        config.ensure_secret()
        configure_logging(config.log_level, config.json_logs)
        # Imported here: numba and grpc load only once the arguments are known to be good.
        from stealguard.server.platform.credentials import Tokens, server_credentials
        from stealguard.server.platform.lifecycle import serve_workers

        build_policies(config.policies, config.secret_bytes())
        try:
            check_metering(config, config.workers)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        server_credentials(config)
        if config.token_file:
            Tokens.from_file(config.token_file)

        def reload() -> Config:
            """The same sources again (file, environment, flags) for SIGHUP."""
            return load_config(args.config, overrides=flags)

        return serve_workers(config, lambda c, reuse: run_one(c, reuse, reload))
    except (ConfigError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        return 0


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

    def build_policies(specs, secret):
        from stealguard.server.launch import start_numba

        start_numba()
        from stealguard.server.policies import PolicySet

        return PolicySet.from_config(specs, secret)

    def run_one(config, reuse_port, reload):
        from stealguard.server.sidecar import run_sidecar

        return run_sidecar(config, reuse_port=reuse_port, reload=reload)

    return serve_command(parser, args, build_policies=build_policies, run_one=run_one)


if __name__ == "__main__":
    sys.exit(main())
