import pytest
from stealguard.server.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def test_defaults_protect_everything_with_coarse_confidence():
    config = load_config(env={})
    assert config.listen == "127.0.0.1:50051"
    assert config.policies == {
        "default": {"defense": "coarse_confidence",
                    "edges": [0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999,
                              0.99997, 0.99999],
                    "margin": 0.02}
    }


def test_beta_without_a_defense_names_the_default_defense_and_its_parameters():
    from stealguard.server.policies import PolicySet

    config = load_config(env={}, overrides={"beta": 1.0})
    with pytest.raises(ConfigError, match="policy 'default': coarse_confidence: unknown "
                                          "parameter 'beta'; accepted: edges, values, margin"):
        PolicySet.from_config(config.policies, secret=b"")


def test_file_then_env_then_flags_each_win_over_the_previous(tmp_path):
    path = write(tmp_path, "listen: 127.0.0.1:1000\nworkers: 2\n"
                 "policies:\n  default: {defense: reverse_sigmoid, beta: 1.0, gamma: 0.5}\n"
                 "  mnist-open: {defense: none}\n")
    env = {"STEALGUARD_LISTEN": "127.0.0.1:2000", "STEALGUARD_BETA": "2.5"}
    config = load_config(path, env=env, overrides={"listen": "127.0.0.1:3000", "gamma": 0.7,
                                                   "beta": None})
    assert config.listen == "127.0.0.1:3000"
    assert config.workers == 2
    assert config.policies["default"] == {"defense": "reverse_sigmoid", "beta": 2.5, "gamma": 0.7}
    assert config.policies["mnist-open"] == {"defense": "none"}


def test_config_file_can_come_from_the_environment(tmp_path):
    path = write(tmp_path, "policies:\n  only: {defense: none}\n")
    assert list(load_config(env={"STEALGUARD_CONFIG": str(path)}).policies) == ["only"]


def test_a_new_defense_flag_replaces_the_default_policy_parameters():
    config = load_config(env={}, overrides={"defense": "top_k"})
    assert config.policies["default"] == {"defense": "top_k"}


def test_unknown_key_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "listne: 1\n")
    with pytest.raises(ConfigError, match=r"sidecar.yaml: unknown key 'listne'"):
        load_config(path, env={})


def test_bad_integer_in_environment_names_the_variable_source():
    with pytest.raises(ConfigError, match=r"^STEALGUARD_WORKERS: must be an integer, got 'two'"):
        load_config(env={"STEALGUARD_WORKERS": "two"})


def test_policy_without_defense_is_rejected(tmp_path):
    path = write(tmp_path, "policies:\n  default: {beta: 1}\n")
    with pytest.raises(ConfigError, match="policy 'default' must be a mapping with a 'defense'"):
        load_config(path, env={})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "policies: [\n"), env={})


def test_zero_workers_is_rejected():
    with pytest.raises(ConfigError, match="--workers: must be at least 1"):
        load_config(env={}, overrides={"workers": 0})


def test_max_in_flight_zero_means_no_limit_and_negative_is_rejected():
    assert load_config(env={"STEALGUARD_MAX_IN_FLIGHT": "0"}).max_in_flight == 0
    with pytest.raises(ConfigError, match="--max-in-flight: must be 0 or more"):
        load_config(env={}, overrides={"max_in_flight": -1})


def test_one_yaml_serves_sidecar_and_proxy(tmp_path):
    from stealguard.server.policies import PolicySet

    path = write(tmp_path, "policies:\n  mnist: {defense: reverse_sigmoid, beta: 1.0, "
                 "on_unrecognized: pass, outputs: [predict_proba]}\n")
    policies = PolicySet.from_config(load_config(path, env={}).policies, b"k")
    assert policies.resolve("mnist").params["beta"] == 1.0


# One settings model, one loader: the same precedence and meanings for every command.

def _modelserver(path=None, env=None, flags=None):
    from stealguard.modelserver.config import load_modelserver_config

    return load_modelserver_config(path, env or {}, flags)


def test_model_server_reads_yaml_then_environment_then_flags(tmp_path):
    path = tmp_path / "modelserver.yaml"
    path.write_text("listen: 127.0.0.1:1000\nmax_batch: 8\ntorch_threads: 1\n"
                    "sidecar_timeout: 250ms\ngrace: 3\n")
    env = {"STEALGUARD_MODELSERVER_LISTEN": "127.0.0.1:2000",
           "STEALGUARD_MODELSERVER_MAX_BATCH": "16", "STEALGUARD_SIDECAR": "side:1"}
    config = _modelserver(path, env, {"listen": "127.0.0.1:3000", "torch_threads": None})
    assert config.listen == "127.0.0.1:3000"  # flag over environment over file
    assert (config.max_batch, config.torch_threads) == (16, 1)  # env over file; file
    assert (config.sidecar, config.sidecar_timeout, config.grace) == ("side:1", 0.25, 3.0)


def test_model_server_config_file_can_come_from_its_environment(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("max_batch: 4\n")
    assert _modelserver(env={"STEALGUARD_MODELSERVER_CONFIG": str(path)}).max_batch == 4


def test_model_server_yaml_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("max_bacth: 4\n")
    with pytest.raises(ConfigError, match="m.yaml: unknown key 'max_bacth'"):
        _modelserver(path)


def test_max_in_flight_zero_means_no_limit_on_the_model_server_too():
    assert _modelserver(flags={"max_in_flight": "0"}).max_in_flight == 0
    with pytest.raises(ConfigError, match="--max-in-flight: must be 0 or more, got -1"):
        _modelserver(flags={"max_in_flight": "-1"})


@pytest.mark.parametrize("text, value", [("on", True), ("yes", True), ("1", True),
                                         ("true", True), ("off", False), ("no", False)])
def test_json_logs_booleans_mean_the_same_on_every_server(text, value):
    assert load_config(env={"STEALGUARD_JSON_LOGS": text}).json_logs is value
    assert _modelserver(env={"STEALGUARD_MODELSERVER_JSON_LOGS": text}).json_logs is value


def test_bad_boolean_names_the_variable():
    with pytest.raises(ConfigError, match="STEALGUARD_MODELSERVER_JSON_LOGS: must be true or"):
        _modelserver(env={"STEALGUARD_MODELSERVER_JSON_LOGS": "maybe"})


@pytest.mark.parametrize("text, seconds", [("10", 10.0), ("1.5", 1.5), ("500ms", 0.5),
                                           ("2s", 2.0), ("1m", 60.0)])
def test_durations_take_seconds_or_units_everywhere(text, seconds):
    assert load_config(env={}, overrides={"grace": text}).grace == seconds
    assert _modelserver(flags={"grace": text}).grace == seconds


def test_shared_settings_have_the_same_defaults_on_sidecar_and_model_server():
    from stealguard.server.settings import ServerSettings, fields_of

    sidecar, model = load_config(env={}), _modelserver()
    for name in fields_of(ServerSettings):
        if name not in ("listen", "metrics_port"):  # each server's own port defaults
            assert getattr(sidecar, name) == getattr(model, name), name


def test_the_sidecar_does_not_read_the_model_servers_environment_or_back():
    assert load_config(env={"STEALGUARD_MODELSERVER_LISTEN": "0.0.0.0:1"}).listen == \
        "127.0.0.1:50051"
    assert _modelserver(env={"STEALGUARD_LISTEN": "0.0.0.0:1"}).listen == "127.0.0.1:7070"
