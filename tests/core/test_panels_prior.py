"""Panel captions "below the location prior", the prior's reference boxes, the alignment note and
caption wrapping, in core/panels.py and in panels.png (core/render.py). No Qt, no networks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_bundles import synthetic_study  # noqa: E402

from cxrviewer.core.geometry import Box  # noqa: E402
from cxrviewer.core.model_card import BELOW_PRIOR  # noqa: E402
from cxrviewer.core.panels import (alignment_note, below_prior_by_role, class_panel, panel_data,  # noqa: E402
                                   prior_boxes, split_below_prior, wrap_caption)
from cxrviewer.core.render import _font, _text_width, _tile, panel_tiles, render_panels  # noqa: E402
from cxrviewer.core.results import Results  # noqa: E402

CLASSES = ("Atelectasis", "Nodule", "Pneumothorax")
CARD = {"localisation": {"per_class": {"Pneumothorax": {"method": 0.10, "prior": 0.30, "n": 12},
                                       "Nodule": {"method": 0.40, "prior": 0.20, "n": 9}}}}


def _results(models: dict | None = None) -> Results:
    rng = np.random.default_rng(0)
    r = Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(300, 260), map_shape=(60, 52),
                classes=CLASSES, probabilities=np.array([0.2, 0.5, 0.9], np.float32),
                maps={"cam": {"cam": rng.normal(size=(3, 60, 52)).astype(np.float32)},
                      "gradcam": {"gradcam": rng.normal(size=(3, 60, 52)).astype(np.float32)},
                      "alignment": {"aligned_image": rng.random((60, 52)).astype(np.float32)}})
    r.models = models if models is not None else {"classifier": {"name": "msa", "bundle": "clf.cxrbundle"},
                                                  "alignment": {"name": "align", "bundle": "al.cxrbundle"}}
    return r


def test_caption_says_below_the_prior_for_the_card_classes_of_the_producing_model():
    r = _results()
    manifests = {"clf.cxrbundle": {"model_card": CARD}}
    below = below_prior_by_role(r, manifests)
    assert below == {"classifier": frozenset({"Pneumothorax"})}
    cam = panel_data("original", r, 2, below)
    assert cam.caption.endswith(f"· {BELOW_PRIOR}") and cam.below_prior and "Pneumothorax" in cam.caption
    assert BELOW_PRIOR in panel_data("gradcam", r, 2, below).caption
    assert BELOW_PRIOR not in panel_data("original", r, 1, below).caption  # Nodule beat the prior
    assert BELOW_PRIOR not in panel_data("aligned", r, 2, below).caption  # an image, not a class map
    assert BELOW_PRIOR not in panel_data("original", r, 2).caption  # no card anywhere
    assert BELOW_PRIOR not in panel_data("original", r, 2, {"cia": {"Pneumothorax"}}).caption  # another model's
    assert class_panel("original") and class_panel("contrast") and not class_panel("normal")


def test_caption_reads_the_card_carried_by_the_results_summary():
    r = _results({"classifier": {"name": "msa", "model_card": CARD}})
    assert BELOW_PRIOR in panel_data("original", r, 2).caption
    r = _results({"classifier": {"name": "msa", "below_prior": ["Nodule"]}})
    assert BELOW_PRIOR in panel_data("original", r, 1).caption
    assert BELOW_PRIOR not in panel_data("original", r, 2).caption


def test_panels_png_tile_caption_says_below_the_prior_and_wraps_within_the_tile():
    r = _results({"classifier": {"name": "msa", "model_card": CARD}})
    caps = {cap[0].split(" ")[0]: cap[0] for _rgb, cap in panel_tiles(synthetic_study(), r, class_index=2)}
    assert BELOW_PRIOR in caps["CAM"] and BELOW_PRIOR in caps["Grad-CAM"] and BELOW_PRIOR not in caps["Aligned"]
    plain = render_panels(synthetic_study(), r, class_index=1, tile=128)
    marked = render_panels(synthetic_study(), r, class_index=2, tile=128)
    assert marked.height > plain.height  # the mark gets lines of its own under the tile
    font = _font(10)
    grey = np.full((64, 64, 3), 128, np.uint8)

    def amber(caption: str) -> int:  # caption pixels (under the 128 px picture) in the warning colour
        band = np.asarray(_tile(grey, [caption, "msa"], 128, font), np.int16)[128:]
        return int(((band[..., 0] > 150) & (band[..., 0] - band[..., 2] > 60)).sum())

    assert amber(caps["CAM"]) > 20 and amber(caps["CAM"].split(f" · {BELOW_PRIOR}")[0]) == 0
    lines = wrap_caption(caps["CAM"], lambda t: _text_width(font, t) <= 120)
    assert len(lines) > 1 and all(_text_width(font, t) <= 120 for t in lines)
    assert " ".join(lines).replace("  ", " ") == caps["CAM"]  # nothing lost, nothing truncated


def test_wrap_caption_breaks_at_parts_then_words_and_elides_only_a_word_too_long():
    text = f"AM final H_f · Pneumothorax p=0.87 · {BELOW_PRIOR}"
    assert wrap_caption(text, lambda t: len(t) <= 80) == [text]
    assert wrap_caption(text, lambda t: len(t) <= 34) == ["AM final H_f · Pneumothorax p=0.87", f"· {BELOW_PRIOR}"]
    assert wrap_caption("Supercalifragilistic x", lambda t: len(t) <= 8) == ["Superca…", "x"]
    assert split_below_prior(text) == ("AM final H_f · Pneumothorax p=0.87", f"· {BELOW_PRIOR}")
    assert split_below_prior("CAM") == ("CAM", "")


def test_prior_boxes_from_results_boxes_or_attributes():
    r = _results()
    assert prior_boxes(r, ["Nodule"]) == () and prior_boxes(None, ["Nodule"]) == ()
    r.attrs["prior"] = {"boxes": {"Nodule": [0.1, 0.2, 0.5, 0.25]}}
    assert prior_boxes(r, ["Nodule"]) == (Box("Nodule", 26.0, 60.0, 130.0, 75.0, None),)
    r.boxes["prior"] = [Box("Nodule", 1, 2, 3, 4, None), Box("Mass", 5, 6, 7, 8, None)]
    assert prior_boxes(r, ["Nodule"]) == (Box("Nodule", 1, 2, 3, 4, None),)
    assert prior_boxes(r, []) == ()


def test_alignment_note_rejected_accepted_unchecked():
    r = _results()
    assert alignment_note(r) is None and alignment_note(None) is None
    r.attrs["alignment"] = json.loads(json.dumps({"quality": 0.5512, "min_quality": 0.7, "rejected": True}))
    assert alignment_note(r) == ("Alignment rejected (NCC 0.55 < 0.70): maps on the unaligned image", True)
    r.attrs["alignment"] = {"quality": 0.91, "min_quality": 0.7, "rejected": False}
    assert alignment_note(r) == ("Aligned, NCC 0.91", False)
