"""`stealguard-attack calibrate --from-contract`: choosing a policy from a contract run's
frontier, on the committed MNIST and digits results and on edge cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _procs import script
from stealguard.attacks.calibrate import FrontierError, choose_from_frontier
from stealguard.server.config import load_config
from stealguard.server.defenses import make_defense

RESULTS = Path(__file__).resolve().parent.parent / "attacks" / "results"
REPORTS = sorted(p for p in RESULTS.glob("*/contract.json"))


def frontier_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())["frontier"]


def holds(row: dict) -> bool:
    return (row["served_margin_ok"] == 1.0 and row["label_kept_round2"] == 1.0
            and row["label_kept_float32"] == 1.0)


def measured(rows):
    return [r for r in rows if r["spec"]["name"] != "none"
            and math.isfinite(r["best_agreement"]) and math.isfinite(r["best_runner_up"])]


def test_there_are_committed_contract_reports_with_a_measured_frontier():
    assert {p.parent.name for p in REPORTS} >= {"mnist", "digits"}
    for path in REPORTS:
        assert len(measured(frontier_of(path))) >= 8, path


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.parent.name)
def test_the_choice_keeps_the_contract_and_the_strongest_protection(path):
    rows = frontier_of(path)
    choice = choose_from_frontier(rows, tolerance=0.01)
    chosen = next(r for r in rows if r["defense"] == choice["defense"])
    assert holds(chosen) and chosen["spec"]["name"] != "none"
    eligible = [r for r in measured(rows) if holds(r)]
    strongest = min(r["best_agreement"] for r in eligible)
    assert chosen["best_agreement"] <= strongest + 0.01 + 1e-12
    assert chosen["best_runner_up"] <= min(r["best_runner_up"] for r in eligible) + 0.01 + 1e-12
    # no equally protective row keeps more confidence order
    peers = [r for r in eligible if r["defense"] in choice["candidates"]]
    assert chosen["spearman_top"] == max(r["spearman_top"] for r in peers)
    # a larger tolerance never chooses less confidence order
    wider = choose_from_frontier(rows, tolerance=0.05)
    assert next(r for r in rows if r["defense"] == wider["defense"])["spearman_top"] >= \
        chosen["spearman_top"]


def test_no_measured_row_or_none_keeping_the_contract_is_an_error():
    row = {"defense": "rounded(decimals 2)", "spec": {"name": "rounded"},
           "served_margin_ok": 1.0, "label_kept_round2": 1.0, "label_kept_float32": 0.9,
           "spearman_top": 0.6, "top_error": 0.0, "best_agreement": 0.9,
           "best_runner_up": 0.3, "best_agreement_by": "sample"}
    with pytest.raises(FrontierError, match="keeps the label contract"):
        choose_from_frontier([row])
    with pytest.raises(FrontierError, match="no defense of the frontier has a measured"):
        choose_from_frontier([{**row, "best_agreement": math.nan}])
    with pytest.raises(FrontierError, match="tolerance"):
        choose_from_frontier([row], tolerance=math.nan)


def test_the_cli_prints_a_policy_the_sidecar_loads(tmp_path):
    import subprocess

    digits = RESULTS / "digits"
    result = subprocess.run([script("stealguard-attack"), "calibrate", "--from-contract",
                             str(digits)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# stealguard-attack calibrate --from-contract {digits}")
    (tmp_path / "sidecar.yaml").write_text(result.stdout)
    config = load_config(tmp_path / "sidecar.yaml", env={})
    policy = dict(config.policies["digits"])
    chosen = choose_from_frontier(frontier_of(digits / "contract.json"))
    assert policy == chosen["config"]
    make_defense(policy.pop("defense"), secret=b"k", **policy)  # the sidecar can build it

    wrong = subprocess.run([script("stealguard-attack"), "calibrate", "--from-contract",
                            str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "no " in wrong.stderr and "Traceback" not in wrong.stderr
    assert wrong.stderr.count("\n") == 1


def test_a_defense_beaten_at_full_depth_is_not_chosen():
    from stealguard.attacks.calibrate import beaten_at_depth

    good = {"defense": "coarse_confidence(six)", "spec": {"name": "coarse_confidence", "p": 6},
            "served_margin_ok": 1.0, "label_kept_round2": 1.0, "label_kept_float32": 1.0,
            "spearman_top": 0.9, "top_error": 0.01, "best_agreement": 0.90,
            "best_runner_up": 0.30, "best_agreement_by": "sample",
            "best_runner_up_by": "sample", "config": {"defense": "coarse_confidence"}}
    finer = {**good, "defense": "coarse_confidence(sixteen)",
             "spec": {"name": "coarse_confidence", "p": 16}, "spearman_top": 0.99}
    floor = {"agreement": 0.90, "runner_up": 0.30}
    assert choose_from_frontier([good, finer], floor=floor)["defense"] == finer["defense"]
    report = {"richer": finer["spec"], "default": good["spec"], "checks": {
        "richer": [{"beats": False}, {"beats": True}], "default": [{"beats": False}],
        "paper": [{"beats": True}]}}
    assert beaten_at_depth(report) == [finer["spec"]]
    choice = choose_from_frontier([good, finer], floor=floor, beaten=beaten_at_depth(report))
    assert choice["defense"] == good["defense"]
    assert "1 more left out: beaten at full depth, coarse_confidence(sixteen)" in choice["reason"]
