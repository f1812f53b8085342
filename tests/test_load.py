"""stealguard-load against real servers on loopback: the sidecar, the bench echo server (also
in its stalling mode) and a counting server in this process. Every run is the real console
script; numbers asserted are counts and the shape of the latency distribution, never speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from _procs import Process, free_port, script, start_sidecar
from stealguard.v1 import defense_pb2, defense_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
LATENCY_KEYS = {"p50", "p90", "p99", "p999", "max"}


def load(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run stealguard-load with ``args``; the completed process (text output)."""
    return subprocess.run([script("stealguard-load"), "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def load_json(*args: str) -> dict:
    done = load(*args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_echo(*extra: str) -> tuple[Process, str]:
    address = f"127.0.0.1:{free_port()}"
    process = Process([sys.executable, str(ROOT / "bench" / "echo_server.py"),
                       "--listen", address, *extra])
    process.wait_healthy(address, timeout=30)
    return process, address


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """The real sidecar with one policy, ``mnist``, and no default: other models are
    NOT_FOUND."""
    config = tmp_path_factory.mktemp("load") / "sidecar.yaml"
    config.write_text("policies:\n  mnist: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n")
    process, address = start_sidecar("--config", str(config))
    yield address
    process.stop()


@pytest.fixture(scope="module")
def echo_server():
    process, address = start_echo()
    yield process, address
    process.stop()


@pytest.fixture
def echo(echo_server):
    return echo_server[1]


class CountingDefense(defense_pb2_grpc.DefenseServicer):
    """Counts Perturb calls and keeps every request's tensor."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tensors: list[defense_pb2.Tensor] = []
        self.metadata: list[dict[str, str]] = []

    def Perturb(self, request, context):
        with self.lock:
            self.tensors.append(request.probabilities)
            self.metadata.append(dict(context.invocation_metadata()))
        return defense_pb2.PerturbResponse(probabilities=request.probabilities)


def start_counting(credentials=None):
    servicer = CountingDefense()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    defense_pb2_grpc.add_DefenseServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}", servicer


@pytest.fixture
def counting():
    server, address, servicer = start_counting()
    yield address, servicer
    server.stop(grace=None)


def assert_latency_block(block: dict) -> None:
    assert LATENCY_KEYS <= set(block)
    values = [block[k] for k in ("p50", "p90", "p99", "p999", "max")]
    assert values == sorted(values) and values[0] > 0


# --- against the sidecar -----------------------------------------------------------------


def test_closed_loop_json_has_the_schema(sidecar):
    doc = load_json("--target", sidecar, "--model", "mnist", "--concurrency", "4",
                    "--duration", "1s")
    assert doc["mode"] == "closed" and doc["corrected"] is False
    assert doc["requests"] == doc["ok"] > 0 and doc["errors"] == {}
    assert doc["rps"] == pytest.approx(doc["requests"] / doc["duration_s"], rel=0.01)
    assert_latency_block(doc["latency_ms"])
    assert "uncorrected_latency_ms" not in doc
    assert doc["host"]["cpus"] >= 1 and 0 <= doc["host"]["busy"] <= 1
    assert len(doc["client"]["cpu_per_proc"]) == 1 and doc["client"]["cpu_us_per_call"] > 0


def test_open_loop_json_reports_corrected_and_uncorrected_latency(sidecar):
    doc = load_json("--target", sidecar, "--model", "mnist", "--rps", "200", "--duration",
                    "1s", "--arrival", "poisson")
    assert doc["mode"] == "open" and doc["corrected"] is True
    assert doc["requested_rps"] == 200 and doc["arrival"] == "poisson"
    assert 120 <= doc["requests"] <= 280  # Poisson count over 1 s at 200/s: 200 +- 5 sigma
    assert_latency_block(doc["latency_ms"])
    assert_latency_block(doc["uncorrected_latency_ms"])
    # Corrected >= uncorrected call by call, so at every percentile too.
    for key in LATENCY_KEYS:
        assert doc["latency_ms"][key] >= doc["uncorrected_latency_ms"][key]


@pytest.mark.parametrize("extra", [["--concurrency", "8"], ["--rps", "500"],
                                   ["--procs", "2", "--concurrency", "3"]])
def test_total_issues_exactly_that_many_calls(sidecar, extra):
    doc = load_json("--target", sidecar, "--model", "mnist", "--total", "137", *extra)
    assert doc["requests"] == doc["ok"] == 137


def test_errors_are_counted_by_status_code(sidecar, tmp_path):
    doc = load_json("--target", sidecar, "--model", "nope", "--total", "25")
    assert doc["errors"] == {"NOT_FOUND": 25} and doc["ok"] == 0
    assert doc["latency_ms"] is None and "no call succeeded" in " ".join(doc["warnings"])
    # On a stream each refused message is answered with its status and the stream goes on.
    doc = load_json("--target", sidecar, "--model", "nope", "--total", "12", "--method",
                    "perturb-stream", "--concurrency", "2")
    assert doc["errors"] == {"NOT_FOUND": 12}
    rows = tmp_path / "bad.npy"
    np.save(rows, np.full((4, 3), 0.5, dtype=np.float32))  # rows sum to 1.5
    doc = load_json("--target", sidecar, "--model", "mnist", "--total", "10", "--payload",
                    str(rows))
    assert doc["errors"] == {"INVALID_ARGUMENT": 10}


@pytest.mark.parametrize("method", ["perturb", "perturb-stream"])
def test_responses_file_has_every_reply_matched_to_its_request(sidecar, tmp_path, method):
    rng = np.random.default_rng(1)
    rows = rng.dirichlet(np.full(5, 0.3), size=6).astype(np.float32)
    payload, log = tmp_path / "rows.npy", tmp_path / "replies.jsonl"
    np.save(payload, rows)
    doc = load_json("--target", sidecar, "--model", "mnist", "--method", method, "--total",
                    "7", "--batch", "2", "--payload", str(payload), "--concurrency", "2",
                    "--responses", str(log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert doc["ok"] == len(lines) == 7
    for line in lines:
        sent = rows[[(2 * line["request"] + k) % 6 for k in range(2)]]
        reply = np.array(line["reply"]["probabilities"])
        assert line["code"] == "OK" and line["reply"]["policy"] == "mnist"
        assert reply.shape == (2, 5) and not np.allclose(reply, sent, atol=1e-3)  # perturbed
        np.testing.assert_array_equal(reply.argmax(1), sent.argmax(1))  # top-1 guard


def test_a_stream_counts_each_refused_message_and_answers_its_neighbours(sidecar, tmp_path):
    rng = np.random.default_rng(2)
    rows = rng.dirichlet(np.full(5, 0.3), size=4).astype(np.float32)
    rows[1] = rows[3] = 0.5  # rows that sum to 2.5
    payload, log = tmp_path / "mixed.npy", tmp_path / "replies.jsonl"
    np.save(payload, rows)
    doc = load_json("--target", sidecar, "--model", "mnist", "--method", "perturb-stream",
                    "--total", "8", "--batch", "1", "--payload", str(payload),
                    "--concurrency", "1", "--responses", str(log))
    assert doc["ok"] == 4 and doc["errors"] == {"INVALID_ARGUMENT": 4}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 8
    for sent, line in enumerate(lines):  # one caller: the log is in the order sent
        if line["request"] % 2:  # one stream carried all eight: its message count runs on
            assert line["code"] == "INVALID_ARGUMENT"
            assert line["details"].startswith(f"stream message {sent}: row 0")
        else:
            assert line["code"] == "OK" and line["reply"]["policy"] == "mnist"


def test_responses_file_records_error_details(sidecar, tmp_path):
    log = tmp_path / "replies.jsonl"
    load_json("--target", sidecar, "--model", "nope", "--total", "3", "--responses", str(log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["code"] for line in lines] == ["NOT_FOUND"] * 3
    assert all("nope" in line["details"] for line in lines)


def test_perturb_stream_times_each_message_on_long_lived_streams(sidecar):
    doc = load_json("--target", sidecar, "--model", "mnist", "--method", "perturb-stream",
                    "--total", "300", "--concurrency", "3")
    assert doc["requests"] == doc["ok"] == 300
    assert_latency_block(doc["latency_ms"])


def test_streams_the_server_refuses_are_counted_by_status_and_reopened():
    # two streams per principal: the third and fourth callers' streams are ended by the
    # sidecar before their first message (a write to a finished call), counted, not a crash
    process, address = start_sidecar("--max-streams-per-principal", "2")
    try:
        doc = load_json("--target", address, "--method", "perturb-stream", "--total", "200",
                        "--concurrency", "4")
    finally:
        process.stop()
    # grpc.aio reports some of the refusals as INTERNAL (a write racing the end of the
    # call, grpc/grpc#36066): those are counted as the server ending the stream
    assert doc["requests"] == 200 and doc["ok"] >= 2
    assert doc["errors"].get("RESOURCE_EXHAUSTED")
    assert set(doc["errors"]) <= {"RESOURCE_EXHAUSTED", "STREAM_ENDED"}, doc["errors"]
    assert doc["ok"] + sum(doc["errors"].values()) == 200


# --- the proof that the correction works -------------------------------------------------


def test_corrected_p99_shows_a_server_stall_that_uncorrected_hides():
    """A server that pauses 200 ms once a second, driven at 200 calls/s with one call in
    flight (wrk2 with one connection): each pause delays one call by 200 ms (0.5% of calls,
    below p99) but the 40 calls scheduled during it all start late (20% of calls)."""
    process, address = start_echo("--stall", "200ms", "--stall-every", "1s")
    try:
        doc = load_json("--target", address, "--rps", "200", "--concurrency", "1",
                        "--duration", "5s")
    finally:
        process.stop()
    assert doc["ok"] == doc["requests"] >= 900
    assert doc["latency_ms"]["p99"] >= 150
    # below the 200 ms stall, however slow a busy machine makes ordinary calls
    assert doc["uncorrected_latency_ms"]["p99"] < 150
    assert doc["uncorrected_latency_ms"]["max"] >= 150  # the stall happened, ghz-style p99 hid it


def test_a_rate_the_server_cannot_reach_is_warned_about(echo):
    done = load("--target", echo, "--rps", "100000", "--concurrency", "1", "--duration", "1s",
                "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["rps"] < 95000
    assert any("below the requested 100000 rps" in w for w in doc["warnings"])
    # The run still ended on time: the backlog is counted as unsent, not sent late.
    assert doc["duration_s"] < 5 and doc["unsent"] > 0
    assert doc["requests"] + doc["unsent"] == pytest.approx(100000, rel=0.01)
    assert "warning: achieved" in done.stderr
    # The schedule slipped: the corrected latency counts calls that never got to start.
    assert doc["latency_ms"]["p50"] > 10 * doc["uncorrected_latency_ms"]["p50"]


# --- payloads, methods and outputs -------------------------------------------------------


def test_payload_rows_are_sent_in_batches_wrapping_around_the_file(counting, tmp_path):
    address, servicer = counting
    rows = np.eye(5, 4, dtype=np.float64)[[0, 1, 2, 3, 0]]  # 5 one-hot rows, 4 classes
    path = tmp_path / "rows.npy"
    np.save(path, rows)
    doc = load_json("--target", address, "--total", "2", "--concurrency", "1", "--batch", "3",
                    "--payload", str(path))
    assert doc["ok"] == 2 and len(servicer.tensors) == 2
    sent = [np.frombuffer(t.data, "<f8").reshape(tuple(t.shape)) for t in servicer.tensors]
    assert all(t.dtype == defense_pb2.FLOAT64 for t in servicer.tensors)
    np.testing.assert_array_equal(np.concatenate(sent), rows[[0, 1, 2, 3, 4, 0]])


def test_synthetic_rows_are_probability_rows_of_the_requested_shape(counting):
    address, servicer = counting
    doc = load_json("--target", address, "--total", "20", "--batch", "4", "--classes", "7")
    assert doc["ok"] == 20
    for t in servicer.tensors:
        rows = np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))
        assert rows.shape == (4, 7) and np.all(rows >= 0)
        np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)


def test_predictions_method_sends_npy_batches(echo):
    doc = load_json("--target", echo, "--method", "predictions", "--model", "mnist",
                    "--total", "20", "--batch", "2")
    assert doc["requests"] == doc["ok"] == 20 and doc["classes"] is None


def test_server_pid_reports_the_servers_cpu_per_call(echo_server):
    process, address = echo_server
    doc = load_json("--target", address, "--total", "400", "--server-pid", str(process.pid))
    assert doc["server"]["pids"] == [process.pid]
    assert doc["server"]["cpu_cores"] > 0 and doc["server"]["cpu_us_per_call"] > 0


def test_csv_has_one_row_per_latency_figure(echo):
    done = load("--target", echo, "--rps", "100", "--total", "30", "--format", "csv")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("latency,method,mode")
    assert [line.split(",")[0] for line in lines[1:]] == ["corrected", "uncorrected"]


def test_table_and_histogram_png(echo, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "latency.png"
    done = load("--target", echo, "--total", "50", "--histogram", str(png))
    assert done.returncode == 0, done.stderr
    assert "requests    50" in done.stdout and "p99.9" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tls_and_token_reach_a_tls_server_and_plaintext_does_not(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, address, servicer = start_counting(creds)
    try:
        doc = load_json("--target", address, "--total", "3", "--tls-ca", str(cert),
                        "--tls-server-name", "localhost", "--token-file", str(token))
        plain = load("--target", address, "--total", "3", "--connect-timeout", "2s")
    finally:
        server.stop(grace=None)
    assert doc["ok"] == 3
    assert {m["authorization"] for m in servicer.metadata} == {"Bearer s3cret"}
    assert plain.returncode == 1 and "cannot reach" in plain.stderr


# --- errors a person can act on ----------------------------------------------------------


def test_unreachable_target_is_one_line_and_exit_1():
    done = load("--target", f"127.0.0.1:{free_port()}", "--total", "5")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach 127.0.0.1:" in lines[0]


@pytest.mark.parametrize("args, flags", [
    (["--total", "5", "--duration", "1s"], ["--duration", "--total"]),
    (["--arrival", "poisson"], ["--arrival", "--rps"]),
    (["--payload", "x.npy", "--classes", "3"], ["--classes", "--payload"]),
    (["--method", "predictions"], ["--model"]),
    (["--rps", "0"], ["--rps"]),
    (["--procs", "2", "--concurrency", "1"], ["--concurrency", "--procs"]),
    (["--duration", "soon"], ["--duration"]),
    (["--server-pid", "999999999"], ["--server-pid"]),
    (["--responses", "r.jsonl", "--procs", "2", "--concurrency", "2"], ["--responses"]),
])
def test_contradictory_or_bad_flags_are_a_usage_error_naming_them(args, flags):
    done = load("--target", "127.0.0.1:1", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(flag in lines[0] for flag in flags), lines


def test_unreadable_payload_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    done = load("--target", "127.0.0.1:1", "--payload", str(bad))
    assert done.returncode == 2 and "--payload" in done.stderr
