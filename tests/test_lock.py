"""The locks agree with pyproject.toml: each lock satisfies every declared range, and constraints-oldest.txt (what
`P2O_CI_OLDEST=1 .ci/run` installs and tests) pins each dependency exactly at its declared lower bound, so a bound
moved without `scripts/lock.sh` is caught here rather than left untested."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the locks

REPO = Path(__file__).resolve().parents[1]


def dependencies() -> list[Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]


def pins(name: str) -> dict[str, Version]:
    lines = (REPO / name).read_text().splitlines()
    return {canonicalize_name(a): Version(b) for a, b in (x.split("==") for x in lines if "==" in x and x[0] != "#")}


@pytest.mark.parametrize("lock", ["constraints.txt", "constraints-vllm.txt", "constraints-oldest.txt"])
def test_every_lock_is_inside_the_declared_range(lock):
    pinned = pins(lock)
    for req in dependencies():
        assert canonicalize_name(req.name) in pinned, (lock, req.name)
        assert req.specifier.contains(pinned[canonicalize_name(req.name)]), (lock, str(req))


def test_the_oldest_lock_pins_every_lower_bound():
    pinned = pins("constraints-oldest.txt")
    for req in dependencies():
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{req} declares no single lower bound for the oldest canary to test"
        oldest = pinned[canonicalize_name(req.name)]
        assert oldest == lower[0], f"{req}: constraints-oldest.txt pins {oldest}; rerun scripts/lock.sh"
