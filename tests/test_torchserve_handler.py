"""Settings of the TorchServe handler: model config < extra file < environment."""

from __future__ import annotations

import pytest

pytest.importorskip("ts", reason="TorchServe is not installed: pip install '.[torchserve]'")

from stealguard.client.torchserve import load_settings  # noqa: E402


def test_defaults_send_the_torchserve_model_name_to_the_local_sidecar(tmp_path):
    settings = load_settings(tmp_path, None, "mnist", env={})
    assert settings == {"sidecar": "127.0.0.1:50051", "policy": "mnist", "timeout": 1.0,
                        "output": "logits", "input_shape": None}


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
])
def test_bad_values_are_rejected_with_the_key(tmp_path, env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(tmp_path, None, "mnist", env=env)
