"""``cxrviewer --self-test``: prove that an installed or frozen cxrviewer works, in one command.

    cxrviewer --self-test [--models DIR | --tiny] [--json-out FILE] [--no-gui]

Checks, in this order (each timed; any failure makes the exit status 1):

``environment``      versions of every component, frozen or not, the torch device
``decoder_plugins``  pydicom finds the expected decoder plugin for each compressed
                     transfer syntax (pylibjpeg's come through entry points, so a
                     frozen app without the packages' metadata fails here)
``decode:<file>``    each DICOM in ``resources/selftest/`` (one per compressed
                     transfer syntax) through :func:`cxrviewer.core.io.load_study`,
                     i.e. in the spawned decoder child; lossless files must match
                     the reference pixels bit for bit, lossy ones within a bound
``pipeline``         :class:`cxrviewer.core.pipeline.Pipeline` once on a demo study
                     with the bundles of ``resources/models`` (or, when there are
                     none or ``--tiny`` is given, tiny random bundles written to a
                     temporary folder by :func:`make_tiny_bundles`, core code only)
``annotations``      a box saved in a temporary :class:`AnnotationStore`, the store
                     closed, reopened and the box read back
``qt``               a Qt application on the offscreen platform renders a decoded
                     study with pyqtgraph; the main window is built and shown
                     (skipped with ``--no-gui``)

torch is imported before Qt (Windows needs that order: torch's DLLs first).
The report is JSON on stdout (and in ``--json-out``, which a windowed Windows
build needs because it has no stdout). Settings and caches go to a temporary
folder, never to the user's. The verdict and each failed check's error also go
to the user's rotating ``cxrviewer.log`` (:mod:`cxrviewer.core.logfile`; its
path is ``log_file`` in the report), where a windowed build's user finds them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .core.logfile import LogFile, install_log_file

log = logging.getLogger("cxrviewer.selftest")

#: Expected first decoder plugin per transfer syntax family (what dicom.py prefers).
EXPECTED_PLUGIN = {
    "1.2.840.10008.1.2.5": "pydicom",          # RLE Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg",     # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg",     # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg",    # HTJ2K lossless (no sample file; plugin only)
    "1.2.840.10008.1.2.4.50": "gdcm",          # JPEG baseline 8-bit
    "1.2.840.10008.1.2.4.57": "gdcm",          # JPEG lossless process 14
    "1.2.840.10008.1.2.4.70": "gdcm",          # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "gdcm",          # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "gdcm",          # JPEG-LS near-lossless
}

#: Tiny random bundles (role -> architecture, kwargs) used when no real bundle exists.
TINY_BUNDLES = {
    "alignment": ("alignment", {"backbone": "tiny"}),
    "segmentation": ("unet", {"width": 4, "depth": 3}),
    "classifier": ("msa", {"backbone": "tiny"}),
    "cia": ("cia", {"backbone": "tiny", "head_channels": 16}),
}

_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg",
                  "python-gdcm", "PySide6-Essentials", "shiboken6", "pyqtgraph", "Pillow", "scipy",
                  "scikit-image", "h5py")


def resource_root() -> Path:
    """``resources/`` of the frozen app (``sys._MEIPASS``) or of the checkout."""
    base = getattr(sys, "_MEIPASS", None)
    if base:
        return Path(base) / "resources"
    return Path(__file__).resolve().parents[1] / "resources"


def _process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): cold start of the app."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        try:
            detail = fn() or {}
            entry["ok"] = True
            entry.update(detail)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none escapes
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=8)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        self.checks.append(entry)
        return bool(entry["ok"])

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)


# --------------------------------------------------------------------------- checks
def check_environment() -> dict[str, Any]:
    """Versions of the components and the device the pipeline will use."""
    from importlib import metadata

    import torch  # before Qt, on purpose

    from . import __version__
    from .core.device import select_device

    versions: dict[str, str | None] = {"cxrviewer": __version__, "python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    dev = select_device("auto")
    info: dict[str, Any] = {
        "versions": versions,
        "torch_version": torch.__version__,
        "frozen": bool(getattr(sys, "frozen", False)),
        "executable": sys.executable,
        "platform": platform.platform(),
        "device": str(dev),
        "cuda_available": bool(torch.cuda.is_available()),
        "torch_cuda": torch.version.cuda,
        "resources": str(resource_root()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    missing = [d for d in ("torch", "numpy", "pydicom", "pylibjpeg-openjpeg", "python-gdcm") if versions[d] is None]
    if missing:
        raise RuntimeError(f"package metadata not found for {missing} (missing copy_metadata in the build?)")
    return info


def check_decoder_plugins() -> dict[str, Any]:
    """Every supported compressed transfer syntax has its preferred plugin available."""
    from pydicom.pixels import get_decoder

    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for uid, want in EXPECTED_PLUGIN.items():
        dec = get_decoder(uid)
        found[uid] = list(dec.available_plugins)
        if want not in found[uid]:
            missing.append(f"{uid} ({dec.UID.name}): {want} not available; "
                           f"missing: {'; '.join(dec.missing_dependencies) or '-'}")
    if missing:
        raise RuntimeError("decoder plugins missing: " + " | ".join(missing))
    return {"available": found}


def _selftest_manifest() -> tuple[Path, dict[str, Any]]:
    folder = resource_root() / "selftest"
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} is missing (resources/selftest not bundled?)")
    return folder, json.loads(mpath.read_text(encoding="utf-8"))


def _reference(folder: Path, manifest: dict[str, Any], bits: int):
    import numpy as np

    from .core.io import load_study

    ref = load_study(folder / manifest["reference_file"]).stored.astype(np.float64)
    if bits == 8:
        lo, hi = manifest["window_8bit"]
        ref = np.clip((ref - lo) / (hi - lo) * 255.0, 0, 255).round()
    return ref


def decode_check(folder: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A check decoding one self-test file through ``load_study`` (the decoder child)."""

    def run() -> dict[str, Any]:
        import numpy as np

        from .core.io import load_study

        study = load_study(folder / entry["file"], timeout=60.0)
        arr = np.ascontiguousarray(study.stored)
        shape = (int(manifest["rows"]), int(manifest["columns"]))
        if arr.shape != shape:
            raise RuntimeError(f"decoded shape {arr.shape}, expected {shape}")
        if arr.dtype.itemsize * 8 != int(entry["bits_allocated"]):
            raise RuntimeError(f"decoded dtype {arr.dtype}, expected {entry['bits_allocated']}-bit")
        out = {"transfer_syntax": entry["transfer_syntax"], "ts_name": entry["name"],
               "file": entry["file"], "lossless": bool(entry["lossless"])}
        if entry["lossless"]:
            digest = hashlib.sha256(arr.tobytes()).hexdigest()
            if digest != entry["pixels_sha256"]:
                raise RuntimeError("lossless decode differs from the reference pixels")
            out["max_abs_error"] = 0
        else:
            err = float(np.abs(arr.astype(np.float64) - _reference(folder, manifest, int(entry["bits_allocated"]))).max())
            out["max_abs_error"] = err
            if err > float(entry["max_abs_error"]):
                raise RuntimeError(f"lossy decode error {err} exceeds {entry['max_abs_error']}")
        if study.meta.transfer_syntax != entry["transfer_syntax"]:
            raise RuntimeError(f"transfer syntax read as {study.meta.transfer_syntax}")
        return out

    return run


def _demo_study_path(selftest_folder: Path, manifest: dict[str, Any]) -> Path:
    """First study of ``resources/demo`` if there is one, else the self-test RLE file."""
    demo = resource_root() / "demo"
    if demo.is_dir():
        from .core.io import open_worklist

        wl = open_worklist([demo])
        if wl.refs:
            return Path(wl.refs[0].path)
    return selftest_folder / manifest["reference_file"]


def _tiny_normal_bank(study_path: Path, size: int, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """CIA normal bank of ``n`` noisy copies of ``study_path`` at ``size``: (extras, extras_info)."""
    import numpy as np
    import torch

    from .core.io import load_study
    from .core.models.cia import hash_codes
    from .core.preprocess import as_image_tensor, resize

    base = resize(as_image_tensor(load_study(study_path).model_input).clamp(0, 1), (size, size))[0, 0]
    noise = torch.Generator().manual_seed(0)
    bank = (base + 0.02 * torch.randn((n, size, size), generator=noise)).clamp(0, 1)
    images = (bank * 255 + 0.5).to(torch.uint8)
    codes = hash_codes(images[:, None].float() / 255.0).numpy().astype(np.float32)
    extras = {"normal_bank_images": images.numpy(), "normal_bank_codes": codes,
              "normal_bank_ids": np.asarray([f"selftest_{i:03d}" for i in range(n)], dtype=str)}
    info = {"normal_bank": {"synthetic": True, "source": f"{study_path.name} + noise (self-test)", "count": n}}
    return extras, info


def make_tiny_bundles(folder: Path, study_path: Path, *, input_size: int = 128, bank_size: int = 4) -> Path:
    """Random-weight tiny bundles for every role in ``folder`` (returns ``folder``).

    Built with the core's registry and bundle writer only; the CIA bank is made of
    noisy copies of ``study_path`` (marked ``synthetic``).
    """
    import torch

    from .core.bundle import save_bundle
    from .core.classes import CLASSES
    from .core.models import SEGMENTATION_CLASSES, create_model

    for seed, (role, (arch, kwargs)) in enumerate(TINY_BUNDLES.items()):
        torch.manual_seed(seed)
        model = create_model(arch, **kwargs)
        classes: tuple[str, ...] = {"alignment": (), "segmentation": tuple(SEGMENTATION_CLASSES)}.get(
            model.family, tuple(CLASSES))
        extras, extras_info = (_tiny_normal_bank(study_path, input_size, bank_size)
                               if model.family == "cia" else (None, None))
        save_bundle(model, folder / f"{role}.cxrbundle", classes=classes, input_size=input_size,
                    normalisation={"kind": "minus1_1"}, name=f"selftest-{role}",
                    description=f"untrained {model.arch} (self-test)", extras=extras, extras_info=extras_info,
                    provenance={"command": "cxrviewer --self-test", "seed": seed, "trained": False,
                                "research_demo": True, "epochs": 0,
                                "licence_notes": "random weights, no training data; self-test only"})
    return folder


def pipeline_check(models: Path | None, tiny: bool, tmp: Path, study_path: Path) -> Callable[[], dict[str, Any]]:
    """Run the pipeline once on ``study_path``."""

    def run() -> dict[str, Any]:
        import numpy as np

        from .core.bundle import default_models_dir, find_bundles
        from .core.io import load_study
        from .core.pipeline import Pipeline

        folder = models if models is not None else default_models_dir()
        source = "resources" if models is None else "given"
        if tiny or not find_bundles(folder):
            folder = make_tiny_bundles(tmp / "tiny-models", study_path)
            source = "tiny-random"
        t0 = time.perf_counter()
        pipe = Pipeline.from_dirs(folder, "auto", map_max_side=128, am_top_k=1)
        t_load = time.perf_counter() - t0
        study = load_study(study_path)
        t1 = time.perf_counter()
        res = pipe.run(study)
        t_run = time.perf_counter() - t1

        def finite(arr: Any) -> bool:
            return arr is not None and bool(np.all(np.isfinite(np.asarray(arr, dtype=np.float64))))

        # Every method the loaded roles require must have produced finite maps, or said in a notice
        # why this study gave it nothing (e.g. the anatomy method when the tiny U-Net finds no lungs).
        def said(e: Any) -> bool:
            return any(n.lower().startswith(e.title.lower()) for n in res.notices)

        missing = [e.name for e in pipe.explainers if e.requires and e.name not in res.maps and not said(e)]
        missing += [f"{e}: {k}" for e, maps in res.maps.items() for k, v in maps.items()
                    if not all(finite(a) for a in (v.values() if isinstance(v, dict) else [v]))]
        if "classifier" in pipe.bundles and not finite(res.probabilities):
            missing.append("classifier: probabilities")
        if missing:
            raise RuntimeError("missing or non-finite pipeline outputs: " + ", ".join(missing))
        return {"models": source, "bundles": sorted(pipe.bundles), "device": str(pipe.device),
                "study": study_path.name, "classes": len(res.classes),
                "load_seconds": round(t_load, 3), "run_seconds": round(t_run, 3),
                "stages": {k: round(float(v), 4) for k, v in (res.timings or {}).items()}}

    return run


def annotations_check(tmp: Path, study_path: Path) -> Callable[[], dict[str, Any]]:
    """Save a box in a temporary store, close it, reopen it and read the box back."""

    def run() -> dict[str, Any]:
        from .core.annotations import SUFFIX, AnnotationStore
        from .core.io import load_study

        study = load_study(study_path)
        path = tmp / f"selftest{SUFFIX}"
        with AnnotationStore(path, annotator="selftest") as store:
            rec = store.register_study(study)
            store.add_box(rec.id, "Nodule", 10.0, 12.0, 30.0, 25.0)
            sid = rec.id
        with AnnotationStore(path, annotator="selftest", read_only=True) as store:
            boxes = store.boxes(sid)
            check = store.integrity_check()
        if len(boxes) != 1:
            raise RuntimeError(f"{len(boxes)} boxes read back, expected 1")
        b = boxes[0]
        if (b.label, round(b.x, 3), round(b.y, 3), round(b.w, 3), round(b.h, 3)) != ("Nodule", 10.0, 12.0, 30.0, 25.0):
            raise RuntimeError(f"box read back differs: {b}")
        if str(check).lower() != "ok":
            raise RuntimeError(f"integrity check: {check}")
        return {"store_bytes": path.stat().st_size, "box": [b.label, b.x, b.y, b.w, b.h]}

    return run


def qt_check(study_path: Path, models: Path | None, tmp: Path, gui: bool) -> Callable[[], dict[str, Any]]:
    """Offscreen Qt: render a study with pyqtgraph, then build and show the main window."""

    def run() -> dict[str, Any]:
        import numpy as np

        from .core.io import load_study

        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        import pyqtgraph as pg
        from PySide6 import __version__ as pyside_version
        from PySide6.QtWidgets import QApplication

        app = QApplication.instance() or QApplication(["cxrviewer-selftest"])
        platform_name = app.platformName()
        if platform_name != "offscreen":
            raise RuntimeError(f"Qt platform is {platform_name!r}, expected 'offscreen'")
        study = load_study(study_path)
        view = pg.GraphicsLayoutWidget()
        item = pg.ImageItem(np.asarray(study.model_input, dtype=np.float32).T)
        vb = view.addViewBox()
        vb.addItem(item)
        view.resize(200, 200)
        view.show()
        app.processEvents()
        img = view.grab().toImage()
        w, h = img.width(), img.height()
        samples = {img.pixel(x, y) for x in range(0, w, 7) for y in range(0, h, 7)}
        view.close()
        if len(samples) < 10:
            raise RuntimeError(f"rendered image is nearly uniform ({len(samples)} colours)")
        out: dict[str, Any] = {"platform": platform_name, "pyside6": pyside_version,
                               "pyqtgraph": pg.__version__, "render_colours": len(samples)}
        if gui:
            from .gui.main_window import MainWindow

            win = MainWindow(popup_errors=False, models_dir=str(models) if models else None,
                             cache_folder=str(tmp / "results-cache"))
            win.show()
            for _ in range(5):
                app.processEvents()
            out["main_window"] = win.windowTitle()
            win.close()
            win.deleteLater()
            app.processEvents()
        return out

    return run


# --------------------------------------------------------------------------- driver
def run_selftest(*, models: str | os.PathLike | None = None, tiny: bool = False,
                 gui: bool = True) -> dict[str, Any]:
    """Run every check and return the report (``report["ok"]`` is the verdict)."""
    started = time.perf_counter()
    age = _process_age()
    rep = _Report()
    models_path = Path(models) if models else None
    with tempfile.TemporaryDirectory(prefix="cxrviewer-selftest-") as td:
        tmp = Path(td)
        # Settings, caches and annotation data of this run stay in the temporary folder.
        saved_env = {var: os.environ.get(var) for var in ("CXRVIEWER_CONFIG_DIR", "CXRVIEWER_DATA_DIR")}
        for var in saved_env:
            os.environ[var] = str(tmp / "config")
        (tmp / "config").mkdir()
        env: dict[str, Any] = {}

        def environment() -> dict[str, Any]:
            env.update(check_environment())
            return {"frozen": env["frozen"], "device": env["device"]}

        rep.run("environment", environment)
        rep.run("decoder_plugins", check_decoder_plugins)
        try:
            folder, manifest = _selftest_manifest()
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            err = exc

            def missing_files() -> None:
                raise err

            rep.run("selftest_files", missing_files)
            folder, manifest = None, None
        study_path = None
        if manifest is not None:
            for entry in manifest["files"]:
                rep.run(f"decode:{entry['file']}", decode_check(folder, manifest, entry))
            study_path = _demo_study_path(folder, manifest)
            rep.run("pipeline", pipeline_check(models_path, tiny, tmp, study_path))
            rep.run("annotations", annotations_check(tmp, study_path))
            rep.run("qt", qt_check(study_path, models_path, tmp, gui))
        with contextlib.suppress(Exception):
            from .core.io.dicom import shutdown_decoder

            shutdown_decoder()
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return {
        "ok": rep.ok,
        "cxrviewer": env.get("versions", {}).get("cxrviewer"),
        "frozen": env.get("frozen", bool(getattr(sys, "frozen", False))),
        "executable": sys.executable,
        "platform": env.get("platform", platform.platform()),
        "device": env.get("device"),
        "cuda_available": env.get("cuda_available"),
        "torch_cuda": env.get("torch_cuda"),
        "versions": env.get("versions"),
        "process_age_at_start_s": age,
        "total_seconds": round(time.perf_counter() - started, 3),
        "failed": [c["name"] for c in rep.checks if not c["ok"]],
        "checks": rep.checks,
    }


def start_log() -> LogFile:
    """The user's rotating ``cxrviewer.log`` (before the run swaps the settings folders for
    temporary ones): a windowed build has no stderr, the log file is where the verdict stays.
    An unwritable folder is a warning, never a failure of the self-test."""
    logfile = install_log_file()
    if logfile.error:
        log.warning("no log file: %s", logfile.error)
    else:
        log.info("self-test started (%s, frozen=%s)", sys.executable, bool(getattr(sys, "frozen", False)))
    return logfile


def log_report(report: dict[str, Any]) -> None:
    """The verdict in the log: one line, then each failed check with its error."""
    if report["ok"]:
        log.info("self-test passed: %d checks in %.1f s", len(report["checks"]), report["total_seconds"])
        return
    log.error("self-test FAILED: %s", ", ".join(report["failed"]))
    for check in report["checks"]:
        if not check["ok"]:
            log.error("check %s failed: %s", check["name"], check.get("error", ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrviewer --self-test", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="folder of model bundles (default: resources/models; "
                   "tiny random bundles when it has none)")
    p.add_argument("--tiny", action="store_true", help="always use tiny random bundles (fast)")
    p.add_argument("--no-gui", action="store_true", help="skip building the main window")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    p.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI of the self-test; returns 0 when every check passed, 1 otherwise."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    console = logging.StreamHandler()  # warnings only on stderr (debug with -v), as before the log file
    console.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[console])
    logfile = start_log()
    report = run_selftest(models=args.models, tiny=args.tiny, gui=not args.no_gui)
    report["log_file"] = str(logfile.path) if logfile.path else None
    log_report(report)
    text = json.dumps(report, indent=2, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    if sys.stdout is not None:  # a windowed Windows build has no stdout
        print(text)
        sys.stdout.flush()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
