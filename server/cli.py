"""`stealguard-sidecar`: start the sidecar (or, with `proxy`, the proxy).

Configuration comes from `--config FILE` (YAML), `STEALGUARD_*` environment variables and
flags; flags win. A mistake in any of them is one line naming the flag or key, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stealguard.server.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stealguard-sidecar",
        description="Serve the stealguard Defense gRPC API: model servers send class "
        "probabilities, the sidecar answers with protected ones.",
        epilog="Subcommand: 'stealguard-sidecar proxy --help' for proxy mode.",
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
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-sidecar`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["proxy"]:
        from stealguard.server.proxy.cli import main as proxy_main

        return proxy_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load_config(args.config, overrides=flags)
        config.ensure_secret()
        configure_logging(config.log_level)
        # Imported here: numba and grpc load only once the arguments are known to be good.
        from stealguard.server.policies import PolicySet
        from stealguard.server.server import run_sidecar, serve_workers

        PolicySet.from_config(config.policies, config.secret_bytes())  # fail before forking
        return serve_workers(config, lambda c, reuse: run_sidecar(c, reuse_port=reuse))
    except (ConfigError, OSError) as error:
        parser.exit(2, f"stealguard-sidecar: error: {error}\n")
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
