"""Escalation on extraction alarms: the ladder in process (a fake clock, no sleeping), the
protect core's hook, the model server's settings, and the real model server answering a
Jacobian-like thief with labels while an honest caller keeps its protected answers."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from _defenses_helpers import assert_protected_like
from _modelserver_helpers import STARTUP_TIMEOUT, TorchServeClient, npy_bytes, start_modelserver
from _procs import free_port
from stealguard.modelserver.store import ModelSpec
from stealguard.server.core import ProtectCore
from stealguard.server.detection.escalation import CLEAR, LabelsOnly, Ladder, parse_steps
from stealguard.server.errors import Exhausted
from stealguard.server.platform.metrics import REGISTRY

ROWS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
EVIDENCE = {"W": 0.71, "delta": 0.94, "queries": 150}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Halving:
    """A stand-in policy: halves every value (so its answers are easy to tell apart)."""

    def __init__(self, name: str = "default"):
        self.name = name

    def perturb(self, rows, logits=False):
        return rows / 2


def ladder(steps=("watch", "labels", "refuse"), **kw) -> Ladder:
    return Ladder(list(steps), **{"named": lambda policy, name: Halving(name), **kw})


def detections(step: str, signal: str = "prada") -> float:
    value = REGISTRY.get_sample_value("stealguard_detections_total",
                                      {"signal": signal, "step": step})
    return value or 0.0


# -- the ladder ---------------------------------------------------------------------------

def test_first_alarm_climbs_one_step_and_every_after_alarms_one_more():
    escalation = ladder(after=10)
    assert escalation.step_of("mallory") == CLEAR
    assert escalation.alarm("mallory", "prada", 1, EVIDENCE) == "watch"
    assert escalation.alarm("mallory", "prada", 9, EVIDENCE) == "watch"
    assert escalation.alarm("mallory", "prada", 1, EVIDENCE) == "labels"
    assert escalation.alarm("mallory", "prada", 25, EVIDENCE) == "refuse"  # two steps at once
    assert escalation.alarm("mallory", "prada", 100, EVIDENCE) == "refuse"  # the top stays
    assert escalation.step_of("alice") == CLEAR


def test_each_step_is_one_log_event_and_one_count_naming_principal_signal_evidence(caplog):
    escalation = ladder(("watch", "labels"), after=5)
    before = detections("labels")
    with caplog.at_level(logging.WARNING, logger="stealguard.detection"):
        escalation.alarm("mallory", "prada", 6, EVIDENCE)
    events = [r.event for r in caplog.records if hasattr(r, "event")]
    assert [(e["from"], e["step"]) for e in events] == [(CLEAR, "watch"), ("watch", "labels")]
    assert events[-1] == {"principal": "mallory", "signal": "prada", "evidence": EVIDENCE,
                          "from": "watch", "step": "labels", "cooldown": False,
                          "dry_run": False}
    assert "'mallory' watch -> labels: prada alarmed (W 0.71, delta 0.94, queries 150)" \
        in caplog.text
    assert detections("labels") == before + 1


def test_allow_listed_principal_never_escalates():
    escalation = ladder(after=1, allow=["ci-probe"])
    assert escalation.alarm("ci-probe", "prada", 50, EVIDENCE) == CLEAR
    policy = Halving()
    assert escalation.policy_for("ci-probe", policy) is policy
    assert len(escalation) == 0


def test_dry_run_climbs_logs_and_counts_but_changes_no_answer(caplog):
    escalation = ladder(after=1, dry_run=True)
    before = detections("refuse")
    with caplog.at_level(logging.WARNING, logger="stealguard.detection"):
        assert escalation.alarm("mallory", "prada", 3, EVIDENCE) == "refuse"
    policy = Halving()
    assert escalation.policy_for("mallory", policy) is policy  # no refusal, no labels
    assert detections("refuse") == before + 1
    assert "escalation (dry run): principal 'mallory' labels -> refuse" in caplog.text
    assert all(r.event["dry_run"] for r in caplog.records if hasattr(r, "event"))


def test_cooldown_steps_back_one_step_per_quiet_period_then_forgets_the_principal():
    clock = Clock()
    escalation = ladder(after=1, cooldown=60.0, clock=clock)
    escalation.alarm("mallory", "prada", 2, EVIDENCE)
    assert escalation.step_of("mallory") == "labels"
    clock.now += 59.0
    assert escalation.step_of("mallory") == "labels"
    clock.now += 1.0
    assert escalation.step_of("mallory") == "watch"
    clock.now += 60.0
    assert escalation.step_of("mallory") == CLEAR
    assert len(escalation) == 0


def test_a_new_alarm_restarts_the_cooldown():
    clock = Clock()
    escalation = ladder(after=100, cooldown=60.0, clock=clock)
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    clock.now += 50.0
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    clock.now += 50.0
    assert escalation.step_of("mallory") == "watch"


def test_at_most_max_principals_are_kept_the_least_recently_alarmed_dropped():
    escalation = ladder(after=1, max_principals=3)
    for name in ("a", "b", "c"):
        escalation.alarm(name, "prada", 1, EVIDENCE)
    escalation.alarm("a", "prada", 1, EVIDENCE)  # a is recent again: b is the oldest
    escalation.alarm("d", "prada", 1, EVIDENCE)
    assert len(escalation) == 3
    assert [escalation.step_of(n) for n in "abcd"] == ["labels", CLEAR, "watch", "watch"]


def test_refuse_step_raises_exhausted_naming_the_principal_and_the_evidence():
    clock = Clock()
    escalation = ladder(("refuse",), cooldown=30.0, clock=clock)
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    clock.now += 10.0
    with pytest.raises(Exhausted) as refused:
        escalation.policy_for("mallory", Halving())
    assert "principal 'mallory' is refused" in str(refused.value)
    assert "prada alarmed (W 0.71, delta 0.94, queries 150)" in str(refused.value)
    assert refused.value.retry_after == pytest.approx(20.0)
    assert refused.value.quota == {"client:mallory": "refused after a prada extraction alarm"}


def test_labels_step_answers_one_hot_of_each_rows_argmax_under_the_same_name():
    escalation = ladder(("labels",))
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    policy = escalation.policy_for("mallory", Halving("mnist"))
    assert isinstance(policy, LabelsOnly) and policy.name == "mnist"
    out = policy.perturb(ROWS.astype(np.float32))
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 0, 1]])
    assert out.dtype == np.float32


def test_a_step_naming_a_policy_gets_the_front_ends_policy_of_that_name():
    escalation = ladder(("strict",))
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    assert escalation.policy_for("mallory", Halving("default")).name == "strict"


@pytest.mark.parametrize(("steps", "message"), [
    ([], "the escalation ladder has no steps"),
    (["refuse", "labels"], "'refuse' must be the last step"),
    (["watch", ""], "step 2 of the escalation ladder is ''"),
])
def test_bad_ladder_is_a_value_error_naming_the_step(steps, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(steps)


def test_ladder_naming_a_policy_needs_a_way_to_look_it_up():
    with pytest.raises(ValueError, match="give `named`"):
        Ladder(["strict"])


# -- the protect core's hook --------------------------------------------------------------

class _Policies:
    def resolve(self, name):
        return Halving()


def test_core_answers_an_escalated_principal_with_labels_and_others_with_their_policy():
    escalation = ladder(("labels",))
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    core = ProtectCore(_Policies(), escalation=escalation)
    assert core.needs_principal
    thief = asyncio.run(core.protect(ROWS, "", "mallory"))
    honest = asyncio.run(core.protect(ROWS, "", "alice"))
    np.testing.assert_array_equal(thief.rows, [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(honest.rows, ROWS / 2)


def test_core_refusal_is_exhausted_and_observers_see_it():
    escalation = ladder(("refuse",))
    escalation.alarm("mallory", "prada", 1, EVIDENCE)
    seen = []
    core = ProtectCore(_Policies(), escalation=escalation,
                       observers=[type("O", (), {"observe": lambda self, e: seen.append(e)})()])
    with pytest.raises(Exhausted, match="'mallory' is refused"):
        asyncio.run(core.protect(ROWS, "", "mallory"))
    assert isinstance(seen[0].error, Exhausted) and seen[0].returned is None


def test_core_keeps_the_configured_policy_when_the_escalation_fails(caplog):
    class Broken:
        def policy_for(self, principal, policy):
            raise RuntimeError("escalation bug")

    core = ProtectCore(_Policies(), escalation=Broken())
    with caplog.at_level(logging.ERROR):
        answer = asyncio.run(core.protect(ROWS, "", "mallory"))
    np.testing.assert_array_equal(answer.rows, ROWS / 2)  # protected, never the raw rows
    assert "escalation bug" in caplog.text


# -- the model server's watch and settings ------------------------------------------------

def _spec(name="digits", policy="digits") -> ModelSpec:
    return ModelSpec(name, "1.0", "simple", Path("unused.pt"), (1, 8, 8),
                     tuple(str(k) for k in range(10)), policy)


def test_watch_that_fails_on_a_batch_logs_and_leaves_the_policy(caplog):
    from stealguard.modelserver.watch import Watch

    watch = Watch(ladder(("labels",)), 0.94, [_spec()])
    with caplog.at_level(logging.ERROR, logger="stealguard.detection"):
        watch.observe(_spec(), "mallory", np.zeros((2, 1, 4, 4), np.float32),
                      np.full((2, 10), 0.1))  # 16 features where the detector takes 64
    assert "extraction detection failed on model 'digits'" in caplog.text
    assert watch.ladder.step_of("mallory") == CLEAR


def test_watch_ignores_the_unprotected_baseline():
    from stealguard.modelserver.watch import Watch

    watch = Watch(ladder(("labels",)), 0.94, [_spec(), _spec("digits-open", "none")])
    assert list(watch.detectors) == ["digits"]
    watch.ladder.alarm("mallory", "prada", 1, EVIDENCE)
    baseline = type("Bound", (), {"name": "digits-open", "protected": False})()
    assert watch.policy_for("mallory", baseline) is baseline


def test_a_step_naming_a_policy_sends_the_sidecar_that_policy_for_the_escalated_only(
        tmp_path):
    """In process, a fake sidecar: the handler's call asks for the step's policy."""
    import io

    import torch
    from stealguard.modelserver.handler import Handler
    from stealguard.modelserver.watch import Watch, _named

    class Sidecar:
        timeout = 5.0

        def __init__(self):
            self.asked = []

        async def perturb(self, probs, model="", **kw):
            self.asked.append(model)
            return probs

    spec = ModelSpec("tiny", "1.0", "mlp", tmp_path / "unused.pt", (3,), ("a", "b", "c"),
                     "tiny")
    watch = Watch(Ladder(["strict"], named=_named), 0.94, [spec])
    watch.ladder.alarm("mallory", "prada", 1, EVIDENCE)
    sidecar = Sidecar()
    handler = Handler(spec, torch.nn.Linear(3, 3).eval(), sidecar,
                      core=ProtectCore(None, escalation=watch), watch=watch)
    buffer = io.BytesIO()
    np.save(buffer, np.full((1, 3), 0.5, np.float32))

    async def ask(who):
        await handler.handle({"data": buffer.getvalue()}, client=who)

    asyncio.run(ask("mallory"))
    asyncio.run(ask("alice"))
    assert sidecar.asked == ["strict", "tiny"]


def test_detection_is_off_by_default():
    from stealguard.modelserver.config import load_modelserver_config
    from stealguard.modelserver.watch import watch_of

    config = load_modelserver_config(env={})
    assert (config.detect, config.escalate, config.detect_dry_run) == ("off", [], False)
    assert watch_of(config, [_spec()]) is None


def test_detection_settings_come_from_yaml_keys(tmp_path):
    from stealguard.modelserver.config import load_modelserver_config

    path = tmp_path / "modelserver.yaml"
    path.write_text("detect: prada\ndetect_delta: 0.9\nescalate: [watch, labels]\n"
                    "detect_cooldown: 2m\ndetect_allow: [ci]\ndetect_dry_run: true\n")
    config = load_modelserver_config(str(path), env={})
    assert (config.detect, config.detect_delta, config.escalate, config.detect_cooldown,
            config.detect_allow, config.detect_dry_run) == (
        "prada", 0.9, ["watch", "labels"], 120.0, ["ci"], True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--detect-delta", "1.5"], "--detect-delta: must be in (0, 1], got 1.5"),
    (["--detect", "prada", "--detect-delta", "high"], "--detect-delta: must be a number"),
    (["--escalate", "labels"], "--escalate needs a detector: add --detect classmix"),
    (["--detect", "prada", "--escalate", "refuse,labels"], "--escalate: 'refuse' must be"),
    (["--detect", "prada", "--detect-cooldown", "soon"], "--detect-cooldown: must be seconds"),
    (["--detect", "prada", "--escalate-after", "0"], "--escalate-after: must be at least 1"),
])
def test_bad_detection_flag_is_one_line_naming_it(capsys, argv, message):
    from stealguard.modelserver.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


# -- the real model server ----------------------------------------------------------------

THIEF_QUERIES = 160
BATCH = 10
AFTER = 50  # alarmed queries from labels to refuse


def jacobian_like_queries(seed_image: np.ndarray, count: int, step: float = 0.01) -> np.ndarray:
    """One image and its augmentations: each round adds every query so far moved by
    `step` along a random sign direction (Jacobian augmentation's shape, without the
    substitute's gradient), float32 in [0, 1]."""
    rng = np.random.default_rng(0)
    queries = seed_image[None].astype(np.float32)
    while len(queries) < count:
        moved = queries + step * np.sign(rng.standard_normal(queries.shape))
        queries = np.clip(np.concatenate([queries, moved]), 0, 1).astype(np.float32)
    return queries[:count]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A model store with the digits Simple CNN (8x8 = 64 features), protected as
    `digits` and unprotected as `digits-open` (trained once per machine, cached)."""
    from stealguard.modelserver.training import Recipe, trained_model

    model = trained_model(Recipe(dataset="digits", architecture="simple", epochs=30),
                          log=lambda line: None)
    store = tmp_path_factory.mktemp("digits-store")
    shutil.copyfile(model.weights, store / "simple-digits.pt")
    for name, policy in (("digits", "digits"), ("digits-open", "none")):
        (store / f"{name}.yaml").write_text(
            "architecture: simple\nweights: simple-digits.pt\ninput_shape: [1, 8, 8]\n"
            f"labels: {json.dumps([str(k) for k in range(10)])}\npolicy: {policy}\n")
    return store


def _events(output: str) -> list[dict]:
    lines = (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    return [line["event"] for line in lines if "event" in line]


def test_jacobian_like_thief_gets_labels_then_refused_while_honest_caller_is_protected(
        sidecar, digits_store):
    from stealguard.client import DefenseClient
    from stealguard.modelserver.datasets import load_dataset

    metrics_port = free_port()
    modelserver, address = start_modelserver(
        sidecar, digits_store, "--trust-client-header", "--json-logs",
        "--metrics-port", str(metrics_port), "--detect", "prada", "--detect-delta", "0.94",
        "--escalate", "labels,refuse", "--escalate-after", str(AFTER))
    client, defense = TorchServeClient(address), DefenseClient(sidecar, timeout=10)
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)

        def predict(model, images, who):
            reply = client.stub.Predictions(client.request(model, npy_bytes(images)),
                                            metadata=[("x-client-id", who)], timeout=30)
            return np.array(json.loads(reply.prediction), dtype=np.float64)

        test_images = load_dataset("digits").test_x
        thief = jacobian_like_queries(test_images[0], THIEF_QUERIES)
        answers, refused = [], []
        for start in range(0, THIEF_QUERIES, BATCH):
            try:
                answers.append(predict("digits", thief[start:start + BATCH], "mallory"))
            except grpc.RpcError as error:
                refused.append((start, error.code(), error.details()))
        raw = predict("digits-open", thief, "reference")

        # PRADA scores from the 101st query on (100 distances); that batch is labels only
        first_labels = 100 // BATCH
        for i, rows in enumerate(answers[:first_labels]):
            batch_raw = raw[i * BATCH:(i + 1) * BATCH]
            assert rows.max() < 1.0  # not one-hot: the sidecar's protected answer
            assert_protected_like(rows, defense.perturb(batch_raw, model="digits"), batch_raw)
        labels = np.concatenate(answers[first_labels:])
        labels_raw = raw[first_labels * BATCH:len(answers) * BATCH]
        np.testing.assert_array_equal(labels, np.eye(10)[labels_raw.argmax(1)])
        # 9 alarms in the first labels batch, then 10 a batch: refused once 50 are past
        assert len(answers) == first_labels + 5
        assert refused[0][0] == 150 and refused[0][1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "principal 'mallory' is refused" in refused[0][2] and "delta 0.94" in refused[0][2]

        honest = test_images[:200]
        for start in range(0, len(honest), 20):
            rows = predict("digits", honest[start:start + 20], "alice")
            batch_raw = predict("digits-open", honest[start:start + 20], "reference")
            assert rows.max() < 1.0
            assert_protected_like(rows, defense.perturb(batch_raw, model="digits"), batch_raw)

        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert 'stealguard_detections_total{signal="prada",step="labels"} 1.0' in page
        assert 'stealguard_detections_total{signal="prada",step="refuse"} 1.0' in page
    finally:
        client.close()
        defense.close()
        assert modelserver.stop() == 0, modelserver.output()
    events = _events(modelserver.output())
    assert [(e["principal"], e["step"]) for e in events] == [("mallory", "labels"),
                                                            ("mallory", "refuse")]
    assert events[0]["evidence"]["queries"] == 110 and events[0]["evidence"]["W"] < 0.94
