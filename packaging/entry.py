"""Frozen entry point of cxrviewer (PyInstaller runs this file as ``__main__``).

Order matters:

1. ``multiprocessing.freeze_support()`` first. The compressed-DICOM decoder runs
   in a ``spawn`` child (``cxrviewer/core/io/_decode_child.py``); in a frozen
   app, spawn re-executes this executable with ``--multiprocessing-fork``, and
   freeze_support turns that process into the child (and exits) before anything
   heavy is imported. PyInstaller's multiprocessing runtime hook makes this
   work on Linux and macOS as well as Windows, including the resource tracker.
2. ``import torch`` before anything imports Qt: on Windows, loading Qt's DLLs
   first can make torch's ``c10.dll``/OpenMP fail to initialise (WinError 1114).
3. torchvision, made importable when its C++ operators are absent (below): on
   Windows at once; elsewhere on its first import (:class:`_TorchvisionOnFirstImport`),
   because torchvision pulls in torch._dynamo and sympy (~1.4 s) and the main window
   needs only torch, so the window comes up that much sooner.
4. The ordinary command line, :func:`cxrviewer.__main__.main`; or, when the build
   sets ``CXRVIEWER_IMPORT_CHECK=LIST.json:OUT.json``, the import check (below).
"""
import json
import multiprocessing
import os
import sys


def _import_torchvision(torch) -> None:
    """Import torchvision; if its C++ ops library is missing, declare the two ops it fakes.

    A CPU bundle built on Linux from PyPI's torchvision wheel (a CUDA build) leaves
    out ``torchvision/_C.so``, which needs ``libtorch_cuda``. torchvision >= 0.2x
    then fails at import while registering fake kernels for ``torchvision::nms``
    and ``qnms``. Declaring those two schemas lets the pure-Python model zoo
    (ResNet/DenseNet backbones) import; the C++ ops (nms, roi_align) stay
    unavailable, and cxrviewer never calls them. A matching CPU torchvision wheel
    (download.pytorch.org/whl/cpu) imports at the first try and needs none of this.
    """
    try:
        __import__("torchvision")
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    __import__("torchvision")


class _TorchvisionOnFirstImport:
    """A ``sys.meta_path`` finder that runs :func:`_import_torchvision` on the first
    ``import torchvision`` (from any thread) and hands the module it made to the import."""

    def __init__(self, torch) -> None:
        self._torch = torch

    def find_spec(self, name, path=None, target=None):
        """None except for ``torchvision``: import it our way, return a spec for that module."""
        if name != "torchvision":
            return None
        import importlib.machinery

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _import_torchvision(self._torch)
        module = sys.modules["torchvision"]
        original = module.__spec__
        spec = importlib.machinery.ModuleSpec(name, self, origin=original.origin, is_package=True)
        spec.submodule_search_locations = original.submodule_search_locations
        spec.has_location = original.has_location
        return spec

    def create_module(self, spec):
        """The module :func:`_import_torchvision` already made."""
        return sys.modules["torchvision"]

    def exec_module(self, module) -> None:
        """Nothing: the module ran when it was made."""


def _import_check(spec: str) -> int:
    """Import every module named in LIST.json and write {module: error or null} to OUT.json.

    packaging/build.py lists every module the cxrviewer and training sources import (at any
    level, lazy imports included) and runs this once unfrozen (the build venv) and once
    frozen: a module that imports there but not here was left out of the bundle (an
    exclusion in the spec went too far).
    """
    import importlib

    src, out = spec.rsplit(":", 1)
    with open(src, encoding="utf-8") as fh:
        names = json.load(fh)
    errors = {}
    for name in names:
        try:
            importlib.import_module(name)
            errors[name] = None
        except BaseException as exc:  # noqa: BLE001 - SystemExit/ImportError/RuntimeError alike
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(errors, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    multiprocessing.freeze_support()
    import torch  # before Qt, see above

    if sys.platform == "win32":
        _import_torchvision(torch)
    else:
        sys.meta_path.insert(0, _TorchvisionOnFirstImport(torch))

    if os.environ.get("CXRVIEWER_IMPORT_CHECK"):
        sys.exit(_import_check(os.environ["CXRVIEWER_IMPORT_CHECK"]))
    from cxrviewer.__main__ import main

    sys.exit(main())
