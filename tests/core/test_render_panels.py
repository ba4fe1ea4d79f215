"""panels.png (issue 14): a colour bar per map tile (quantity, raw range, the viewer's colour map),
the radiograph -- not the colour map's lowest colour -- outside the warped map, and the study's
file name as title. No Qt, no networks."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_bundles import synthetic_study  # noqa: E402

from cxrviewer.core.render import (BAR_H, DEFAULT_COLORMAP, _fit, _font, _tile, colormap, gray_rgb,  # noqa: E402
                                   render_panels, scaled_tiles, study_title)
from cxrviewer.core.results import Results  # noqa: E402

CLASSES = ("Atelectasis", "Nodule", "Pneumothorax")


def _study():
    s = synthetic_study()
    return dataclasses.replace(s, meta=dataclasses.replace(s.meta, source_path="/data/nih/00002578_000.png"))


def _results() -> Results:
    rng = np.random.default_rng(0)
    valid = np.zeros((60, 52), bool)
    valid[:, :30] = True  # the warped map lands on the left part only
    r = Results(study_id="b41ab04725f0575b", source_path="x", pixel_sha256="0" * 64, image_shape=(300, 260),
                map_shape=(60, 52), classes=CLASSES, probabilities=np.array([0.2, 0.5, 0.9], np.float32),
                maps={"cam": {"cam": rng.normal(size=(3, 60, 52)).astype(np.float32) + 5.0},
                      "gradcam": {"gradcam": rng.normal(size=(3, 60, 52)).astype(np.float32)},
                      "alignment": {"valid": valid}})
    r.models = {"classifier": {"name": "msa", "bundle": "clf.cxrbundle"}}
    return r


def test_every_map_tile_has_its_colour_bar_with_quantity_and_raw_range():
    r = _results()
    tiles = scaled_tiles(_study(), r, class_index=2)
    scales = {cap[0].split(" ")[0]: scale for _rgb, cap, scale in tiles}
    assert scales["Original"] is None
    label, lo, hi, cmap = scales["CAM"]
    cam = r.get("cam", "cam")[2][:, :30]
    assert label == "CAM/AM map" and cmap == DEFAULT_COLORMAP
    assert (lo, hi) == (float(cam.min()), float(cam.max()))  # the range drawn, inside the map
    assert scales["Grad-CAM"][0] == "Grad-CAM"


def test_tile_colour_bar_is_drawn_in_the_colour_map():
    font = _font(12)
    grey = np.full((64, 64, 3), 40, np.uint8)
    img = np.asarray(_tile(grey, ["CAM"], 128, font, ("CAM activation", 0.0, 1.0, "viridis")), np.int16)
    row = img[128 + BAR_H // 2 + 1]
    lut = colormap("viridis").astype(np.int16)
    for colour in (lut[5], lut[128], lut[250]):
        assert np.abs(row - colour).sum(axis=1).min() < 30
    plain = np.asarray(_tile(grey, ["CAM"], 128, font), np.int16)
    assert plain.shape[0] < img.shape[0]  # no bar without a map


def test_outside_the_warped_map_shows_the_radiograph():
    study, r = _study(), _results()
    tiles = scaled_tiles(study, r, class_index=2)
    rgb = next(t for t, cap, _s in tiles if cap[0].startswith("CAM"))
    base = gray_rgb(_fit(np.asarray(study.display_image(), np.float32), r.map_shape))
    assert np.array_equal(rgb[:, 31:], base[:, 31:])  # outside: the radiograph, untouched
    assert not np.array_equal(rgb[:, :29], base[:, :29])  # inside: the map


def test_title_is_the_file_name_not_the_pixel_hash():
    study, r = _study(), _results()
    assert study_title(study, r) == "00002578_000.png"
    tiles = scaled_tiles(study, r, class_index=2)
    assert tiles[0][1] == ["Original", "00002578_000.png"]
    a = np.asarray(render_panels(study, r, tile=128))
    b = np.asarray(render_panels(study, r, tile=128, title="another name.dcm"))
    assert a.shape[1] == b.shape[1] and not np.array_equal(a[:20], b[:20])
    no_path = dataclasses.replace(study, meta=dataclasses.replace(study.meta, source_path=""))
    assert study_title(no_path, r) == "b41ab04725f0575b"


def test_disease_mask_caption_says_source_and_coverage():
    from cxrviewer.core.panels import panel_data, panel_ref

    r = _results()
    psi = np.zeros((3, 60, 52), np.float32)
    psi[1, :, :26] = 1.0  # Nodule: half the map (both lungs of a pseudo mask read "everywhere")
    name = panel_ref("disease_mask").explainer.name
    r.maps[name] = {"psi": psi}
    r.attrs[name] = {"source": "pdm"}
    d = panel_data("disease_mask", r, 1)
    assert d.filled and "not a finding" in d.caption and "ψ≥0.5 on 50% of the map" in d.caption
    r.attrs[name] = {"source": "dm"}
    assert "from the DM model" in panel_data("disease_mask", r, 1).caption
    assert "ψ≥0.5" not in panel_data("original", r, 1).caption
