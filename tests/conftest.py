"""Shared test set-up: offscreen Qt, isolated settings, paths to ../shared data."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Settings (QSettings, model folders) never touch the user's home during tests.
_SETTINGS_DIR = tempfile.mkdtemp(prefix="cxrviewer-test-settings-")
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


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """Keep torch to the CI machine's 2 cores and deterministic-ish."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
