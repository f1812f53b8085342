"""`stealguard-sidecar proxy` usage errors: one line naming the flag or key, exit 2."""

from __future__ import annotations

import subprocess

import pytest
from _procs import script


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([script("stealguard-sidecar"), "proxy", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        ((), None, "--upstream is required"),
        (("--upstream", "localhost"), None, "--upstream must be HOST:PORT, got 'localhost'"),
        (("--upstream", "h:1", "--protocol", "grpc"), None, "argument --protocol: invalid"),
        (("--upstream", "h:1", "--health-interval", "0"), None, "--health-interval"),
        (("--upstream", "h:1"), "protocol: triton\n", "--protocol must be one of"),
        (("--upstream", "h:1"), "policies: {m: {defense: none, on_unrecognized: drop}}\n",
         "policy 'm': on_unrecognized must be 'reject' or 'pass', got 'drop'"),
        (("--upstream", "h:1"), "policies: {m: {defense: none, outputs: 3}}\n",
         "policy 'm': outputs must be a non-empty list"),
        (("--upstream", "h:1", "--upstream-tls-cert", "c.pem"), None,
         "--upstream-tls-cert and --upstream-tls-key go together"),
        (("--upstream", "h:1", "--upstream-tls-ca", "/no/such/ca.pem"), None,
         "--upstream-tls-ca: cannot read /no/such/ca.pem: No such file or directory"),
    ],
)
def test_usage_error_is_one_line_naming_the_flag_and_exit_2(tmp_path, args, config, message):
    if config is not None:
        path = tmp_path / "proxy.yaml"
        path.write_text(config)
        args = (*args, "--config", str(path))
    result = run(*args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # argparse's own errors follow the usage
    assert last.startswith("stealguard-sidecar proxy: error: ") and message in last
    assert "Traceback" not in result.stderr
