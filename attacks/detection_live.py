"""Detection through the real model server: issue 22's evaluation end to end.

    bash scripts/detect-live attacks/results/detection-live      # starts the stack itself
    stealguard-attack --torch-threads 1 detect --target HOST:PORT --out DIR \\
        [--model mnist] [--baseline-model mnist-open] [--allowed NAME]

The stack is a sidecar on its defaults and `stealguard-modelserver --detect classmix
--escalate labels --trust-client-header --detect-allow NAME` (`scripts/detect-live`). Every
stream is one principal, named by the `x-client-id` header, so the server's class mix
watches each as the product would watch a client behind a gateway:
 1. benign traffic: 20 clients, each sending the 1,000 held-out test images in its own
    random order to the protected model; a false alarm is any answer that comes back as
    labels only;
 2. each attack of `attacks.detection.ATTACKS` spends its budget as its own principal;
    from the call after the server's alarm on, it is answered labels only (one-hot rows:
    the default defense never returns a 1.0), so the thief trains on what it really got,
    and its queries to detection are the first labelled query (the alarm fell in the call
    before it: at most `batch` queries earlier);
 3. the Jacobian thief once more as the allow-listed principal: never escalated, its
    agreement "without detection" on the same server;
 4. scoring: agreement with the unprotected baseline model's answers on the test images
    (queries of the allow-listed principal, outside every budget).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from stealguard.attacks.detection import ATTACKS, Plan, _stolen_by, benign_clients, steal
from stealguard.attacks.metrics import agreement, kl
from stealguard.attacks.oracles import OracleError, RemoteOracle
from stealguard.attacks.training import predict
from stealguard.modelserver.datasets import Dataset

CLIENT_HEADER = "x-client-id"
ALLOWED = "detect-eval-allowed"
WITHOUT_DETECTION = ("jacobian",)


def labelled(rows: np.ndarray) -> np.ndarray:
    """Which rows are labels only: one 1.0 and zeros elsewhere."""
    rows = np.asarray(rows)
    return (rows.max(axis=1) == 1.0) & (np.count_nonzero(rows, axis=1) == 1)


def first_labelled(rows: np.ndarray) -> int | None:
    """The 1-based position of the first labels-only row, or None."""
    hits = np.flatnonzero(labelled(rows))
    return int(hits[0]) + 1 if len(hits) else None


class LiveOracle(RemoteOracle):
    """A `RemoteOracle` calling as `principal` (the client header) that keeps every input
    it sent and every answer, in order (what `attacks.detection.steal` reads)."""

    def __init__(self, target: str, model_name: str, budget: int, principal: str, *,
                 batch_size: int, timeout: float):
        super().__init__(target, model_name, budget, timeout=timeout, batch_size=batch_size,
                         metadata=((CLIENT_HEADER, principal),))
        self.principal = principal
        self.inputs: list[np.ndarray] = []
        self.answers: list[np.ndarray] = []

    def _answer(self, x: np.ndarray) -> np.ndarray:
        answers = super()._answer(x)
        self.inputs.append(x.copy())
        self.answers.append(answers)
        return answers

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.inputs), np.concatenate(self.answers)


@dataclass(frozen=True)
class Live:
    """Where and as whom the evaluation calls."""

    target: str
    model: str = "mnist"
    baseline: str = "mnist-open"
    allowed: str = ALLOWED
    batch: int = 10
    timeout: float = 30.0
    wait: float = 600.0  # seconds for the protected model to answer with probabilities


def _ask(live: Live, model: str, principal: str, x: np.ndarray) -> np.ndarray:
    with RemoteOracle(live.target, model, len(x), timeout=live.timeout,
                      batch_size=100, metadata=((CLIENT_HEADER, principal),)) as oracle:
        return oracle.query(x)


def wait_protected(live: Live, x: np.ndarray, log: Callable[[str], None]) -> None:
    """Wait until the protected model answers the allow-listed principal with
    probabilities: labels only means its sidecar is not serving yet (the model server
    fails closed), or that `live.allowed` is not on the server's --detect-allow."""
    deadline = time.monotonic() + live.wait
    while True:
        try:
            if not labelled(_ask(live, live.model, live.allowed, x)).any():
                return
            why = "answers labels only"
        except OracleError as error:
            why = str(error)
        if time.monotonic() > deadline:
            raise OracleError(f"{live.target} model {live.model!r} {why} after {live.wait:g}s "
                              f"(is its sidecar serving, and is {live.allowed!r} on the model "
                              "server's --detect-allow?)")
        log(f"waiting for {live.target} model {live.model!r}: {why}")
        time.sleep(2.0)


def evaluate_live(ds: Dataset, live: Live, plan: Plan,
                  log: Callable[[str], None] = print) -> dict:
    """The evaluation of the module docstring; a JSON-ready dict."""
    wait_protected(live, ds.test_x[:10], log)
    run_id = secrets.token_hex(3)  # fresh principals: an earlier run's ladder state stays
    base_test = _ask(live, live.baseline, live.allowed, ds.test_x)

    log(f"benign: {plan.clients} clients x the {len(ds.test_x)} held-out test images "
        f"through {live.target} model {live.model!r}")
    benign = []
    for i, x in enumerate(benign_clients(ds.test_x, plan.clients, plan.client_queries,
                                         plan.seed + 2)):
        principal = f"benign-{run_id}-{i}"
        served = _ask(live, live.model, principal, x)
        benign.append({"principal": principal, "queries": len(x),
                       "labels_from": first_labelled(served),
                       "labelled": int(labelled(served).sum())})

    rows = []
    for attack in plan.attacks:
        rows.append(_attack(attack, f"attack-{run_id}-{attack}", ds, live, plan, base_test,
                            log))
    undetected = []
    for attack in WITHOUT_DETECTION:
        if attack in plan.attacks:
            row = _attack(attack, live.allowed, ds, live, plan, base_test, log)
            undetected.append({k: row[k] for k in ("attack", "principal", "queries",
                                                   "labels_from", "agreement", "kl")})
    return {
        "target": live.target, "model": live.model, "baseline": live.baseline,
        "batch": live.batch, "run_id": run_id,
        "benign": {"clients": benign,
                   "alarmed_clients": sum(c["labels_from"] is not None for c in benign),
                   "queries": sum(c["queries"] for c in benign)},
        "attacks": rows, "without_detection": undetected,
    }


def _attack(attack: str, principal: str, ds: Dataset, live: Live, plan: Plan,
            base_test: np.ndarray, log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    with LiveOracle(live.target, live.model, plan.budget, principal, batch_size=live.batch,
                    timeout=live.timeout) as oracle:
        run = steal(attack, None, ds, plan, oracle)
    stolen = predict(run["stolen"], ds.test_x)
    labels_from = first_labelled(run["answers"])
    row = {"attack": attack, "strategy": ATTACKS[attack][0], "samples": ATTACKS[attack][1],
           "principal": principal, "queries": len(run["queries"]),
           "labels_from": labels_from,
           "labelled": int(labelled(run["answers"]).sum()),
           "agreement": agreement(stolen, base_test), "kl": kl(base_test, stolen),
           "agreement_at_detection": None}
    if labels_from is not None and labels_from > 1:
        before = _stolen_by(attack, run, labels_from - 1)
        row["agreement_at_detection"] = agreement(predict(before, ds.test_x), base_test)
    row["seconds"] = round(time.perf_counter() - started, 1)
    log(f"  {attack} as {principal}: "
        + (f"labels from query {labels_from}" if labels_from else "never labelled")
        + f", agreement {row['agreement']:.3f} at {row['queries']} ({row['seconds']:.0f} s)")
    return row


def render_live(result: dict, meta: dict) -> str:
    """report.md of a live run."""
    batch = result["batch"]
    benign = result["benign"]
    lines = [
        "# Class-mix detection through the real model server (MNIST)",
        "",
        f"`{meta['command']}` ({meta['seconds']:.0f} s, torch threads {meta['torch_threads']})"
        f" against {result['target']}, model `{result['model']}` (the sidecar's default "
        f"policy), scored against `{result['baseline']}`; the model server ran "
        "`--detect classmix --escalate labels` on its defaults otherwise (threshold G > 23).",
        "",
        f"Each stream is one principal (`{CLIENT_HEADER}`), sending {batch} queries per "
        "call. Detected = the first query answered labels only: the server's alarm fell in "
        f"the call before it (at most {batch} queries earlier), and from then on the thief "
        "trains on labels.",
        "",
        "| attack | queries | labels from query | labelled answers | agreement at budget "
        "| agreement at detection | KL(victim ‖ stolen) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["attacks"]:
        at = r["agreement_at_detection"]
        lines.append(
            f"| {r['attack']} ({r['strategy']}, {r['samples']} samples) | {r['queries']} | "
            f"{r['labels_from'] or 'not detected'} | {r['labelled']} | {r['agreement']:.3f} "
            f"| {'-' if at is None else f'{at:.3f}'} | {r['kl']:.3f} |")
    for r in result["without_detection"]:
        escalated = next((a for a in result["attacks"] if a["attack"] == r["attack"]), None)
        lines += [
            "",
            f"**{r['attack']} without detection** (the same attack as the allow-listed "
            f"principal `{r['principal']}`, same server): agreement {r['agreement']:.3f} at "
            f"{r['queries']} queries"
            + (f", against {escalated['agreement']:.3f} escalated to labels." if escalated
               else "."),
        ]
    alarmed = [c for c in benign["clients"] if c["labels_from"] is not None]
    lines += [
        "",
        f"Benign: {len(benign['clients'])} clients, each the held-out test images in its "
        f"own order ({benign['queries']} queries): **{benign['alarmed_clients']} of "
        f"{len(benign['clients'])} clients answered labels only**"
        + ("" if not alarmed else " (" + ", ".join(
            f"{c['principal']} from query {c['labels_from']}" for c in alarmed) + ")")
        + ".",
        "",
    ]
    return "\n".join(lines)
