"""The U-Net's run size: its trained size unless the manifest or the pipeline asks for another; a
U-Net is tied to the scale it was trained at (the shared-data test measures it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_bundles import make_tiny_bundles, synthetic_study
from cxrviewer.core.bundle import load_bundle
from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.segmentation import run_size
from cxrviewer.core.pipeline import Pipeline


def test_run_size_rules() -> None:
    assert run_size((512, 512)) == (512, 512)  # the trained size by default
    assert run_size((160, 160), {"upsample_to": 3}) == (160, 160)
    assert run_size((512, 384), option=256) == (256, 192)  # aspect kept
    assert run_size((512, 512), {"run_size": 256}) == (256, 256)  # a bundle validated at 256
    assert run_size((512, 512), {"run_size": 512}) == (512, 512)  # the manifest asks for more
    assert run_size((512, 512), {"run_size": 0}) == (512, 512)  # 0 = the trained size
    assert run_size((512, 512), {"run_size": 384}, option=128) == (128, 128)  # the option wins
    for bad in (-1, 8, 5000, 2.5, "256", True):
        with pytest.raises(ExplainError, match="run size"):
            run_size((512, 512), option=bad)


@pytest.fixture(scope="module")
def seg512(tmp_path_factory):
    torch.manual_seed(0)
    return make_tiny_bundles(tmp_path_factory.mktemp("seg"), ("segmentation",), input_size=512)["segmentation"]


def _run(b, **options):
    sizes: list[tuple[int, int]] = []
    h = b.model.register_forward_hook(lambda m, inp, out: sizes.append(tuple(inp[0].shape[-2:])))
    res = Pipeline({"segmentation": b}, "cpu", map_max_side=128, options=options).run(synthetic_study())
    h.remove()
    return res, sizes


def test_pipeline_runs_the_trained_size_unless_told(seg512) -> None:
    b = load_bundle(seg512)
    full, sizes = _run(b)
    assert sizes == [(512, 512)] and full.attr("segmentation", "run_size") == [512, 512]
    fast, sizes = _run(b, segmentation_size=256)
    assert sizes == [(256, 256)] and fast.attr("segmentation", "run_size") == [256, 256]
    m_fast, m_full = fast.get("segmentation", "masks"), full.get("segmentation", "masks")
    assert m_fast.shape == m_full.shape == (3, *fast.map_shape) and m_fast.dtype == np.uint8
    b.manifest.inference = {"run_size": 384}
    _, sizes = _run(b)
    assert sizes == [(384, 384)]


@pytest.mark.shared
def test_shipped_unet_needs_its_trained_scale_not_its_detail(jsrt_dir, tmp_path) -> None:
    """Held-out JSRT images with the shipped U-Net (trained at 160 px): 80 px of detail shown at the
    trained scale keeps the Dice of 160 px; running at 80 px (half the scale) loses the heart."""
    from pathlib import Path

    import torch.nn.functional as F

    from cxrviewer.core.preprocess import resize
    from training.data.segmentation import (PREPROCESS, SEG_CLASSES, load_jsrt_records, preprocess_input,
                                            read_gray01, read_mask, split_folds)

    bundle = Path(__file__).resolve().parents[2] / "resources" / "models" / "segmentation.cxrbundle"
    b = load_bundle(bundle)
    trained = b.manifest.input_size[0]
    assert trained == 160
    _, held = split_folds(load_jsrt_records(jsrt_dir), 0, 5, 0)
    half = trained // 2

    def dice(x: torch.Tensor, gts: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            lg = b.model(x)["logits"].float()
        p = (F.interpolate(lg, size=gts[0].shape, mode="bilinear", align_corners=False)[0] > 0).numpy()
        return np.array([2 * (p[i] & g).sum() / max(p[i].sum() + g.sum(), 1) for i, g in enumerate(gts)])

    native, detail, scaled = [], [], []
    for r in held[:6]:
        im = read_gray01(r.image)
        gts = [read_mask(r.masks[c])[::4, ::4] for c in SEG_CLASSES]  # 256 px masks: enough for Dice
        native.append(dice(preprocess_input(im, trained, PREPROCESS), gts))
        detail.append(dice(resize(preprocess_input(im, half, PREPROCESS), (trained, trained)), gts))
        scaled.append(dice(preprocess_input(im, half, PREPROCESS), gts))
    native, detail, scaled = (np.mean(v, axis=0) for v in (native, detail, scaled))
    assert native.min() > 0.9
    assert np.all(detail > native - 0.02)  # the detail of 80 px is enough
    assert scaled[2] < 0.5 < native[2]  # the heart is lost off the trained scale
