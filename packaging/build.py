"""Build the cxrviewer desktop bundle with PyInstaller (onedir, windowed), then check it.

    python packaging/build.py [--variant cpu|cuda] [--reuse-venv .venv] [--skip-selftest]

Steps (each printed with its time; a build report goes to ``dist/<variant>/build-report.json``):

1. **Build venv** ``build/venv-<variant>`` (PyInstaller never goes into the
   development venv). Made once and reused:

   * ``cpu``: a CPU-only torch wheel (``--torch`` / ``--torchvision`` specs;
     defaults to the ``+cpu`` wheel pinned below, found through pip's
     find-links or ``--pip-arg --index-url=https://download.pytorch.org/whl/cpu``)
     plus the runtime requirements pinned to what the dev venv has, so no CUDA
     library is even installed;
   * ``cuda``: with ``--reuse-venv DEV_VENV`` a venv with only PyInstaller and a
     ``.pth`` file pointing at the dev venv's site-packages (no 3 GB download);
     without it, the default (CUDA) torch wheel from PyPI.

2. **PyInstaller** on ``packaging/cxrviewer.spec`` -> ``dist/<variant>/cxrviewer/``.
3. **Licences**: ``packaging/licenses.py`` writes ``THIRD_PARTY_LICENSES`` into
   the bundle (and, for the cpu variant on Linux, ``packaging/THIRD_PARTY_LICENSES``);
   GPL/AGPL code fails the build.
4. **Self-test**: the frozen ``cxrviewer --self-test`` run from a temporary folder
   outside the source tree with a minimal environment (no venv, no PYTHONPATH);
   its exit status is the build's. Size, build time and start-up times are
   recorded in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IS_WIN = sys.platform == "win32"

PYINSTALLER = ["pyinstaller==6.22.3", "pyinstaller-hooks-contrib==2026.9"]
#: torch/torchvision for the CPU variant (a matching pair without CUDA code). On Linux PyPI's
#: wheels are CUDA builds, so the +cpu wheel comes from pip's find-links (/opt/wheels here) or
#: from ``--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu``; on Windows and
#: macOS PyPI's own wheels are CPU-only.
if sys.platform.startswith("linux"):
    CPU_TORCH, CPU_TORCHVISION = "torch==2.13.0+cpu", "torchvision==0.28.0"
else:
    CPU_TORCH, CPU_TORCHVISION = "torch==2.14.1", "torchvision==0.29.1"
#: Runtime requirements other than torch (pyproject.toml), pinned to the tested versions.
RUNTIME = ["numpy==2.4.6", "pydicom==3.0.2", "pylibjpeg==2.1.0", "pylibjpeg-openjpeg==2.6.0",
           "python-gdcm==3.2.6", "PySide6-Essentials==6.12.0", "pyqtgraph==0.14.0", "pillow==13.0.0",
           "scikit-image==0.26.0", "scipy==1.17.1", "h5py==3.16.0"]


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if IS_WIN else "bin/python")


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_venv(args: argparse.Namespace) -> Path:
    venv = Path(args.venv) if args.venv else REPO / "build" / f"venv-{args.variant}"
    py = venv_python(venv)
    marker = venv / ".cxrviewer-build-ok"
    if marker.is_file() and not args.recreate_venv:
        log(f"reusing build venv {venv}")
        return py
    if venv.exists():
        shutil.rmtree(venv)
    base = getattr(sys, "_base_executable", None) or sys.executable
    run([base, "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", *args.pip_arg]
    if args.reuse_venv:
        dev_py = venv_python(Path(args.reuse_venv).resolve())
        dev_site = site_packages(dev_py)
        run([*pip, *PYINSTALLER])
        (site_packages(py) / "cxrviewer_dev_venv.pth").write_text(str(dev_site) + "\n", encoding="utf-8")
        log(f"build venv sees the packages of {dev_site}")
    else:
        torch = args.torch or (CPU_TORCH if args.variant == "cpu" else "torch")
        vision = args.torchvision or (CPU_TORCHVISION if args.variant == "cpu" else "torchvision")
        run([*pip, torch, vision, *RUNTIME, *PYINSTALLER])
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"), encoding="utf-8")
    return py


def check_variant(py: Path, variant: str) -> dict:
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda}))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if variant == "cpu" and info["cuda"]:
        raise SystemExit(f"the cpu variant needs a CPU-only torch wheel; the build venv has {info['torch']} "
                         f"(CUDA {info['cuda']}). Use --torch 'torch==X+cpu' or --recreate-venv.")
    if variant == "cuda" and not info["cuda"]:
        raise SystemExit(f"the cuda variant needs a CUDA torch wheel; the build venv has {info['torch']}")
    return info


def folder_size(p: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                total += os.path.getsize(fp)
    return total


def clean_env() -> dict[str, str]:
    """What a user's shell would have: no venv, no PYTHONPATH, the system PATH only."""
    keep = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "WINDIR", "USERPROFILE",
            "APPDATA", "LOCALAPPDATA", "DISPLAY", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = os.pathsep.join([r"C:\Windows\System32", r"C:\Windows"] if IS_WIN else ["/usr/bin", "/bin"])
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    return env


def exe_path(bundle: Path) -> Path:
    return bundle / ("cxrviewer-cli.exe" if IS_WIN else "cxrviewer")


def smoke(bundle: Path, report: dict) -> int:
    """Start-up time and the self-test of the frozen app, from outside the source tree."""
    exe = exe_path(bundle)
    with tempfile.TemporaryDirectory(prefix="cxrviewer-frozen-") as td:
        env = clean_env()
        for label in ("first", "second"):
            t0 = time.perf_counter()
            out = subprocess.run([str(exe), "--version"], cwd=td, env=env, capture_output=True, text=True,
                                 timeout=600)
            report[f"start_version_{label}_s"] = round(time.perf_counter() - t0, 2)
            if out.returncode != 0:
                log(f"--version failed ({out.returncode}): {out.stderr[-2000:]}")
                return out.returncode or 1
        log(f"start-up (--version, imports torch): first {report['start_version_first_s']} s, "
            f"second {report['start_version_second_s']} s")
        t0 = time.perf_counter()
        json_out = Path(td) / "selftest.json"
        out = subprocess.run([str(exe), "--self-test", "--json-out", str(json_out)], cwd=td, env=env,
                             capture_output=True, text=True, timeout=1800)
        report["selftest_wall_s"] = round(time.perf_counter() - t0, 2)
        report["selftest_exit"] = out.returncode
        try:
            st = json.loads(json_out.read_text(encoding="utf-8"))
            report["selftest"] = {k: st.get(k) for k in ("ok", "failed", "device", "total_seconds",
                                                          "process_age_at_start_s")}
            report["selftest"]["checks"] = {c["name"]: [c["ok"], c["seconds"]] for c in st.get("checks", [])}
        except (OSError, ValueError):
            report["selftest"] = None
        if out.returncode != 0:
            log("self-test FAILED:\n" + out.stdout[-6000:] + out.stderr[-3000:])
        else:
            log(f"self-test passed in {report['selftest_wall_s']} s")
        return out.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--venv", default=None, help="build venv (default build/venv-VARIANT)")
    p.add_argument("--reuse-venv", default=None, metavar="DEV_VENV",
                   help="let the build venv see this venv's packages (.pth) instead of installing them")
    p.add_argument("--recreate-venv", action="store_true", help="make the build venv again")
    p.add_argument("--torch", default=None, help=f"torch requirement (cpu default {CPU_TORCH})")
    p.add_argument("--torchvision", default=None, help=f"torchvision requirement (cpu default {CPU_TORCHVISION})")
    p.add_argument("--pip-arg", action="append", default=[], help="extra pip argument (repeatable)")
    p.add_argument("--dist", default=None, help="output folder (default dist/VARIANT)")
    p.add_argument("--clean", action="store_true", help="empty PyInstaller's cache first")
    p.add_argument("--skip-selftest", action="store_true")
    p.add_argument("--skip-licences", action="store_true")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    report: dict = {"variant": args.variant, "platform": platform.platform(), "python": platform.python_version(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    py = ensure_venv(args)
    report["torch"] = check_variant(py, args.variant)
    report["venv_seconds"] = round(time.perf_counter() - t_start, 1)

    dist = Path(args.dist) if args.dist else REPO / "dist" / args.variant
    work = REPO / "build" / f"pyi-{args.variant}"
    env = {**os.environ, "CXRVIEWER_VARIANT": args.variant, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    run([py, "-m", "PyInstaller", REPO / "packaging" / "cxrviewer.spec", "--noconfirm",
         *(["--clean"] if args.clean else []), "--distpath", dist, "--workpath", work], cwd=REPO, env=env)
    report["pyinstaller_seconds"] = round(time.perf_counter() - t0, 1)
    bundle = dist / "cxrviewer"
    report["bundle"] = str(bundle)
    report["bundle_bytes"] = folder_size(bundle)
    report["bundle_files"] = sum(len(f) for _r, _d, f in os.walk(bundle))
    log(f"bundle {bundle}: {report['bundle_bytes'] / 2**20:.0f} MiB in {report['bundle_files']} files")

    rc = 0
    if not args.skip_licences:
        cmd = [py, REPO / "packaging" / "licenses.py", bundle, "--binaries", work / "cxrviewer" / "binaries.json",
               "--json", dist / "licences.json", "--title", f"the cxrviewer {args.variant} bundle"]
        lrc = subprocess.run([str(c) for c in cmd], env={**os.environ, "PYTHONPATH": ""}).returncode
        report["licences_ok"] = lrc == 0
        if lrc != 0:
            log("licence check FAILED (GPL/AGPL code in the bundle, see above)")
            rc = lrc
        elif args.variant == "cpu" and sys.platform.startswith("linux"):
            shutil.copyfile(bundle / "THIRD_PARTY_LICENSES", REPO / "packaging" / "THIRD_PARTY_LICENSES")
    if not args.skip_selftest and rc == 0:
        rc = smoke(bundle, report)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = rc == 0
    (dist / "build-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"report: {dist / 'build-report.json'} ({'ok' if rc == 0 else 'FAILED'})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
