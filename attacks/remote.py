"""`stealguard-attack run`: steal models through a live TorchServe gRPC or REST endpoint.

The attack code is the experiment's; only the oracle differs (`remote_oracle`: gRPC for
HOST:PORT, REST for http://HOST:PORT). Scoring needs
the base model's answers on the held-out test inputs, which come from an unprotected model
on the same server (`--baseline-model`, default mnist-open); those scoring queries are not
part of any attack's budget. For each attacked model the report gives:
  - agreement of each stolen model with the base model (per strategy and budget), and
  - the attacked model's own top-1 agreement with the base model on the test inputs, with
    the cosine, MAE and KL distances of its answers from the base model's, and the utility
    contract's figures (`contract.utility`: label kept through rounding and float32,
    confidence order) as an honest caller of that model sees them.
Formula-aware strategies (closed-form, estimated, learned) know the defense and its
published parameters: `published` maps each model to (defense name, parameters), read from
the sidecar's ListPolicies by `published_policies`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from stealguard.attacks.contract import runner_up, utility
from stealguard.attacks.experiment import profile_for
from stealguard.attacks.kerckhoffs import constructor_params
from stealguard.attacks.metrics import accuracy, agreement, distortion, kl
from stealguard.attacks.oracles import OracleError, remote_oracle
from stealguard.attacks.strategies import STRATEGIES, Attacker
from stealguard.attacks.training import predict
from stealguard.modelserver.datasets import load_dataset


def _answers(target: str, model: str, x, timeout: float):
    with remote_oracle(target, model, len(x), timeout=timeout) as oracle:
        return oracle.query(x)


KNOWS_THE_DEFENSE = ("closed-form", "estimated", "learned")


def published_policies(sidecar: str, models: list[str], mapping: dict[str, str],
                       timeout: float = 10.0) -> dict[str, tuple[str, dict]]:
    """{model: (defense, published parameters)} from the sidecar's ListPolicies.

    A model's policy is `mapping[model]`, else the policy of the model's name, else
    `default`; the policy name `none` means the model is not protected.
    """
    import grpc
    from stealguard.v1 import defense_pb2, defense_pb2_grpc

    with grpc.insecure_channel(sidecar) as channel:
        try:
            reply = defense_pb2_grpc.DefenseStub(channel).ListPolicies(
                defense_pb2.ListPoliciesRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise OracleError(f"--policies-from {sidecar}: ListPolicies answered "
                              f"{e.code().name}: {e.details()}") from None
    policies = {p.name: (p.defense, dict(p.params)) for p in reply.policies}
    out = {}
    for model in models:
        name = mapping.get(model, model if model in policies else "default")
        if name == "none":
            out[model] = ("none", {})
        elif name in policies:
            out[model] = policies[name]
        else:
            raise OracleError(f"--policy {model}={name}: the sidecar at {sidecar} has no "
                              f"policy {name!r} (it has {', '.join(sorted(policies))})")
    return out


def _options(strategy: str, published: tuple[str, dict] | None, beta, gamma,
             quick: bool) -> dict:
    if strategy == "same-layer":
        return {"beta": beta, "gamma": gamma}
    if strategy not in KNOWS_THE_DEFENSE:
        return {}
    defense, params = published or ("none", {})
    params = constructor_params(defense, params)
    if strategy == "estimated":
        return {"defense": defense}
    if strategy == "closed-form":
        return {"defense": defense, "params": params}
    sizes = {"pairs": 200, "steps": 100} if quick else {}
    return {"defense": defense, "params": params, **sizes}


def run_remote(*, target: str, models: list[str], strategies: list[str], budgets: list[int],
               baseline_model: str, dataset: str = "mnist", architecture: str = "allconv",
               beta: float | None = None, gamma: float | None = None, timeout: float = 30.0,
               quick: bool = False, seed: int = 0,
               published: dict[str, tuple[str, dict]] | None = None,
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
                 "protected_accuracy": accuracy(answers[name], ds.test_y),
                 "utility": utility(answers[name], base),
                 "published": list((published or {}).get(name, ("unknown", {}))), "runs": []}
        for strategy in strategies:
            options = _options(strategy, (published or {}).get(name), beta, gamma, quick)
            for budget in budgets:
                started = time.perf_counter()
                log(f"{name}: {strategy} with {budget} queries")
                with remote_oracle(target, name, budget, timeout=timeout) as oracle:
                    stolen = STRATEGIES[strategy](oracle, budget, attacker, **options)
                    used = oracle.queries
                stolen_test = predict(stolen, ds.test_x)
                entry["runs"].append({
                    "strategy": strategy, "budget": budget, "queries": used,
                    "agreement": agreement(stolen_test, base),
                    "runner_up": float((runner_up(stolen_test) == runner_up(base)).mean()),
                    "kl": kl(base, stolen_test),
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
    contract = (("label_kept_round2", "label kept, rounded to 2 decimals (contract rows)"),
                ("label_kept_float32", "label kept, float32 (contract rows)"),
                ("spearman_top", "Spearman(raw top, served top)"),
                ("mean_top_served", "mean top probability served"),
                ("runner_up_served", "answers' runner-up = base runner-up"))
    for key, label in contract:
        lines.append(f"| {label} | " + " | ".join(
            f"{result['models'][n]['utility'][key]:.3f}" for n in names) + " |")
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
            cells.append("—" if r is None else
                         f"{r['agreement']:.2f} / {r.get('runner_up', float('nan')):.2f}")
        lines.append(f"| stolen agreement / runner-up, {strategy}, {budget} queries | "
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
