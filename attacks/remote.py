"""`stealguard-attack run`: steal models through a live TorchServe gRPC endpoint.

The attack code is the experiment's; only the oracle differs (RemoteOracle). Scoring needs
the base model's answers on the held-out test inputs, which come from an unprotected model
on the same server (`--baseline-model`, default mnist-open); those scoring queries are not
part of any attack's budget. For each attacked model the report gives:
  - agreement of each stolen model with the base model (per strategy and budget), and
  - the attacked model's own top-1 agreement with the base model on the test inputs
    (1.00 expected for stealguard's Reverse Sigmoid with preserve_top1), with the cosine,
    MAE and KL distances of its answers from the base model's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from stealguard.attacks.datasets import load_dataset
from stealguard.attacks.experiment import profile_for
from stealguard.attacks.metrics import accuracy, agreement, distortion
from stealguard.attacks.oracles import RemoteOracle
from stealguard.attacks.strategies import STRATEGIES, Attacker
from stealguard.attacks.training import predict


def _answers(target: str, model: str, x, timeout: float):
    with RemoteOracle(target, model, len(x), timeout=timeout) as oracle:
        return oracle.query(x)


def run_remote(*, target: str, models: list[str], strategies: list[str], budgets: list[int],
               baseline_model: str, dataset: str = "mnist", architecture: str = "allconv",
               beta: float | None = None, gamma: float | None = None, timeout: float = 30.0,
               quick: bool = False, seed: int = 0,
               log: Callable[[str], None] = print) -> dict:
    """Attack every model in `models` with every strategy at every budget. Raises
    OracleError (unreachable target, unknown model) before any attack starts."""
    ds = load_dataset(dataset, seed=seed)
    profile = profile_for(ds, quick)
    attacker = Attacker.from_dataset(ds, architecture, profile.train, seed)
    base = _answers(target, baseline_model, ds.test_x, timeout)
    answers = {}
    for name in models:  # also checks every model exists before the long part starts
        answers[name] = _answers(target, name, ds.test_x, timeout)
    log(f"scored {baseline_model} and {', '.join(models)} on {len(ds.test_x)} test inputs "
        f"at {target}")
    result = {"target": target, "dataset": dataset, "baseline_model": baseline_model,
              "architecture": architecture, "test_samples": len(ds.test_x),
              "base_accuracy": accuracy(base, ds.test_y), "models": {}}
    for name in models:
        effect = distortion(answers[name], base)
        entry = {"protected_agreement": effect.pop("protected_agreement"), **effect,
                 "protected_accuracy": accuracy(answers[name], ds.test_y), "runs": []}
        for strategy in strategies:
            options = {"beta": beta, "gamma": gamma} if strategy == "same-layer" else {}
            for budget in budgets:
                started = time.perf_counter()
                log(f"{name}: {strategy} with {budget} queries")
                with RemoteOracle(target, name, budget, timeout=timeout) as oracle:
                    stolen = STRATEGIES[strategy](oracle, budget, attacker, **options)
                    used = oracle.queries
                stolen_test = predict(stolen, ds.test_x)
                entry["runs"].append({
                    "strategy": strategy, "budget": budget, "queries": used,
                    "agreement": agreement(stolen_test, base),
                    "accuracy": accuracy(stolen_test, ds.test_y),
                    "seconds": round(time.perf_counter() - started, 1)})
        result["models"][name] = entry
    return result


def render_table(result: dict) -> str:
    """The side-by-side table: one column per attacked model."""
    names = list(result["models"])
    head = "| | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    lines.append("| answers' top-1 agreement with base | " + " | ".join(
        f"{result['models'][n]['protected_agreement']:.2f}" for n in names) + " |")
    distances = (("cosine", "cosine to base"), ("mae", "MAE to base"),
                 ("kl", "KL(base || answers)"))
    for key, label in distances:
        lines.append(f"| {label} | " + " | ".join(
            f"{result['models'][n][key]:.3f}" for n in names) + " |")
    keys = []
    for n in names:
        for r in result["models"][n]["runs"]:
            if (r["strategy"], r["budget"]) not in keys:
                keys.append((r["strategy"], r["budget"]))
    for strategy, budget in keys:
        cells = []
        for n in names:
            r = next((r for r in result["models"][n]["runs"]
                      if (r["strategy"], r["budget"]) == (strategy, budget)), None)
            cells.append("—" if r is None else f"{r['agreement']:.2f}")
        lines.append(f"| stolen agreement, {strategy}, {budget} queries | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> None:
    """out/report.json, out/report.md and out/agreement.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    meta = result.get("meta", {})
    md = [f"# Stealing through {result['target']}", "",
          f"Made by `{meta.get('command', 'stealguard-attack run')}` in "
          f"{meta.get('seconds', 0):.0f} s. Agreement: top-1 agreement with the base model's "
          f"answers ({result['baseline_model']}) on {result['test_samples']} held-out "
          f"{result['dataset']} test inputs (base accuracy {result['base_accuracy']:.3f}); "
          f"stolen models are {result['architecture']}.", "", render_table(result), "",
          "![agreement](agreement.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in result["models"].items():
        for strategy in dict.fromkeys(r["strategy"] for r in entry["runs"]):
            runs = sorted((r for r in entry["runs"] if r["strategy"] == strategy),
                          key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in runs], [r["agreement"] for r in runs], "o-",
                    label=f"{name}: {strategy}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("queries")
    ax.set_ylabel("stolen agreement with base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "agreement.png", dpi=120)
    plt.close(fig)
