"""warm_up: only the kernels the given policies use, single-thread first, with progress;
and the kernel cache key that follows every source a kernel inlines."""

from __future__ import annotations

import threading
import time

import numpy as np
from _procs import start_sidecar
from numba import njit, prange
from stealguard.server.defenses import DEFENSE_NAMES, ReverseSigmoid, make_defense, warm_up
from stealguard.server.defenses._base import Defense
from stealguard.server.defenses._cache import kernel_keys, stale_modules
from stealguard.server.defenses.reverse_sigmoid import reverse_sigmoid_parallel


@njit(cache=False)
def _copy_serial(y, out, n, k, check):
    for e in range(n * k):
        out[e] = y[e]
    return -1


@njit(cache=False, parallel=True)
def _copy_parallel(y, out, n, k, check):
    for e in prange(n * k):
        out[e] = y[e]
    return -1


class Copy(Defense):
    """A defense class warm_up has never heard of (not even in the registry)."""

    name = "copy"
    _serial = staticmethod(_copy_serial)
    _parallel = staticmethod(_copy_parallel)


def test_progress_names_the_policies_and_counts_every_kernel_to_the_end():
    messages: list[str] = []
    policies = {"default": make_defense("reverse_sigmoid"), "mnist-open": make_defense("none")}
    warm_up(policies, progress=messages.append)
    assert messages[0] == ("compiling kernels for policies default, mnist-open: 0/8 "
                           f"(reverse_sigmoid float32 serial), {messages[0].split(', ')[-1]}")
    assert messages[-1].startswith("kernels for policies default, mnist-open: 8/8 ready in ")


def test_two_policies_of_one_defense_share_their_kernels():
    messages: list[str] = []
    warm_up({"a": make_defense("reverse_sigmoid"), "b": make_defense("reverse_sigmoid", beta=1)},
            progress=messages.append)
    assert messages[-1].startswith("kernels for policies a, b: 4/4 ready")


def test_a_new_defense_class_is_warmed_without_any_edit():
    messages: list[str] = []
    warm_up([Copy()], progress=messages.append)
    assert "copy float32 serial" in messages[0]
    assert messages[-1].startswith("kernels for defenses copy: 4/4 ready")
    assert len(_copy_serial.signatures) == 2 and len(_copy_parallel.signatures) == 2


def test_background_warm_up_answers_big_batches_the_same_and_restores_the_parallel_kernel():
    ready = threading.Event()
    defense = make_defense("reverse_sigmoid")
    big = np.random.default_rng(1).dirichlet(np.ones(4), 1 << 15).astype(np.float32)

    def progress(message: str) -> None:
        if " ready in " in message:
            ready.set()

    warm_up({"default": defense}, progress=progress, background=True)
    during = defense(big)  # on whichever kernel is in place right now
    assert ready.wait(600)
    assert ReverseSigmoid._parallel is reverse_sigmoid_parallel
    assert during.tobytes() == defense(big).tobytes()


def test_warm_up_with_no_arguments_still_warms_every_defense():
    messages: list[str] = []
    assert warm_up(progress=messages.append) >= 0.0
    assert messages[0].startswith(f"compiling kernels for defenses {', '.join(DEFENSE_NAMES)}: 0/")


def _package(root, sources: dict[str, str]):
    for name, text in sources.items():
        (root / f"{name}.py").write_text(text)
    return kernel_keys(root)


def test_an_edit_to_an_inlined_helper_invalidates_exactly_its_importers(tmp_path):
    sources = {
        "_rows": "X = 1\n",
        "_fastmath": "Y = 1\n",
        "_validation": "from ._rows import X\n",
        "reverse_sigmoid": "from ._validation import X\nfrom ._fastmath import Y\n",
        "noise": "from . import _fastmath\n",
        "simple": "from stealguard.server.defenses._validation import X\n",
    }
    before = _package(tmp_path, sources)
    after = _package(tmp_path, {"_rows": "X = 2\n"})
    assert stale_modules(before, after) == {"_rows", "_validation", "reverse_sigmoid", "simple"}
    assert stale_modules(after, _package(tmp_path, {"noise": "from . import _fastmath\nZ=1\n"})
                         ) == {"noise"}


def test_a_cache_without_a_stamp_is_all_stale(tmp_path):
    keys = _package(tmp_path, {"reverse_sigmoid": "", "noise": ""})
    assert stale_modules({}, keys) == {"reverse_sigmoid", "noise"}


def test_sidecar_start_logs_what_it_compiles_for_which_policies(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text("policies:\n  default: {defense: reverse_sigmoid}\n"
                      "  mnist-open: {defense: none}\n")
    process, _ = start_sidecar("--config", str(config))
    try:
        deadline = time.monotonic() + 600  # the parallel kernels come after SERVING
        while " 8/8 ready in " not in process.output() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        process.stop()
    log = process.output()
    assert "compiling kernels for policies default, mnist-open: 0/8 " in log
    assert "kernels for policies default, mnist-open: 8/8 ready in " in log
