"""Proxy mode, in process: what the proxy does to TorchServe JSON and v2 output tensors."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.server.config import ConfigError
from stealguard.server.core import ProtectCore
from stealguard.server.defenses import make_defense
from stealguard.server.errors import Exhausted
from stealguard.server.metrics import MetricsObserver
from stealguard.server.platform import metrics as platform_metrics
from stealguard.server.platform.metrics import REGISTRY
from stealguard.server.proxy import predictions, tensors
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicies

SECRET = b"test-secret"
POLICIES = ProxyPolicies.from_config(
    {
        "default": {"defense": "reverse_sigmoid", "beta": 1.5, "gamma": 0.3},
        "lenient": {"defense": "reverse_sigmoid", "on_unrecognized": "pass",
                    "outputs": ["probabilities", "extra"]},
        "tabular": {"defense": "reverse_sigmoid", "outputs": "predict_proba"},
    },
    SECRET,
)
DEFENSE = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3, preserve_top1=True)
CORE = ProtectCore(POLICIES.policies)
ROW = [0.61, 0.2, 0.1, 0.05, 0.04]
BATCH = [ROW, [0.05, 0.05, 0.7, 0.1, 0.1]]


def perturber(policy, core=CORE, principal="tester"):
    async def perturb(rows):
        return (await core.protect(rows, policy.name, principal)).rows
    return perturb


def protect_prediction(raw, policy, model, core=CORE):
    return asyncio.run(predictions.protect_prediction(raw, policy, model, perturber(policy, core)))


def protect_outputs(response, policy, model, core=CORE):
    asyncio.run(tensors.protect_outputs(response, policy, model, perturber(policy, core)))


def protect(value, model="m"):
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return json.loads(protect_prediction(raw, POLICIES.resolve(model), model))


def test_probability_vector_is_the_defense_of_the_vector_with_the_same_top1():
    got = protect(ROW)
    assert got == DEFENSE(np.array([ROW]))[0].tolist()
    assert np.argmax(got) == np.argmax(ROW) and got != ROW


def test_batch_is_protected_row_by_row_in_order():
    assert protect(BATCH) == DEFENSE(np.array(BATCH)).tolist()


def test_top_k_dict_is_perturbed_with_the_missing_mass_as_one_other_class():
    top_k = {"tabby": 0.41, "tiger_cat": 0.27, "Egyptian_cat": 0.12}
    got = protect(top_k)
    other = 1.0 - np.sum([0.41, 0.27, 0.12])  # 0.19999999999999996
    expected = DEFENSE(np.array([[0.41, 0.27, 0.12, other]]))[0, :3]
    assert list(got) == ["tabby", "tiger_cat", "Egyptian_cat"]
    assert list(got.values()) == expected.tolist()


def test_list_of_top_k_dicts_is_protected_dict_by_dict():
    got = protect([{"a": 0.9}, {"b": 0.5, "c": 0.5}])
    assert got[0] == {"a": DEFENSE(np.array([[0.9, 1.0 - 0.9]]))[0, 0]}
    assert list(got[1].values()) == DEFENSE(np.array([[0.5, 0.5, 0.0]]))[0, :2].tolist()


@pytest.mark.parametrize(
    ("prediction", "reason"),
    [
        ({"label": 3}, "not {label: probability}"),
        ([0, 1, 0], "list of integers"),
        ("cat", "JSON string"),
        (b"\x89PNG\r\n", "is not JSON"),
        ([0.5, 0.7], "row 0"),
        ({"a": 0.8, "b": 0.7}, "sums to 1.5"),
        ([[0.5, 0.5], [1.0]], "lengths [1, 2]"),
        ([0.5, "0.5"], "not all probabilities"),
    ],
)
def test_unrecognized_prediction_is_rejected_naming_model_and_reason(prediction, reason):
    with pytest.raises(Unrecognized) as error:
        protect(prediction, model="m")
    message = str(error.value)
    assert reason in message and "model 'm'" in message and "on_unrecognized: pass" in message


def test_unrecognized_prediction_passes_unchanged_under_pass():
    raw = b'{"label": 3, "score": "high"}'
    assert protect_prediction(raw, POLICIES.resolve("lenient"), "lenient") == raw


def test_empty_batch_is_returned_as_it_is():
    assert protect([]) == []


def infer_response(datatype="FP32", raw=False, names=("probabilities", "label")):
    probs = np.array(BATCH, dtype="<f4" if datatype == "FP32" else "<f8")
    labels = probs.argmax(axis=1).astype("<i8")
    response = v2.ModelInferResponse(model_name="m")
    for name in names:
        array, kind = (labels, "INT64") if name == "label" else (probs, datatype)
        output = response.outputs.add(name=name, datatype=kind, shape=array.shape)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        elif kind == "INT64":
            output.contents.int64_contents.extend(array.tolist())
        else:
            getattr(output.contents, f"{kind.lower()}_contents").extend(array.ravel().tolist())
    return response, probs


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("raw", [False, True])
def test_named_v2_output_is_protected_in_place_and_others_untouched(datatype, raw):
    response, probs = infer_response(datatype, raw)
    before = response.SerializeToString()
    label_before = (response.raw_output_contents[1] if raw
                    else list(response.outputs[1].contents.int64_contents))
    protect_outputs(response, POLICIES.resolve("m"), "m")
    expected = DEFENSE(probs)
    if raw:
        got = np.frombuffer(response.raw_output_contents[0], dtype=probs.dtype).reshape(2, 5)
        assert response.raw_output_contents[1] == label_before
    else:
        field = f"{datatype.lower()}_contents"
        got = np.array(getattr(response.outputs[0].contents, field), probs.dtype).reshape(2, 5)
        assert list(response.outputs[1].contents.int64_contents) == label_before
    assert got.dtype == probs.dtype and got.tobytes() == expected.tobytes()
    assert list(response.outputs[0].shape) == [2, 5] and response.SerializeToString() != before


def test_v2_answer_without_a_named_output_is_rejected_or_passed():
    response, _ = infer_response(names=("label",))
    with pytest.raises(Unrecognized, match=r"none of its outputs \['label'\]"):
        protect_outputs(response, POLICIES.resolve("m"), "m")
    before = response.SerializeToString()
    protect_outputs(response, POLICIES.resolve("lenient"), "lenient")
    assert response.SerializeToString() == before


def test_v2_named_output_that_is_not_float_is_rejected_with_its_datatype():
    response, _ = infer_response()
    response.outputs[0].datatype = "INT64"
    with pytest.raises(Unrecognized, match="output 'probabilities': datatype INT64"):
        protect_outputs(response, POLICIES.resolve("m"), "m")


def test_v2_pass_protects_what_it_can_and_leaves_only_the_unreadable_output():
    response, probs = infer_response(names=("probabilities", "extra"))
    response.outputs[1].datatype = "FP16"
    extra = list(response.outputs[1].contents.fp32_contents)
    protect_outputs(response, POLICIES.resolve("lenient"), "lenient")
    got = np.array(response.outputs[0].contents.fp32_contents, np.float32).reshape(2, 5)
    assert got.tobytes() == DEFENSE(probs).tobytes()
    assert list(response.outputs[1].contents.fp32_contents) == extra


def test_v2_output_list_may_be_a_single_name():
    assert POLICIES.resolve("tabular").outputs == ("predict_proba",)


def test_proxy_keys_never_reach_the_defense_and_bad_values_name_the_policy():
    assert POLICIES.resolve("lenient").policy.defense.params == DEFENSE.params
    with pytest.raises(ConfigError, match="policy 'x': on_unrecognized must be"):
        ProxyPolicies.from_config({"x": {"defense": "none", "on_unrecognized": "drop"}}, SECRET)
    with pytest.raises(ConfigError, match="policy 'x': outputs must be a non-empty list"):
        ProxyPolicies.from_config({"x": {"defense": "none", "outputs": []}}, SECRET)


def test_list_of_top_k_dicts_of_one_width_is_one_query_of_all_its_rows():
    calls = []

    async def perturb(rows):
        calls.append(rows.shape)
        return (await CORE.protect(rows, "default")).rows

    raw = json.dumps([{"a": 0.6, "b": 0.3}, {"c": 0.5, "d": 0.25}, {"e": 0.9}]).encode()
    asyncio.run(predictions.protect_prediction(raw, POLICIES.resolve("m"), "m", perturb))
    assert sorted(calls) == [(1, 2), (2, 3)]


def test_max_rows_applies_to_a_proxied_answer():
    small = ProtectCore(POLICIES.policies, max_rows=1)
    with pytest.raises(Exhausted, match="2 rows: at most 1 per request"):
        protect_prediction(json.dumps(BATCH).encode(), POLICIES.resolve("m"), "m", core=small)
    response, _ = infer_response()
    with pytest.raises(Exhausted, match="2 rows: at most 1 per request"):
        protect_outputs(response, POLICIES.resolve("m"), "m", core=small)


def test_proxied_answer_is_counted_in_the_per_client_row_and_distortion_metrics(monkeypatch):
    monkeypatch.setattr(platform_metrics, "per_client", True)  # --metrics-per-client
    core = ProtectCore(POLICIES.policies, observers=[MetricsObserver()])

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {"rows": sample("stealguard_rows_total", policy="default"),
              "client": sample("stealguard_client_rows_total", client="proxied-client"),
              "queries": sample("stealguard_client_queries_total", client="proxied-client"),
              "l1": sample("stealguard_l1_distortion_total", policy="default")}
    got = json.loads(asyncio.run(predictions.protect_prediction(
        json.dumps(BATCH).encode(), POLICIES.resolve("m"), "m",
        perturber(POLICIES.resolve("m"), core, principal="proxied-client"))))
    assert sample("stealguard_rows_total", policy="default") - before["rows"] == 2
    assert sample("stealguard_client_rows_total", client="proxied-client") - before["client"] == 2
    assert sample("stealguard_client_queries_total",
                  client="proxied-client") - before["queries"] == 1
    np.testing.assert_allclose(sample("stealguard_l1_distortion_total", policy="default")
                               - before["l1"], np.abs(np.array(got) - BATCH).sum(), rtol=1e-9)
