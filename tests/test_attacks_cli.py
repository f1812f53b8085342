"""stealguard-attack end to end: experiment --quick, the remote oracle and `run` against a
real gRPC server process (tests/_attacks_server.py), and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from _procs import Process, free_port, script, start_sidecar
from google.protobuf import empty_pb2
from stealguard.attacks.oracles import BudgetExceeded, OracleError, RemoteOracle
from stealguard.compat.torchserve import inference_pb2_grpc
from stealguard.modelserver.datasets import load_dataset
from stealguard.server.defenses import make_defense

SERVER = Path(__file__).with_name("_attacks_server.py")
RECORD_KEYS = {"dataset", "defense", "strategy", "budget", "agreement", "accuracy",
               "cosine", "mae", "kl"}


def attack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([script("stealguard-attack"), *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server():
    """A real TorchServe-gRPC server process: `digits` (Reverse Sigmoid) and `digits-open`."""
    address = f"127.0.0.1:{free_port()}"
    process = Process([sys.executable, str(SERVER), "--listen", address])
    deadline = time.monotonic() + 120
    try:
        while True:
            with grpc.insecure_channel(address) as channel:
                try:
                    inference_pb2_grpc.InferenceAPIsServiceStub(channel).Ping(
                        empty_pb2.Empty(), timeout=1)
                    break
                except grpc.RpcError:
                    pass
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("test server did not start:\n" + process.output())
            time.sleep(0.2)
        yield address
    finally:
        process.stop()


def test_remote_oracle_returns_the_servers_probabilities_and_counts(server):
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset("digits", seed=0)
    local = LogisticRegression(max_iter=2000).fit(ds.base_x.reshape(len(ds.base_x), -1),
                                                  ds.base_y)
    x = ds.attacker_x[:450]
    expected = local.predict_proba(x.reshape(450, -1).astype(np.float64))
    with RemoteOracle(server, "digits-open", budget=500, batch_size=200) as oracle:
        got = oracle.query(x)  # three requests of <= 200
        assert got.shape == (450, 10)
        assert np.allclose(got, expected, atol=1e-6)
        with pytest.raises(BudgetExceeded, match="450 of the budget of 500 already used"):
            oracle.query(x[:51])
        assert oracle.queries == 450
    with RemoteOracle(server, "digits-rs", budget=10) as oracle:
        protected = oracle.query(x[:10])
    defense = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3, preserve_top1=True)
    assert np.allclose(protected, defense(expected[:10]), atol=1e-6)


def test_remote_oracle_names_an_unknown_model_and_an_unreachable_target(server):
    x = np.zeros((1, 1, 8, 8), np.float32)
    with RemoteOracle(server, "nope", budget=1) as oracle, \
            pytest.raises(OracleError, match="model 'nope' not found"):
        oracle.query(x)
    with pytest.raises(OracleError, match=r"cannot reach the model server at 127\.0\.0\.1"):
        RemoteOracle(f"127.0.0.1:{free_port()}", "digits", budget=1, timeout=0.5)


def test_run_attacks_two_models_side_by_side(server, tmp_path):
    out = tmp_path / "run"
    result = attack("run", "--target", server, "--model", "digits", "--model", "digits-open",
                    "--baseline-model", "digits-open", "--dataset", "digits",
                    "--strategy", "sample,argmax", "--budget", "100,200",
                    "--architecture", "mlp", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"digits", "digits-open"}
    for entry in report["models"].values():
        assert entry["protected_agreement"] == 1.0  # top-1 guard, and the open model itself
        assert [(r["strategy"], r["budget"], r["queries"]) for r in entry["runs"]] == [
            ("sample", 100, 100), ("sample", 200, 200), ("argmax", 100, 100),
            ("argmax", 200, 200)]
        assert all(0.0 <= r["agreement"] <= 1.0 for r in entry["runs"])
    assert report["models"]["digits-open"]["cosine"] == pytest.approx(1.0)
    assert report["models"]["digits"]["utility"]["label_kept_round2"] == 1.0
    assert report["models"]["digits"]["utility"]["runner_up_served"] < 0.5
    assert report["models"]["digits-open"]["runs"][1]["agreement"] > 0.6
    assert "| stolen agreement / runner-up, sample, 200 queries |" in result.stdout
    assert (out / "report.md").read_text().startswith("# Stealing through")
    assert (out / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_formula_aware_attacks_read_the_published_policy_from_list_policies(server, tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("policies:\n  default: {defense: coarse_confidence}\n"
                      "  digits-rs: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n")
    sidecar, address = start_sidecar("--config", str(config))
    try:
        out = tmp_path / "run"
        result = attack("run", "--target", server, "--model", "digits", "--model", "digits-rs",
                        "--baseline-model", "digits-open", "--dataset", "digits",
                        "--strategy", "closed-form,learned,contract-floor", "--budget", "100",
                        "--policies-from", address, "--architecture", "mlp", "--quick",
                        "--out", str(out))
    finally:
        sidecar.stop()
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["digits"]["published"][0] == "coarse_confidence"
    assert report["models"]["digits-rs"]["published"] == [
        "reverse_sigmoid", {"beta": 1.5, "gamma": 0.3, "preserve_top1": 1.0}]
    runs = {(m, r["strategy"]): r for m, e in report["models"].items() for r in e["runs"]}
    # the inversion ran with the published beta and gamma and kept the labels (chance 0.1)
    assert runs["digits-rs", "closed-form"]["agreement"] > 0.6
    # against the default, the closed-form inverse is the contract view: the same targets
    assert runs["digits", "closed-form"]["agreement"] == runs["digits", "contract-floor"][
        "agreement"]
    assert report["models"]["digits-rs"]["utility"]["spearman_top"] < 0


def test_formula_aware_strategies_need_policies_from(tmp_path):
    result = attack("run", "--target", "127.0.0.1:1", "--model", "m", "--strategy",
                    "closed-form", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "--policies-from" in result.stderr


def test_experiment_quick_writes_results_report_and_figures(tmp_path):
    out = tmp_path / "digits"
    # 300 s was not enough with the machine's 2 cores shared (load average 9-12)
    result = attack("experiment", "--dataset", "digits", "--quick", "--out", str(out),
                    timeout=1800)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert runs and all(RECORD_KEYS <= set(r) for r in runs)
    for r in runs:
        assert r["dataset"] == "digits"
        assert set(r["defense"]) == {"name", "params"}
        assert isinstance(r["budget"], int) and r["budget"] > 0
        assert r["queries"] <= r["budget"]
        assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert -1.0 <= r["cosine"] <= 1.0 + 1e-9 and r["mae"] >= 0.0 and r["kl"] >= 0.0
    strategies = {r["strategy"] for r in runs}
    assert {"sample", "argmax", "random", "jacobian", "same-layer", "mse",
            "inversion"} <= strategies
    defenses = {r["defense"]["name"] for r in runs}
    assert {"none", "reverse_sigmoid", "uniform_random"} <= defenses
    rs = [r for r in runs if r["defense"]["name"] == "reverse_sigmoid"]
    assert all(r["protected_agreement"] == 1.0 for r in rs)
    assert all(r["cosine"] == 1.0 for r in runs if r["defense"]["name"] == "none")
    meta = results["meta"]
    assert meta["calibration"]["beta"] > 0 and meta["targets"]
    report = (out / "report.md").read_text()
    for heading in ("Table I", "Table II", "Table IV", "Agreement vs. queries", "Targets"):
        assert heading in report
    assert "stealguard-attack experiment --dataset digits --quick" in report
    for png in ("fig4_agreement.png", "fig1_reverse_sigmoid.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_quick_on_iris_solves_the_logistic_regression(tmp_path):
    result = attack("experiment", "--dataset", "iris", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    solved = [r for r in runs if r["strategy"] == "equation-solving"
              and r["defense"]["name"] == "none"]
    assert solved and solved[0]["budget"] == 15 and solved[0]["agreement"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["experiment", "--dataset", "cifar", "--out", "x"], "unknown dataset 'cifar'"),
    (["calibrate", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--target", "127.0.0.1:1", "--model", "m", "--strategy", "steal-all",
      "--out", "x"], "unknown strategy 'steal-all'"),
    (["run", "--target", "127.0.0.1:1", "--model", "m", "--budget", "0", "--out", "x"],
     "'0' is not a positive integer"),
    (["run", "--target", "127.0.0.1:1", "--model", "m", "--budget", "250,-5", "--out", "x"],
     "'-5' is not a positive integer"),
    (["run", "--target", "127.0.0.1:1", "--model", "m", "--budget", "abc", "--out", "x"],
     "'abc' is not a positive integer"),
    (["run", "--target", "127.0.0.1:1", "--model", "m", "--strategy", "same-layer",
      "--out", "x"], "needs --beta and --gamma"),
    (["contract", "--dataset", "digits", "--out", "x", "--seeds", "9-3"],
     "'9-3': the range ends before it starts"),
    (["contract", "--dataset", "digits", "--out", "x", "--seeds", "0,two"],
     "'two' is not a seed or a range A-B"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = attack(*args, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_lists_take_ranges_and_single_seeds_once_each():
    from stealguard.attacks.cli import seed_list

    assert seed_list("0-4,9") == [0, 1, 2, 3, 4, 9]
    assert seed_list("3,3, 2-3") == [3, 2]


def test_unreachable_target_is_one_line_and_nonzero(tmp_path):
    result = attack("run", "--target", f"127.0.0.1:{free_port()}", "--model", "mnist",
                    "--timeout", "1", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("stealguard-attack: error: cannot reach")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unknown_model_is_one_line_and_nonzero(server, tmp_path):
    result = attack("run", "--target", server, "--model", "nope", "--dataset", "digits",
                    "--baseline-model", "digits-open", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert "model 'nope' not found" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_calibrate_a_model_store_model_prints_the_sidecar_policy(tmp_path):
    import torch
    import yaml
    from stealguard.attacks.training import TrainConfig, train
    from stealguard.modelserver.architectures import build_model

    iris = load_dataset("iris", seed=0)
    torch.manual_seed(0)
    model = train(build_model("logreg", (4,), 3), iris.base_x, np.eye(3)[iris.base_y],
                  TrainConfig(epochs=300, min_steps=0, batch_size=16, lr=0.05))
    torch.save(model.state_dict(), tmp_path / "iris.pt")
    (tmp_path / "flowers.yaml").write_text(yaml.safe_dump({
        "version": "1.0", "architecture": "logreg", "weights": "iris.pt",
        "input_shape": [4], "labels": ["setosa", "versicolor", "virginica"],
        "policy": "flowers"}))
    result = attack("calibrate", "--dataset", "iris", "--model-store", str(tmp_path),
                    "--model", "flowers", "--quick", "--beta", "0.5,1.5", "--gamma", "0.3")
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    policy = doc["policies"]["flowers"]
    assert policy["defense"] == "reverse_sigmoid" and policy["preserve_top1"] is True
    assert policy["beta"] in (0.5, 1.5) and policy["gamma"] == 0.3
    assert result.stdout.startswith("# stealguard-attack calibrate: Sample budget 60")
    missing = attack("calibrate", "--dataset", "iris", "--model-store", str(tmp_path),
                     "--model", "tulips", "--quick")
    assert missing.returncode == 2 and "no model 'tulips' in the model store" in missing.stderr
