"""`stealguard-sidecar proxy`: start the proxy in front of a TorchServe or v2 model server.

Same configuration as the sidecar (one loader: `--config` YAML < `STEALGUARD_*` < flags),
plus `upstream` and `protocol`. A mistake is one line naming the flag or key, exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from stealguard.server.cli import add_policy_flags, add_server_flags, serve_command
from stealguard.server.config import Config, ConfigError

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
    parser.add_argument("--health-interval", type=_positive_seconds, default=1.0,
                        help="seconds between polls of the upstream's readiness (default 1)")
    add_server_flags(parser, listen="the config's `listen`", config_env="STEALGUARD_CONFIG")
    add_policy_flags(parser)
    return parser


def check_proxy(config: Config) -> None:
    """The proxy's own settings: an upstream HOST:PORT, a known protocol, readable TLS
    files for the upstream (ConfigError or OSError naming the flag)."""
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-sidecar proxy`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def build_policies(specs, secret):
        from stealguard.server.launch import start_numba

        start_numba()
        from stealguard.server.proxy.options import ProxyPolicies

        return ProxyPolicies.from_config(specs, secret)

    def run_one(config, reuse_port, reload):
        from stealguard.server.proxy.app import run_proxy

        return run_proxy(config, reuse_port=reuse_port, health_interval=args.health_interval,
                         reload=reload)

    return serve_command(parser, args, build_policies=build_policies, run_one=run_one,
                         check=check_proxy, skip=("health_interval",))


if __name__ == "__main__":
    sys.exit(main())
