"""Print the project's dependencies from pyproject.toml, one requirement a line.

Usage: python3 requirements.py PYPROJECT [EXTRA ...]

The image build installs the dependencies before it copies the source, so that editing the
code does not reinstall them; `deploy/build-images` uses the same list to fetch wheels on the
host. Reading pyproject.toml keeps one list of dependencies, not two.
"""

import sys

import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    """Return the core dependencies of `pyproject` followed by those of each extra."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project.get("dependencies", []))
    known = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in known:
            raise SystemExit(f"requirements.py: unknown extra {extra!r}; known: {sorted(known)}")
        lines.extend(known[extra])
    return lines


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python3 requirements.py PYPROJECT [EXTRA ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
