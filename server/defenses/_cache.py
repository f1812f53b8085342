"""Keep numba's on-disk kernel cache in step with the sources it was compiled from.

numba invalidates a cached kernel only when the file that defines it changes, not when a
function it inlines from another module does (`_fastmath`, `_rows`, `_validation`). So a
stamp of all this package's sources is kept beside the cache; when it differs, the
package's cached kernels are deleted and numba recompiles them on first use.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_STAMP = "stealguard-defenses.stamp"


def _sources_digest() -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(_PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def refresh_kernel_cache() -> None:
    """Delete this package's cached kernels if any source changed since they were built."""
    from .reverse_sigmoid import reverse_sigmoid_serial  # any kernel: they share the dir

    try:
        cache_dir = Path(reverse_sigmoid_serial._cache._cache_path)
    except AttributeError:  # caching disabled or numba internals changed: nothing to do
        return
    stamp = cache_dir / _STAMP
    current = _sources_digest()
    try:
        if stamp.read_text() == current:
            return
    except OSError:
        pass
    modules = {path.stem for path in _PACKAGE.glob("*.py")}
    try:
        for entry in cache_dir.iterdir():
            if entry.suffix in (".nbi", ".nbc") and entry.name.split(".")[0] in modules:
                entry.unlink(missing_ok=True)
        tmp = cache_dir / f"{_STAMP}.{os.getpid()}"
        tmp.write_text(current)
        os.replace(tmp, stamp)
    except OSError:  # read-only install: numba cannot cache there either
        pass
