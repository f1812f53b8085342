"""Choosing a policy: from a contract run's frontier, or Reverse Sigmoid's beta and gamma by
the paper's rule (Sec. IV-B).

From the frontier (`choose_from_frontier`, `calibrate --from-contract DIR`): among the
shipped defenses whose label contract holds and whose best frontier thief was measured, those
that keep every thief at argmax-only (best-thief agreement and runner-up agreement each at
most `tolerance` above the argmax-only floor: the best label-only thief against the
undefended model); among those the one that keeps the most confidence order (Spearman of the
top probability), then the smallest top error. When none is at the floor (or the floor was
not run), the strongest protection: the rows within `tolerance` of the lowest. A defense that
was also run at full depth (every attack, budget and seed) and beat a floor there is not
chosen: the frontier is one budget and three seeds, the full-depth checks are paired
intervals at every budget (`beaten_at_depth`).

The paper's rule:

"The best parameters for the defense methods are searched using grid search to achieve the
highest cosine similarity to the original model with at least 20% accuracy drop in stealing
with attacker budget of 19200. When we cannot find parameters satisfying 20% accuracy drop
in stealing, we instead choose the parameters with the highest accuracy drop in stealing."

Here: for each (beta, gamma) on the grid, run the Sample attack at the budget against
P(M, Reverse Sigmoid with the top-1 guard); keep the pairs whose stolen agreement is at
least `min_drop` below the undefended Sample attack's; pick the one whose protected outputs
have the highest mean cosine similarity to the base model's.
"""

from __future__ import annotations

import math

import yaml
from stealguard.attacks.contract import contract_holds
from stealguard.attacks.experiment import NO_DEFENSE, Experiment, Run, reverse_sigmoid

MIN_DROP = 0.20
FRONTIER_TOLERANCE = 0.02


class FrontierError(ValueError):
    """The frontier cannot support a choice (no measured row meets the contract)."""


def beaten_at_depth(report: dict) -> list[dict]:
    """The defenses (as contract.json describes them) that a full-depth check found beaten:
    some attack above its floor by more than the interval, at some budget."""
    return [report[role] for role, found in report.get("checks", {}).items()
            if role in report and any(c.get("beats") for c in found)]


def choose_from_frontier(rows: list[dict], tolerance: float = FRONTIER_TOLERANCE,
                         floor: dict | None = None, beaten: list[dict] = ()) -> dict:
    """The frontier row to serve, with the reason: {"defense", "config", "reason",
    "candidates"}. `rows` are contract.json's "frontier" entries, `floor` its "label_floor"
    ({"agreement", "runner_up", ...}), `beaten` the defenses its full-depth checks found
    beaten (`beaten_at_depth`); the undefended row is never chosen."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise FrontierError(f"tolerance must be a number >= 0, not {tolerance}")
    measured = [r for r in rows if r.get("spec", {}).get("name") != "none"
                and math.isfinite(r.get("best_agreement", math.nan))
                and math.isfinite(r.get("best_runner_up", math.nan))]
    excluded = [r for r in measured if r.get("spec") in beaten]
    measured = [r for r in measured if r not in excluded]
    if not measured:
        raise FrontierError("no defense of the frontier has a measured best thief (run "
                            "`stealguard-attack contract` without --no-frontier)")
    eligible = [r for r in measured if contract_holds(r)]
    if not eligible:
        raise FrontierError(f"none of the {len(measured)} measured defenses keeps the label "
                            "contract")
    def within(agreement: float, runner_up: float) -> list[dict]:
        return [r for r in eligible if r["best_agreement"] <= agreement + tolerance + 1e-12
                and r["best_runner_up"] <= runner_up + tolerance + 1e-12]

    strongest = within(floor["agreement"], floor["runner_up"]) if floor else []
    if strongest:
        target = (f"keep every thief within {tolerance:g} of the argmax-only floor (agreement "
                  f"{floor['agreement']:.3f}, runner-up {floor['runner_up']:.3f})")
    else:
        low = (min(r["best_agreement"] for r in eligible),
               min(r["best_runner_up"] for r in eligible))
        strongest = within(*low)
        target = ((f"none is within {tolerance:g} of the argmax-only floor; " if floor else
                   "the argmax-only floor was not run; ") +
                  f"within {tolerance:g} of the strongest protection (agreement {low[0]:.3f}, "
                  f"runner-up {low[1]:.3f})")
    best = max(strongest, key=lambda r: (r["spearman_top"], -r["top_error"]))
    dropped = (f" ({len(excluded)} more left out: beaten at full depth, "
               f"{', '.join(r['defense'] for r in excluded)})" if excluded else "")
    reason = (f"{len(eligible)} of {len(measured)} measured defenses keep the contract"
              f"{dropped}; "
              f"{len(strongest)} {target}; this one keeps the most confidence order "
              f"(Spearman {best['spearman_top']:.3f}, top error {best['top_error']:.3f}; best "
              f"thief agreement {best['best_agreement']:.3f} by {best['best_agreement_by']}, "
              f"runner-up {best['best_runner_up']:.3f} by {best['best_runner_up_by']})")
    return {"defense": best["defense"], "config": best.get("config"), "reason": reason,
            "candidates": [r["defense"] for r in strongest]}


def config_policy_yaml(name: str, config: dict) -> str:
    """The sidecar config fragment serving the policy `config` ({"defense", ...}) as
    `name`."""
    return yaml.safe_dump({"policies": {name: dict(config)}}, default_flow_style=None,
                          sort_keys=False)


def calibrate(exp: Experiment, betas, gammas, budget: int, min_drop: float = MIN_DROP) -> dict:
    """Grid search of (beta, gamma) on the experiment's base model. Returns the chosen
    pair with the evidence: {"beta", "gamma", "budget", "baseline_agreement", "met",
    "reason", "grid": [{"beta", "gamma", "agreement", "drop", "cosine", "mae", "kl",
    "protected_agreement"}, ...]}. Records of every run are kept in exp.records."""
    # the undefended Sample attack at this budget: the mean of the curve's seeds, if run
    baselines = [r for r in exp.records
                 if r["strategy"] == "sample" and r["defense"]["name"] == "none"
                 and r["budget"] == budget]
    if not baselines:
        baselines = [exp.run(Run("calibration", "sample", NO_DEFENSE, budget))]
    baseline = sum(r["agreement"] for r in baselines) / len(baselines)
    grid = []
    for beta in betas:
        for gamma in gammas:
            record = exp.run(Run("calibration", "sample", reverse_sigmoid(beta, gamma), budget))
            grid.append({
                "beta": beta, "gamma": gamma,
                "agreement": record["agreement"],
                "drop": baseline - record["agreement"],
                **{k: record[k] for k in ("cosine", "mae", "kl", "protected_agreement")},
            })
    kept = [g for g in grid if g["drop"] >= min_drop - 1e-12]
    if kept:
        best = max(kept, key=lambda g: g["cosine"])
        reason = (f"{len(kept)} of {len(grid)} pairs drop Sample's agreement by >= {min_drop:.2f}"
                  f"; highest cosine {best['cosine']:.3f}")
    else:
        best = max(grid, key=lambda g: g["drop"])
        reason = (f"no pair drops Sample's agreement by {min_drop:.2f}; largest drop "
                  f"{best['drop']:.3f} chosen (the paper's fallback)")
    return {
        "beta": best["beta"], "gamma": best["gamma"], "budget": budget,
        "baseline_agreement": baseline, "min_drop": min_drop,
        "met": bool(kept), "reason": reason, "grid": grid,
    }


def policy_yaml(name: str, beta: float, gamma: float) -> str:
    """The sidecar config fragment for the chosen pair."""
    policy = {"defense": "reverse_sigmoid", "beta": float(beta), "gamma": float(gamma),
              "preserve_top1": True}
    return yaml.safe_dump({"policies": {name: policy}}, default_flow_style=None,
                          sort_keys=False)
