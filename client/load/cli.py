"""``stealguard-load``: drive a Defense sidecar (or a TorchServe-style server) and report latency.

Exit status: 0 when the run completed (errors are counted in the report, as ghz does),
1 when the target cannot be reached or the run fails, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

from .calls import TargetUnreachable
from .config import ARRIVALS, DISTRIBUTIONS, METHODS, LoadConfig, Security, check, parse_duration

PROG = "stealguard-load"
CLOSED_CONCURRENCY = 10
OPEN_MAX_IN_FLIGHT = 100

EPILOG = """\
load models:
  closed loop  --concurrency C: C callers, each starts its next call when the last returns.
  open loop    --rps R: calls are scheduled at R per second (--arrival constant|poisson);
               --concurrency then caps the calls in flight (default 100), like ghz's -c.
               Latency is measured from each call's scheduled send time (corrected for
               coordinated omission, as wrk2 does) and from its actual send (uncorrected);
               both are reported. A timed run ends on time: calls still waiting for a
               free slot are counted as unsent.
  --procs N    splits --rps, --concurrency, --connections and --total over N processes
               whose HDR histograms merge into one report.
Latency percentiles are over successful calls; failed calls are counted by status code.
Exit status: 0 run completed (errors included), 1 target unreachable, 2 usage error.

examples:
  stealguard-load --target 127.0.0.1:50051 --concurrency 16 --duration 30s
  stealguard-load --target 127.0.0.1:50051 --rps 2000 --arrival poisson --format json
  stealguard-load --target 127.0.0.1:7070 --method predictions --model mnist --total 1000
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,28,28") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="gRPC load tester that measures like wrk2.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("target")
    g.add_argument("--target", required=True, help="HOST:PORT of the server")
    g.add_argument("--method", choices=METHODS, default="perturb",
                   help="RPC to call (default perturb)")
    g.add_argument("--model", default=None,
                   help="model name: selects the sidecar policy; required for predictions")
    g.add_argument("--timeout", type=_duration, default=10.0, help="per call (default 10s)")
    g.add_argument("--connect-timeout", type=_duration, default=5.0,
                   help="to reach the target before the run (default 5s)")
    g = p.add_argument_group("load")
    g.add_argument("-c", "--concurrency", type=int, default=None,
                   help=f"closed loop: callers (default {CLOSED_CONCURRENCY}); with --rps: "
                        f"most calls in flight (default {OPEN_MAX_IN_FLIGHT})")
    g.add_argument("--rps", type=float, default=None, help="open loop: calls per second")
    g.add_argument("--arrival", choices=ARRIVALS, default=None,
                   help="open-loop arrivals (default constant)")
    g.add_argument("-z", "--duration", type=_duration, default=None,
                   help="measured time, e.g. 30s, 2m (default 10s)")
    g.add_argument("-n", "--total", type=int, default=None, help="exactly this many calls")
    g.add_argument("--warmup", type=_duration, default=0.0,
                   help="unmeasured load before the run (default 0s)")
    g.add_argument("--connections", type=int, default=None,
                   help="TCP connections in all (default one per process)")
    g.add_argument("--procs", type=int, default=1,
                   help="worker processes; their histograms merge into one (default 1)")
    g.add_argument("--seed", type=int, default=0, help="payload and arrival seed")
    g.add_argument("--server-pid", type=int, action="append", default=[], metavar="PID",
                   help="server on this host: report its CPU (with its child processes); "
                        "repeatable")
    g = p.add_argument_group("payload")
    g.add_argument("--batch", type=int, default=1, help="rows (or samples) per request")
    g.add_argument("--classes", type=int, default=None, help="classes per row (default 10)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default=None,
                   help="synthetic rows: Dirichlet(alpha) or softmax of N(0,3) logits")
    g.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha (default 0.3)")
    g.add_argument("--logits", action="store_true", help="send logits (logits=true)")
    g.add_argument("--payload", default=None, metavar="FILE.npy",
                   help="real rows (perturb: model outputs; predictions: input samples)")
    g.add_argument("--input-shape", type=_shape, default=None,
                   help="predictions without --payload: one sample's shape (default 1,28,28)")
    g = p.add_argument_group("security (for a hardened sidecar)")
    g.add_argument("--tls-ca", default=None, metavar="FILE", help="CA bundle: use TLS")
    g.add_argument("--tls-cert", default=None, metavar="FILE", help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="client key (mTLS)")
    g.add_argument("--tls-server-name", default=None, help="expected server name")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="sends 'authorization: Bearer <token>'")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("table", "json", "csv"), default="table")
    g.add_argument("-o", "--output", default=None, metavar="FILE", help="write the report here")
    g.add_argument("--histogram", default=None, metavar="FILE.png",
                   help="latency-by-percentile plot (needs matplotlib)")
    g.add_argument("--responses", default=None, metavar="FILE.jsonl",
                   help="every measured call's status and decoded reply, one JSON line each")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The plan the flags describe; raises ValueError("--flag: reason") on contradictions."""
    conflicts = [
        (args.duration is not None and args.total is not None,
         "--duration and --total are alternatives: give one"),
        (args.arrival is not None and args.rps is None, "--arrival needs --rps (open loop)"),
        (args.payload is not None and args.classes is not None,
         "--classes comes from the --payload file: give one"),
        (args.payload is not None and (args.distribution or args.alpha) is not None,
         "--distribution/--alpha describe synthetic rows: not with --payload"),
        (args.method == "predictions" and (args.classes or args.distribution or args.alpha
                                           or args.logits),
         "--classes/--distribution/--alpha/--logits describe probability rows: "
         "not with --method predictions"),
        (args.input_shape is not None and (args.method != "predictions" or args.payload),
         "--input-shape is for --method predictions without --payload"),
        (args.alpha is not None and args.distribution == "softmax",
         "--alpha is the Dirichlet parameter: not with --distribution softmax"),
    ]
    for bad, message in conflicts:
        if bad:
            raise ValueError(message)
    procs = args.procs
    concurrency = args.concurrency or (OPEN_MAX_IN_FLIGHT if args.rps else CLOSED_CONCURRENCY)
    cfg = LoadConfig(
        target=args.target,
        method=args.method,
        model=args.model or "",
        concurrency=concurrency,
        rps=args.rps,
        arrival=args.arrival or "constant",
        duration=None if args.total is not None else (args.duration or 10.0),
        total=args.total,
        warmup=args.warmup,
        connections=args.connections or max(1, procs),
        procs=procs,
        batch=args.batch,
        classes=args.classes or 10,
        dtype=args.dtype,
        distribution=args.distribution or "dirichlet",
        alpha=args.alpha or 0.3,
        logits=args.logits,
        payload=args.payload,
        input_shape=args.input_shape or (1, 28, 28),
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        seed=args.seed,
        server_pids=tuple(args.server_pid),
        responses=args.responses,
        security=Security(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name,
                          args.token_file),
    )
    for pid in args.server_pid:
        if not os.path.exists(f"/proc/{pid}"):
            raise ValueError(f"--server-pid {pid}: no such process (or no /proc here)")
    problems = check(cfg)
    if problems:
        flag, reason = problems[0]
        raise ValueError(f"{flag}: {reason}")
    return cfg


class _Bar:
    """A tqdm bar on a terminal: calls for --total, seconds for --duration."""

    def __init__(self, cfg: LoadConfig) -> None:
        from tqdm import tqdm

        self.cfg = cfg
        self.t0: float | None = None
        if cfg.total is not None:
            self.bar = tqdm(total=cfg.total, unit="call", file=sys.stderr, leave=False)
        else:
            self.bar = tqdm(total=round(cfg.duration, 1), unit="s", file=sys.stderr,
                            leave=False, bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f}s{postfix}")

    def __call__(self, count: int) -> None:
        if self.cfg.total is not None:
            self.bar.n = count
        else:
            self.t0 = self.t0 or time.monotonic()
            self.bar.n = min(self.bar.total, round(time.monotonic() - self.t0, 1))
            self.bar.set_postfix_str(f"{count} calls", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.histogram and importlib.util.find_spec("matplotlib") is None:
        parser.error("--histogram needs matplotlib: pip install 'stealguard[lab]' "
                     "(or pip install matplotlib)")

    from . import report, runner  # after validation: --help and usage errors stay fast

    bar = _Bar(cfg) if sys.stderr.isatty() and not args.no_progress else None
    try:
        result = runner.run(cfg, progress=bar)
    except TargetUnreachable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a payload or token file that cannot be used
        parser.error(str(exc))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()

    doc = report.summarize(result)
    if args.format == "json":
        text = json.dumps(doc, indent=2) + "\n"
    elif args.format == "csv":
        text = report.csv_text(doc)
    else:
        text = report.table(doc)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.format != "table":
        for warning in doc["warnings"]:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.histogram:
        report.plot(result, args.histogram)
    return 0


if __name__ == "__main__":
    sys.exit(main())
