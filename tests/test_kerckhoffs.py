"""What an attacker who knows the algorithm recovers: closed-form inversion, estimation,
the contract view; and the contract's utility figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _defenses_helpers import digits_softmax_rows
from stealguard.attacks.contract import margins, runner_up, utility
from stealguard.attacks.contract_report import checks, group, interval
from stealguard.attacks.kerckhoffs import (
    constructor_params,
    contract_view,
    estimate,
    invert,
    label_view,
)
from stealguard.server.defenses import make_defense

ROWS = digits_softmax_rows()


def test_closed_form_inversion_recovers_the_runner_up_that_reverse_sigmoid_hides():
    served = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(ROWS)
    recovered = invert(served, "reverse_sigmoid", {"beta": 1.5, "gamma": 0.3})
    as_served = (runner_up(served) == runner_up(ROWS)).mean()
    inverted = (runner_up(recovered) == runner_up(ROWS)).mean()
    assert as_served < 0.2
    assert inverted > as_served + 0.3
    assert (recovered.argmax(1) == ROWS.argmax(1)).all()
    np.testing.assert_allclose(recovered.sum(1), 1.0)


def test_estimated_parameters_invert_nearly_as_well_as_the_published_ones():
    served = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(ROWS)
    params = estimate(served, "reverse_sigmoid")
    recovered = invert(served, "reverse_sigmoid", params)
    assert (runner_up(recovered) == runner_up(ROWS)).mean() > 0.3


def test_coarse_confidence_inverts_to_its_contract_view_only():
    served = make_defense("coarse_confidence", secret=b"s")(ROWS)
    recovered = invert(served, "coarse_confidence", {})
    np.testing.assert_array_equal(recovered, contract_view(served))
    rest = np.sort(recovered, 1)[:, :-1]
    np.testing.assert_allclose(rest, rest[:, :1].repeat(rest.shape[1], 1))


def test_label_view_discloses_only_the_label():
    view = label_view(ROWS, 0.9)
    assert (view.argmax(1) == ROWS.argmax(1)).all()
    np.testing.assert_allclose(view.max(1), 0.9)


def test_published_flat_parameters_rebuild_the_defense():
    d = make_defense("coarse_confidence", edges=[0.9, 0.999], margin=0.03)
    params = constructor_params("coarse_confidence", d.params)
    assert make_defense("coarse_confidence", **params).params == d.params


def test_utility_of_the_paper_default_fails_rounding_and_inverts_confidence():
    served = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3, preserve_top1=False)(ROWS)
    u = utility(served, ROWS)
    assert u["spearman_top"] < 0
    assert u["label_kept_round2"] < 0.5
    assert (margins(ROWS) >= 0.02).mean() == u["contract_rows"]


def test_checks_pair_seeds_and_call_a_difference_beyond_its_interval_beating():
    def run(stage, strategy, seed, agreement):
        return {"stage": stage, "strategy": strategy, "seed": seed, "budget": 100,
                "defense": {"name": "none", "params": {}}, "agreement": agreement,
                "runner_up": 0.3, "kl": 0.1}

    runs = [run("floor", "argmax", s, 0.80 + 0.01 * s) for s in range(5)]
    runs += [run("default", "contract-floor", s, 0.80 + 0.01 * s + 0.001) for s in range(5)]
    runs += [run("default", "sample", s, 0.85 + 0.01 * s) for s in range(5)]
    found = {(c["attack"], c["metric"]): c for c in checks(group(runs), "default")}
    assert found["contract-floor", "agreement"]["beats"]  # +0.001 every seed: no spread
    assert found["sample", "agreement"]["beats"]
    assert not found["sample", "runner_up"]["beats"]
    mean, hw = interval([1.0, 2.0, 3.0])
    assert (mean, round(hw, 3)) == (2.0, 2.484)


def test_full_stage_runs_are_reported_by_the_role_of_their_defense():
    from stealguard.attacks.contract import ALTERNATIVE, DEFAULT, FULL_STAGE, RICHER

    def run(defense, seed):
        return {"stage": FULL_STAGE, "strategy": "sample", "seed": seed, "budget": 100,
                "defense": defense.describe(), "agreement": 0.9, "runner_up": 0.3, "kl": 0.1}

    runs = ([run(DEFAULT, s) for s in range(3)] + [run(ALTERNATIVE, s) for s in range(2)]
            + [run(RICHER, 0)])
    roles = {k[0]: len(cell) for k, cell in group(runs).items()}
    assert roles == {"default": 3, "alternative": 2, "richer": 1}


def test_the_interval_uses_student_t_at_any_number_of_seeds():
    mean, hw = interval([0.0, 1.0] * 10)  # 20 seeds: t(19) = 2.093, not the normal 1.96
    assert mean == 0.5 and round(hw, 3) == round(2.093 * math.sqrt(20 / 19 * 0.25 / 20), 3)


def test_a_results_folder_keeps_its_victim_and_refuses_runs_against_another(tmp_path):
    import torch
    from stealguard.attacks.contract import (
        RUNS_FILE,
        ContractExperiment,
        VictimMismatch,
        victim_model,
        weights_of,
    )
    from stealguard.modelserver.datasets import load_dataset

    logged = []
    model, info = victim_model("iris", tmp_path, log=logged.append)
    assert (tmp_path / "victim.pt").exists() and "trained here" in logged[-1]
    # the saved weights are what the next run attacks, whatever this machine would train
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.save(model.state_dict(), tmp_path / "victim.pt")
    again, _ = victim_model("iris", tmp_path, log=logged.append)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ds = load_dataset("iris", seed=0)
    (tmp_path / RUNS_FILE).write_text(json.dumps({"key": "k", "victim": info["victim"]}) + "\n")
    with pytest.raises(VictimMismatch, match="another victim"):
        ContractExperiment(ds, again, tmp_path)  # the weights moved: another victim
    # the same weights are the same victim even where another CPU rounds their answers
    # differently (the answers' hash is then not this machine's)
    (tmp_path / RUNS_FILE).write_text(json.dumps(
        {"key": "k", "victim": "mean top 0.9, sha256 from-another-cpu",
         "victim_weights": weights_of(again)}) + "\n")
    assert ContractExperiment(ds, again, tmp_path).done == {"k"}
    with pytest.raises(VictimMismatch, match="not digits"):
        victim_model("digits", tmp_path)


def test_the_full_stage_plans_every_attack_on_each_policy_at_each_seed():
    from dataclasses import replace

    from stealguard.attacks.contract import FULL_DEPTH, FULL_STAGE, QUICK, plan_all

    plans = plan_all(replace(QUICK, seeds=(0, 7)), frontier=False)
    full = {(json.dumps(p.defense.describe(), sort_keys=True), p.strategy, p.seed)
            for p in plans if p.stage == FULL_STAGE}
    assert len(full) == len(FULL_DEPTH) * 3 * 2  # sample, contract floor, learned; two seeds
    assert {s for _, _, s in full} == {0, 7}
    floors = {(p.strategy, p.seed) for p in plans if p.stage == "floor"}
    assert {s for _, s in floors} == {0, 7}


def test_a_policys_short_label_lists_its_edges_in_order_past_nine():
    from stealguard.attacks.contract_report import _short_label
    from stealguard.server.defenses import make_defense

    params = make_defense("coarse_confidence", edges=[  # the richer policy: fifteen edges
        0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999, 0.99997, 0.99999, 0.999997,
        0.999999, 0.9999997, 0.9999999]).params
    label = _short_label({"name": "coarse_confidence", "params": params})
    assert label == "coarse_confidence, edges 0.5 / 0.7 / 0.9 / 0.97 / 0.99 / 0.997 / " \
        "0.999 / 0.9997 / 0.9999 / 0.99997 / 0.99999 / 0.999997 / 0.999999 / " \
        "0.9999997 / 0.9999999"
