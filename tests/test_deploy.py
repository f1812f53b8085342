"""The deployment files agree with each other: Dockerfile targets, docker-compose.yml, the
Kubernetes manifests, and the health probe script they all call.

No Docker engine is needed here; `deploy/ci-scenario` builds and runs the images for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from _procs import free_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HEALTHCHECK_IN_IMAGE = "/opt/stealguard/healthcheck.py"
SIDECAR_PORT = 50051
MODELSERVER_PORT = 7070
MODELSERVER_HTTP_PORT = 8080  # stealguard.modelserver.config.DEFAULT_HTTP_PORT


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each named stage of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append(line)
    return stages


def instructions(stage: list[str], keyword: str) -> list[str]:
    return [line[len(keyword):].strip() for line in stage if line.startswith(keyword + " ")]


def test_dockerfile_has_sidecar_and_lab_targets_running_as_non_root():
    stages = dockerfile_stages()
    for target in ("sidecar", "lab"):
        users = instructions(stages[target], "USER")
        assert users and users[-1] not in ("root", "0"), f"{target} runs as {users}"


def test_sidecar_image_has_no_torch_and_warms_numba_at_build_time():
    stages = dockerfile_stages()
    sidecar_chain = " ".join(stages["deps"] + stages["sidecar-build"] + stages["sidecar"])
    assert "torch" not in sidecar_chain
    assert "requirements-sidecar.txt" in sidecar_chain
    assert "requirements-lab.txt" not in sidecar_chain
    runs = instructions(stages["sidecar"], "RUN")
    assert any("warm_up()" in run for run in runs)
    assert any("NUMBA_CACHE_DIR" in env for env in instructions(stages["sidecar"], "ENV"))


def test_sidecar_image_healthcheck_probes_the_exposed_port():
    sidecar = dockerfile_stages()["sidecar"]
    assert instructions(sidecar, "EXPOSE") == [str(SIDECAR_PORT)]
    (check,) = instructions(sidecar, "HEALTHCHECK")
    assert HEALTHCHECK_IN_IMAGE in check
    assert f"127.0.0.1:{SIDECAR_PORT}" in check
    assert f"0.0.0.0:{SIDECAR_PORT}" in " ".join(instructions(sidecar, "CMD"))


def test_lab_image_exposes_the_model_server_port():
    lab = dockerfile_stages()["lab"]
    assert instructions(lab, "EXPOSE") == [f"{MODELSERVER_PORT} {MODELSERVER_HTTP_PORT}"]


def test_build_context_allows_every_file_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    text = (DEPLOY / "Dockerfile").read_text()
    for copy in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        sources = [word for word in copy.split()[:-1] if not word.startswith("--")]
        for source in sources:
            source = source.replace("${WHEELS}", "deploy/wheels")
            source = source.replace("${TRAINING_CACHE}", "deploy/cache").rstrip("/")
            if source.endswith("*"):  # README*: optional
                continue
            assert source in allowed, f"{source} is copied but excluded by .dockerignore"
            assert (ROOT / source).exists(), source


def test_constraints_pin_every_dependency_of_the_images():
    pinned = {
        line.split("==")[0].lower()
        for line in (DEPLOY / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    reqs = subprocess.run(
        [sys.executable, str(DEPLOY / "requirements.py"), str(ROOT / "pyproject.toml"), "lab"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    names = {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in reqs}
    assert names - pinned == set()


def test_requirements_script_rejects_an_unknown_extra_by_name():
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "requirements.py"), str(ROOT / "pyproject.toml"), "gpu"],
        capture_output=True, text=True,
    )
    assert done.returncode != 0
    assert "unknown extra 'gpu'" in done.stderr


# --- docker-compose.yml --------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


SERVICES = {"store", "sidecar", "sidecar-2", "modelserver", "attacker", "metering",
            "modelserver-raw", "envoy", "attacker-envoy", "loadtest", "modelserver-watch",
            "detector"}
HEALTHY = {"condition": "service_healthy"}


def test_compose_services_wait_for_healthy_dependencies(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for sidecar in ("sidecar", "sidecar-2"):
        assert services[sidecar]["depends_on"] == {"store": HEALTHY}
    assert services["modelserver"]["depends_on"] == {"sidecar": HEALTHY}
    assert services["attacker"]["depends_on"] == {"modelserver": HEALTHY, "sidecar": HEALTHY}
    assert services["metering"]["depends_on"] == {"sidecar": HEALTHY, "sidecar-2": HEALTHY}
    assert services["envoy"]["depends_on"] == {"sidecar": HEALTHY, "modelserver-raw": HEALTHY}
    assert services["attacker-envoy"]["depends_on"] == {"envoy": HEALTHY, "sidecar": HEALTHY}
    assert services["loadtest"]["depends_on"] == {"sidecar": HEALTHY}
    assert services["modelserver-watch"]["depends_on"] == {"sidecar": HEALTHY}
    assert services["detector"]["depends_on"] == {"modelserver-watch": HEALTHY}
    profiles = {name: s.get("profiles") for name, s in services.items()}
    assert profiles == {
        "store": None, "sidecar": None, "sidecar-2": None, "modelserver": None,
        "attacker": None, "metering": ["metering"], "modelserver-raw": ["envoy"],
        "envoy": ["envoy"], "attacker-envoy": ["envoy"], "loadtest": ["loadtest"],
        "modelserver-watch": ["detection"], "detector": ["detection"]}
    for name in ("sidecar", "sidecar-2", "modelserver", "modelserver-raw", "modelserver-watch"):
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "python3",
                                                              HEALTHCHECK_IN_IMAGE]


def test_compose_ports_and_probes_match_the_images(compose):
    services = compose["services"]
    sidecar, modelserver = services["sidecar"], services["modelserver"]
    assert sidecar["build"]["target"] == "sidecar"
    assert {s["build"]["target"] for s in (modelserver, services["attacker"])} == {"lab"}
    assert sidecar["command"][:2] == ["--listen", f"0.0.0.0:{SIDECAR_PORT}"]
    assert f"127.0.0.1:{SIDECAR_PORT}" in sidecar["healthcheck"]["test"]
    ms_cmd = modelserver["command"]
    assert ms_cmd[ms_cmd.index("--listen") + 1] == f"0.0.0.0:{MODELSERVER_PORT}"
    assert ms_cmd[ms_cmd.index("--sidecar") + 1] == f"sidecar:{SIDECAR_PORT}"
    assert modelserver["healthcheck"]["test"][3:] == [f"127.0.0.1:{MODELSERVER_PORT}"]
    assert modelserver["ports"][0].endswith(f":{MODELSERVER_PORT}")
    attack = services["attacker"]["command"]
    assert attack[:2] == ["stealguard-attack", "run"]
    assert attack[attack.index("--target") + 1] == f"modelserver:{MODELSERVER_PORT}"
    assert {"mnist", "mnist-open"} <= set(attack)
    assert attack[attack.index("--policies-from") + 1] == f"sidecar:{SIDECAR_PORT}"
    load = services["loadtest"]["command"]
    assert load[load.index("--target") + 1] == f"sidecar:{SIDECAR_PORT}"
    assert load[load.index("--format") + 1] == "json"
    assert load[load.index("--output") + 1].startswith("/out/")
    for name in ("attacker", "loadtest"):
        assert services[name]["volumes"] == ["./out:/out"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_v1_accepts_the_file_against_the_compose_specification():
    # 1.29 validates a file without `version:` against its copy of the Compose Specification.
    done = subprocess.run(
        ["docker-compose", "--profile", "loadtest", "config", "--services"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == SERVICES


# --- Kubernetes ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_kubernetes_manifests_parse_into_the_expected_objects(manifests):
    assert {k.split("/")[0] for k in manifests} == {
        "ConfigMap", "Deployment", "Service", "NetworkPolicy", "Secret", "StatefulSet"}
    for doc in manifests.values():
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_sidecar_is_a_second_container_reached_on_localhost(manifests):
    deployment = manifests["Deployment/stealguard-modelserver"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"modelserver", "sidecar"}
    modelserver, sidecar = containers["modelserver"], containers["sidecar"]
    assert modelserver["image"].startswith("stealguard/lab:")
    assert sidecar["image"].startswith("stealguard/sidecar:")
    cmd = modelserver["command"]
    assert cmd[cmd.index("--sidecar") + 1] == f"127.0.0.1:{SIDECAR_PORT}"
    assert cmd[cmd.index("--listen") + 1] == f"0.0.0.0:{MODELSERVER_PORT}"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001


def test_kubernetes_ports_and_probes_agree_with_the_images(manifests):
    pod = manifests["Deployment/stealguard-modelserver"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    sidecar, modelserver = containers["sidecar"], containers["modelserver"]
    assert [p["containerPort"] for p in sidecar["ports"]] == [SIDECAR_PORT]
    assert sidecar["readinessProbe"]["grpc"] == {"port": SIDECAR_PORT}
    assert sidecar["livenessProbe"]["grpc"] == {"port": SIDECAR_PORT}
    # The kubelet dials the Pod IP, so the sidecar must listen beyond loopback.
    assert sidecar["args"][sidecar["args"].index("--listen") + 1] == f"0.0.0.0:{SIDECAR_PORT}"
    assert [p["containerPort"] for p in modelserver["ports"]] == [MODELSERVER_PORT,
                                                                  MODELSERVER_HTTP_PORT]
    http = modelserver["command"][modelserver["command"].index("--http-port") + 1]
    assert int(http) == MODELSERVER_HTTP_PORT
    for probe in ("readinessProbe", "startupProbe"):
        assert modelserver[probe]["grpc"] == {"port": MODELSERVER_PORT}
    config_path = sidecar["args"][sidecar["args"].index("--config") + 1]
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "sidecar-config"]
    assert config_path.startswith(mount["mountPath"] + "/")
    data = manifests["ConfigMap/stealguard-sidecar"]["data"]
    config = yaml.safe_load(data[Path(config_path).name])
    assert config["policies"]["default"]["defense"] == "coarse_confidence"


def test_service_and_network_policy_expose_only_the_model_server(manifests):
    pod = manifests["Deployment/stealguard-modelserver"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    service = manifests["Service/stealguard-modelserver"]["spec"]
    assert service["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [
        (MODELSERVER_PORT, "grpc"), (MODELSERVER_HTTP_PORT, "http")]
    policy = manifests["NetworkPolicy/stealguard-modelserver"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [
        MODELSERVER_PORT, MODELSERVER_HTTP_PORT]


# --- the health probe script ---------------------------------------------------------------

def run_healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *args, "--timeout", "2"],
        capture_output=True, text=True, timeout=30,
    )


@pytest.fixture
def health_server():
    """A gRPC server with only grpc.health.v1 on a loopback port: (address, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    yield address, servicer
    server.stop(None)


def test_healthcheck_passes_only_while_serving(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = run_healthcheck(address)
    assert (done.returncode, done.stdout.strip()) == (1, f"{address}: NOT_SERVING")
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    done = run_healthcheck(address)
    assert (done.returncode, done.stdout.strip()) == (0, f"{address}: SERVING")


def test_healthcheck_fails_with_the_reason_when_nothing_listens():
    address = f"127.0.0.1:{free_port()}"
    done = run_healthcheck(address)
    assert done.returncode == 1
    assert done.stderr.startswith(f"{address}: UNAVAILABLE") or "DEADLINE_EXCEEDED" in done.stderr


def test_healthcheck_reads_torchserve_ping():
    from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

    class Ping(inference_pb2_grpc.InferenceAPIsServiceServicer):
        health = "Unhealthy"

        def Ping(self, request, context):  # noqa: N802 - gRPC method name
            return inference_pb2.TorchServeHealthResponse(
                health=json.dumps({"status": self.health})
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = Ping()
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    try:
        assert run_healthcheck(address, "--torchserve").returncode == 1
        servicer.health = "Healthy"
        done = run_healthcheck(address, "--torchserve")
        assert (done.returncode, done.stdout.strip()) == (0, f"{address}: Healthy")
    finally:
        server.stop(None)


# --- the scenario's report check -----------------------------------------------------------

def scenario_report(kept: float = 1.0, closed_form: float = 0.93, runner_up: float = 0.30,
                    round2: float = 1.0, sample_runner_up: float = 0.28,
                    runner_up_served: float = 0.10, raw: float = 1.0) -> dict:
    def run(strategy: str, agreement: float, runner: float) -> dict:
        return {"strategy": strategy, "budget": 1000, "queries": 1000, "agreement": agreement,
                "runner_up": runner}

    utility = {"label_kept_round2": round2, "label_kept_float32": 1.0,
               "runner_up_served": runner_up_served}
    protected = {"protected_agreement": kept, "utility": utility, "runs": [
        run("argmax", 0.92, 0.33), run("label-smoothed", 0.93, 0.30),
        run("sample", 0.92, sample_runner_up), run("closed-form", closed_form, runner_up)]}
    unprotected = {"protected_agreement": 1.0, "utility": {**utility, "runner_up_served": raw},
                   "runs": [run("sample", 0.95, 0.62)]}
    return {"models": {"mnist": protected, "mnist-open": unprotected}}


def run_check_report(tmp_path: Path, report: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return subprocess.run([sys.executable, str(DEPLOY / "check_report.py"), str(path)],
                          capture_output=True, text=True, timeout=30)


def test_check_report_passes_a_protected_model_whose_thieves_get_labels(tmp_path):
    done = run_check_report(tmp_path, scenario_report())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("check_report: OK")


def test_check_report_fails_a_thief_above_the_label_only_ones(tmp_path):
    done = run_check_report(tmp_path, scenario_report(closed_form=0.99))
    assert done.returncode == 1
    assert ("closed-form reaches agreement 0.990, above the label-only thieves' 0.930 by more "
            "than 0.05") in done.stderr


def test_check_report_fails_when_dark_knowledge_leaks(tmp_path):
    done = run_check_report(tmp_path, scenario_report(sample_runner_up=0.60))
    assert done.returncode == 1
    assert "gap 0.02 < 0.03" in done.stderr


def test_check_report_fails_a_thief_above_the_label_only_runner_up(tmp_path):
    done = run_check_report(tmp_path, scenario_report(runner_up=0.45))
    assert done.returncode == 1
    assert "closed-form reaches runner_up 0.450, above the label-only thieves' 0.330 by more " \
        "than 0.10" in done.stderr


def test_check_report_fails_when_the_defense_changes_labels(tmp_path):
    done = run_check_report(tmp_path, scenario_report(kept=0.99))
    assert done.returncode == 1
    assert "on 0.9900 of the test inputs, not 1.00" in done.stderr


def test_check_report_fails_when_rounding_loses_labels(tmp_path):
    done = run_check_report(tmp_path, scenario_report(round2=0.10))
    assert done.returncode == 1
    assert "label_kept_round2 is 0.1000" in done.stderr


def test_check_report_fails_answers_that_did_not_come_through_the_defense(tmp_path):
    done = run_check_report(tmp_path, scenario_report(runner_up_served=1.0))
    assert done.returncode == 1
    assert ("mnist: its answers' runner-up is the base model's on 1.000 of the test inputs, "
            "above 0.50: the answers did not come through the defense") in done.stderr


def test_check_report_fails_a_baseline_that_is_not_raw(tmp_path):
    done = run_check_report(tmp_path, scenario_report(raw=0.10))
    assert done.returncode == 1
    assert "mnist-open: its answers' runner-up is the base model's on 0.100" in done.stderr


def test_every_replica_meters_in_the_one_store_with_the_shared_secrets(manifests, tmp_path):
    from stealguard.client.defense import read_token_file
    from stealguard.server.config import load_config
    from stealguard.server.metering.settings import check_metering, limits_of
    from stealguard.server.platform.credentials import Tokens

    pod = manifests["Deployment/stealguard-modelserver"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    sidecar, modelserver = containers["sidecar"], containers["modelserver"]
    secret = manifests["Secret/stealguard-secrets"]["stringData"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "stealguard-secrets"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]

    def secret_file(container, flag, args_key):
        args = container[args_key]
        path = Path(args[args.index(flag) + 1])
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
        assert str(path.parent) == mount["mountPath"]
        local = tmp_path / path.name
        local.write_text(secret[path.name])
        return local

    # the sidecar believes the model server's token as a gateway's: end clients are charged
    tokens = Tokens.from_file(str(secret_file(sidecar, "--token-file", "args")))
    token = read_token_file(secret_file(modelserver, "--sidecar-token-file", "command"),
                            "--sidecar-token-file")
    assert tokens.client_of(f"Bearer {token}") == "modelserver"
    assert "modelserver" in tokens.gateways
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in sidecar["env"]}
    assert {ref["name"] for ref in env.values()} == {"stealguard-secrets"}
    assert all(ref["key"] in secret for ref in env.values())
    # one store for every replica: the URL names the store's Service and port, and the
    # store's password is the one the sidecars are given
    path = tmp_path / "sidecar.yaml"
    path.write_text(manifests["ConfigMap/stealguard-sidecar"]["data"]["sidecar.yaml"])
    config = load_config(path, env={})
    check_metering(config, workers=1)
    assert limits_of(config).active
    service = manifests["Service/stealguard-store"]
    host, port = config.store.removeprefix("redis://").split("/")[0].split(":")
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    store = manifests["StatefulSet/stealguard-store"]["spec"]
    assert service["spec"]["selector"] == store["template"]["metadata"]["labels"]
    (valkey,) = store["template"]["spec"]["containers"]
    (password,) = valkey["env"]
    assert password["valueFrom"]["secretKeyRef"] == env["STEALGUARD_STORE_PASSWORD"]
    assert f"$({password['name']})" in valkey["args"] and "--appendonly" in valkey["args"]
    ingress = manifests["NetworkPolicy/stealguard-store"]["spec"]["ingress"]
    assert ingress[0]["from"][0]["podSelector"]["matchLabels"] == \
        manifests["Deployment/stealguard-modelserver"]["spec"]["template"]["metadata"]["labels"]


# --- the commands in the files are ones the programs accept ---------------------------------

def test_compose_and_kubernetes_commands_parse_with_the_programs_own_parsers(compose, manifests):
    from stealguard.attacks.cli import build_parser as attack_parser
    from stealguard.client.load.cli import build_parser as load_parser
    from stealguard.client.load.cli import config_from_args
    from stealguard.modelserver.cli import build_parser as modelserver_parser
    from stealguard.server.cli import build_parser as sidecar_parser

    services = compose["services"]
    sidecar_parser().parse_args(services["sidecar"]["command"])
    pod = manifests["Deployment/stealguard-modelserver"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    sidecar_parser().parse_args(containers["sidecar"]["args"])
    for command in (services["modelserver"]["command"], containers["modelserver"]["command"]):
        assert command[0] == "stealguard-modelserver"
        modelserver_parser().parse_args(command[1:])
    attack = attack_parser().parse_args(services["attacker"]["command"][1:])
    assert (attack.command, attack.model) == ("run", ["mnist", "mnist-open"])
    load = services["loadtest"]["command"]
    assert load[0] == "stealguard-load"
    config_from_args(load_parser().parse_args(load[1:]))  # validates durations and sizes


def test_kubernetes_sidecar_config_builds_its_policies(manifests, tmp_path):
    from stealguard.server.config import load_config
    from stealguard.server.policies import PolicySet

    path = tmp_path / "sidecar.yaml"
    path.write_text(manifests["ConfigMap/stealguard-sidecar"]["data"]["sidecar.yaml"])
    config = load_config(path, env={})
    assert config.listen == f"0.0.0.0:{SIDECAR_PORT}"
    policies = PolicySet.from_config(config.policies, b"test-secret")
    assert policies.resolve("mnist").defense.name == "coarse_confidence"
    assert policies.resolve("mnist-open").defense.name == "none"
