"""Fuzz the live sidecar: 12,000 generated `PerturbRequest`s from a seeded generator.

Every request is answered OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (the sidecar has a
default policy, so an unknown model is never NOT_FOUND), never INTERNAL or UNKNOWN. Where
the generator knows the right answer (a valid row must be accepted, a NaN, a negative
dimension or an unknown dtype must be refused, too many rows is RESOURCE_EXHAUSTED) it is
asserted. Every OK answer has the request's shape and dtype, finite values in [0, 1] and
rows that sum to 1, and echoes the request id and the policy that applied. The sidecar is
alive and SERVING at the end. Each request is rebuilt from (SEED, index), so a failure
names the one request to replay. Wire bytes that do not parse as the request message are
INVALID_ARGUMENT at the sidecar, the model server and the proxy alike.
"""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from _modelserver_helpers import STARTUP_TIMEOUT
from _procs import health_status, start_sidecar
from stealguard.v1 import defense_pb2, defense_pb2_grpc

SEED = 20240609
REQUESTS = 12_000
STREAMS = 100  # PerturbStream calls of STREAM_LENGTH requests, beyond REQUESTS
STREAM_LENGTH = 20
CALLERS = 8
MAX_ROWS = 4096
MAX_MESSAGE_BYTES = 1 << 20

# One policy per defense, so that every kernel meets the fuzz; `default` catches the rest.
CONFIG = """\
secret: fuzz-secret
policies:
  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3, preserve_top1: true}
  rs-unguarded: {defense: reverse_sigmoid, beta: 2.0, gamma: 0.2, preserve_top1: false}
  identity: {defense: none}
  uniform: {defense: uniform_random, beta: 0.5}
  concave: {defense: uniform_random_concave, beta: 0.5, rho: 0.3}
  convex: {defense: uniform_random_convex, beta: 0.5, rho: 0.3}
  ranking: {defense: ranking_preserving_uniform_random, beta: 0.5}
  sine: {defense: sine, beta: 0.3, f: 10.0}
  gaussian: {defense: gaussian_noise, scale: 0.1}
  cutoff: {defense: high_confidence, cutoff: 0.25}
  top2: {defense: top_k, k: 2}
  rounded: {defense: rounded, decimals: 2}
  labels: {defense: class_labels}
"""
POLICIES = ("default", "rs-unguarded", "identity", "uniform", "concave", "convex", "ranking",
            "sine", "gaussian", "cutoff", "top2", "rounded", "labels")
UNKNOWN_MODELS = ("", "mnist", "no-such-model", "DEFAULT", "labels ", "x" * 5000,
                  "model/../../etc", "\u00e9\u4e2d\U0001f600", "\t\n")

ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
DTYPES = {defense_pb2.FLOAT32: np.dtype("<f4"), defense_pb2.FLOAT64: np.dtype("<f8")}
DTYPE_UNSPECIFIED = 0


@dataclass
class Case:
    """One generated request and what the generator knows about its answer."""

    index: int
    kind: str
    request: defense_pb2.PerturbRequest
    expect: set[str]  # the status codes this request may get

    def describe(self) -> str:
        t = self.request.probabilities
        return (f"request {self.index} (kind {self.kind}, shape {list(t.shape)}, dtype "
                f"{t.dtype}, {len(t.data)} data bytes, model {self.request.model[:40]!r}, "
                f"logits {self.request.logits}; rebuild with make_case({self.index}))")


def _probabilities(rng: np.random.Generator, rows: int, classes: int,
                   dtype: np.dtype) -> np.ndarray:
    """Valid rows: Dirichlet with a random concentration, some one-hot or uniform."""
    alpha = float(rng.choice([0.01, 0.1, 0.3, 1.0, 10.0]))
    probs = rng.dirichlet(np.full(classes, alpha), size=rows) if classes > 1 else \
        rng.random((rows, 1))
    for row in range(rows):
        shape = rng.integers(8)
        if shape == 0 and classes > 1:
            probs[row] = np.eye(classes)[rng.integers(classes)]
        elif shape == 1 and classes > 1:
            probs[row] = 1.0 / classes
    out = probs.astype(dtype)
    if classes > 1:  # renormalise in the target dtype so float32 rows stay within 1e-3
        out = (out / out.sum(axis=1, keepdims=True, dtype=np.float64)).astype(dtype)
    return out


def _shape(rng: np.random.Generator) -> tuple[int, int, bool]:
    """(rows, classes, one_dimensional)."""
    rows = int(rng.choice([0, 1, 1, 2, 3, 8, 33, 200]))
    classes = int(rng.choice([1, 2, 2, 3, 10, 10, 17, 100, 1000]))
    if classes >= 1000:  # stay well under the message limit; "too-large" tests that
        rows = min(rows, 33)
    one_dimensional = rows == 1 and rng.random() < 0.4
    return rows, classes, one_dimensional


def _tensor(array: np.ndarray, one_dimensional: bool) -> defense_pb2.Tensor:
    enum = defense_pb2.FLOAT32 if array.dtype == np.float32 else defense_pb2.FLOAT64
    if one_dimensional:
        array = array.reshape(-1)
    return defense_pb2.Tensor(shape=array.shape, dtype=enum,
                              data=np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
                              .tobytes())


def make_case(index: int) -> Case:
    """The request number `index` of the fuzz run (deterministic in SEED and index)."""
    rng = np.random.default_rng([SEED, index])
    dtype = DTYPES[int(rng.choice([defense_pb2.FLOAT32, defense_pb2.FLOAT64]))]
    rows, classes, one_d = _shape(rng)
    if rng.random() < 0.6:
        model = str(rng.choice(POLICIES))
    else:
        model = str(rng.choice(UNKNOWN_MODELS))
    logits = False
    kind = str(rng.choice(
        ["valid", "valid", "valid", "logits", "logits", "bad-value", "off-sum", "random-bytes",
         "data-length", "shape", "dtype", "too-many-rows", "too-large", "empty"],
        p=[.14, .14, .14, .1, .05, .12, .08, .07, .04, .04, .04, .02, .005, .015]))
    expect = {"INVALID_ARGUMENT"}

    if kind == "valid":
        tensor, expect = _tensor(_probabilities(rng, rows, classes, dtype), one_d), {"OK"}
    elif kind == "logits":
        logits = True
        scale = float(rng.choice([1e-3, 1.0, 30.0, 1e4, 1e30 if dtype == np.float32 else 1e300]))
        values = rng.normal(0, 1, (rows, classes)) * scale
        values = np.clip(values, np.finfo(dtype).min, np.finfo(dtype).max).astype(dtype)
        tensor, expect = _tensor(values, one_d), {"OK"}
    elif kind == "bad-value":
        rows = max(rows, 1)
        probs = _probabilities(rng, rows, classes, dtype)
        bad = rng.choice([np.nan, np.inf, -np.inf, -0.5, -1e-6, 1.5, 2.0, 1e30])
        probs[rng.integers(rows), rng.integers(classes)] = bad
        logits = bool(rng.random() < 0.3)
        if logits and np.isfinite(bad):
            expect = {"OK"}  # any finite value is a valid logit
        tensor = _tensor(probs, one_d)
    elif kind == "off-sum":
        rows, classes = max(rows, 1), max(classes, 2)
        probs = _probabilities(rng, rows, classes, np.dtype(np.float64))
        factor = float(rng.choice([0.5, 0.98, 1.02, 0.9999, 1.0004]))
        row = rng.integers(rows)
        probs[row] *= factor
        probs = probs.astype(dtype)
        # the contract: each row sums to 1 within 1e-3; leave the borderline to the server
        error = abs(float(probs[row].sum(dtype=np.float64)) - 1.0)
        expect = {"OK"} if error < 5e-4 else {"INVALID_ARGUMENT"} if error > 2e-3 else \
            {"OK", "INVALID_ARGUMENT"}
        if np.any(probs[row] > 1):
            expect = {"INVALID_ARGUMENT"}
        tensor = _tensor(probs, one_d)
    elif kind == "random-bytes":  # random bit patterns of the right length: NaN, inf, subnormal
        data = rng.bytes(rows * classes * dtype.itemsize)
        logits = bool(rng.random() < 0.5)
        tensor = defense_pb2.Tensor(shape=[classes] if one_d else [rows, classes],
                                    dtype=int({4: defense_pb2.FLOAT32, 8: defense_pb2.FLOAT64}
                                              [dtype.itemsize]), data=data)
        expect = ALLOWED - {"RESOURCE_EXHAUSTED"}
    elif kind == "data-length":
        rows = max(rows, 1)
        size = rows * classes * dtype.itemsize
        wrong = int(rng.choice([0, size - 1, size + 1, size + dtype.itemsize, size // 2]))
        if wrong == size:
            wrong += 1
        tensor = defense_pb2.Tensor(shape=[rows, classes], dtype=_enum(dtype),
                                    data=rng.bytes(max(wrong, 0)))
    elif kind == "shape":
        choice = rng.integers(6)
        big = int(rng.choice([2**31, 2**32 + 1, 2**62, 2**63 - 1]))
        if choice == 0:
            shape, expect = [], {"INVALID_ARGUMENT"}
        elif choice == 1:
            shape = [1, 2, 5][: 3 + int(rng.integers(3))] + [1] * int(rng.integers(3))
        elif choice == 2:
            shape = [int(rng.choice([-1, -(2**63), -10])), classes]
            if rng.random() < 0.5:
                shape.reverse()
        elif choice == 3:  # a huge class count: the data cannot match it
            shape = [1, big]
        elif choice == 4:  # huge rows: refused before the data is looked at
            shape, expect = [big, classes], {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
        else:
            shape = [big, big]
            expect = {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
        tensor = defense_pb2.Tensor(shape=shape, dtype=_enum(dtype),
                                    data=rng.bytes(int(rng.integers(0, 64)) * 4))
    elif kind == "dtype":
        value = int(rng.choice([DTYPE_UNSPECIFIED, 3, 7, 99, 2**31 - 1, -1, -(2**31)]))
        probs = _probabilities(rng, max(rows, 1), classes, dtype)
        tensor = _tensor(probs, one_d)
        tensor.dtype = value
    elif kind == "too-many-rows":
        rows = MAX_ROWS + 1 + int(rng.integers(0, 3))
        probs = _probabilities(rng, rows, 1, np.dtype(np.float32))
        tensor, expect = _tensor(probs, False), {"RESOURCE_EXHAUSTED"}
    elif kind == "too-large":
        count = MAX_MESSAGE_BYTES // dtype.itemsize + 64
        tensor = defense_pb2.Tensor(shape=[1, count], dtype=_enum(dtype),
                                    data=np.full(count, 1.0 / count, dtype).tobytes())
        expect = {"RESOURCE_EXHAUSTED"}
    else:  # empty: no rows, or an empty tensor message altogether
        if rng.random() < 0.5:
            tensor, expect = defense_pb2.Tensor(shape=[0, classes], dtype=_enum(dtype)), {"OK"}
        else:
            tensor = defense_pb2.Tensor()
    request = defense_pb2.PerturbRequest(probabilities=tensor, model=model, logits=logits,
                                         request_id=f"fuzz-{index}")
    return Case(index, kind, request, expect)


def _enum(dtype: np.dtype) -> int:
    return defense_pb2.FLOAT32 if dtype == np.float32 else defense_pb2.FLOAT64


def check_answer(case: Case, code: str, reply: defense_pb2.PerturbResponse | None,
                 details: str) -> str | None:
    """None if the answer is right for the request, else what is wrong with it."""
    if code not in ALLOWED:
        return f"{case.describe()}: status {code} ({details})"
    if code not in case.expect:
        return f"{case.describe()}: status {code} ({details}), expected one of {case.expect}"
    if code != "OK":
        return None if details else f"{case.describe()}: {code} without a message"
    asked, got = case.request.probabilities, reply.probabilities
    if list(got.shape) != list(asked.shape) or got.dtype != asked.dtype:
        return (f"{case.describe()}: answer has shape {list(got.shape)} dtype {got.dtype}, "
                f"not the request's")
    dtype = DTYPES[got.dtype]
    if len(got.data) != math.prod(got.shape) * dtype.itemsize:
        return f"{case.describe()}: answer has {len(got.data)} data bytes for its shape"
    if reply.request_id != case.request.request_id:
        return f"{case.describe()}: request id {reply.request_id!r} not echoed"
    policy = case.request.model if case.request.model in POLICIES else "default"
    if reply.policy != policy:
        return f"{case.describe()}: policy {reply.policy!r}, expected {policy!r}"
    values = np.frombuffer(got.data, dtype).reshape(got.shape)
    values = values.reshape(1, -1) if values.ndim == 1 else values
    if not np.all(np.isfinite(values)):
        return f"{case.describe()}: answer has non-finite values"
    if values.size and (values.min() < 0 or values.max() > 1):
        return f"{case.describe()}: answer has values outside [0, 1]"
    if values.shape[1] > 1 and values.shape[0]:
        # `none` returns the input, which the contract accepts within 1e-3 of summing to 1
        tolerance = 1e-3 if policy == "identity" or dtype == np.float32 else 1e-9
        sums = values.sum(axis=1, dtype=np.float64)
        worst = int(np.argmax(np.abs(sums - 1)))
        if abs(sums[worst] - 1) > tolerance:
            return f"{case.describe()}: answer row {worst} sums to {sums[worst]!r}"
    return None


def _call(stub: defense_pb2_grpc.DefenseStub, index: int) -> tuple[Case, str, str | None]:
    """(the case, its status code, what is wrong with the answer or None)."""
    case = make_case(index)
    try:
        reply = stub.Perturb(case.request, timeout=30)
        return case, "OK", check_answer(case, "OK", reply, "")
    except grpc.RpcError as error:
        code = error.code().name
        return case, code, check_answer(case, code, None, error.details() or "")


def _stream(stub: defense_pb2_grpc.DefenseStub, number: int) -> tuple[int, list[str]]:
    """One PerturbStream call: answers in order until the first refused request."""
    first = REQUESTS + number * STREAM_LENGTH
    cases = [make_case(first + k) for k in range(STREAM_LENGTH)]
    problems, answered = [], 0
    try:
        for reply in stub.PerturbStream(iter([c.request for c in cases]), timeout=60):
            problems += filter(None, [check_answer(cases[answered], "OK", reply, "")])
            answered += 1
    except grpc.RpcError as error:
        # a too-large message can fail the stream before earlier answers are delivered, so
        # the refusal may belong to any request not yet answered
        code, rest = error.code().name, cases[answered:]
        if code not in ALLOWED or not any(code in case.expect for case in rest):
            problems.append(f"stream {number}: status {code} ({error.details()}) after "
                            f"{answered} answers; unanswered: {[c.kind for c in rest]}")
        answered += 1
    return answered, problems


@pytest.fixture(scope="module")
def fuzzed_sidecar(tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz") / "sidecar.yaml"
    config.write_text(CONFIG)
    process, address = start_sidecar("--config", str(config), "--max-rows", str(MAX_ROWS),
                                     "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                                     wait=False)
    try:
        process.wait_healthy(address, timeout=STARTUP_TIMEOUT)  # kernels may compile first
    except Exception:
        process.stop(signal.SIGKILL)
        raise
    yield process, address
    assert process.stop() == 0, process.output()


def test_generated_requests_get_ok_or_a_client_error_and_ok_answers_are_valid(fuzzed_sidecar):
    process, address = fuzzed_sidecar
    options = [("grpc.max_receive_message_length", 8 * MAX_MESSAGE_BYTES)]
    start = time.monotonic()
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    problems: list[str] = []
    with grpc.insecure_channel(address, options=options) as channel:
        stub = defense_pb2_grpc.DefenseStub(channel)
        with ThreadPoolExecutor(CALLERS) as pool:
            for case, code, problem in pool.map(lambda i: _call(stub, i), range(REQUESTS)):
                kinds[case.kind] += 1
                codes[code] += 1
                if problem:
                    problems.append(problem)
            streamed = 0
            for answered, found in pool.map(lambda n: _stream(stub, n), range(STREAMS)):
                streamed += answered
                problems += found
    elapsed = time.monotonic() - start
    print(f"fuzz: {REQUESTS} unary + {streamed} streamed requests in {elapsed:.1f}s, "
          f"{len(problems)} problems; statuses {dict(codes)}; kinds {dict(kinds)}")
    assert not problems, f"{len(problems)} wrong answers, first ones:\n" + "\n".join(problems[:10])
    assert streamed >= STREAMS  # every stream answered at least its first request
    assert process.popen.poll() is None, process.output()
    assert health_status(address) == "SERVING"
    assert health_status(address, "stealguard.v1.Defense") == "SERVING"


def test_every_kind_of_request_is_generated():
    kinds = Counter(make_case(i).kind for i in range(2000))
    assert set(kinds) == {"valid", "logits", "bad-value", "off-sum", "random-bytes",
                          "data-length", "shape", "dtype", "too-many-rows", "too-large", "empty"}
    assert sum(make_case(i).expect == {"OK"} for i in range(2000)) > 700  # real work too


def test_bytes_that_are_not_a_perturb_request_are_invalid_argument(fuzzed_sidecar):
    """Wire bytes that do not parse (random bytes, a `model` that is not UTF-8) are a bad
    request: INVALID_ARGUMENT with a message, not UNKNOWN with a Python exception name."""
    process, address = fuzzed_sidecar
    rng = np.random.default_rng([SEED, 1 << 40])
    valid = make_case(0).request
    valid.model = "MODEL"
    not_utf8 = valid.SerializeToString().replace(b"MODEL", b"\xff\xfe\xfd\xfc\xfb")
    payloads = [not_utf8] + [rng.bytes(int(rng.integers(1, 200))) for _ in range(300)]
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        perturb = channel.unary_unary("/stealguard.v1.Defense/Perturb")  # bytes in, bytes out
        for payload in payloads:
            try:
                perturb(payload, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
                assert error.code().name in ALLOWED, (
                    f"{payload[:40]!r}...: {error.code().name} ({error.details()})")
                assert "<class" not in (error.details() or ""), error.details()
    assert codes["INVALID_ARGUMENT"] > 200
    assert health_status(address) == "SERVING"


UNPARSEABLE = (b"\x0a\x02\xff\xfe", b"\xff\xff\xff")  # a string field that is not UTF-8; junk

UPSTREAM_APIS = {  # the inference APIs in front of the model: the same rule holds
    "modelserver": "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
    "proxy-torchserve": "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
    "proxy-v2": "/inference.GRPCInferenceService/ModelInfer",
}


@pytest.mark.parametrize("server", sorted(UPSTREAM_APIS))
def test_bytes_that_do_not_parse_are_invalid_argument_at_the_model_server_and_proxy(
        server, tmp_path):
    """The model server's and the proxy's inference APIs treat unparseable request bytes
    like the sidecar does: INVALID_ARGUMENT with the reason (today: UNKNOWN)."""
    from _modelserver_helpers import start_modelserver
    from _proxy_helpers import start_proxy
    from stealguard.modelserver.training import trained_model

    if server == "modelserver":
        trained_model()  # cached once per machine
        process, address = start_modelserver("127.0.0.1:1", tmp_path / "store")
    else:
        config = tmp_path / "proxy.yaml"
        config.write_text(CONFIG)
        process, address = start_proxy(server.removeprefix("proxy-"), "127.0.0.1:1",
                                       str(config), wait=False)  # no upstream: never SERVING
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while health_status(address) == "UNREACHABLE":  # listening is enough: no model runs
            assert process.popen.poll() is None and time.monotonic() < deadline, \
                process.output()
            time.sleep(0.2)
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary(UPSTREAM_APIS[server])
            for payload in UNPARSEABLE:
                with pytest.raises(grpc.RpcError) as error:
                    call(payload, timeout=30)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    f"{payload!r}: {error.value.code().name} ({error.value.details()})")
    finally:
        process.stop()
