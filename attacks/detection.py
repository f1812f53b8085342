"""Does PRADA tell thieves from honest callers? The evaluation of issue 22, in process.

    stealguard-attack --torch-threads 1 detect --out attacks/results/detection

reads top to bottom:
 1. the victim: the MNIST model whose weights attacks/results/mnist commits, answering
    undefended through a `LocalOracle` that records every query it is sent;
 2. each attack spends its budget as one principal: Sample (the attacker's natural MNIST
    samples), ArgmaxSample, Jacobian augmentation, Random, and Knockoff with a surrogate
    set (scikit-learn's digits upscaled into MNIST's frame);
 3. calibration traffic, from the model owner's own training images: 20 clients of 1,000
    images each in random order; delta is the largest value on a 0.01 grid at which none
    of them is alarmed (chosen before anything below is looked at, never on the attacks);
 4. benign traffic: 20 clients, each sending the 1,000 held-out test images in its own
    random order: false alarms at that delta;
 5. every stream through PRADA, one principal each, the class being the victim's answer:
    W after each query, queries to detection, and what the thief's model agrees on at the
    full budget and when trained on what it had sent by detection;
 6. each detected attack once more against escalation to labels only (`EscalatingOracle`):
    its final agreement next to the undetected run's.
One JSON, one report, one figure.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from stealguard.attacks import strategies
from stealguard.attacks.metrics import agreement
from stealguard.attacks.oracles import LocalOracle
from stealguard.attacks.strategies import Attacker, one_hot
from stealguard.attacks.training import TrainConfig, predict
from stealguard.modelserver.datasets import Dataset
from stealguard.server.detection import ClassMix, Prada
from stealguard.server.detection.classmix import MIN_QUERIES, WINDOW
from torch import nn

#: attack name -> (strategy of attacks.strategies, where its samples come from)
ATTACKS: dict[str, tuple[str, str]] = {
    "sample": ("sample", "attacker"),
    "argmax": ("argmax", "attacker"),
    "jacobian": ("jacobian", "attacker"),
    "random": ("random", "attacker"),
    "knockoff": ("sample", "surrogate"),
}
LABEL_ONLY = ("argmax",)
DELTA_GRID = 0.01
SWEEP = tuple(round(0.85 + DELTA_GRID * i, 2) for i in range(12))  # 0.85 ... 0.96, reported
MNIST_BOX, MNIST_SIDE = 20, 28  # MNIST centres each digit's 20x20 box in a 28x28 frame


@dataclass(frozen=True)
class Plan:
    """The sizes of one evaluation."""

    budget: int = 4000
    clients: int = 20
    client_queries: int = 1000
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, min_steps=200, batch_size=128, lr=2e-3, temperature=4.0))
    architecture: str = "allconv"
    attacks: tuple[str, ...] = tuple(ATTACKS)
    seed: int = 0
    max_vectors: int = 1000  # the detector's caps (per principal)
    max_distances: int = 5000


class RecordingOracle(LocalOracle):
    """A `LocalOracle` that keeps every input it answers and its answer, in order."""

    def __init__(self, model: nn.Module, budget: int):
        super().__init__(model, budget)
        self.inputs: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []

    def _answer(self, x: np.ndarray) -> np.ndarray:
        return self._record(x, super()._answer(x))

    def _record(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        self.inputs.append(x.copy())
        self.answers.append(probs)
        return probs

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """(queries, answers) in the order they were sent."""
        return np.concatenate(self.inputs), np.concatenate(self.answers)


class EscalatingOracle(RecordingOracle):
    """Escalation to labels only, online: every query goes through `detector` as
    `principal` before it is answered; from the query that raises the alarm on, the
    answer is the label alone (one-hot), so an adaptive thief (Jacobian augmentation)
    builds the rest of its queries on labels. `alarmed_at`: that query's 1-based count."""

    def __init__(self, model: nn.Module, budget: int, detector: Prada, principal: str):
        super().__init__(model, budget)
        self.detector, self.principal = detector, principal
        self.alarmed_at: int | None = None

    def _answer(self, x: np.ndarray) -> np.ndarray:
        before = self.queries - len(x)  # Oracle.query has counted this batch already
        probs = predict(self.model, x)
        reading = self.detector.observe(self.principal, x, probs.argmax(1))
        if self.alarmed_at is None and reading.alarmed_at is not None:
            self.alarmed_at = reading.alarmed_at
        if self.alarmed_at is not None:
            labels = np.arange(before + 1, before + len(x) + 1) >= self.alarmed_at
            probs[labels] = one_hot(probs[labels])
        return self._record(x, probs)


def surrogate_digits() -> np.ndarray:
    """scikit-learn's 1,797 digits as MNIST images: each 8x8 digit (0-16) scaled to [0, 1],
    resized bilinearly to MNIST's 20x20 digit box and centred in a 28x28 frame of zeros,
    float32 (N, 1, 28, 28). A surrogate set of the same task from another source."""
    import torch
    from sklearn.datasets import load_digits

    small = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
    box = torch.nn.functional.interpolate(small, size=(MNIST_BOX, MNIST_BOX), mode="bilinear",
                                          align_corners=False).clamp(0, 1)
    pad = (MNIST_SIDE - MNIST_BOX) // 2
    return torch.nn.functional.pad(box, (pad, pad, pad, pad)).numpy()


def steal(attack: str, model: nn.Module, ds: Dataset, plan: Plan,
          oracle: RecordingOracle | None = None) -> dict:
    """Run `attack` against the undefended `model` for the plan's budget (through `oracle`,
    by default a plain recording one); its queries, the answers, and the stolen model."""
    strategy, source = ATTACKS[attack]
    attacker = Attacker.from_dataset(ds, plan.architecture, plan.train, plan.seed)
    if source == "surrogate":
        attacker = replace(attacker, samples=surrogate_digits())
    oracle = RecordingOracle(model, plan.budget) if oracle is None else oracle
    stolen = strategies.STRATEGIES[strategy](oracle, plan.budget, attacker)
    queries, answers = oracle.stream()
    return {"queries": queries, "answers": answers, "stolen": stolen, "attacker": attacker}


def benign_clients(pool: np.ndarray, clients: int, per_client: int,
                   seed: int) -> list[np.ndarray]:
    """`clients` streams of `per_client` images of `pool` (all of it when it holds no
    more), each in its own random order."""
    rng = np.random.default_rng(seed)
    take = min(per_client, len(pool))
    return [pool[rng.permutation(len(pool))[:take]] for _ in range(clients)]


def scores(detector: Prada, principal: str, model: nn.Module, x: np.ndarray,
           answers: np.ndarray | None = None) -> np.ndarray:
    """W after each query of `principal`'s stream `x` (classes: the victim's answers)."""
    answers = predict(model, x) if answers is None else answers
    return detector.observe(principal, x, answers.argmax(1)).scores


def first_alarm(w: np.ndarray, delta: float) -> int | None:
    """The 1-based query at which W first fell below `delta`, or None."""
    below = np.flatnonzero(w < delta)
    return int(below[0]) + 1 if len(below) else None


def choose_delta(calibration: list[np.ndarray]) -> float:
    """The largest delta on the 0.01 grid at which no calibration stream alarms
    (alarm: W < delta; so delta <= the smallest W any of them reached)."""
    lowest = min(float(np.nanmin(w)) for w in calibration)
    return round(math.floor(lowest / DELTA_GRID) * DELTA_GRID, 2)


def evaluate(ds: Dataset, model: nn.Module, plan: Plan,
             log: Callable[[str], None] = print) -> dict:
    """The whole evaluation (see the module docstring); a JSON-ready dict with every
    stream's W trajectory."""
    features = math.prod(ds.input_shape)
    # delta only decides alarms; the W trajectories are computed before it is known
    detector = Prada(features, delta=1.0, max_vectors=plan.max_vectors,
                     max_distances=plan.max_distances,
                     max_principals=2 * plan.clients + len(plan.attacks))
    base_test = predict(model, ds.test_x)

    log(f"calibration: {plan.clients} clients x {plan.client_queries} of the owner's "
        f"{len(ds.base_x)} training images")
    calibration_x = benign_clients(ds.base_x, plan.clients, plan.client_queries, plan.seed + 1)
    calibration_answers = [predict(model, x) for x in calibration_x]
    calibration = [scores(detector, f"calibration-{i}", model, x, a) for i, (x, a) in
                   enumerate(zip(calibration_x, calibration_answers, strict=True))]
    delta = choose_delta(calibration)
    log(f"  delta = {delta:.2f} (smallest calibration W "
        f"{min(np.nanmin(w) for w in calibration):.4f})")

    log(f"benign: {plan.clients} clients x the {len(ds.test_x)} held-out test images")
    benign_x = benign_clients(ds.test_x, plan.clients, plan.client_queries, plan.seed + 2)
    benign_answers = [predict(model, x) for x in benign_x]
    benign = [scores(detector, f"benign-{i}", model, x, a) for i, (x, a) in
              enumerate(zip(benign_x, benign_answers, strict=True))]
    alarmed = [first_alarm(w, delta) for w in benign]

    rows, attack_answers = [], []
    for attack in plan.attacks:
        started = time.perf_counter()
        run = steal(attack, model, ds, plan)
        w = scores(detector, f"attack-{attack}", model, run["queries"], run["answers"])
        attack_answers.append(predict(model, run["queries"]))  # raw, also under ArgmaxSample
        detected = first_alarm(w, delta)
        row = {
            "attack": attack,
            "strategy": ATTACKS[attack][0],
            "samples": ATTACKS[attack][1],
            "queries": len(run["queries"]),
            "queries_to_detect": detected,
            "min_w": float(np.nanmin(w)),
            "final_w": float(w[-1]),
            "agreement": agreement(predict(run["stolen"], ds.test_x), base_test),
            "agreement_at_detection": None,
            "w": w,
        }
        if detected is not None:
            row["agreement_at_detection"] = agreement(
                predict(_stolen_by(attack, run, detected), ds.test_x), base_test)
            row["escalated"] = _escalated(attack, model, ds, plan, delta, base_test)
        row["seconds"] = round(time.perf_counter() - started, 1)
        log(f"  {attack}: {detected_text(row)}, agreement {row['agreement']:.3f} at "
            f"{row['queries']} ({row['seconds']:.0f} s)")
        rows.append(row)

    hindsight = choose_delta(benign)
    sweep = [{"delta": d,
              "calibration_alarmed_clients": sum(first_alarm(w, d) is not None
                                                 for w in calibration),
              "benign_alarmed_clients": sum(first_alarm(w, d) is not None for w in benign),
              "benign_alarms": int(sum((w[~np.isnan(w)] < d).sum() for w in benign)),
              "queries_to_detect": {r["attack"]: first_alarm(r["w"], d) for r in rows}}
             for d in sorted({*SWEEP, delta, hindsight})]
    mix = class_mix(predict(model, ds.base_x), calibration_answers, benign_answers,
                    attack_answers, rows)
    return {
        "class_mix": mix,
        "delta": delta,
        "hindsight_delta": hindsight,
        "hindsight_rule": "largest value on the 0.01 grid with no alarm among the benign test "
                          "clients themselves (chosen on the traffic it is scored on: a bound, "
                          "not a deployable choice)",
        "sweep": sweep,
        "delta_rule": "largest value on a 0.01 grid with no alarm among the calibration "
                      "clients (the owner's training images), chosen before the benign and "
                      "attack streams were scored",
        "detector": {"features": features, "min_distances": detector.min_distances,
                     "max_vectors": plan.max_vectors, "max_distances": plan.max_distances},
        "calibration": _clients_summary(calibration, delta, "owner's training images"),
        "benign": {**_clients_summary(benign, delta, "held-out test images"),
                   "alarmed_at": alarmed},
        "attacks": rows,
    }


def class_mix(owner: np.ndarray, calibration: list[np.ndarray], benign: list[np.ndarray],
              attacks: list[np.ndarray], rows: list[dict]) -> dict:
    """The output-only signal (`ClassMix`) on the same streams: the reference mix is the
    victim's classes on all the owner's training images, the threshold the largest G any
    calibration client reaches, rounded up to the 0.5 grid (chosen before benign and attack
    streams are scored); alarms are G above it. Adds each attack row's "classmix" entry:
    queries to detect, and the first alarm of either signal."""
    classes = owner.shape[1]
    prior = np.bincount(owner.argmax(1), minlength=classes) / len(owner)

    def trajectories(streams, name):
        return g_trajectories([a.argmax(1) for a in streams], classes, prior, name)

    def first_above(g: np.ndarray, threshold: float) -> int | None:
        above = np.flatnonzero(g > threshold)
        return int(above[0]) + 1 if len(above) else None

    cal = trajectories(calibration, "calibration")
    threshold = threshold_above(cal)
    ben = trajectories(benign, "benign")
    for row, g in zip(rows, trajectories(attacks, "attack"), strict=True):
        q = first_above(g, threshold)
        either = [v for v in (q, row["queries_to_detect"]) if v is not None]
        row["classmix"] = {"queries_to_detect": q, "max_g": float(np.nanmax(g)),
                           "final_g": float(g[-1]), "either": min(either) if either else None}
    return {"threshold": threshold, "prior": [round(float(v), 4) for v in prior],
            "min_queries": MIN_QUERIES, "window": WINDOW,
            "rule": "largest G any calibration client reaches, rounded up to the 0.5 grid, "
                    "chosen before the benign and attack streams were scored",
            "calibration_max_g": max(float(np.nanmax(g)) for g in cal),
            "benign_max_g": max(float(np.nanmax(g)) for g in ben),
            "benign_alarmed_clients": sum(first_above(g, threshold) is not None for g in ben),
            "benign_alarms": int(sum((g[~np.isnan(g)] > threshold).sum() for g in ben))}


def g_trajectories(streams: list[np.ndarray], classes: int, prior: np.ndarray,
                   name: str = "stream") -> list[np.ndarray]:
    """G after each answer of each stream of classes (one principal each; nan before
    `MIN_QUERIES`). The threshold only decides alarms, so none is set here."""
    detector = ClassMix(classes, threshold=float(np.finfo(np.float64).max), prior=prior,
                        max_principals=max(len(streams), 1))
    return [detector.observe(f"{name}-{i}", np.asarray(s, np.int64)).scores
            for i, s in enumerate(streams)]


def threshold_above(calibration: list[np.ndarray]) -> float:
    """The class mix's threshold for calibration trajectories: the largest G any of them
    reaches, rounded up to the 0.5 grid (so none of them alarms: G must exceed it)."""
    return math.ceil(max(float(np.nanmax(g)) for g in calibration) * 2) / 2


def calibrate_class_mix(classes_seen: np.ndarray, classes: int, clients: int = 20,
                        per_client: int = 1000, seed: int = 0) -> dict:
    """`--detect-prior` and `--detect-threshold` from a calibration stream: the class of
    each answer the model gave honest traffic. The prior is their mix; the threshold
    comes from `clients` streams of `per_client` answers each drawn in its own random
    order (`threshold_above`). ValueError naming what is wrong with the stream."""
    seen = np.asarray(classes_seen)
    if seen.ndim != 1 or seen.dtype.kind not in "iu" or len(seen) == 0:
        raise ValueError(f"the calibration stream must be a non-empty list of class indices, "
                         f"got shape {list(seen.shape)} of {seen.dtype}")
    if seen.min() < 0 or seen.max() >= classes:
        raise ValueError(f"the calibration classes must be in [0, {classes}), got "
                         f"{seen.min()} to {seen.max()}")
    if len(seen) < MIN_QUERIES:
        raise ValueError(f"the calibration stream has {len(seen)} answers: the class mix "
                         f"scores from {MIN_QUERIES}, so it needs at least that many")
    # Jeffreys-smoothed: a class honest traffic never showed is rare, not impossible (a zero
    # would make its first answer an infinite G)
    prior = (np.bincount(seen, minlength=classes) + 0.5) / (len(seen) + 0.5 * classes)
    streams = benign_clients(seen, clients, per_client, seed)
    g = g_trajectories(streams, classes, prior, "calibration")
    return {"prior": [round(float(v), 6) for v in prior], "threshold": threshold_above(g),
            "max_g": max(float(np.nanmax(t)) for t in g), "answers": len(seen),
            "clients": len(streams), "per_client": len(streams[0])}


def _escalated(attack: str, model: nn.Module, ds: Dataset, plan: Plan, delta: float,
               base_test: np.ndarray) -> dict:
    """The same attack again, same seed, against labels-only escalation at `delta` (a
    detector of its own): where the alarm fell and the thief's final agreement."""
    detector = Prada(math.prod(ds.input_shape), delta=delta, max_vectors=plan.max_vectors,
                     max_distances=plan.max_distances, max_principals=1)
    oracle = EscalatingOracle(model, plan.budget, detector, f"escalated-{attack}")
    run = steal(attack, model, ds, plan, oracle)
    return {"alarmed_at": oracle.alarmed_at, "queries": len(run["queries"]),
            "agreement": agreement(predict(run["stolen"], ds.test_x), base_test)}


def _stolen_by(attack: str, run: dict, queries: int) -> nn.Module:
    """The thief's model trained on the first `queries` answers (what it had stolen by
    detection), the way the attack trains: labels for ArgmaxSample, else distilled."""
    x, answers = run["queries"][:queries], run["answers"][:queries]
    attacker = run["attacker"]
    if attack in LABEL_ONLY:
        return attacker.fit(x, one_hot(answers))
    return attacker.distil(x, answers)


def _clients_summary(ws: list[np.ndarray], delta: float, source: str) -> dict:
    scored = np.concatenate([w[~np.isnan(w)] for w in ws])
    return {"source": source, "clients": len(ws), "queries": int(sum(len(w) for w in ws)),
            "alarmed_clients": sum(first_alarm(w, delta) is not None for w in ws),
            "alarms": int((scored < delta).sum()), "min_w": float(scored.min()),
            "w": ws}


def detected_text(row: dict) -> str:
    """"detected at N" or "not detected by N"."""
    q = row["queries_to_detect"]
    return f"detected at {q}" if q is not None else f"not detected by {row['queries']}"


def to_json(result: dict, meta: dict, every: int = 10) -> dict:
    """The result with each W trajectory kept at every `every`-th query, rounded."""
    def thin(w: np.ndarray) -> list:
        return [None if np.isnan(v) else round(float(v), 4) for v in w[every - 1::every]]

    out = json.loads(json.dumps({k: v for k, v in result.items()
                                 if k not in ("attacks", "calibration", "benign")}))
    out["meta"] = meta
    out["trajectory_every"] = every
    for part in ("calibration", "benign"):
        out[part] = {k: v for k, v in result[part].items() if k != "w"}
        out[part]["w"] = [thin(w) for w in result[part]["w"]]
    out["attacks"] = [{**{k: v for k, v in r.items() if k != "w"}, "w": thin(r["w"])}
                      for r in result["attacks"]]
    return out


def render(result: dict, meta: dict) -> str:
    """report.md."""
    delta, benign, cal = result["delta"], result["benign"], result["calibration"]
    lines = [
        "# PRADA and the class mix against the attack suite (MNIST)",
        "",
        f"`{meta['command']}` ({meta['seconds']:.0f} s, torch threads {meta['torch_threads']}); "
        f"victim `{meta['victim']}`, undefended.",
        "",
        f"Detector: PRADA on raw pixels ({result['detector']['features']} features), one "
        f"principal per stream, scored after {result['detector']['min_distances']} distances; "
        f"at most {result['detector']['max_vectors']} stored vectors per principal.",
        "",
        f"**delta = {delta:.2f}**: {result['delta_rule']}. Smallest calibration W "
        f"{cal['min_w']:.4f} over {cal['clients']} clients x "
        f"{cal['queries'] // max(cal['clients'], 1)} queries.",
        "",
        "| stream | queries | queries to detect | min W | final W | agreement at budget "
        "| agreement at detection |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["attacks"]:
        at = r["agreement_at_detection"]
        lines.append(
            f"| {r['attack']} ({r['strategy']}, {r['samples']} samples) | {r['queries']} | "
            f"{r['queries_to_detect'] or 'not detected by ' + str(r['queries'])} | "
            f"{r['min_w']:.4f} | {r['final_w']:.4f} | {r['agreement']:.3f} | "
            f"{'-' if at is None else f'{at:.3f}'} |")
    escalated = [r for r in result["attacks"] if r.get("escalated")]
    if escalated:
        lines += [
            "",
            "Escalation to labels only on detection (the same attack and seed again, each "
            "query through PRADA at this delta before it is answered; from the alarm on, "
            "answers are one-hot labels):",
            "",
            "| stream | alarm at | agreement at budget, escalated | without detection |",
            "|---|---|---|---|",
        ]
        for r in escalated:
            e = r["escalated"]
            lines.append(f"| {r['attack']} | {e['alarmed_at'] or 'no alarm'} | "
                         f"{e['agreement']:.3f} ({e['queries']} queries) | "
                         f"{r['agreement']:.3f} |")
    lines += [
        "",
        f"Benign: {benign['clients']} clients, each the {benign['queries'] // benign['clients']} "
        f"held-out test images in its own order: **{benign['alarmed_clients']} of "
        f"{benign['clients']} clients alarmed, {benign['alarms']} alarms over "
        f"{benign['queries']} queries** (smallest W {benign['min_w']:.4f}).",
        "",
        "Agreement: the thief's model against the victim on the 1,000 test images; at "
        "detection, a model trained the attack's way on the answers it had by then.",
        "",
        f"Every delta, for the trade-off (hindsight delta {result['hindsight_delta']:.2f}: "
        f"{result['hindsight_rule']}). Queries to detect, '-' = not detected:",
        "",
        "| delta | calibration clients alarmed | benign clients alarmed | benign alarms | "
        + " | ".join(r["attack"] for r in result["attacks"]) + " |",
        "|---|---|---|---|" + "---|" * len(result["attacks"]),
    ]
    for row in result["sweep"]:
        detect = [row["queries_to_detect"][r["attack"]] for r in result["attacks"]]
        lines.append(f"| {row['delta']:.2f} | {row['calibration_alarmed_clients']} | "
                     f"{row['benign_alarmed_clients']} | {row['benign_alarms']} | "
                     + " | ".join("-" if q is None else str(q) for q in detect) + " |")
    mix = result.get("class_mix")
    if mix:
        lines += [
            "",
            "## The output-only signal: class mix",
            "",
            f"`ClassMix` (G-test of the classes a principal was answered over its last "
            f"{mix['window']} answers, against the victim's class mix on the owner's "
            f"training images; scored from {mix['min_queries']} answers). **Threshold G > "
            f"{mix['threshold']:g}**: {mix['rule']} (calibration max "
            f"{mix['calibration_max_g']:.2f}). Benign: **{mix['benign_alarmed_clients']} of "
            f"{benign['clients']} clients alarmed, {mix['benign_alarms']} alarms** (largest G "
            f"{mix['benign_max_g']:.2f}).",
            "",
            "| stream | queries to detect, class mix | PRADA | either | largest G | final G |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["attacks"]:
            m = r["classmix"]
            lines.append(
                f"| {r['attack']} | {m['queries_to_detect'] or '-'} | "
                f"{r['queries_to_detect'] or '-'} | {m['either'] or '-'} | "
                f"{m['max_g']:.1f} | {m['final_g']:.1f} |")
    lines += [
        "",
        "![W against queries](detection_w.png)",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """W against queries per attack; the benign clients' range shaded; delta dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = result["trajectory_every"]

    def series(w: list) -> tuple[np.ndarray, np.ndarray]:
        w = np.array(w, dtype=float)  # None (not scored yet) -> nan
        return every * np.arange(1, len(w) + 1), w

    fig, ax = plt.subplots(figsize=(8, 4.5))
    benign = np.vstack([series(w)[1] for w in result["benign"]["w"]])
    q = every * np.arange(1, benign.shape[1] + 1)
    scored = ~np.isnan(benign).all(0)
    ax.fill_between(q[scored], np.nanmin(benign[:, scored], 0), np.nanmax(benign[:, scored], 0),
                    color="0.8", label=f"benign clients (range of {len(benign)})")
    for r in result["attacks"]:
        (line,) = ax.plot(*series(r["w"]), lw=1.2, label=r["attack"])
        if r["queries_to_detect"] is not None:
            ax.plot(r["queries_to_detect"], result["delta"], "o", color=line.get_color())
    ax.axhline(result["delta"], color="k", ls="--", lw=1, label=f"delta {result['delta']:.2f}")
    ax.axhline(result["hindsight_delta"], color="k", ls=":", lw=1,
               label=f"hindsight delta {result['hindsight_delta']:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("queries of the principal")
    ax.set_ylabel("Shapiro-Wilk W of the distances")
    ax.set_title("PRADA on MNIST: detection score against queries (dot: first alarm)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
