"""The proxy's StreamPredictions2 pairs answers with requests by sequence_id, not by order:
behind upstreams that answer out of order, twice, or without ids (stand-ins, real
processes), every reply is protected or an error, never an upstream's raw vector.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from _proxy_helpers import digits_samples, npy, start_proxy, start_upstream
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

CONFIG = """
policies:
  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3, preserve_top1: true}
  secret: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3, preserve_top1: true}
  public: {defense: none}
"""
SAMPLES = digits_samples(4)


def proxy_in_front_of(mode: str, tmp_path_factory):
    """Yields (upstream address, proxy address): a proxy in front of a `mode` upstream."""
    upstream, upstream_address = start_upstream("torchserve", None, "--stream2", mode)
    config = tmp_path_factory.mktemp("streams") / "proxy.yaml"
    config.write_text(CONFIG)
    try:
        proxy, address = start_proxy("torchserve", upstream_address, str(config))
    except Exception:
        upstream.stop()
        raise
    yield upstream_address, address
    proxy.stop()
    upstream.stop()


@pytest.fixture(scope="module", params=["reversed", "double", "unpaired"])
def rogue(request, tmp_path_factory):
    """(mode, upstream address, proxy address): a proxy in front of a misbehaving upstream."""
    for upstream, proxy in proxy_in_front_of(request.param, tmp_path_factory):
        yield request.param, upstream, proxy


def stub(address):
    return inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(address))


def ask(model, row, sequence_id=None):
    message = inference_pb2.PredictionsRequest(model_name=model, input={"data": npy(row)})
    if sequence_id is not None:
        message.sequence_id = sequence_id
    return message


def stream(address, requests):
    """The replies until the stream ends, and its error code (None when it ended OK)."""
    replies = []
    try:
        for reply in stub(address).StreamPredictions2(iter(requests), timeout=20):
            replies.append(reply)
    except grpc.RpcError as error:
        return replies, error.code()
    return replies, None


def raw_secret(upstream, row):
    """The upstream's raw probabilities for `row` (what must never come back for `secret`)."""
    reply = stub(upstream).Predictions(ask("secret", row), timeout=20)
    return json.loads(reply.prediction)


@pytest.mark.parametrize("with_ids", [False, True], ids=["proxy-ids", "caller-ids"])
def test_no_reply_of_a_protected_model_comes_back_raw(rogue, with_ids):
    mode, upstream, proxy = rogue
    # slow secret, fast public: the stream an out-of-order upstream turns around
    requests = [ask("secret", SAMPLES[0]), ask("public", SAMPLES[1]),
                ask("secret", SAMPLES[2]), ask("public", SAMPLES[3])]
    if with_ids:
        for i, message in enumerate(requests):
            message.sequence_id = f"caller-{i}"
    replies, code = stream(proxy, requests)
    raws = [np.array(raw_secret(upstream, SAMPLES[i])) for i in (0, 2)]
    for reply in replies:
        got = np.array(json.loads(reply.prediction))
        assert not any(np.allclose(got, raw, atol=1e-6) for raw in raws), (mode, reply)
    protected = [json.loads(stub(proxy).Predictions(ask("secret", SAMPLES[i]),
                                                    timeout=20).prediction) for i in (0, 2)]
    expected_ids = [f"caller-{i}" for i in range(4)] if with_ids else [""] * 4
    if mode == "reversed":  # answered in full, each reply paired with its own request
        assert code is None and len(replies) == 4
        by_id = {r.sequence_id: json.loads(r.prediction) for r in replies}
        if with_ids:
            assert by_id["caller-0"] == protected[0] and by_id["caller-2"] == protected[1]
            assert sorted(by_id) == expected_ids
        else:  # the proxy's own ids are stripped again
            assert all(not r.HasField("sequence_id") for r in replies)
            answers = [json.loads(r.prediction) for r in replies]
            assert answers[3] == protected[0] and answers[1] == protected[1]
    elif mode == "double":  # the second answer to a request is an error, not an answer
        assert code == grpc.StatusCode.INTERNAL and len(replies) == 1
        assert json.loads(replies[0].prediction) == protected[0]
    else:  # answers without an id cannot be paired: an error at the first
        assert code == grpc.StatusCode.INTERNAL and replies == []


def test_a_caller_id_shared_by_two_models_in_flight_is_refused(rogue):
    mode, upstream, proxy = rogue
    replies, code = stream(proxy, [ask("secret", SAMPLES[0], "same"),
                                   ask("public", SAMPLES[1], "same")])
    raw = np.array(raw_secret(upstream, SAMPLES[0]))
    assert code is not None
    assert not any(np.allclose(json.loads(r.prediction), raw, atol=1e-6) for r in replies)



@pytest.fixture(scope="module")
def late_double(tmp_path_factory):
    """(upstream, proxy): an upstream that answers each request a second time once the
    next request has arrived."""
    yield from proxy_in_front_of("late-double", tmp_path_factory)


def test_a_caller_id_answered_for_a_protected_model_is_refused_for_another(late_double):
    """The caller reuses its id for an unprotected model only after the protected model's
    request was answered, so the id is never in flight for two models; the upstream's late
    second answer to the first request would pair with the second: the reuse is refused,
    and the raw answer never comes back."""
    import threading

    upstream, proxy = late_double
    answered = threading.Event()

    def requests():
        yield ask("secret", SAMPLES[0], "same")
        answered.wait(20)
        yield ask("public", SAMPLES[1], "same")

    replies, code = [], None
    try:
        for reply in stub(proxy).StreamPredictions2(requests(), timeout=20):
            replies.append(reply)
            answered.set()
    except grpc.RpcError as error:
        code = error.code()
    finally:
        answered.set()
    raw = np.array(raw_secret(upstream, SAMPLES[0]))
    assert not any(np.allclose(json.loads(r.prediction), raw, atol=1e-6) for r in replies)
    assert len(replies) == 1 and code == grpc.StatusCode.INVALID_ARGUMENT, (replies, code)
    protected = stub(proxy).Predictions(ask("secret", SAMPLES[0]), timeout=20).prediction
    assert json.loads(replies[0].prediction) == json.loads(protected)
