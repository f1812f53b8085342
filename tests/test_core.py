"""The protect core, its limiter, the error kinds and their gRPC/HTTP maps, and who a
caller is: in process, no servers (as MLServer's tests build an in-process data plane)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from stealguard.server.core import ANONYMOUS, ProtectCore
from stealguard.server.errors import (
    INTERNAL_MESSAGE,
    Exhausted,
    FailedPrecondition,
    Internal,
    InvalidInput,
    Kind,
    NotFound,
    Unauthenticated,
    Unavailable,
    http_headers,
    http_status,
)
from stealguard.server.limits import TokenBucket
from stealguard.server.platform.credentials import Tokens
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.status import GrpcError, grpc_status
from stealguard.server.policies import PolicySet

ROWS = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
POLICIES = PolicySet.from_config(
    {"default": {"defense": "reverse_sigmoid", "beta": 1.5, "gamma": 0.3},
     "open": {"defense": "none"}}, b"secret")


class Recording:
    def __init__(self):
        self.seen = []

    def observe(self, exchange):
        self.seen.append(exchange)


class Refusing:
    def __init__(self):
        self.asked = []

    async def admit(self, principal, rows):
        self.asked.append((principal, rows))
        raise Exhausted("no more", retry_after=2.5, quota={"client:x": "1 row/s"})


def protect(core, rows=ROWS, policy="", principal=ANONYMOUS, **kw):
    return asyncio.run(core.protect(rows, policy, principal, **kw))


def test_core_protects_rows_with_the_named_policy_else_the_default():
    core = ProtectCore(POLICIES)
    answer = protect(core, policy="open")
    assert answer.policy == "open" and np.array_equal(answer.rows, ROWS)
    answer = protect(core, policy="no-such-model")
    assert answer.policy == "default"
    expected = POLICIES.resolve("default").defense(ROWS)
    assert np.array_equal(answer.rows, expected)
    assert (answer.rows.argmax(1) == ROWS.argmax(1)).all()


def test_core_without_a_default_policy_is_not_found_naming_the_policies():
    core = ProtectCore(PolicySet.from_config({"open": {"defense": "none"}}, b""))
    with pytest.raises(NotFound, match=r"no policy for model 'cifar' .*\(policies: open\)"):
        protect(core, policy="cifar")


def test_refusing_core_is_unavailable_until_opened_again():
    core = ProtectCore(POLICIES)
    core.refuse("draining")
    with pytest.raises(Unavailable, match="draining"):
        protect(core)
    with pytest.raises(Unavailable):
        core.resolve("open")
    core.open()
    assert protect(core).policy == "default"


def test_rows_that_are_not_probabilities_are_invalid_input_naming_the_row():
    core = ProtectCore(POLICIES)
    with pytest.raises(InvalidInput, match="row 1"):
        protect(core, rows=np.array([[0.5, 0.5], [np.nan, 1.0]]))
    with pytest.raises(InvalidInput, match="2-D"):
        protect(core, rows=np.array([0.5, 0.5]))


def test_more_rows_than_max_rows_is_exhausted_and_observed():
    observer = Recording()
    core = ProtectCore(POLICIES, max_rows=1, observers=[observer])
    with pytest.raises(Exhausted, match="2 rows: at most 1 per request"):
        protect(core, principal="shop")
    [seen] = observer.seen
    assert (seen.principal, seen.policy, seen.rows_in, seen.rows_out) == ("shop", "default", 2, 0)
    assert isinstance(seen.error, Exhausted) and not seen.limited


def test_limiter_is_asked_with_principal_and_rows_and_its_refusal_passes_with_retry_info():
    limiter, observer = Refusing(), Recording()
    core = ProtectCore(POLICIES, limiter=limiter, observers=[observer])
    with pytest.raises(Exhausted) as refused:
        protect(core, principal="shop")
    assert limiter.asked == [("shop", 2)]
    assert refused.value.retry_after == 2.5 and refused.value.quota == {"client:x": "1 row/s"}
    assert observer.seen[0].limited and observer.seen[0].returned is None


def test_observers_see_principal_policy_rows_and_arrays_of_an_answer():
    observer = Recording()
    core = ProtectCore(POLICIES, observers=[observer])
    answer = protect(core, policy="open", principal="shop", logits=False)
    [seen] = observer.seen
    assert (seen.principal, seen.policy, seen.rows_in, seen.rows_out) == ("shop", "open", 2, 2)
    assert seen.given is ROWS and seen.returned is answer.rows and seen.error is None


def test_an_observer_that_fails_does_not_change_the_answer(caplog):
    class Broken:
        def observe(self, exchange):
            raise RuntimeError("observer bug")

    core = ProtectCore(POLICIES, observers=[Broken()])
    with caplog.at_level(logging.ERROR):
        assert protect(core, policy="open").policy == "open"
    assert "observer" in caplog.text and "observer bug" in caplog.text


def test_a_policy_may_perturb_asynchronously():
    class Remote:
        name = "remote"

        async def perturb(self, rows, logits):
            await asyncio.sleep(0)
            return rows * 0 + 0.5

    answer = protect(ProtectCore(POLICIES), policy=Remote())
    assert answer.policy == "remote" and (answer.rows == 0.5).all()


def test_core_needs_a_principal_only_for_a_limiter_or_observers():
    assert not ProtectCore(POLICIES).needs_principal
    assert ProtectCore(POLICIES, limiter=TokenBucket(1)).needs_principal
    assert ProtectCore(POLICIES, observers=[Recording()]).needs_principal


def test_token_bucket_admits_its_burst_then_refuses_with_the_wait_per_principal():
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a", now=10.0) == pytest.approx(0.5)
    assert bucket.take("b", now=10.0) == 0.0  # another principal has its own bucket
    assert bucket.take("a", now=10.5) == 0.0  # refilled at 2/s


def test_token_bucket_refusal_names_the_client_and_the_limit():
    bucket = TokenBucket(rate=1, burst=1)
    asyncio.run(bucket.admit("shop", 5))
    with pytest.raises(Exhausted, match="client 'shop' is over its rate limit of 1 requests/s") \
            as refused:
        asyncio.run(bucket.admit("shop", 5))
    assert 0 < refused.value.retry_after <= 1.0
    assert refused.value.quota == {"client:shop": "1 requests/s, burst 1"}


@pytest.mark.parametrize(("error", "code", "http"), [
    (InvalidInput("row 0: bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (NotFound("no policy"), grpc.StatusCode.NOT_FOUND, 404),
    (Exhausted("too many"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (Unavailable("draining"), grpc.StatusCode.UNAVAILABLE, 503),
    (Unauthenticated("token"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (FailedPrecondition("fix it"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (Internal("safe text"), grpc.StatusCode.INTERNAL, 500),
])
def test_each_error_kind_maps_to_one_grpc_code_and_one_http_status(error, code, http):
    status = grpc_status(error)
    assert status.code == code and status.message == str(error)
    assert http_status(error) == http


def test_every_kind_has_a_grpc_code_and_an_http_status():
    from stealguard.server.errors import HTTP_STATUS
    from stealguard.server.platform.status import GRPC_CODE

    assert set(GRPC_CODE) == set(Kind) == set(HTTP_STATUS)


def test_unexpected_exception_is_internal_with_a_generic_message_and_a_logged_traceback(caplog):
    try:
        np.zeros(2).reshape(3)  # a bug deep in numpy: a ValueError that is not the caller's
    except ValueError as error:
        with caplog.at_level(logging.ERROR):
            status = grpc_status(error)
    assert status.code == grpc.StatusCode.INTERNAL  # never INVALID_ARGUMENT
    assert status.message == INTERNAL_MESSAGE
    assert "Traceback" in caplog.text and "cannot reshape" in caplog.text
    assert "reshape" not in status.message
    assert http_status(ValueError("x")) == 500


def test_exhausted_carries_retry_info_and_quota_failure_details():
    status = grpc_status(Exhausted("slow down", retry_after=1.5,
                                   quota={"client:shop": "2 requests/s"}))
    [(key, value)] = status.trailing
    assert key == "grpc-status-details-bin"
    proto = status_pb2.Status.FromString(value)
    assert proto.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert proto.details[0].Unpack(retry) and proto.details[1].Unpack(quota)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000
    assert quota.violations[0].subject == "client:shop"
    assert http_headers(Exhausted("x", retry_after=1.2)) == {"retry-after": "2"}
    assert grpc_status(Exhausted("no details")).trailing == ()


def test_a_status_from_upstream_passes_unchanged_with_its_metadata():
    status = grpc_status(GrpcError(grpc.StatusCode.ABORTED, "upstream said", (("k", "v"),)))
    assert status == (grpc.StatusCode.ABORTED, "upstream said", (("k", "v"),))


def test_stream_errors_name_the_message_first():
    assert grpc_status(InvalidInput("row 0: bad"), prefix="stream message 3: ").message == \
        "stream message 3: row 0: bad"


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("shop:s3cret\n")
    return Tokens.from_file(str(path))


def test_principal_is_the_token_name_first(tokens):
    identity = Identity(tokens, mtls=True)
    metadata = {"authorization": "Bearer s3cret", "x-client-id": "liar"}
    assert identity.principal(metadata, subject="cn") == "shop"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "s3cret"])
def test_missing_or_wrong_token_is_unauthenticated(tokens, authorization):
    metadata = {} if authorization is None else {"authorization": authorization}
    with pytest.raises(Unauthenticated, match="bearer token"):
        Identity(tokens).principal(metadata)


def test_principal_without_tokens_is_the_mtls_subject_else_the_peer_never_the_header():
    identity = Identity(client_header="X-Client-Id")
    assert identity.principal({"x-client-id": "app"}, subject="client.example") == \
        "client.example"
    assert identity.principal({"x-client-id": "liar"}, peer="ipv4:10.1.2.3:555") == \
        "peer:10.1.2.3"
    trusting = Identity(client_header="X-Client-Id", trust_client_header=True)
    assert trusting.principal({"x-client-id": "a" * 500}) == "a" * 128


def test_importing_the_platform_does_not_import_numba():
    code = ("import sys; import stealguard.server.platform, stealguard.server.platform.app, "
            "stealguard.server.platform.lifecycle, stealguard.server.platform.status, "
            "stealguard.server.platform.interceptors, stealguard.server.core; "
            "assert 'numba' not in sys.modules, 'numba imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_model_server_does_not_import_numba():
    code = ("import sys; import stealguard.modelserver.server, stealguard.modelserver.cli; "
            "assert 'numba' not in sys.modules, 'numba imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_model_server_does_not_import_the_attack_suite():
    """The dependency goes one way: `attacks` uses the model server's networks, datasets,
    training and store; nothing under `modelserver` imports `attacks`."""
    code = ("import sys; import stealguard.modelserver.server, stealguard.modelserver.cli, "
            "stealguard.modelserver.training, stealguard.modelserver.handler, "
            "stealguard.modelserver.store, stealguard.modelserver.architectures, "
            "stealguard.modelserver.datasets; "
            "bad = [m for m in sys.modules if m.startswith('stealguard.attacks')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    sources = Path(__file__).resolve().parent.parent / "modelserver"
    assert not [p.name for p in sources.rglob("*.py") if "stealguard.attacks" in p.read_text()]
