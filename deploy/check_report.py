"""Check the compose scenario's out/report.json (written by `stealguard-attack run`).

Usage: python3 deploy/check_report.py [REPORT] [--protected mnist] [--unprotected mnist-open]
                                      [--min-gap 0.20]

Passes (exit 0) when, at every strategy and budget the scenario ran, the model stolen from
the protected model agrees with the base model at least MIN_GAP less than the one stolen
from the unprotected model, and the protected model's own answers keep the base model's
top-1 label on every test input (agreement 1.00). Otherwise prints why and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys


def problems(report: dict, protected: str, unprotected: str, min_gap: float) -> list[str]:
    """What the report fails, as sentences; empty when it passes."""
    models = report.get("models", {})
    missing = [name for name in (protected, unprotected) if name not in models]
    if missing:
        return [f"no results for model(s) {', '.join(missing)}; have {sorted(models)}"]
    found = []
    kept = models[protected]["protected_agreement"]
    if kept < 1.0:
        found.append(f"{protected}: its answers keep the base model's top-1 label on "
                     f"{kept:.4f} of the test inputs, not 1.00")
    open_runs = {(r["strategy"], r["budget"]): r for r in models[unprotected]["runs"]}
    runs = models[protected]["runs"]
    if not runs:
        found.append(f"{protected}: no attack ran")
    for run in runs:
        key = (run["strategy"], run["budget"])
        if key not in open_runs:
            found.append(f"{unprotected}: no {key[0]} attack with {key[1]} queries to compare")
            continue
        gap = open_runs[key]["agreement"] - run["agreement"]
        if gap < min_gap:
            found.append(
                f"{key[0]}, {key[1]} queries: stolen agreement {run['agreement']:.2f} "
                f"({protected}) vs {open_runs[key]['agreement']:.2f} ({unprotected}): "
                f"gap {gap:.2f} < {min_gap:.2f}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default="out/report.json")
    parser.add_argument("--protected", default="mnist")
    parser.add_argument("--unprotected", default="mnist-open")
    parser.add_argument("--min-gap", type=float, default=0.20)
    args = parser.parse_args(argv)
    try:
        with open(args.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as err:
        print(f"check_report: cannot read {args.report}: {err}", file=sys.stderr)
        return 1
    found = problems(report, args.protected, args.unprotected, args.min_gap)
    for problem in found:
        print(f"check_report: FAIL: {problem}", file=sys.stderr)
    if found:
        return 1
    runs = report["models"][args.protected]["runs"]
    print(f"check_report: OK: {args.protected} keeps every top-1 label; stolen agreement is "
          f"at least {args.min_gap:.2f} below {args.unprotected} in all {len(runs)} attack(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
