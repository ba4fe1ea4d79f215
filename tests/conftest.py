"""Shared test set-up: offscreen Qt, isolated settings, paths to ../shared data."""
from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

#: Every test runs torch on this many intra-op threads and one inter-op thread, whatever the
#: machine's core count and whatever an earlier test left behind (the GUI's ``reserve_gui_core()``
#: lowers the count on a 2-core machine, benchmarks set their own). Float sums, and so the weights
#: a training run reaches, depend on the thread count; one thread also never stalls in an OpenMP
#: barrier on a loaded machine. The learning tests' margins were measured at 1 and 2 threads
#: (``python -m tests.training.margins``).
TORCH_THREADS = 1
#: Every test starts from these global seeds (random, numpy, torch), so its draws do not depend
#: on which tests ran before it.
TEST_SEED = 0

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Subprocesses (cxr-train, torchrun, the self-test) get the same thread count (before torch loads).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(TORCH_THREADS)
# cuBLAS needs this before CUDA starts for deterministic matmuls (only matters on a GPU machine).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Settings (QSettings, model folders) never touch the user's home during tests.
_SETTINGS_DIR = tempfile.mkdtemp(prefix="cxrviewer-test-settings-")
atexit.register(shutil.rmtree, _SETTINGS_DIR, ignore_errors=True)  # not left behind in the temp folder
os.environ.setdefault("CXRVIEWER_CONFIG_DIR", _SETTINGS_DIR)
os.environ.setdefault("XDG_CONFIG_HOME", _SETTINGS_DIR)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The ``../shared`` folder beside the checkout (override with CXR_SHARED)."""
    return Path(os.environ.get("CXR_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if not (d / "data").is_dir():
        pytest.skip("../shared data is absent (a user's checkout has none)")
    return d


@pytest.fixture(scope="session")
def nih_dir(shared: Path) -> Path:
    d = shared / "data" / "nih"
    if not (d / "images").is_dir():
        pytest.skip("../shared/data/nih is absent")
    return d


@pytest.fixture(scope="session")
def jsrt_dir(shared: Path) -> Path:
    d = shared / "data" / "jsrt"
    if not (d / "images").is_dir():
        pytest.skip("../shared/data/jsrt is absent")
    return d


def _pydicom_data(name: str) -> Path:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom not installed")
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"{name} not available (install the test extras: pydicom-data)")
    return Path(p)


@pytest.fixture(scope="session")
def rg1_uncr() -> Path:
    return _pydicom_data("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def rg1_j2kr() -> Path:
    return _pydicom_data("RG1_J2KR.dcm")


@pytest.fixture(scope="session")
def rg1_j2ki() -> Path:
    return _pydicom_data("RG1_J2KI.dcm")


# ---- determinism (TORCH_THREADS, TEST_SEED above) ----------------------------------------------
def _pin_torch() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN-filling of every torch.empty


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    try:
        torch.set_num_interop_threads(1)  # only possible before the first parallel work
    except RuntimeError:  # pragma: no cover - already started (e.g. pytest re-entered)
        pass
    _pin_torch()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the item's fixtures (module-scoped training fixtures included): fixed threads, seeds."""
    _pin_torch()
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(TEST_SEED)
