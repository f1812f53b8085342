"""Issue 19 on a real sidecar process: token revocation and certificate rotation by
SIGHUP, where /metrics listens and who may read it, reflection behind the token."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from _certs import make_pki
from _procs import free_port, start_sidecar
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from stealguard.client import DefenseClient, SidecarError, channel_credentials
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2, defense_pb2_grpc

ROWS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)


def code_for(address, token, credentials=None):
    """OK or the error code of a Perturb call with `token` (None: no token)."""
    try:
        DefenseClient(address, timeout=10, token=token, credentials=credentials).perturb(ROWS)
    except SidecarError as error:
        return error.code
    return grpc.StatusCode.OK


def perturb_as(address, client):
    request = defense_pb2.PerturbRequest(probabilities=array_to_tensor(ROWS))
    with grpc.insecure_channel(address) as channel:
        defense_pb2_grpc.DefenseStub(channel).Perturb(
            request, metadata=(("x-client-id", client),), timeout=10)


def until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_a_revoked_token_is_refused_after_sighup_and_a_bad_file_keeps_the_old(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\nbob:bob-secret\n")
    process, address = start_sidecar("--token-file", str(tokens))
    try:
        assert code_for(address, "bob-secret") == grpc.StatusCode.OK
        tokens.write_text("alice:alice-secret\n")  # bob revoked
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: code_for(address, "bob-secret")
                     == grpc.StatusCode.UNAUTHENTICATED)
        assert code_for(address, "alice-secret") == grpc.StatusCode.OK
        tokens.write_text("# nobody\n")  # a file that would refuse every call
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: "no token in the file" in process.output())
        assert code_for(address, "alice-secret") == grpc.StatusCode.OK
        assert code_for(address, "bob-secret") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.stop()
    assert "SIGHUP: policies reloaded" in process.output()
    assert "new config rejected, old policies stay" in process.output()


def test_sighup_swaps_the_certificate_for_the_next_handshake(tmp_path):
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(old.read("server.pem"))
    key.write_bytes(old.read("server.key"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    process, _ = start_sidecar("--tls-cert", str(cert), "--tls-key", str(key), port=port,
                               wait=False)
    trusts_old = channel_credentials(tls_ca=old.path("ca.pem"))
    trusts_new = channel_credentials(tls_ca=new.path("ca.pem"))
    try:
        assert until(lambda: code_for(address, None, trusts_old) == grpc.StatusCode.OK,
                     timeout=300)
        key.write_bytes(new.read("server.key"))  # a key that does not match: rejected
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: "not a matching PEM certificate and key" in process.output())
        assert code_for(address, None, trusts_old) == grpc.StatusCode.OK
        cert.write_bytes(new.read("server.pem"))
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: code_for(address, None, trusts_new) == grpc.StatusCode.OK)
        assert code_for(address, None, trusts_old) == grpc.StatusCode.UNAVAILABLE
    finally:
        process.stop()


def reflection_services(address, token=None):
    """The services reflection lists, or the error code."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:
            replies = list(stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata, timeout=10))
        except grpc.RpcError as error:
            return error.code()
    return sorted(s.name for s in replies[0].list_services_response.service)


def test_reflection_and_list_policies_need_the_token_and_reflection_turns_off(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\n")
    process, address = start_sidecar("--token-file", str(tokens))
    try:
        assert reflection_services(address) == grpc.StatusCode.UNAUTHENTICATED
        assert "stealguard.v1.Defense" in reflection_services(address, "alice-secret")
        with pytest.raises(SidecarError) as error:
            DefenseClient(address, timeout=10).policies()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert DefenseClient(address, timeout=10, token="alice-secret").policies()
    finally:
        process.stop()
    process, address = start_sidecar("--reflection", "off")
    try:
        assert reflection_services(address) == grpc.StatusCode.UNIMPLEMENTED
        assert code_for(address, None) == grpc.StatusCode.OK
    finally:
        process.stop()


def scrape(host, port, token=None):
    """(HTTP status, body) of /metrics at host:port; None when nothing listens there."""
    request = urllib.request.Request(f"http://{host}:{port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return None


def listening_hosts(pid, port):
    """The IPv4 addresses that process `pid` listens on at `port` (from /proc)."""
    hosts = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                hosts.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return hosts


def test_metrics_listen_on_the_listen_host_and_name_no_client_by_default():
    port = free_port()
    process, address = start_sidecar("--metrics-port", str(port), "--trust-client-header")
    try:
        perturb_as(address, "shop")
        assert listening_hosts(process.popen.pid, port) == ["127.0.0.1"]
        status, text = scrape("127.0.0.1", port)
    finally:
        process.stop()
    assert status == 200
    assert 'stealguard_client_queries_total{client="_all"} 1.0' in text
    assert "shop" not in text


def test_metrics_listen_where_asked_want_the_token_and_name_clients_when_asked(tmp_path):
    port = free_port()
    token = tmp_path / "metrics-token"
    token.write_text("scraper-secret\n")
    process, address = start_sidecar("--metrics-listen", f"127.0.0.2:{port}",
                                     "--metrics-token-file", str(token), "--metrics-per-client",
                                     "--trust-client-header")
    try:
        perturb_as(address, "shop")
        assert listening_hosts(process.popen.pid, port) == ["127.0.0.2"]
        assert scrape("127.0.0.1", port) is None
        assert scrape("127.0.0.2", port) == (401, "")
        assert scrape("127.0.0.2", port, "wrong") == (401, "")
        status, text = scrape("127.0.0.2", port, "scraper-secret")
    finally:
        process.stop()
    assert status == 200 and 'stealguard_client_queries_total{client="shop"} 1.0' in text
