"""contract.md, contract.json and the figures, from contract-runs.jsonl and utility.json.

Intervals are 95% t-intervals over attacker seeds. Comparisons are paired by seed (the
same queries and initial weights on both sides): a difference "beats" when its mean
exceeds its interval's half-width, and is "within" otherwise.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

METRICS = ("agreement", "runner_up")


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for one value."""
    v = np.asarray(list(values), np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    t = student_t.ppf(0.975, len(v) - 1)
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def _short_label(defense: dict) -> str:
    """A defense by the parameters that tell policies apart: coarse_confidence's edges."""
    edges = [f"{v:.10g}" for _, v in sorted((int(k[5:]), v) for k, v in
                                            defense["params"].items()
                                            if k.startswith("edge_"))]  # edge_10 after edge_9
    if defense["name"] == "coarse_confidence":
        return f"coarse_confidence, edges {' / '.join(edges) or 'none'}"
    return _defense_label(defense)


def _defense_label(defense: dict) -> str:
    params = ", ".join(f"{k} {v:.10g}" if k.startswith("edge_") else f"{k} {v:g}"
                       for k, v in defense["params"].items() if k != "preserve_top1")
    return f"{defense['name']}({params})" if params else defense["name"]


def role(run: dict) -> str:
    """The stage a run is reported under. Runs of the full stage are the default's, the
    alternative's or the richer policy's, told apart by their defense, so that changing
    which policy is the default re-labels its runs instead of invalidating them."""
    from stealguard.attacks.contract import FULL_DEPTH, FULL_STAGE

    if run["stage"] != FULL_STAGE:
        return run["stage"]
    return next((name for name, policy in FULL_DEPTH.items()
                 if run["defense"] == policy.describe()), "other")


def group(runs: list[dict]) -> dict:
    """{(role, defense label, strategy, budget): {seed: run}}."""
    out: dict = defaultdict(dict)
    for r in runs:
        out[(role(r), _defense_label(r["defense"]), r["strategy"], r["budget"])][r["seed"]] = r
    return out


def paired(a: dict, b: dict, metric: str) -> tuple[float, float, int]:
    """Mean and half-width of a - b over the seeds both have, and how many."""
    seeds = sorted(set(a) & set(b))
    mean, hw = interval([a[s][metric] - b[s][metric] for s in seeds]) if seeds else (math.nan,
                                                                                     math.nan)
    return mean, hw, len(seeds)


def _beats(mean: float, hw: float) -> bool | None:
    if math.isnan(mean) or math.isnan(hw):
        return None
    return mean > hw


def checks(groups: dict, stage: str) -> list[dict]:
    """For each budget of `stage`: every attack against the contract floor (the learned
    thief against the stronger of it and the learned thief on labels), and the contract
    floor against argmax-only (the best label-only thief), on each metric."""
    from stealguard.attacks.contract import LEARNED

    out = []
    budgets = sorted({k[3] for k in groups if k[0] == stage})
    for b in budgets:
        cells = {k[2]: v for k, v in groups.items() if k[0] == stage and k[3] == b}
        floors = {k[2]: v for k, v in groups.items() if k[0] == "floor" and k[3] == b}
        floor_cf = cells.get("contract-floor")
        for metric in METRICS:
            if floors and floor_cf:
                best = max(floors, key=lambda s: interval(r[metric] for r in floors[s].values())[0])
                mean, hw, n = paired(floor_cf, floors[best], metric)
                out.append({"budget": b, "metric": metric, "attack": "contract-floor",
                            "against": f"argmax-only ({best})", "difference": mean,
                            "interval": hw, "seeds": n, "beats": _beats(mean, hw)})
            if floor_cf:
                for strategy, cell in sorted(cells.items()):
                    if strategy == "contract-floor":
                        continue
                    floor, against = floor_cf, "contract-floor"
                    if strategy == LEARNED and LEARNED in floors and (
                            interval(r[metric] for r in floors[LEARNED].values())[0]
                            > interval(r[metric] for r in floor_cf.values())[0]):
                        # a learned thief brings its shadow model's prior (each class's
                        # usual confusions); on this metric the same thief on labels only
                        # is the stronger floor
                        floor, against = floors[LEARNED], "argmax-only (learned on labels)"
                    mean, hw, n = paired(cell, floor, metric)
                    out.append({"budget": b, "metric": metric, "attack": strategy,
                                "against": against, "difference": mean,
                                "interval": hw, "seeds": n, "beats": _beats(mean, hw)})
    return out


def _cell(cell: dict, metric: str) -> str:
    mean, hw = interval(r[metric] for r in cell.values())
    return f"{mean:.3f}" if math.isnan(hw) else f"{mean:.3f} ± {hw:.3f}"


def _stage_table(groups: dict, stages: tuple[str, ...]) -> list[str]:
    rows = sorted((k for k in groups if k[0] in stages), key=lambda k: (k[3], k[0], k[2]))
    lines = ["| budget | thief | trains on answers of | seeds | agreement | runner-up | "
             "KL(victim ‖ stolen) |", "|---|---|---|---|---|---|---|"]
    for k in rows:
        cell = groups[k]
        lines.append(f"| {k[3]} | {k[2]} | {k[1]} | {len(cell)} | {_cell(cell, 'agreement')} | "
                     f"{_cell(cell, 'runner_up')} | {_cell(cell, 'kl')} |")
    return lines


def _checks_table(items: list[dict]) -> list[str]:
    lines = ["| budget | metric | attack | against | difference | verdict |",
             "|---|---|---|---|---|---|"]
    for c in items:
        verdict = {True: "**beats**", False: "within", None: "undetermined (one seed)"}[c["beats"]]
        hw = "" if math.isnan(c["interval"]) else f" ± {c['interval']:.3f}"
        lines.append(f"| {c['budget']} | {c['metric']} | {c['attack']} | {c['against']} | "
                     f"{c['difference']:+.3f}{hw} ({c['seeds']} seeds) | {verdict} |")
    return lines


def _config(described: dict) -> dict | None:
    """The sidecar policy of the shipped frontier defense that describes itself so."""
    from stealguard.attacks.contract import FRONTIER

    for spec in FRONTIER:
        if spec.describe() == described:
            return {"defense": spec.name, **spec.params}
    return None


def frontier(groups: dict, utilities: list[dict]) -> list[dict]:
    """Per shipped defense: the utility figures and the best frontier attack."""
    out = []
    for u in utilities:
        label = _defense_label(u["defense"])
        cells = {k[2]: v for k, v in groups.items() if k[0] == "frontier" and k[1] == label}
        best = {}
        for metric in METRICS:
            scored = [(interval(r[metric] for r in c.values())[0], s) for s, c in cells.items()]
            best[metric] = max(scored) if scored else (math.nan, "")
        out.append({"defense": label, "spec": u["defense"], "config": _config(u["defense"]),
                    **{k: v for k, v in u.items() if k != "defense"},
                    "best_agreement": best["agreement"][0], "best_agreement_by":
                    best["agreement"][1], "best_runner_up": best["runner_up"][0],
                    "best_runner_up_by": best["runner_up"][1]})
    return out


def label_floor(groups: dict, budget: int | None) -> dict | None:
    """The argmax-only floor at `budget`: the best label-only thief (floor stage, against the
    undefended model) by mean over seeds, for agreement and for runner-up agreement."""
    cells = {k[2]: v for k, v in groups.items() if k[0] == "floor" and k[3] == budget}
    if not cells:
        return None
    out: dict = {"budget": budget, "seeds": min(len(c) for c in cells.values())}
    for metric in METRICS:
        out[metric], out[f"{metric}_by"] = max(
            (interval(r[metric] for r in c.values())[0], s) for s, c in cells.items())
    return out


def _frontier_budget(groups: dict) -> int | None:
    budgets = {k[3] for k in groups if k[0] == "frontier"}
    return max(budgets) if budgets else None


def _victim_lines(victims: Counter) -> list[str]:
    if len(victims) < 2:
        return []
    parts = "; ".join(f"{n} runs against {v}" for v, n in victims.most_common())
    return [f"**Warning: these runs attacked {len(victims)} different victims** ({parts}). "
            "Comparisons pair runs by seed, so some pairs mix victims; re-run on one victim "
            "for figures that can be cited as one experiment.", ""]


def _floor_lines(floor: dict | None) -> list[str]:
    if floor is None:
        return ["The argmax-only floor at the frontier budget was not run."]
    return [f"The argmax-only floor at {floor['budget']} queries ({floor['seeds']} seeds): "
            f"agreement {floor['agreement']:.3f} ({floor['agreement_by']}), runner-up "
            f"{floor['runner_up']:.3f} ({floor['runner_up_by']})."]


def _calibration_lines(rows: list[dict], floor: dict | None,
                       beaten: list[dict] = ()) -> list[str]:
    """What `stealguard-attack calibrate --from-contract` chooses from this frontier."""
    from stealguard.attacks.calibrate import FrontierError, choose_from_frontier

    try:
        choice = choose_from_frontier(rows, floor=floor, beaten=beaten)
    except FrontierError as e:
        return [f"`stealguard-attack calibrate --from-contract` cannot choose yet: {e}."]
    return [f"`stealguard-attack calibrate --from-contract` chooses **{choice['defense']}**: "
            f"{choice['reason']}."]


def _frontier_table(rows: list[dict]) -> list[str]:
    from stealguard.attacks.contract import contract_holds

    lines = ["| defense | contract (label) | label kept, round 2 / float32 | Spearman(top) | "
             "mean top served | top error | L1 | cosine | KL | best thief agreement | "
             "best thief runner-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "holds" if contract_holds(r) else "fails"
        lines.append(
            f"| {r['defense']} | {ok} | {r['label_kept_round2']:.3f} / "
            f"{r['label_kept_float32']:.3f} | {r['spearman_top']:.2f} | "
            f"{r['mean_top_served']:.3f} | {r['top_error']:.3f} | {r['l1']:.3f} | "
            f"{r['cosine']:.3f} | {r['kl']:.2f} | {r['best_agreement']:.3f} "
            f"({r['best_agreement_by']}) | {r['best_runner_up']:.3f} ({r['best_runner_up_by']}) |")
    return lines


STYLES = {"floor": "k--", "default": "-", "alternative": "-.", "richer": "--", "paper": ":"}
ROLES = {"default": "the default", "alternative": "the alternative",
         "richer": "the richer policy", "paper": "the paper's RS 1.5/0.3"}


def plot(groups: dict, path: Path, title: str) -> None:
    """Agreement and runner-up agreement against queries, with 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5))
    series = defaultdict(dict)
    for (stage, _, strategy, budget), cell in groups.items():
        if stage in STYLES:
            series[(stage, strategy)][budget] = cell
    for (stage, strategy), by_budget in sorted(series.items()):
        budgets = sorted(by_budget)
        style = STYLES[stage]
        name = f"{strategy} on {ROLES[stage]}" if stage != "floor" else f"{strategy} (floor)"
        for ax, metric in zip(axes, METRICS, strict=True):
            stats = [interval(r[metric] for r in by_budget[b].values()) for b in budgets]
            means = np.array([s[0] for s in stats])
            hws = np.nan_to_num(np.array([s[1] for s in stats]))
            (line,) = ax.plot(budgets, means, style, marker="o", ms=3, label=name)
            ax.fill_between(budgets, means - hws, means + hws, alpha=0.15,
                            color=line.get_color())
    for ax, metric in zip(axes, ("top-1 agreement", "runner-up agreement"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("queries")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.22, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, meta: dict) -> str:
    """contract.md, contract.json and contract_agreement.png in `out`; returns a summary."""
    from stealguard.attacks.contract import read_runs

    runs = read_runs(out)
    groups = group(runs)
    utilities = json.loads((out / "utility.json").read_text()) if (out / "utility.json"
                                                                    ).exists() else []
    from stealguard.attacks.contract import FULL_DEPTH

    all_checks = {name: checks(groups, name) for name in (*FULL_DEPTH, "paper")}
    front = frontier(groups, utilities)
    floor = label_floor(groups, _frontier_budget(groups))
    (out / "contract.json").write_text(json.dumps(
        {"meta": meta, "checks": all_checks,
         **{name: policy.describe() for name, policy in FULL_DEPTH.items()},
         "frontier": front, "label_floor": floor, "runs": len(runs)},
        indent=1, default=float) + "\n")
    label = {name: _short_label(policy.describe()) for name, policy in FULL_DEPTH.items()}
    if runs:
        plot(groups, out / "contract_agreement.png", f"{meta.get('dataset', '')}: thieves "
             f"against the default ({label['default']}), the alternative "
             f"({label['alternative']}),\nthe richer policy ({label['richer']}) and the "
             "paper's Reverse Sigmoid (95% bands over attacker seeds)")
    beaten = {name: [c for c in cs if c["beats"]] for name, cs in all_checks.items()}
    default_checks = all_checks["default"]
    from stealguard.attacks.contract import identity

    victims = Counter(identity(r) for r in runs)
    lines = [
        f"# {meta.get('dataset', '')}: the utility contract and the Kerckhoffs attacker", "",
        f"Made by `{meta.get('command', 'stealguard-attack contract')}` ({len(runs)} runs). "
        "Intervals: 95% t over attacker seeds; comparisons paired by seed.", "",
        *_victim_lines(victims),
        "## Utility and protection of every shipped defense (the frontier)", "",
        "Utility on the held-out test answers (contract rows: raw margin ≥ 0.02). "
        "Protection: the best of Sample, the contract floor and (Reverse Sigmoid) closed-form "
        "inversion at the frontier budget, mean over the frontier seeds.", "",
        *_floor_lines(floor), "",
        *_frontier_table(front), "",
        *_calibration_lines(front, floor, [FULL_DEPTH[name].describe() for name in FULL_DEPTH
                                           if beaten[name]]), "",
        f"## The default, {label['default']}, under every attack", "",
        *_stage_table(groups, ("floor", "default")), "",
        "### Checks", "",
        *_checks_table(default_checks), "",
        f"{len(beaten['default'])} of {len(default_checks)} comparisons beat their floor. The "
        "learned thief is compared with the stronger, per metric, of the contract floor and "
        "the same thief trained on labels only (its shadow model's prior: what labels give "
        "it).", "",
        *_neighbour_lines("alternative", label["alternative"], "less", groups, all_checks),
        *_neighbour_lines("richer", label["richer"], "more", groups, all_checks),
        "## The paper's Reverse Sigmoid (beta 1.5, gamma 0.3, guard) under the same attacks", "",
        *_stage_table(groups, ("paper",)), "",
        *_checks_table(all_checks["paper"]), "",
        "![agreement](contract_agreement.png)", "",
    ]
    (out / "contract.md").write_text("\n".join(lines))
    counts = "; ".join(f"{name}: {len(beaten[name])} of {len(all_checks[name])}"
                       for name in FULL_DEPTH)
    return (f"{len(runs)} runs; comparisons that beat their floor, {counts}; "
            f"wrote {out}/contract.md, contract.json")


def _neighbour_lines(name: str, label: str, direction: str, groups: dict,
                     all_checks: dict) -> list[str]:
    """The section of a neighbour of the default on the frontier."""
    found = all_checks[name]
    return [f"## {ROLES[name].capitalize()}, {label}, under the same attacks", "",
            f"The next policy on the frontier with {direction} confidence order, at the "
            "default's depth: the floors above are its floors too.", "",
            *_stage_table(groups, (name,)), "",
            *_checks_table(found), "",
            f"{sum(1 for c in found if c['beats'])} of {len(found)} comparisons beat their "
            "floor.", ""]
