"""bench/run_all on a bench folder of stand-in benchmarks: every benchmark runs, a missing one
is noted and skipped, a failing one is reported, helpers are left alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "bench" / "run_all"

STANDINS = {
    "kernels.py": """
import json, os, sys
print("| batch | ratio |\\n|---|---|\\n| 10 | 3.0 |")
print("quick" if "--quick" in sys.argv else "full")
with open(os.environ["STEALGUARD_BENCH_JSON"], "w") as f:
    json.dump({"headline": {"kernel speed-up": 3.0}}, f)
""",
    "service.py": "import sys\nsys.exit('service: the sidecar did not start')\n",
    "zz_extra.py": "print('plain text, not markdown')\n",
    "_helper.py": "raise SystemExit('a helper must not run')\n",
    "echo_server.py": "raise SystemExit('the echo server is not a benchmark')\n",
    "soak.py": "# run_all: skip\nraise SystemExit('opted out')\n",
}


def test_run_all_runs_every_benchmark_and_skips_missing_ones(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    shutil.copy(RUN_ALL, bench / "run_all")
    for name, text in STANDINS.items():
        (bench / name).write_text(text)
    out = tmp_path / "REPORT.md"
    done = subprocess.run([sys.executable, str(bench / "run_all"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # service.py failed
    report = out.read_text()
    assert "| kernel speed-up | 3.0 | `kernels` |" in report
    assert "| 10 | 3.0 |" in report and "\nquick\n" in report  # --quick passed on
    assert "_Skipped: `bench/modelserver.py` does not exist yet._" in report
    assert "_Skipped: `bench/proxy.py` does not exist yet._" in report
    assert "**The benchmark exit status 1.**" in report
    assert "service: the sidecar did not start" in report
    assert "```text\nplain text, not markdown\n```" in report  # other bench/*.py run too
    for not_run in ("a helper must not run", "not a benchmark", "opted out"):
        assert not_run not in report


def test_run_all_only_rejects_an_unknown_name(tmp_path):
    done = subprocess.run([sys.executable, str(RUN_ALL), "--only", "nope", "--out",
                           str(tmp_path / "r.md")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no benchmark named nope" in done.stderr
    assert not (tmp_path / "r.md").exists()
