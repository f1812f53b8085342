"""The utility contract and the Kerckhoffs attacker: what honest callers keep, what thieves
get, per defense (README, "Choosing the default").

    stealguard-attack contract --dataset mnist --out attacks/results/mnist

reads top to bottom:
 1. the base model M and its answers on the held-out test inputs;
 2. utility of every defense on those answers (`utility`): does the label survive rounding
    and float32 on the rows whose raw margin is at least 0.02, how much of the confidence
    order is kept (Spearman of raw and served top), L1, cosine, KL, top error;
 3. the floors at every budget and attacker seed: argmax-only (the labels as ArgmaxSample
    trains on them, and label-smoothed, the stronger label-only thief) against M;
 4. every attack of the suite against the default defense and against the paper's Reverse
    Sigmoid, at every budget and seed, formula-aware ones included: the contract floor
    (label and served top, rest uniform), closed-form inversion, estimated parameters,
    learned recovery, rounded argmax, and Sample;
 5. the frontier: Sample, the contract floor and (for Reverse Sigmoid) closed-form
    inversion against every defense we ship, at one budget.
Every run appends one JSON line to contract-runs.jsonl, so several processes can share
the work (`--budgets`) and `contract-report` renders what is there. Comparisons are paired
by attacker seed (the same queries and initial weights): "beats" means the mean paired
difference exceeds its 95% t-interval.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from stealguard.attacks import strategies
from stealguard.attacks.experiment import NO_DEFENSE, DefenseSpec, profile_for
from stealguard.attacks.metrics import agreement, cosine, kl
from stealguard.attacks.oracles import LocalOracle
from stealguard.attacks.strategies import Attacker
from stealguard.attacks.training import predict
from stealguard.modelserver.datasets import Dataset
from torch import nn

CONTRACT_MARGIN_RAW = 0.02  # rows whose raw top-1 margin is at least this ...
CONTRACT_MARGIN_SERVED = 0.01  # ... are served with at least this margin
RUNS_FILE = "contract-runs.jsonl"

DEFAULT = DefenseSpec("coarse_confidence")  # twelve levels: 0.5, 0.7, two per nine to 0.99999
# The neighbour of the default on the frontier with less confidence order, run at the
# default's full depth (every attack, budget and attacker seed), so that choosing between
# the two is a measurement: six levels, one per nine from 0.9 (the default before this one).
ALTERNATIVE = DefenseSpec("coarse_confidence", {"edges": [0.9, 0.99, 0.999, 0.9999, 0.99999]})
# Its neighbour on the other side, for operators who want more confidence order: sixteen
# levels, the default's and two per nine on to 0.9999999 (Spearman of the served top 0.996
# on MNIST and 0.995 on digits, against the default's 0.986 and 0.930), measured at the same
# depth so that its price is stated, not guessed.
RICHER = DefenseSpec("coarse_confidence", {"edges": [
    0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999, 0.99997, 0.99999, 0.999997,
    0.999999, 0.9999997, 0.9999999]})
# Earlier defaults, on the frontier: four levels and three.
FOUR_LEVELS = DefenseSpec("coarse_confidence", {"edges": [0.9, 0.999, 0.99999]})
PREVIOUS = DefenseSpec("coarse_confidence", {"edges": [0.999, 0.99999]})  # three levels
FULL_STAGE = "full"  # the policies of FULL_DEPTH; the report tells them apart by defense
FULL_DEPTH = {"default": DEFAULT, "alternative": ALTERNATIVE, "richer": RICHER}
VICTIM_FILE, VICTIM_META = "victim.pt", "victim.json"
PAPER_RS = DefenseSpec("reverse_sigmoid", {"beta": 1.5, "gamma": 0.3, "preserve_top1": True})
FRONTIER = (
    NO_DEFENSE,
    DefenseSpec("coarse_confidence", {"edges": []}),
    DefenseSpec("coarse_confidence", {"edges": [0.99999]}),
    PREVIOUS,
    FOUR_LEVELS,
    ALTERNATIVE,
    DEFAULT,
    RICHER,
    DefenseSpec("rounded", {"decimals": 2}),
    DefenseSpec("top_k", {"k": 1}),
    DefenseSpec("class_labels"),
    DefenseSpec("gaussian_noise", {"scale": 0.1}),
    DefenseSpec("reverse_sigmoid", {"beta": 0.5, "gamma": 0.25, "preserve_top1": True}),
    DefenseSpec("reverse_sigmoid", {"beta": 1.0, "gamma": 0.5, "preserve_top1": True}),
    PAPER_RS,
)
# Floors: label-only thieves against the undefended model (a defense that keeps the top-1
# label gives them the same labels).
FLOOR_STRATEGIES = ("argmax", "label-smoothed")
# The learned (D-DAE) thief against label-only answers: what its shadow model's prior alone
# gives (the usual confusions of each class), so that a learned thief's runner-up agreement
# is compared with what it gets from labels, not only with the contract floor.
LABELS = DefenseSpec("class_labels")
LEARNED = "learned"
CONTRACT_FLOOR = "contract-floor"


@dataclass(frozen=True)
class ContractProfile:
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]  # floors and the default
    paper_seeds: tuple[int, ...]  # the paper's Reverse Sigmoid
    frontier_budget: int
    frontier_seeds: tuple[int, ...]
    learned_pairs: int
    learned_steps: int


FULL = ContractProfile(budgets=(50, 250, 1000, 4000), seeds=(0, 1, 2, 3, 4),
                       paper_seeds=(0, 1, 2), frontier_budget=1000, frontier_seeds=(0, 1, 2),
                       learned_pairs=4000, learned_steps=3000)
QUICK = ContractProfile(budgets=(50,), seeds=(0, 1), paper_seeds=(0,), frontier_budget=50,
                        frontier_seeds=(0,), learned_pairs=200, learned_steps=100)


def runner_up(probs: np.ndarray) -> np.ndarray:
    """The second most probable class of each row."""
    return np.argsort(np.asarray(probs), axis=1, kind="stable")[:, -2]


def margins(probs: np.ndarray) -> np.ndarray:
    """Top minus runner-up probability of each row."""
    ordered = np.sort(np.asarray(probs, np.float64), axis=1)
    return ordered[:, -1] - ordered[:, -2]


def _label_kept(served: np.ndarray, raw_labels: np.ndarray) -> np.ndarray:
    """Rows whose served argmax is the raw label and is not tied with another class."""
    served = np.asarray(served, np.float64)
    return (served.argmax(1) == raw_labels) & (margins(served) > 0)


def utility(served: np.ndarray, raw: np.ndarray) -> dict[str, float]:
    """What an honest caller keeps of the raw answers `raw` when served `served`.

    The contract rows are those with a raw margin of at least 0.02; on them the served
    margin must be at least 0.01 and the label must survive rounding to 2 decimals and a
    float32 cast (a tie counts as lost). Confidence order is Spearman(raw top, served
    top) over all rows.
    """
    from scipy.stats import spearmanr

    raw = np.asarray(raw, np.float64)
    served = np.asarray(served, np.float64)
    labels = raw.argmax(1)
    rows = margins(raw) >= CONTRACT_MARGIN_RAW
    kept = {f"label_kept_round{d}": float(_label_kept(np.round(served, d), labels)[rows].mean())
            for d in (2, 3, 4, 6)}
    served_top = served[np.arange(len(served)), labels]
    served_tops = served.max(1)
    rho = (spearmanr(raw.max(1), served_tops).statistic
           if np.ptp(served_tops) > 0 else 0.0)  # one level: no order kept
    return {
        "contract_rows": float(rows.mean()),
        "served_margin_ok": float((margins(served)[rows] >= CONTRACT_MARGIN_SERVED - 1e-12)
                                  .mean()),
        "min_served_margin": float(margins(served)[rows].min()) if rows.any() else math.nan,
        **kept,
        "label_kept_float32": float(_label_kept(served.astype(np.float32), labels)[rows]
                                    .mean()),
        "spearman_top": float(rho) if np.isfinite(rho) else 0.0,
        "mean_top_raw": float(raw.max(1).mean()),
        "mean_top_served": float(served.max(1).mean()),
        "top_error": float(np.abs(served_top - raw.max(1)).mean()),
        "l1": float(np.abs(served - raw).sum(1).mean()),
        "cosine": cosine(served, raw),
        "kl": kl(raw, served),
        "runner_up_served": float((runner_up(served) == runner_up(raw)).mean()),
    }


def contract_holds(u: dict[str, float]) -> bool:
    """The label half of the contract: margin and label kept on every contract row."""
    return (u["served_margin_ok"] == 1.0 and u["label_kept_round2"] == 1.0
            and u["label_kept_float32"] == 1.0)


@dataclass(frozen=True)
class Plan:
    stage: str
    strategy: str
    defense: DefenseSpec
    budget: int
    seed: int
    options: tuple = ()  # (key, value) pairs of the strategy's keyword arguments


def attack_plans(defense: DefenseSpec, budget: int, seed: int, p: ContractProfile,
                 stage: str) -> list[Plan]:
    """Every attack of the suite that applies to `defense`."""
    name, params = defense.name, defense.describe()["params"]
    published = tuple(sorted(defense.params.items()))
    learned = (("defense", name), ("params", published), ("pairs", p.learned_pairs),
               ("steps", p.learned_steps))
    plans = [Plan(stage, "sample", defense, budget, seed),
             Plan(stage, CONTRACT_FLOOR, defense, budget, seed),
             Plan(stage, "learned", defense, budget, seed, learned)]
    if name == "reverse_sigmoid":
        plans += [
            Plan(stage, "closed-form", defense, budget, seed,
                 (("defense", name), ("params", tuple(sorted(params.items()))))),
            Plan(stage, "estimated", defense, budget, seed, (("defense", name),)),
            Plan(stage, "argmax-rounded", defense, budget, seed),
        ]
    return plans


def plan_all(p: ContractProfile, budgets: Iterable[int] | None = None,
             frontier: bool = True) -> list[Plan]:
    """The floors, the policies of FULL_DEPTH and the paper's formula at every budget and
    seed, then the frontier."""
    plans = []
    for b in budgets or p.budgets:
        for s in p.seeds:
            plans += [Plan("floor", f, NO_DEFENSE, b, s) for f in FLOOR_STRATEGIES]
            for policy in FULL_DEPTH.values():
                plans += attack_plans(policy, b, s, p, FULL_STAGE)
            plans += [x for x in attack_plans(LABELS, b, s, p, "floor") if x.strategy == LEARNED]
    for b in budgets or p.budgets:
        for s in p.paper_seeds:
            plans += attack_plans(PAPER_RS, b, s, p, "paper")
    if frontier:
        for d in FRONTIER:
            for s in p.frontier_seeds:
                plans += [Plan("frontier", "sample", d, p.frontier_budget, s),
                          Plan("frontier", CONTRACT_FLOOR, d, p.frontier_budget, s)]
                if d.name == "reverse_sigmoid":
                    plans.append(attack_plans(d, p.frontier_budget, s, p, "frontier")[3])
    return plans


def _options(plan: Plan) -> dict:
    out = {}
    for key, value in plan.options:
        out[key] = dict(value) if key == "params" else value
    return out


def _key(plan: Plan) -> str:
    return json.dumps([plan.stage, plan.strategy, plan.defense.describe(), plan.budget,
                       plan.seed], sort_keys=True)


class ContractExperiment:
    """Runs plans against the base model of one dataset; one JSON line per run."""

    def __init__(self, ds: Dataset, model: nn.Module, out: Path, seed: int = 0):
        self.ds, self.model, self.seed = ds, model, seed
        profile = profile_for(ds, quick=False)
        self.attacker = Attacker.from_dataset(ds, profile.architecture, profile.train, seed)
        self.base_test = predict(model, ds.test_x)
        self.runs_path = out / RUNS_FILE
        runs = read_runs(out)
        self.weights, self.answers = weights_of(model), victim_of(self.base_test)
        others = Counter(identity(r) for r in runs
                         if identity(r) not in (self.weights, self.answers))
        if others:
            raise VictimMismatch(
                f"{self.runs_path} holds {sum(others.values())} runs against another victim "
                f"({'; '.join(others)}) than this one ({self.weights}); runs are paired by "
                "seed, so "
                f"they cannot be mixed: use a new --out, or move {RUNS_FILE} away")
        self.done = {r["key"] for r in runs}

    def run(self, plan: Plan) -> dict | None:
        """Carry out `plan` unless a run of it is already recorded; append its record."""
        key = _key(plan)
        if key in self.done:
            return None
        started = time.perf_counter()
        oracle = LocalOracle(self.model, plan.budget, plan.defense.build())
        attacker = replace(self.attacker, seed=self.seed + plan.seed)
        stolen = strategies.STRATEGIES[plan.strategy](oracle, plan.budget, attacker,
                                                      **_options(plan))
        stolen_test = predict(stolen, self.ds.test_x)
        record = {
            "key": key, "dataset": self.ds.name, "stage": plan.stage,
            "strategy": plan.strategy, "defense": plan.defense.describe(),
            "budget": plan.budget, "seed": attacker.seed, "queries": oracle.queries,
            "agreement": agreement(stolen_test, self.base_test),
            "runner_up": float((runner_up(stolen_test) == runner_up(self.base_test)).mean()),
            "kl": kl(self.base_test, stolen_test),
            "cosine": cosine(stolen_test, self.base_test),
            "victim": self.answers, "victim_weights": self.weights,
            "seconds": round(time.perf_counter() - started, 1),
        }
        line = json.dumps(record) + "\n"
        fd = os.open(self.runs_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write per line: processes can share the file
        finally:
            os.close(fd)
        self.done.add(key)
        return record

    def utilities(self) -> list[dict]:
        """The utility figures of every frontier defense on the test answers."""
        out = []
        for spec in FRONTIER:
            served = spec.build()(self.base_test)
            out.append({"defense": spec.describe(), **utility(served, self.base_test)})
        return out


class VictimMismatch(ValueError):
    """The results folder holds runs against another victim than the one loaded."""


def victim_model(dataset: str, out: Path, seed: int = 0,
                 log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """The model every run in `out` attacks: out/victim.pt when it is there, else the base
    model trained here (`experiment.base_model`), whose weights are then saved there.
    Training again on another machine or torch build gives another victim (floating-point
    order differs), so a results folder keeps its own and every later run attacks it."""
    import torch
    from stealguard.attacks.experiment import base_model
    from stealguard.modelserver.architectures import build_model

    weights, meta_path = out / VICTIM_FILE, out / VICTIM_META
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("dataset") != dataset:
            raise VictimMismatch(f"{weights} is a {meta.get('dataset')} model, not {dataset}")
        model = build_model(meta["architecture"], tuple(meta["input_shape"]), meta["num_classes"])
        model.load_state_dict(torch.load(weights, weights_only=True))
        log(f"victim: {weights} ({weights_of(model)})")
        return model.eval(), {**meta, "weights": str(weights)}
    model, info = base_model(dataset, seed=seed, log=log)
    trained = json.loads((Path(info["weights"]).parent / "meta.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    from stealguard.attacks.training import predict
    from stealguard.modelserver.datasets import load_dataset

    meta = {"dataset": dataset, "architecture": info["architecture"],
            "input_shape": trained["input_shape"], "num_classes": trained["num_classes"],
            "recipe": info["recipe"], "test_accuracy": trained["test_accuracy"],
            "torch_version": trained["torch_version"], "trained_at": trained["trained_at"],
            "victim": victim_of(predict(model, load_dataset(dataset, seed=seed).test_x)),
            "victim_weights": weights_of(model)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"victim: trained here, saved to {weights} ({meta['victim_weights']})")
    return model, {**meta, "weights": str(weights)}


def weights_of(model: nn.Module) -> str:
    """Which victim a run attacked: a hash of its weights. A retrained base model (another
    machine, another torch) is another victim, and runs against different victims must not
    be paired; the same weights are the same victim on any machine."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"weights sha256 {digest.hexdigest()[:12]}"


def identity(run: dict) -> str:
    """The victim a recorded run attacked: its weights, or for runs recorded before weights
    were, its answers."""
    return run.get("victim_weights") or run.get("victim", "not recorded")


def victim_of(base_test: np.ndarray) -> str:
    """A victim's test answers: their mean top and a hash. Informative only: the same
    weights answer with other rounding on another CPU (the MNIST victim's hash differs
    between the machine that trained it and this one), so runs are paired by weights."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(base_test, np.float64).tobytes()).hexdigest()
    return f"mean top {float(np.max(base_test, 1).mean()):.5f}, sha256 {digest[:12]}"


def read_runs(out: Path) -> list[dict]:
    path = out / RUNS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_contract(ds: Dataset, model: nn.Module, out: Path, profile: ContractProfile,
                 budgets: Iterable[int] | None = None, frontier: bool = True,
                 log: Callable[[str], None] = print) -> ContractExperiment:
    """Every planned run not yet recorded in `out`, then utility.json."""
    out.mkdir(parents=True, exist_ok=True)
    exp = ContractExperiment(ds, model, out)
    (out / "utility.json").write_text(json.dumps(exp.utilities(), indent=1) + "\n")
    plans = plan_all(profile, budgets, frontier)
    for i, plan in enumerate(plans, 1):
        record = exp.run(plan)
        if record is not None:
            log(f"[{i}/{len(plans)}] {plan.stage} {plan.strategy} vs {plan.defense.name} "
                f"at {plan.budget}, seed {plan.seed}: agreement {record['agreement']:.3f}, "
                f"runner-up {record['runner_up']:.3f} ({record['seconds']:.0f} s)")
    return exp


def render(out: Path, meta: dict) -> str:
    """Write contract.json and contract.md from what `out` holds; returns the summary."""
    from stealguard.attacks import contract_report

    return contract_report.write(out, meta)
