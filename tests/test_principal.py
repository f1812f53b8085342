"""The trust model: who a caller is charged as (server/principal.py)."""

from __future__ import annotations

from stealguard.server.platform.credentials import Tokens
from stealguard.server.principal import Caller, peer_host, principal_of


def test_rotating_client_header_without_trust_stays_one_peer_principal():
    names = {principal_of(Caller(peer=f"ipv4:10.0.0.7:{5000 + i}", asserted=f"user-{i}"))
             for i in range(50)}
    assert names == {"peer:10.0.0.7"}


def test_a_plain_token_cannot_assert_another_client():
    caller = Caller(token_name="alice", peer="ipv4:10.0.0.7:1", asserted="bob")
    assert principal_of(caller) == "alice"


def test_a_gateway_token_is_believed_for_its_end_client():
    caller = Caller(token_name="modelserver", gateway=True, peer="ipv4:10.0.0.9:1",
                    asserted="alice")
    assert principal_of(caller) == "alice"
    assert principal_of(Caller(token_name="modelserver", gateway=True)) == "modelserver"


def test_trust_client_header_believes_anyone():
    assert principal_of(Caller(peer="ipv4:10.0.0.7:1", asserted="carol"),
                        trust_client_header=True) == "carol"


def test_mtls_subject_comes_before_the_peer_and_after_the_token():
    assert principal_of(Caller(mtls_subject="svc-a", peer="ipv4:1.2.3.4:5")) == "svc-a"
    assert principal_of(Caller(token_name="t", mtls_subject="svc-a")) == "t"


def test_peer_is_its_ip_and_an_ipv6_peer_its_64_network():
    assert peer_host("ipv4:127.0.0.1:54321") == "127.0.0.1"
    assert peer_host("ipv6:[2001:db8:1:2:aaaa::5]:443") == "2001:db8:1:2::/64"
    assert peer_host("ipv6:%5B2001:db8:1:2:bbbb::6%5D:80") == "2001:db8:1:2::/64"
    assert peer_host("ipv6:[::1]:80") == "::1"
    assert peer_host("ipv6:[::ffff:10.1.2.3]:80") == "10.1.2.3"
    assert peer_host("unix:/tmp/sock") == "unix"


def test_an_asserted_name_is_cut_to_128_characters():
    caller = Caller(token_name="gw", gateway=True, asserted="x" * 500)
    assert principal_of(caller) == "x" * 128


def test_token_file_marks_gateways(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alice:s3cret\nmodelserver:gw-token:gateway\n# comment\n")
    tokens = Tokens.from_file(str(path))
    assert tokens.client_of("Bearer gw-token") == "modelserver"
    assert tokens.client_of("Bearer gw-token:gateway") is None
    assert tokens.client_of("Bearer s3cret") == "alice"
    assert tokens.gateways == frozenset({"modelserver"})
