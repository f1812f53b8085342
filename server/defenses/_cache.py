"""Keep numba's on-disk kernel cache in step with the sources it was compiled from.

numba invalidates a cached kernel only when the file that defines it changes, not when a
function or constant it inlines from another module does (`_fastmath`, `_rows`,
`_validation`). So each module of this package gets a key: its own source and the sources of
every package module it imports, directly or through another (read from its `from . import`
lines, so a new module needs no entry here). The keys are kept in a stamp file beside the
cache; a module whose key changed has its cached kernels deleted, and numba recompiles them
on first use. An edit to `noise.py` recompiles the noise kernels only; an edit to `_rows.py`
recompiles every kernel that imports it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_PACKAGE_NAME = __name__.rsplit(".", 1)[0]  # stealguard.server.defenses
_STAMP = "stealguard-defenses.stamp"


def _package_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of this package that the source at `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            module = node.module
        elif node.level == 0 and (node.module or "").startswith(_PACKAGE_NAME + "."):
            module = node.module[len(_PACKAGE_NAME) + 1:]
        else:
            continue
        if module:  # from .x import y / from stealguard.server.defenses.x import y
            found.add(module.split(".")[0])
        else:  # from . import x, y
            found.update(alias.name for alias in node.names)
    return found & modules


def kernel_keys(package: Path = _PACKAGE) -> dict[str, str]:
    """{module: key} for every module of `package`; a key changes when the module's source
    or the source of any package module it imports (transitively) changes."""
    sources = {path.stem: path for path in sorted(package.glob("*.py"))}
    names = set(sources)
    imports = {name: _package_imports(path, names) for name, path in sources.items()}
    keys = {}
    for name in sources:
        closure, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module not in closure:
                closure.add(module)
                todo.extend(imports[module])
        digest = hashlib.blake2b(digest_size=16)
        for module in sorted(closure):
            digest.update(module.encode() + b"\0")
            digest.update(sources[module].read_bytes())
        keys[name] = digest.hexdigest()
    return keys


def stale_modules(old: dict[str, str], new: dict[str, str]) -> set[str]:
    """The modules whose cached kernels must go: key changed, or unknown to `old`."""
    return {name for name, key in new.items() if old.get(name) != key}


def refresh_kernel_cache() -> None:
    """Delete the cached kernels of every module whose key changed since they were built."""
    from .reverse_sigmoid import reverse_sigmoid_serial  # any kernel: they share the dir

    try:
        cache_dir = Path(reverse_sigmoid_serial._cache._cache_path)
    except AttributeError:  # caching disabled or numba internals changed: nothing to do
        return
    stamp = cache_dir / _STAMP
    current = kernel_keys()
    try:
        old = json.loads(stamp.read_text())
        if not isinstance(old, dict):
            old = {}
    except (OSError, ValueError):
        old = {}  # no stamp, or the whole-package stamp of older releases: all stale
    stale = stale_modules(old, current)
    if not stale:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for entry in cache_dir.iterdir():
            if entry.suffix in (".nbi", ".nbc") and entry.name.split(".")[0] in stale:
                entry.unlink(missing_ok=True)
        tmp = cache_dir / f"{_STAMP}.{os.getpid()}"
        tmp.write_text(json.dumps(current, indent=0, sort_keys=True))
        os.replace(tmp, stamp)
    except OSError:  # read-only install: numba cannot cache there either
        pass
