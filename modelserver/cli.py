"""`stealguard-modelserver`: TorchServe's gRPC inference API, protected by the sidecar.

Runs with no arguments: an empty model store gets the default models `mnist` (protected)
and `mnist-open` (unprotected), trained once and cached. Settings: defaults < `--config`
YAML < environment (STEALGUARD_MODELSERVER_<KEY>, STEALGUARD_SIDECAR*,
STEALGUARD_MODEL_STORE; `stealguard.modelserver.config`) < flags. A bad value is one line
naming its flag, key or variable, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from stealguard.modelserver.config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ServerConfig,
    config_from,
)
from stealguard.server.cli import add_server_flags, configure_logging
from stealguard.server.settings import ConfigError


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="stealguard-modelserver",
        description="Serve models over TorchServe's gRPC and REST inference APIs; every protected "
        "model's probabilities pass through the stealguard sidecar before they are returned.",
    )
    parser.add_argument("--http-port", dest="http_port",
                        help="TorchServe's REST inference API (/predictions/{model}, /ping) "
                        f"on the --listen host (default {DEFAULT_HTTP_PORT}, skipped with a "
                        "warning when taken; 0 disables)")
    parser.add_argument("--sidecar",
                        help=f"address of the stealguard sidecar (default {defaults.sidecar})")
    parser.add_argument("--sidecar-timeout", dest="sidecar_timeout",
                        help="seconds to wait for the sidecar, cut to what is left of the "
                        "caller's deadline, before answering label-only "
                        f"(default {defaults.sidecar_timeout})")
    parser.add_argument("--sidecar-transport", dest="sidecar_transport",
                        help="how to reach the sidecar: 'stream' (one long-lived "
                        "PerturbStream shared by all requests, about half a unary "
                        "call's round trip) or 'unary' (one Perturb per request) "
                        f"(default {defaults.sidecar_transport})")
    parser.add_argument("--sidecar-tls-ca", dest="sidecar_tls_ca",
                        help="CA (PEM) that signed the sidecar's certificate: call it over TLS")
    parser.add_argument("--sidecar-tls-cert", dest="sidecar_tls_cert",
                        help="client certificate (PEM) for mutual TLS with the sidecar")
    parser.add_argument("--sidecar-tls-key", dest="sidecar_tls_key",
                        help="client private key (PEM) for mutual TLS with the sidecar")
    parser.add_argument("--sidecar-token-file", dest="sidecar_token_file",
                        help="file holding the one bearer token to send to the sidecar")
    parser.add_argument("--model-store", dest="model_store",
                        help=f"directory of model manifests (default {defaults.model_store}); "
                        "an empty one gets the default models")
    parser.add_argument("--torch-threads", dest="torch_threads",
                        help=f"threads per forward pass (default {defaults.torch_threads})")
    parser.add_argument("--max-batch", dest="max_batch",
                        help=f"most samples in one request (default {defaults.max_batch})")
    parser.add_argument("--prepare", action="store_true",
                        help="create the default models in the store (training once), then exit")
    add_server_flags(parser, listen=defaults.listen,
                     config_env="STEALGUARD_MODELSERVER_CONFIG",
                     metrics=f"default {DEFAULT_METRICS_PORT}, skipped with a warning when "
                     "taken; 0 disables")
    return parser


def check_security(config: ServerConfig) -> None:
    """Read every certificate and token now, so that a bad one is a one-line error at start."""
    from stealguard.client import channel_credentials
    from stealguard.server.metering.settings import check_metering
    from stealguard.server.platform.credentials import Tokens, server_credentials

    check_metering(config)
    server_credentials(config)
    if config.token_file:
        Tokens.from_file(config.token_file)
    channel_credentials(config.sidecar_tls_ca, config.sidecar_tls_cert, config.sidecar_tls_key)
    config.read_sidecar_token()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-modelserver`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
        check_security(config)
    except (ConfigError, ValueError, OSError) as error:
        parser.exit(2, f"stealguard-modelserver: error: {error}\n")
    configure_logging(config.log_level, config.json_logs)
    # Imported here: torch and grpc load only once the flags are known to be good.
    from stealguard.modelserver.server import prepare_store, run_modelserver
    from stealguard.modelserver.store import ManifestError

    try:
        if args.prepare:
            prepare_store(config)
            return 0
        # SIGHUP: the same sources again, for the token file and certificates
        asyncio.run(run_modelserver(config, reload=lambda: config_from(args)))
    except (ManifestError, OSError) as error:
        parser.exit(2, f"stealguard-modelserver: error: {error}\n")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
