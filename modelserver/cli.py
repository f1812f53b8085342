"""`stealguard-modelserver`: TorchServe's gRPC inference API, protected by the sidecar.

Runs with no arguments: an empty model store gets the default models `mnist` (protected)
and `mnist-open` (unprotected), trained once and cached. Flags win over environment
variables (STEALGUARD_MODELSERVER_LISTEN, STEALGUARD_SIDECAR, STEALGUARD_SIDECAR_TIMEOUT,
STEALGUARD_MODEL_STORE). A bad flag is one line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from stealguard.modelserver.config import ServerConfig, config_from


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="stealguard-modelserver",
        description="Serve models over TorchServe's gRPC inference API; every protected "
        "model's probabilities pass through the stealguard sidecar before they are returned.",
    )
    parser.add_argument("--listen", help=f"address to serve on (default {defaults.listen})")
    parser.add_argument("--sidecar",
                        help=f"address of the stealguard sidecar (default {defaults.sidecar})")
    parser.add_argument("--sidecar-timeout", dest="sidecar_timeout",
                        help="seconds to wait for the sidecar before answering label-only "
                        f"(default {defaults.sidecar_timeout})")
    parser.add_argument("--model-store", dest="model_store",
                        help=f"directory of model manifests (default {defaults.model_store}); "
                        "an empty one gets the default models")
    parser.add_argument("--torch-threads", dest="torch_threads", type=int,
                        help=f"threads per forward pass (default {defaults.torch_threads})")
    parser.add_argument("--max-batch", dest="max_batch", type=int,
                        help=f"most samples in one request (default {defaults.max_batch})")
    parser.add_argument("--prepare", action="store_true",
                        help="create the default models in the store (training once), then exit")
    parser.add_argument("--log-level", dest="log_level", default="info",
                        choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-modelserver`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as error:
        parser.exit(2, f"stealguard-modelserver: error: {error}\n")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    # Imported here: torch and grpc load only once the flags are known to be good.
    from stealguard.modelserver.server import prepare_store, run_modelserver
    from stealguard.modelserver.store import ManifestError

    try:
        if args.prepare:
            prepare_store(config)
            return 0
        asyncio.run(run_modelserver(config))
    except (ManifestError, OSError) as error:
        parser.exit(2, f"stealguard-modelserver: error: {error}\n")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
