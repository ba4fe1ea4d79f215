"""Build the cxrviewer desktop bundle with PyInstaller (onedir, windowed), then check it.

    python packaging/build.py [--variant cpu|cuda] [--reuse-venv .venv] [--skip-selftest]

Steps (each printed with its time; a build report goes to ``dist/<variant>/build-report.json``):

1. **Build venv** ``build/venv-<variant>`` (PyInstaller never goes into the
   development venv). Made once and reused:

   Every requirement comes from the one lock, ``packaging/constraints.txt`` (what the
   README install, CI and the tests use): each runtime dependency of ``pyproject.toml``
   plus PyInstaller, pinned to the lock's version and installed with ``-c`` the lock, so
   transitive dependencies are the locked ones too. Only the torch wheel's local variant
   may differ:

   * ``cpu`` on Linux: ``torch==X+cpu`` / ``torchvision==Y+cpu`` of the locked release
     (from https://download.pytorch.org/whl/cpu, added as an extra index, or pip's
     find-links); where that cannot be reached the build stops, unless ``--allow-fallback``
     takes the lock's ``# cpu-fallback:`` pair (recorded as ``torch_pair: fallback``; not the
     tested stack). No CUDA library is installed.
     On Windows/macOS PyPI's wheels are CPU-only: the locked ones as they are.
   * ``cuda``: the locked (CUDA) wheels from PyPI; or with ``--reuse-venv DEV_VENV`` a
     venv with only PyInstaller and a ``.pth`` file pointing at the dev venv's
     site-packages (no 3 GB download; the dev venv is made from the same lock).

   The venv is reused while its marker names the same requirements. The versions
   installed are written to the report (``installed``) and checked against the lock;
   a mismatch (or the excluded PySide6 6.12.0) stops the build.

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
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IS_WIN = sys.platform == "win32"

LOCK = REPO / "packaging" / "constraints.txt"
PYPROJECT = REPO / "pyproject.toml"
#: Build-only distributions, pinned in the lock like the runtime ones.
BUILD_ONLY = ("pyinstaller", "pyinstaller-hooks-contrib")
#: Where the cpu variant's "+cpu" torch wheels live (Linux; PyPI's Linux wheels are CUDA builds).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FALLBACK_TAG = "# cpu-fallback:"
FALLBACK_REFUSED = (
    "the locked torch release with {local} cannot be installed here (PyTorch's CPU index or a find-links "
    "wheel is needed). The lock's cpu-fallback pair ({pair}) is NOT the tested stack (the suite runs on the "
    "locked release). Pass --allow-fallback to build it anyway "
    "(the report then says torch_pair: fallback), or build the exact tested torch with "
    "--variant cuda --reuse-venv .venv.")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name ("PySide6_Essentials" -> "pyside6-essentials")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """The distribution name at the start of a requirement string ("torch>=2.10; ..." -> "torch")."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"not a requirement: {req!r}")
    return canonical(m.group(1))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """The lock's ``name==version`` pins, by canonical name (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path.name}: not an exact pin: {line!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_fallback(path: Path = LOCK) -> list[str]:
    """The lock's ``# cpu-fallback:`` torch/torchvision pair (empty when there is none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(FALLBACK_TAG):
            return line[len(FALLBACK_TAG):].split()
    return []


def runtime_names(pyproject: Path = PYPROJECT) -> list[str]:
    """Canonical names of pyproject.toml's [project].dependencies (what the frozen app needs)."""
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    return [requirement_name(d) for d in deps]


def torch_local(variant: str, platform_name: str = sys.platform) -> str:
    """The torch wheel's local version label for a variant ("+cpu" for cpu on Linux, else "")."""
    return "+cpu" if variant == "cpu" and platform_name.startswith("linux") else ""


def build_requirements(variant: str, platform_name: str = sys.platform, lock: Path = LOCK,
                       pyproject: Path = PYPROJECT) -> list[str]:
    """Everything the build venv installs, each pinned to the lock (torch's local label aside)."""
    pins = read_lock(lock)
    names = list(dict.fromkeys(runtime_names(pyproject) + list(BUILD_ONLY)))
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"{lock.name} has no pin for {', '.join(missing)} (pyproject runtime/build dependency)")
    local = torch_local(variant, platform_name)
    return [f"{n}=={pins[n]}{local if n in ('torch', 'torchvision') else ''}" for n in names]


def with_torch_pair(reqs: list[str], pair: list[str]) -> list[str]:
    """``reqs`` with its torch and torchvision requirements replaced by ``pair``."""
    by_name = {requirement_name(r): r for r in pair}
    return [by_name.get(requirement_name(r), r) for r in reqs]


def fallback_constraints(pair: list[str], dest: Path, lock: Path = LOCK) -> Path:
    """A copy of the lock with its torch/torchvision pins replaced by ``pair`` (for pip's -c)."""
    names = {requirement_name(r) for r in pair}
    lines = [ln for ln in lock.read_text(encoding="utf-8").splitlines()
             if not (ln.split("#", 1)[0].strip() and requirement_name(ln) in names)]
    dest.write_text("\n".join(lines + pair) + "\n", encoding="utf-8")
    return dest


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


def pip_install(py: Path, args: argparse.Namespace, reqs: list[str], constraints: Path,
                extra: list[str] = ()) -> bool:
    """pip install ``reqs`` under ``constraints`` into the build venv; False when pip fails."""
    cmd = [py, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints, *extra, *args.pip_arg,
           *reqs]
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd]).returncode == 0


def install_runtime(py: Path, args: argparse.Namespace, reqs: list[str]) -> str:
    """Install the locked requirements; returns where the torch pair came from (lock/fallback/option)."""
    if args.torch or args.torchvision:  # an explicit pair (e.g. a CUDA index on Windows): not the lock's
        pair = [r for r in (args.torch, args.torchvision) if r]
        with tempfile.TemporaryDirectory() as td:
            cons = fallback_constraints(pair, Path(td) / "constraints.txt")
            if not pip_install(py, args, with_torch_pair(reqs, pair), cons):
                raise SystemExit("pip could not install the requirements")
        return "option"
    local = torch_local(args.variant)
    index = ["--extra-index-url", TORCH_CPU_INDEX] if local and not args.no_torch_index else []
    if pip_install(py, args, reqs, LOCK, index):
        return "lock"
    pair = read_fallback()
    if not (local and pair):
        raise SystemExit("pip could not install the locked requirements (see above)")
    if not args.allow_fallback:
        raise SystemExit(FALLBACK_REFUSED.format(local=local, pair=" ".join(pair)))
    log(f"the locked torch release with {local} is not reachable; using the lock's cpu-fallback {pair} "
        "(--allow-fallback): NOT the tested stack")
    with tempfile.TemporaryDirectory() as td:
        cons = fallback_constraints(pair, Path(td) / "constraints.txt")
        if not pip_install(py, args, with_torch_pair(reqs, pair), cons):
            raise SystemExit("pip could not install the cpu-fallback requirements either (see above)")
    return "fallback"


def ensure_venv(args: argparse.Namespace) -> tuple[Path, str]:
    """The build venv (made from the lock, or reused when its marker names the same requirements)."""
    venv = Path(args.venv) if args.venv else REPO / "build" / f"venv-{args.variant}"
    py = venv_python(venv)
    marker = venv / ".cxrviewer-build-ok"
    pins = read_lock()
    reqs = ([f"{n}=={pins[n]}" for n in BUILD_ONLY] if args.reuse_venv
            else build_requirements(args.variant))
    wanted = {"requirements": reqs, "torch": args.torch, "torchvision": args.torchvision,
              "reuse_venv": args.reuse_venv}
    if marker.is_file() and not args.recreate_venv:
        try:
            have = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            have = {}
        if {k: have.get(k) for k in wanted} == wanted:
            source = have.get("torch_pair", "lock")
            if source == "fallback" and not args.allow_fallback:
                raise SystemExit(FALLBACK_REFUSED.format(local=torch_local(args.variant),
                                                         pair=" ".join(read_fallback())))
            log(f"reusing build venv {venv} (same locked requirements; torch pair: {source})")
            return py, source
        log(f"build venv {venv} was made from other requirements: making it again")
    if venv.exists():
        shutil.rmtree(venv)
    base = getattr(sys, "_base_executable", None) or sys.executable
    run([base, "-m", "venv", venv])
    if args.reuse_venv:
        dev_py = venv_python(Path(args.reuse_venv).resolve())
        dev_site = site_packages(dev_py)
        if not pip_install(py, args, reqs, LOCK):
            raise SystemExit("pip could not install PyInstaller")
        (site_packages(py) / "cxrviewer_dev_venv.pth").write_text(str(dev_site) + "\n", encoding="utf-8")
        log(f"build venv sees the packages of {dev_site}")
        source = "reused dev venv"
    else:
        source = install_runtime(py, args, reqs)
    marker.write_text(json.dumps({**wanted, "torch_pair": source,
                                  "made": time.strftime("%Y-%m-%dT%H:%M:%S")}), encoding="utf-8")
    return py, source


def installed_versions(py: Path) -> dict[str, str]:
    """Canonical name -> version of every distribution the build venv's Python sees."""
    code = ("import json; from importlib import metadata; "
            "print(json.dumps({d.metadata['Name']: d.version for d in metadata.distributions()}))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    return {canonical(k): v for k, v in sorted(json.loads(out.stdout.strip().splitlines()[-1]).items())}


def lock_mismatches(installed: dict[str, str], pins: dict[str, str], torch_pair: list[str] = ()) -> list[str]:
    """Installed distributions whose version (local label aside) is not the lock's (or the given pair's)."""
    expected = dict(pins)
    for req in torch_pair:
        name, _, version = req.partition("==")
        expected[canonical(name)] = version
    bad = []
    for name, want in sorted(expected.items()):
        have = installed.get(name)
        if have is not None and have.split("+")[0] != want.split("+")[0]:
            bad.append(f"{name} {have} (lock: {want})")
    if installed.get("pyside6-essentials") == "6.12.0":
        bad.append("pyside6-essentials 6.12.0 is excluded (pyproject.toml)")
    return bad


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


def component_sizes(bundle: Path, top: int = 25) -> dict[str, int]:
    """Bytes per top-level entry of the bundle's ``_internal`` (torch, PySide6, ...), largest first."""
    inner = bundle / "_internal"
    sizes: dict[str, int] = {}
    if inner.is_dir():
        for entry in inner.iterdir():
            if entry.is_symlink():
                continue
            sizes[entry.name] = folder_size(entry) if entry.is_dir() else entry.stat().st_size
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:top])
    if len(ranked) > top:
        out["(other)"] = sum(v for _k, v in ranked[top:])
    return out


def longest_relative_path(bundle: Path) -> tuple[int, str]:
    """(length, path) of the longest file path inside the bundle: on Windows without long-path
    support, install folder + this must stay under 260 characters (MAX_PATH)."""
    best = (0, "")
    for root, _dirs, files in os.walk(bundle):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), bundle)
            best = max(best, (len(rel), rel))
    return best


#: The Visual C++ runtime DLLs torch, Qt and CPython link against (Windows). PyInstaller
#: collects them from the build host as dependencies; without them the user needs Microsoft's
#: VC++ redistributable installed.
VC_RUNTIME = ("vcruntime140.dll", "vcruntime140_1.dll", "msvcp140.dll")


def windows_checks(bundle: Path, report: dict) -> None:
    """Record (and warn about) the Windows-specific parts of a bundle: VC runtime, path lengths."""
    length, path = longest_relative_path(bundle)
    report["longest_relative_path"] = {"chars": length, "path": path}
    if not IS_WIN:
        return
    names = {f.lower() for _r, _d, files in os.walk(bundle) for f in files}
    missing = [d for d in VC_RUNTIME if d not in names]
    report["vc_runtime_missing"] = missing
    if missing:
        log(f"WARNING: {', '.join(missing)} not in the bundle: users need the Microsoft VC++ redistributable")
    if length > 200:  # leaves ~60 characters for the install folder under MAX_PATH (260)
        log(f"WARNING: the longest path in the bundle is {length} characters ({path}); install it into a "
            "short folder or enable long paths (LongPathsEnabled)")


def clean_env() -> dict[str, str]:
    """What a user's shell would have: no venv, no PYTHONPATH, the system PATH only."""
    keep = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "WINDIR", "USERPROFILE",
            "APPDATA", "LOCALAPPDATA", "DISPLAY", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = os.pathsep.join([r"C:\Windows\System32", r"C:\Windows"] if IS_WIN else ["/usr/bin", "/bin"])
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    return env


def source_imports(packages: tuple[str, ...] = ("cxrviewer", "training")) -> list[str]:
    """Every module the sources of ``packages`` are, and import at any level (lazy imports too).

    ``from X import Y`` gives X and X.Y (Y may be a submodule); relative imports are the
    packages' own modules, which are listed anyway.
    """
    names: set[str] = set()
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            names.add(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"))
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module)
                    names.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return sorted(n for n in names if n.split(".")[0] != "__future__")


def import_check(py: Path, bundle: Path, td: Path, report: dict) -> int:
    """Every module the sources import: imported by the build venv, and by the frozen app.

    A module the build venv imports and the bundle does not was left out (an exclusion in the
    spec went too far): the build fails. Modules that fail in both (optional libraries not
    installed, ``from X import function``) are not counted.
    """
    names = source_imports()
    listing = td / "imports.json"
    listing.write_text(json.dumps(names), encoding="utf-8")
    results = {}
    for label, cmd, env in (
            ("unfrozen", [str(py), str(REPO / "packaging" / "entry.py")],
             {**os.environ, "PYTHONPATH": str(REPO), "QT_QPA_PLATFORM": "offscreen"}),
            ("frozen", [str(exe_path(bundle))], {**clean_env(), "QT_QPA_PLATFORM": "offscreen"})):
        out = td / f"imports-{label}.json"
        env["CXRVIEWER_IMPORT_CHECK"] = f"{listing}:{out}"
        proc = subprocess.run(cmd, cwd=td, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.is_file():
            log(f"import check ({label}) failed to run: {proc.stderr[-3000:]}")
            return proc.returncode or 1
        results[label] = json.loads(out.read_text(encoding="utf-8"))
    ok = [n for n in names if results["unfrozen"].get(n) is None]
    lost = {n: results["frozen"].get(n, "not run") for n in ok if results["frozen"].get(n, "not run") is not None}
    report["import_check"] = {"modules_listed": len(names), "importable_unfrozen": len(ok),
                              "importable_frozen": len(ok) - len(lost), "missing_from_bundle": lost}
    if lost:
        log(f"import check FAILED: {len(lost)} modules import in the build venv but not in the bundle: "
            + ", ".join(sorted(lost)[:30]))
        return 1
    log(f"import check: all {len(ok)} modules the sources import (of {len(names)} listed) import frozen")
    return 0


def exe_path(bundle: Path) -> Path:
    return bundle / ("cxrviewer-cli.exe" if IS_WIN else "cxrviewer")


def smoke(bundle: Path, report: dict, py: Path) -> int:
    """Start-up time, the self-test and the import check of the frozen app, outside the source tree."""
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
            return out.returncode
        log(f"self-test passed in {report['selftest_wall_s']} s")
        return import_check(py, bundle, Path(td), report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--venv", default=None, help="build venv (default build/venv-VARIANT)")
    p.add_argument("--reuse-venv", default=None, metavar="DEV_VENV",
                   help="let the build venv see this venv's packages (.pth) instead of installing them")
    p.add_argument("--recreate-venv", action="store_true", help="make the build venv again")
    p.add_argument("--torch", default=None,
                   help="torch requirement instead of the lock's (not the tested stack; recorded in the report)")
    p.add_argument("--torchvision", default=None, help="torchvision requirement instead of the lock's")
    p.add_argument("--allow-fallback", action="store_true",
                   help="when the locked torch's +cpu wheel cannot be had, build with the lock's cpu-fallback "
                        "pair (not the tested stack; recorded in the report)")
    p.add_argument("--no-torch-index", action="store_true",
                   help=f"do not add {TORCH_CPU_INDEX} for the cpu variant's +cpu wheels (Linux)")
    p.add_argument("--pip-arg", action="append", default=[], help="extra pip argument (repeatable)")
    p.add_argument("--dist", default=None, help="output folder (default dist/VARIANT)")
    p.add_argument("--clean", action="store_true", help="empty PyInstaller's cache first")
    p.add_argument("--skip-selftest", action="store_true")
    p.add_argument("--skip-licences", action="store_true")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    report: dict = {"variant": args.variant, "platform": platform.platform(), "python": platform.python_version(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    py, source = ensure_venv(args)
    report["torch"] = check_variant(py, args.variant)
    report["torch_pair"] = source
    report["build_python"] = str(py)
    report["installed"] = installed_versions(py)
    pair = read_fallback() if source == "fallback" else []
    if source != "option":
        bad = lock_mismatches(report["installed"], read_lock(), pair)
        if bad:
            raise SystemExit("the build venv is not the locked stack: " + "; ".join(bad))
    log("stack: " + ", ".join(f"{n} {report['installed'].get(n)}" for n in
                              ("torch", "torchvision", "pyside6-essentials", "numpy", "pydicom", "highdicom")))
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
    report["components_bytes"] = component_sizes(bundle)
    windows_checks(bundle, report)
    log(f"bundle {bundle}: {report['bundle_bytes'] / 2**20:.0f} MiB in {report['bundle_files']} files; largest: "
        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in list(report["components_bytes"].items())[:6]))

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
        rc = smoke(bundle, report, py)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = rc == 0
    (dist / "build-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"report: {dist / 'build-report.json'} ({'ok' if rc == 0 else 'FAILED'})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
