"""PNG/JPEG/TIFF loading through Pillow, including every NIH image in ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrviewer.core.io import load_study


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_png_8bit_values_and_window(tmp_path: Path) -> None:
    a = _gradient()
    Image.fromarray(a, mode="L").save(tmp_path / "a.png")
    s = load_study(tmp_path / "a.png")
    assert s.meta.format == "png" and s.meta.bits_stored == 8
    assert s.stored.dtype == np.uint8 and np.array_equal(s.stored, a)
    assert s.window == (127.5, 255.0) and not s.invert_display
    assert np.allclose(s.model_input, a / 255.0, atol=1e-6)


def test_png_16bit_keeps_values_and_uses_data_range(tmp_path: Path) -> None:
    a = (np.arange(50 * 30).reshape(50, 30) * 2 + 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "b.png")
    s = load_study(tmp_path / "b.png")
    assert s.stored.dtype == np.uint16 and np.array_equal(s.stored, a)
    c, w = s.window
    assert 1000 <= c - w / 2 < 1100 and 3800 < c + w / 2 <= 4000


def test_rgba_and_palette_become_grayscale(tmp_path: Path) -> None:
    g = _gradient()
    rgba = np.dstack([g, g, g, np.full_like(g, 128)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.png")
    s = load_study(tmp_path / "c.png")
    assert s.stored.ndim == 2 and np.array_equal(s.stored, g)
    assert any("RGBA" in w for w in s.meta.warnings)
    Image.fromarray(g, mode="L").convert("P").save(tmp_path / "p.png")
    s = load_study(tmp_path / "p.png")
    assert s.stored.ndim == 2 and s.stored.dtype == np.uint8


def test_jpeg_and_tiff(tmp_path: Path) -> None:
    g = _gradient()
    Image.fromarray(g).save(tmp_path / "d.jpg", quality=95)
    Image.fromarray(g).save(tmp_path / "e.tif")
    j = load_study(tmp_path / "d.jpg")
    t = load_study(tmp_path / "e.tif")
    assert j.meta.format == "jpeg" and t.meta.format == "tiff"
    assert np.array_equal(t.stored, g)
    assert float(np.abs(j.stored.astype(int) - g).mean()) < 8


def test_content_beats_extension(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "x.png")
    (tmp_path / "x.dcm").write_bytes((tmp_path / "x.png").read_bytes())
    assert load_study(tmp_path / "x.dcm").meta.format == "png"


def test_all_shared_nih_images_load(nih_dir: Path) -> None:
    """Every image of the shared NIH subset (1,222 jpg + 21 png originals) decodes to 2-D."""
    files = sorted((nih_dir / "images").iterdir())
    originals = nih_dir / "png-originals"
    if originals.is_dir():
        files += sorted(originals.iterdir())
    files = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert len(files) >= 1000
    rgba = 0
    for f in files:
        s = load_study(f)
        assert s.stored.ndim == 2 and s.stored.shape[0] >= 256, f
        assert s.model_input.dtype == np.float32
        rgba += any("RGBA" in w for w in s.meta.warnings)
    if originals.is_dir():
        assert rgba >= 1  # the shared png-originals include RGBA files; they came out 2-D
