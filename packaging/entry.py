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
3. torchvision, made importable when its C++ operators are absent (below).
4. The ordinary command line, :func:`cxrviewer.__main__.main`.
"""
import multiprocessing
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
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


if __name__ == "__main__":
    multiprocessing.freeze_support()
    import torch  # before Qt, see above

    _import_torchvision(torch)

    from cxrviewer.__main__ import main

    sys.exit(main())
