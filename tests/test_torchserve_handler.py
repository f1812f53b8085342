"""The TorchServe handler without TorchServe: its settings (model config < extra file <
environment) and its pipeline over a batch of requests, against the real sidecar."""

from __future__ import annotations

import pytest

pytest.importorskip("ts", reason="TorchServe is not installed: pip install '.[torchserve]'")

from stealguard.client.torchserve import load_settings  # noqa: E402


def test_defaults_send_the_torchserve_model_name_to_the_local_sidecar(tmp_path):
    settings = load_settings(tmp_path, None, "mnist", env={})
    assert settings == {"sidecar": "127.0.0.1:50051", "policy": "mnist", "timeout": 1.0,
                        "transport": "stream", "output": "logits", "input_shape": None,
                        "token_file": None, "principal_header": None, "token": None}


def test_extra_file_overrides_model_config_and_environment_overrides_both(tmp_path):
    (tmp_path / "stealguard.yaml").write_text(
        "sidecar: 10.0.0.1:50051\npolicy: strict\ninput_shape: [1, 28, 28]\n")
    model_config = {"stealguard": {"sidecar": "ignored:1", "timeout": 0.25}}
    settings = load_settings(tmp_path, model_config, "mnist",
                             env={"STEALGUARD_SIDECAR": "sidecar:50051"})
    assert settings["sidecar"] == "sidecar:50051"
    assert settings["policy"] == "strict"
    assert settings["timeout"] == 0.25
    assert settings["input_shape"] == (1, 28, 28)


def test_json_extra_file_is_read(tmp_path):
    (tmp_path / "stealguard.json").write_text('{"policy": "none", "output": "probabilities"}')
    settings = load_settings(tmp_path, None, "mnist", env={})
    assert settings["policy"] == "none" and settings["output"] == "probabilities"


def test_unknown_setting_is_named_with_its_source(tmp_path):
    (tmp_path / "stealguard.yaml").write_text("sidcar: 10.0.0.1:50051\n")
    with pytest.raises(ValueError, match=r"stealguard.yaml: unknown setting\(s\) sidcar"):
        load_settings(tmp_path, None, "mnist", env={})


@pytest.mark.parametrize("env, message", [
    ({"STEALGUARD_SIDECAR_TIMEOUT": "soon"}, "timeout must be seconds, got 'soon'"),
    ({"STEALGUARD_SIDECAR_TIMEOUT": "0"}, "timeout must be > 0 seconds"),
    ({"STEALGUARD_OUTPUT": "scores"}, "output must be 'logits' or 'probabilities'"),
    ({"STEALGUARD_SIDECAR_TRANSPORT": "udp"}, "transport must be 'stream' or 'unary'"),
    ({"STEALGUARD_PRINCIPAL_HEADER": "x client"}, "principal_header must be an HTTP header"),
    ({"STEALGUARD_SIDECAR_TOKEN_FILE": "/nonexistent/token"}, "token_file: cannot read"),
])
def test_bad_values_are_rejected_with_the_key(tmp_path, env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(tmp_path, None, "mnist", env=env)


def _handler(settings: dict, sidecar: str):
    import torch
    from stealguard.client import DefenseClient
    from stealguard.client.torchserve import StealguardHandler

    handler = StealguardHandler()  # as TorchServe would have initialised it
    handler.settings = {**settings, "sidecar": sidecar}
    handler.sidecar = DefenseClient(sidecar, timeout=10, stream=True)
    handler.device = torch.device("cpu")
    handler._requests = None
    return handler


def test_a_torchserve_batch_of_requests_gets_one_protected_answer_each(tmp_path, sidecar):
    import numpy as np
    import torch
    from _modelserver_helpers import mnist_test_images, npy_bytes, png_bytes
    from stealguard.client import DefenseClient

    settings = load_settings(tmp_path, {"stealguard": {"input_shape": [1, 28, 28]}}, "mnist",
                             env={})
    handler = _handler(settings, sidecar)
    images = mnist_test_images(3)
    batch = handler.preprocess([{"data": npy_bytes(images[:2])},
                                {"body": bytearray(png_bytes(images[2]))}])
    assert tuple(batch.shape) == (3, 1, 28, 28)
    logits = torch.tensor(np.random.default_rng(0).normal(0, 4, (3, 10)))
    answers = handler.postprocess(logits)
    probs = torch.softmax(logits, dim=1).numpy()
    with DefenseClient(sidecar, timeout=10) as defense:
        expected = defense.perturb(probs, model="mnist")
    assert len(answers) == 2 and len(answers[0]) == 2 and len(answers[1]) == 10
    np.testing.assert_allclose(np.array(answers[0]), expected[:2], atol=1e-12)
    np.testing.assert_allclose(np.array(answers[1]), expected[2], atol=1e-12)


def test_a_bad_request_in_a_torchserve_batch_is_a_400_naming_it(tmp_path, sidecar):
    from ts.utils.util import PredictionException

    settings = load_settings(tmp_path, {"stealguard": {"input_shape": [1, 28, 28]}}, "mnist",
                             env={})
    handler = _handler(settings, sidecar)
    with pytest.raises(PredictionException) as error:
        handler.preprocess([{"data": b"\x93NUMPY garbage"}, {"other": b""}])
    assert error.value.error_code == 400
    assert error.value.message.startswith("request 0: input 'data' is not a readable .npy")


def test_a_batch_from_two_end_clients_is_sent_as_one_call_each(tmp_path):
    """A TorchServe batch mixing alice and bob (TorchServe's own Context and
    RequestProcessor): each client's rows reach the sidecar under its name, in one call
    each, and each answer is that client's rows protected."""
    import numpy as np
    import torch
    from _modelserver_helpers import mnist_test_images, npy_bytes
    from _procs import start_sidecar
    from stealguard.client import DefenseClient
    from ts.context import Context, RequestProcessor

    (tmp_path / "tokens").write_text("torchserve:gw-secret:gateway\n")
    (tmp_path / "token").write_text("gw-secret\n")
    process, address = start_sidecar("--token-file", str(tmp_path / "tokens"),
                                      "--quota", "3/1h")
    try:
        settings = load_settings(tmp_path, {"stealguard": {
            "input_shape": [1, 28, 28], "principal_header": "X-Client-Id",
            "token_file": str(tmp_path / "token")}}, "mnist", env={})
        handler = _handler(settings, address)
        handler.sidecar = DefenseClient(address, timeout=10, token=settings["token"])
        handler.context = Context("mnist", str(tmp_path), {}, 3, None, "0.12")
        handler.context.request_processor = [RequestProcessor({"X-Client-Id": name})
                                             for name in ("alice", "bob", "alice")]
        images = mnist_test_images(4)
        batch = handler.preprocess([{"data": npy_bytes(images[:2])},
                                    {"data": npy_bytes(images[2])},
                                    {"data": npy_bytes(images[3])}])
        assert tuple(batch.shape) == (4, 1, 28, 28)
        logits = torch.tensor(np.random.default_rng(1).normal(0, 4, (4, 10)))
        answers = handler.postprocess(logits)
        # alice has spent 3 rows (2 + 1), bob 1: alice's next row is over, bob's is not
        after = handler.preprocess([{"data": npy_bytes(images[0])},
                                    {"data": npy_bytes(images[1])},
                                    {"data": npy_bytes(images[2])}])
        assert tuple(after.shape) == (3, 1, 28, 28)
        more = handler.postprocess(logits[:3])
    finally:
        process.stop()
    probs = torch.softmax(logits, dim=1).numpy()
    assert [np.array(a).shape for a in answers] == [(2, 10), (10,), (10,)]
    served = np.vstack([answers[0], answers[1], answers[2]])
    assert (served.argmax(1) == probs.argmax(1)).all() and (served.max(1) < 1).all()
    alice_over, bob_ok, alice_over_too = (np.array(a) for a in more)
    np.testing.assert_array_equal(alice_over, np.eye(10)[probs[0].argmax()])
    assert bob_ok.max() < 1 and bob_ok.argmax() == probs[1].argmax()
    np.testing.assert_array_equal(alice_over_too, np.eye(10)[probs[2].argmax()])
