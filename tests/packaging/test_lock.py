"""One lock: packaging/build.py installs exactly packaging/constraints.txt, which covers pyproject.

Fast (no build, no network): reads the lock, pyproject.toml, build.py's requirement list and the
spec, and checks that the dev venv the tests run in is the locked stack.
"""
from __future__ import annotations

import importlib.util
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "packaging" / "constraints.txt"


def _load_build():
    """packaging/build.py as a module (the folder name clashes with the ``packaging`` library)."""
    spec = importlib.util.spec_from_file_location("cxrviewer_build_script", REPO / "packaging" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


def _runtime() -> list[Requirement]:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return [Requirement(d) for d in tomllib.load(fh)["project"]["dependencies"]]


@pytest.mark.parametrize("variant,plat", [("cpu", "linux"), ("cuda", "linux"), ("cpu", "win32")])
def test_build_installs_every_runtime_dependency_at_the_locked_version(variant: str, plat: str) -> None:
    pins = build.read_lock()
    reqs = build.build_requirements(variant, plat)
    by_name = {build.requirement_name(r): r.split("==", 1)[1] for r in reqs}
    runtime = {build.canonical(r.name) for r in _runtime()}
    assert runtime <= set(by_name), f"missing from the build: {runtime - set(by_name)}"
    assert {"highdicom", "pyyaml", "pyside6-essentials"} <= set(by_name)
    for name, version in by_name.items():
        local = "+cpu" if (variant, plat) == ("cpu", "linux") and name in ("torch", "torchvision") else ""
        assert version == pins[name] + local, (name, version, pins[name])


def test_lock_pins_satisfy_pyproject_and_exclude_pyside_6_12_0() -> None:
    pins = build.read_lock()
    for req in _runtime():
        name = build.canonical(req.name)
        assert name in pins, f"{name} (pyproject runtime dependency) has no pin in {LOCK.name}"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (name, pins[name], str(req))
    assert pins["pyside6-essentials"] != "6.12.0" and pins["shiboken6"] == pins["pyside6-essentials"]
    from cxrviewer.gui import _pyside_fix

    assert pins["pyside6-essentials"] not in _pyside_fix.AFFECTED  # the workaround is only a guard


def test_torch_pairs_match_their_torchvision() -> None:
    """torchvision 0.N pairs with torch 2.(N-15): the lock's pair and the cpu fallback pair."""
    pins = build.read_lock()
    pairs = [(pins["torch"], pins["torchvision"])]
    fallback = dict(r.split("==") for r in build.read_fallback())
    if fallback:
        assert set(fallback) == {"torch", "torchvision"}
        pairs.append((fallback["torch"], fallback["torchvision"]))
    for torch_v, vision_v in pairs:
        t, v = Version(torch_v), Version(vision_v)
        assert (t.major, t.minor) == (2, v.minor - 15), (torch_v, vision_v)


def test_build_script_has_no_private_pins() -> None:
    """Versions live in the lock only: build.py names none of its own."""
    text = (REPO / "packaging" / "build.py").read_text(encoding="utf-8")
    assert not re.findall(r"""["'][A-Za-z0-9_.-]+==\d""", text)


def test_disagreement_is_caught(tmp_path: Path) -> None:
    """A lock without a runtime pin stops the build; a venv off the lock is reported."""
    lock = tmp_path / "constraints.txt"
    lock.write_text("\n".join(ln for ln in LOCK.read_text(encoding="utf-8").splitlines()
                              if not ln.lower().startswith("highdicom")) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="highdicom"):
        build.build_requirements("cpu", "linux", lock=lock)
    pins = build.read_lock()
    good = {**pins, "torch": pins["torch"] + "+cpu"}
    assert build.lock_mismatches(good, pins) == []
    bad = {**good, "torch": "2.13.0+cpu", "pyside6-essentials": "6.12.0"}
    found = build.lock_mismatches(bad, pins)
    assert any(m.startswith("torch 2.13.0") for m in found) and any("6.12.0" in m for m in found)
    assert build.lock_mismatches(bad, {**pins, "pyside6-essentials": "6.12.0"},
                                 build.read_fallback())[-1].endswith("excluded (pyproject.toml)")
    cons = build.fallback_constraints(["torch==2.13.0+cpu", "torchvision==0.28.0"], tmp_path / "c.txt")
    text = cons.read_text(encoding="utf-8")
    assert "torch==2.13.0+cpu" in text and "torch==" + pins["torch"] + "\n" not in text


def test_tests_run_on_the_locked_stack() -> None:
    """The venv running this suite is the lock (torch's local label aside)."""
    pins = build.read_lock()
    names = [build.canonical(r.name) for r in _runtime()] + ["shiboken6", "scipy", "pyjpegls"]
    have = {n: metadata.version(n) for n in names}
    assert build.lock_mismatches(have, {n: pins[n] for n in names}) == []


def test_spec_keeps_metadata_of_every_runtime_dependency() -> None:
    """The spec's METADATA list names every pyproject runtime dependency (versions, licences)."""
    text = (REPO / "packaging" / "cxrviewer.spec").read_text(encoding="utf-8")
    block = re.search(r"^METADATA = \[(.*?)\]", text, re.S | re.M).group(1)
    listed = {build.canonical(n) for n in re.findall(r'"([^"]+)"', block)}
    missing = {build.canonical(r.name) for r in _runtime()} - listed
    assert not missing, f"cxrviewer.spec METADATA lacks {sorted(missing)}"


def test_ci_and_readme_install_from_the_lock() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "-c packaging/constraints.txt" in ci
