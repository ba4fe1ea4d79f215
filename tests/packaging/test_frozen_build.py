"""Build the frozen app with PyInstaller and test the stack that ships (slow: ~10-20 min, several GB of disk).

The build venv is the lock (packaging/constraints.txt; build-report.json lists what it installed,
and the build's import check found every module the sources import in the bundle). The frozen app
runs its self-test and ``cxrviewer analyze`` on the five demo studies; its probabilities must equal
(within 1e-5) those of the same stack unfrozen (the build venv: freezing changes nothing) and those
of this test's venv (the tested stack: fails for a ``--allow-fallback`` build with another torch).
With root and ``CXRVIEWER_DEB_INSTALL_TEST=1`` the .deb is installed, self-tested and removed.

Marked ``slow``: deselected by default (pyproject's ``addopts``), run with::

    nice -n 10 .venv/bin/python -m pytest tests/packaging/test_frozen_build.py -m slow

``CXRVIEWER_BUILD_VARIANT`` picks cpu (default) or cuda. ``CXRVIEWER_FROZEN_BUNDLE=dist/cpu/cxrviewer``
skips the build and self-tests an existing bundle.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The demo studies: four PNG phantoms and the JPEG 2000 DICOM (decoded in the sandboxed child).
DEMO_STUDIES = [REPO / "resources" / "demo" / "images", REPO / "resources" / "demo_dicom" / "RG1_J2KR.dcm"]
PROBABILITY_TOLERANCE = 1e-5

pytestmark = pytest.mark.slow  # builds the PyInstaller bundle (minutes, several GB)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR", "SYSTEMROOT", "USERPROFILE")}
    env["PATH"] = os.pathsep.join([r"C:\Windows\System32"] if sys.platform == "win32" else ["/usr/bin", "/bin"])
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The bundle: CXRVIEWER_FROZEN_BUNDLE, or built now (CXRVIEWER_BUILD_ARGS, e.g. --allow-fallback)."""
    given = os.environ.get("CXRVIEWER_FROZEN_BUNDLE")
    if given:
        return Path(given).resolve()
    variant = os.environ.get("CXRVIEWER_BUILD_VARIANT", "cpu")
    extra = shlex.split(os.environ.get("CXRVIEWER_BUILD_ARGS", ""))
    proc = subprocess.run([sys.executable, str(REPO / "packaging" / "build.py"), "--variant", variant, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return Path(json.loads((REPO / "dist" / variant / "build-report.json").read_text(encoding="utf-8"))["bundle"])


@pytest.fixture(scope="module")
def build_report(bundle: Path) -> dict:
    """The build's report (beside the bundle), checked: the lock's stack, licences, self-test, imports."""
    report = json.loads((bundle.parent / "build-report.json").read_text(encoding="utf-8"))
    assert report["ok"] and report["licences_ok"] and report["selftest_exit"] == 0
    assert report["import_check"]["missing_from_bundle"] == {} and report["import_check"]["importable_frozen"] > 200
    installed = report["installed"]
    assert installed["pyside6-essentials"] != "6.12.0" and report["torch_pair"] in ("lock", "fallback")
    assert "highdicom" in installed and "pyyaml" in installed and "pyjpegls" in installed
    return report


@pytest.fixture(scope="module")
def frozen_probabilities(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    exe = bundle / ("cxrviewer-cli.exe" if sys.platform == "win32" else "cxrviewer")
    tmp = tmp_path_factory.mktemp("frozen")
    return _analyze([str(exe)], tmp / "out", _clean_env(), tmp)


def _max_difference(a: dict, b: dict) -> float:
    """Largest |p_a - p_b| over studies and classes (same studies, classes and model weights)."""
    assert len(a) == 5 and set(a) == set(b)
    worst = 0.0
    for study, probs in a.items():
        other = b[study]
        assert probs["_weights"] == other["_weights"]  # the same bundled models
        classes = set(probs) - {"_weights"}
        assert classes == set(other) - {"_weights"} and len(classes) >= 14
        for cls in classes:
            assert math.isfinite(probs[cls])
            worst = max(worst, abs(probs[cls] - other[cls]))
    return worst


def _probabilities(out: Path) -> dict[str, dict[str, float]]:
    """Study folder name -> class -> probability, from each ``summary.json`` of an analyze run."""
    found = {}
    for summary in sorted(out.glob("*/summary.json")):
        data = json.loads(summary.read_text(encoding="utf-8"))
        found[summary.parent.name] = {k: float(v) for k, v in data["probabilities"].items()}
        found[summary.parent.name]["_weights"] = data["analysis"]["weights_sha256"]
    return found


def _analyze(cmd: list[str], out: Path, env: dict[str, str], cwd: Path) -> dict[str, dict[str, float]]:
    proc = subprocess.run([*cmd, "analyze", *map(str, DEMO_STUDIES), "--out", str(out), "--no-panels",
                           "--device", "cpu", "--quiet"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return _probabilities(out)


def test_frozen_selftest_outside_the_source_tree(bundle: Path, build_report: dict, tmp_path: Path) -> None:
    exe = bundle / ("cxrviewer-cli.exe" if sys.platform == "win32" else "cxrviewer")
    assert exe.is_file()
    out_file = tmp_path / "report.json"
    env = {**_clean_env(), "CXRVIEWER_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([str(exe), "--self-test", "--json-out", str(out_file)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out_file.read_text(encoding="utf-8"))
    assert report["ok"] and report["frozen"] is True
    assert (tmp_path / "logs" / "cxrviewer.log").is_file() and report["log_file"]  # a windowed build has no stderr
    decodes = [c for c in report["checks"] if c["name"].startswith("decode:")]
    assert len(decodes) >= 8 and all(c["ok"] for c in decodes)
    assert (bundle / "THIRD_PARTY_LICENSES").is_file()
    text = (bundle / "THIRD_PARTY_LICENSES").read_text(encoding="utf-8")
    assert "pydicom" in text and "PySide6" in text


def test_frozen_app_rejects_unknown_option(bundle: Path, tmp_path: Path) -> None:
    exe = bundle / ("cxrviewer-cli.exe" if sys.platform == "win32" else "cxrviewer")
    proc = subprocess.run([str(exe), "--no-such-option"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--no-such-option" in proc.stderr


def test_frozen_analyze_equals_unfrozen(bundle: Path, build_report: dict, frozen_probabilities: dict,
                                       tmp_path: Path) -> None:
    """Freezing changes nothing: the frozen ``analyze`` of the demo studies gives the probabilities of the
    same stack run unfrozen (the build venv, through packaging/entry.py) within 1e-5."""
    build_py = build_report["build_python"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    unfrozen = _analyze([build_py, str(REPO / "packaging" / "entry.py")], tmp_path / "unfrozen", env, REPO)
    worst = _max_difference(frozen_probabilities, unfrozen)
    print("frozen vs unfrozen (build venv) analyze:", {"studies": 5, "max_abs_difference": worst})
    assert worst <= PROBABILITY_TOLERANCE, worst


def test_frozen_stack_is_the_tested_stack(build_report: dict, frozen_probabilities: dict, tmp_path: Path) -> None:
    """The bundle's runtime versions are this test venv's (torch's local label aside), and its ``analyze``
    gives this venv's probabilities within 1e-5. Fails for a --allow-fallback build (another torch)."""
    from importlib import metadata

    build = _load_script("build.py")
    mine = {n: metadata.version(n) for n in build.runtime_names()}
    theirs = {n: build_report["installed"].get(n) for n in mine}
    unfrozen = _analyze([sys.executable, "-m", "cxrviewer"], tmp_path / "venv",
                        {**os.environ, "OMP_NUM_THREADS": "2"}, REPO)
    worst = _max_difference(frozen_probabilities, unfrozen)
    record = {"max_abs_difference": worst, "torch_pair": build_report["torch_pair"],
              "bundle_torch": theirs["torch"], "test_venv_torch": mine["torch"]}
    print("frozen vs the test venv:", record)
    assert build.lock_mismatches(theirs, mine) == [], record
    assert worst <= PROBABILITY_TOLERANCE, record


def _load_script(name: str):
    """packaging/NAME as a module (the folder name clashes with the ``packaging`` library)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cxrviewer_{name[:-3]}", REPO / "packaging" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)


@pytest.mark.skipif(os.environ.get("CXRVIEWER_DEB_INSTALL_TEST") != "1" or not hasattr(os, "geteuid")
                    or os.geteuid() != 0, reason="installs a .deb on this machine: root and CXRVIEWER_DEB_INSTALL_TEST=1")
def test_deb_installs_self_tests_and_removes_leaving_projects(bundle: Path, tmp_path: Path) -> None:
    """apt install ./cxrviewer_*.deb; cxrviewer --self-test from PATH; a project in ~/.local/share;
    apt remove, then dpkg --purge: /opt/cxrviewer is gone and the project is still there, unchanged."""
    if _sh(["dpkg", "-s", "cxrviewer"]).returncode == 0:
        pytest.skip("a cxrviewer package is already installed here; not touching it")
    deb, _missing = _load_script("build_deb.py").build_deb(bundle, tmp_path / "deb")
    inst = _sh(["apt-get", "install", "-y", "--no-install-recommends", str(deb)],
               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if inst.returncode != 0:  # e.g. no package lists: dpkg alone (Depends are the host's own packages)
        inst = _sh(["dpkg", "-i", str(deb)])
    home = tmp_path / "home"
    project = home / ".local" / "share" / "cxrviewer" / "projects" / "mine.cxrann"
    try:
        assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
        assert Path("/opt/cxrviewer/cxrviewer").is_file() and Path("/usr/bin/cxrviewer").is_file()
        env = {**_clean_env(), "HOME": str(home), "CXRVIEWER_LOG_DIR": str(tmp_path / "logs")}
        out_file = tmp_path / "selftest.json"
        proc = _sh(["cxrviewer", "--self-test", "--json-out", str(out_file)], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        report = json.loads(out_file.read_text(encoding="utf-8"))
        assert report["ok"] and report["frozen"] is True
        demo = Path("/opt/cxrviewer/_internal/resources/demo")
        proc = _sh(["cxrviewer", "import", str(project), "--format", "nih-csv", str(demo / "BBox_List_2017_demo.csv"),
                    "--studies", str(demo / "images")], cwd=tmp_path, env=env)
        assert proc.returncode == 0 and project.is_file(), proc.stdout + proc.stderr
        desktop = Path("/usr/share/applications/cxrviewer.desktop")
        assert desktop.is_file()
        if shutil.which("desktop-file-validate"):
            assert _sh(["desktop-file-validate", str(desktop)]).returncode == 0
        if shutil.which("update-mime-database"):  # postinst ran it: the .cxrann type is known
            assert Path("/usr/share/mime/application/x-cxrviewer-project.xml").is_file()
        before = project.read_bytes()
    finally:
        rm = _sh(["apt-get", "remove", "-y", "cxrviewer"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if rm.returncode != 0:
            rm = _sh(["dpkg", "-r", "cxrviewer"])
    assert rm.returncode == 0, rm.stdout[-2000:] + rm.stderr[-2000:]
    assert not Path("/opt/cxrviewer").exists() and not Path("/usr/bin/cxrviewer").exists()
    assert not Path("/usr/share/mime/application/x-cxrviewer-project.xml").exists()
    assert project.read_bytes() == before  # the user's project is untouched
    purge = _sh(["dpkg", "--purge", "cxrviewer"])  # leave no "rc" entry behind; purging spares homes too
    assert purge.returncode == 0 and project.read_bytes() == before, purge.stdout + purge.stderr
    assert _sh(["dpkg", "-s", "cxrviewer"]).returncode != 0
