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
import os
import sys
from pathlib import Path

from stealguard.modelserver.server import ServerConfig

ENV = {
    "listen": "STEALGUARD_MODELSERVER_LISTEN",
    "sidecar": "STEALGUARD_SIDECAR",
    "sidecar_timeout": "STEALGUARD_SIDECAR_TIMEOUT",
    "model_store": "STEALGUARD_MODEL_STORE",
}


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
                        default=defaults.torch_threads,
                        help=f"threads per forward pass (default {defaults.torch_threads})")
    parser.add_argument("--prepare", action="store_true",
                        help="create the default models in the store (training once), then exit")
    parser.add_argument("--log-level", dest="log_level", default="info",
                        choices=["debug", "info", "warning", "error"], help="default info")
    return parser


def config_from(args: argparse.Namespace, env=os.environ) -> ServerConfig:
    """Flags, else environment, else defaults. Raises ValueError naming the flag."""
    defaults = ServerConfig()
    values = {}
    for key, var in ENV.items():
        flag = "--" + key.replace("_", "-")
        value = getattr(args, key)
        source = flag
        if value is None and env.get(var):
            value, source = env[var], var
        if value is None:
            continue
        if key == "sidecar_timeout":
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{source}: expected seconds, got {value!r}") from None
            if not value > 0:
                raise ValueError(f"{source}: must be > 0 seconds, got {value}")
        elif key == "model_store":
            value = Path(value).expanduser()
            if value.exists() and not value.is_dir():
                raise ValueError(f"{source}: {value} is not a directory")
        elif ":" not in value:
            raise ValueError(f"{source}: expected HOST:PORT, got {value!r}")
        values[key] = value
    if args.torch_threads < 1:
        raise ValueError(f"--torch-threads: must be at least 1, got {args.torch_threads}")
    values["torch_threads"] = args.torch_threads
    return ServerConfig(**{**defaults.__dict__, **values})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stealguard-modelserver`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    from stealguard.modelserver.server import prepare_store, run_modelserver
    from stealguard.modelserver.store import ManifestError

    try:
        config = config_from(args)
        if args.prepare:
            prepare_store(config)
            return 0
        asyncio.run(run_modelserver(config))
    except (ValueError, ManifestError, OSError) as error:
        parser.exit(2, f"stealguard-modelserver: error: {error}\n")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
