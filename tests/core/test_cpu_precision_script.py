"""benchmarks/cpu_precision.py (channels-last and CPU bf16 against the float32 NCHW pipeline) at toy scale."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from _tiny_bundles import make_tiny_bundles

ROOT = Path(__file__).resolve().parents[2]


def test_the_layout_change_keeps_what_the_user_sees_and_bf16_is_measured(tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_precision

    make_tiny_bundles(tmp_path / "models", roles=("classifier", "segmentation"), input_size=64)
    rng = np.random.default_rng(0)
    studies = []
    for i in range(2):
        studies.append(tmp_path / f"s{i}.png")
        Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8)).save(studies[-1])
    rep = cpu_precision.measure(tmp_path / "models", studies)
    assert set(rep["median_s_per_study"]) == {"reference", "channels_last", "bf16"}
    cl, bf16 = rep["vs_reference"]["channels_last"], rep["vs_reference"]["bf16"]
    # the layout is not a change of arithmetic worth the name: probabilities to float rounding, same boxes
    assert cl["max_prob_diff"] < 1e-4
    assert all(s["median_iou"] == 1.0 for s in cl["best_box_per_class"].values()) and cl["best_box_per_class"]
    assert bf16["max_prob_diff"] > 0  # bf16 autocast really ran: it rounds
    assert {"cam", "gradcam", "attention_mining"} <= set(bf16["best_box_per_class"])
