"""Files written through a temporary file get the user's normal permissions (issue 14, item 8)."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from cxrviewer.core.annotations.export import atomic_write
from cxrviewer.core.atomic import mkstemp_beside, normal_mode

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_mkstemp_beside_normal_mode(tmp_path, umask022) -> None:
    fd, tmp = mkstemp_beside(tmp_path / "out.png")
    os.close(fd)
    assert normal_mode() == 0o644
    assert _mode(tmp) == 0o644  # not mkstemp's 0600
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.png.")


def test_exports_and_results_have_normal_permissions(tmp_path, umask022) -> None:
    import numpy as np

    from cxrviewer.core.io.results import write_results
    from cxrviewer.core.results import Results

    atomic_write(tmp_path / "boxes.json", b"{}")
    assert _mode(tmp_path / "boxes.json") == 0o644
    res = Results(study_id="s", source_path="s.png", pixel_sha256="0" * 64, image_shape=(8, 8),
                  map_shape=(8, 8), classes=("A",), probabilities=np.array([0.5], np.float32))
    write_results(res, tmp_path / "results.h5")
    assert _mode(tmp_path / "results.h5") == 0o644


def test_saved_bundle_folder_has_normal_permissions(tmp_path, umask022) -> None:
    from cxrviewer.core.bundle import save_bundle
    from cxrviewer.core.classes import CLASSES
    from cxrviewer.core.models import create_model

    model = create_model("cam_classifier", backbone="tiny")
    out = save_bundle(model, tmp_path / "m.cxrbundle", classes=CLASSES, input_size=64)
    assert _mode(out) == 0o755  # not mkdtemp's 0700
    assert all(_mode(f) == 0o644 for f in out.iterdir())
