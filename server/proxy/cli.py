"""`stealguard-sidecar proxy`: start the proxy in front of a TorchServe or v2 model server.

Same configuration as the sidecar (one loader: `--config` YAML < `STEALGUARD_*` < flags),
plus `upstream` and `protocol`. A mistake is one line naming the flag or key, exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from stealguard.server.cli import add_server_flags, configure_logging
from stealguard.server.config import ConfigError, load_config

PROTOCOL_NAMES = ("torchserve", "v2")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})$")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stealguard-sidecar proxy",
        description="Serve a model server's own gRPC inference API (TorchServe or the Open "
        "Inference Protocol v2), forward every call to it and protect the probabilities in "
        "its answers with the policy of the requested model.",
    )
    parser.add_argument("--listen", help="address to serve on (default: config `listen`)")
    parser.add_argument("--upstream", help="HOST:PORT of the model server's gRPC inference "
                        "API (also `upstream:` in the config, STEALGUARD_UPSTREAM)")
    parser.add_argument("--protocol", choices=PROTOCOL_NAMES,
                        help="API of the upstream (default torchserve)")
    parser.add_argument("--upstream-tls-ca", dest="upstream_tls_ca",
                        help="CA (PEM) that signed the upstream's certificate: reach the "
                        "upstream over TLS (STEALGUARD_UPSTREAM_TLS_CA)")
    parser.add_argument("--upstream-tls-cert", dest="upstream_tls_cert",
                        help="client certificate (PEM) for mutual TLS with the upstream")
    parser.add_argument("--upstream-tls-key", dest="upstream_tls_key",
                        help="client private key (PEM) for mutual TLS with the upstream")
    parser.add_argument("--config", help="YAML config file (also STEALGUARD_CONFIG)")
    parser.add_argument("--defense", help="defense of the default policy (e.g. reverse_sigmoid)")
    parser.add_argument("--beta", type=float, help="beta of the default policy")
    parser.add_argument("--gamma", type=float, help="gamma of the default policy")
    parser.add_argument("--workers", type=int, help="processes serving one port (default 1)")
    parser.add_argument("--health-interval", type=_positive_seconds, default=1.0,
                        help="seconds between polls of the upstream's readiness (default 1)")
    parser.add_argument("--metrics-port", type=int, dest="metrics_port",
                        help="Prometheus metrics port (0 disables; default 0)")
    parser.add_argument("--log-level", dest="log_level",
                        choices=["debug", "info", "warning", "error"], help="default info")
    add_server_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-sidecar proxy`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "health_interval")}
    try:
        config = load_config(args.config, overrides=flags)
        if not config.upstream:
            raise ConfigError("--upstream is required: HOST:PORT of the model server to "
                              "protect (or `upstream:` in --config, or STEALGUARD_UPSTREAM)")
        if not _HOST_PORT.match(config.upstream):
            raise ConfigError(f"--upstream must be HOST:PORT, got {config.upstream!r}")
        if config.protocol not in PROTOCOL_NAMES:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOL_NAMES)}, got "
                              f"{config.protocol!r}")
        from stealguard.server.proxy.upstream import upstream_credentials

        upstream_credentials(config.upstream_tls_ca, config.upstream_tls_cert,
                             config.upstream_tls_key)  # a bad file is an error now, not later
        config.ensure_secret()
        configure_logging(config.log_level, config.json_logs)
        # Imported here: numba and grpc load only once the arguments are known to be good.
        from stealguard.server.cli import check_before_fork
        from stealguard.server.platform.lifecycle import serve_workers
        from stealguard.server.proxy.app import run_proxy
        from stealguard.server.proxy.options import ProxyPolicies

        check_before_fork(config, ProxyPolicies.from_config)

        def reload():
            """The same sources again (file, environment, flags) for SIGHUP."""
            return load_config(args.config, overrides=flags)

        return serve_workers(config, lambda c, reuse: run_proxy(
            c, reuse_port=reuse, health_interval=args.health_interval, reload=reload))
    except (ConfigError, OSError) as error:
        parser.exit(2, f"stealguard-sidecar proxy: error: {error}\n")
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
