"""Random-weight TINY bundles for pipeline/analyze tests (made with init-bundle's function)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrviewer.core.study import Study, StudyMeta
from cxrviewer.selftest import TINY_BUNDLES

#: role -> (architecture, kwargs) of a tiny, fast network: the self-test's, plus a DM (this order
#: of the roles is the order of their seeds in make_tiny_bundles)
TINY = {role: TINY_BUNDLES.get(role, ("dm", {"backbone": "tiny", "mask_size": 8}))
        for role in ("alignment", "segmentation", "classifier", "dm", "cia")}


def make_tiny_bundles(folder: Path, roles=tuple(TINY), *, input_size: int = 128, overrides=None) -> dict[str, Path]:
    from training.commands.init_bundle import init_bundle

    spec = dict(TINY)
    spec.update(overrides or {})
    return {r: init_bundle(spec[r][0], Path(folder) / r, kwargs=spec[r][1], input_size=input_size,
                           bank_size=8, seed=i, canonical=False)
            for i, r in enumerate(roles)}


def synthetic_study(h: int = 300, w: int = 260, seed: int = 0) -> Study:
    """A non-square chest-like image as a Study (no file needed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.6 - 0.35 * (((xx - w * 0.32) / (w * 0.15)) ** 2 + ((yy - h * 0.45) / (h * 0.3)) ** 2 < 1)
    img = img - 0.35 * (((xx - w * 0.68) / (w * 0.15)) ** 2 + ((yy - h * 0.45) / (h * 0.3)) ** 2 < 1)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
    stored = (img * 4095).astype(np.uint16)
    return Study(stored=stored, modality=stored.astype(np.float32), model_input=img,
                 window=(2048.0, 4096.0), invert_display=False,
                 meta=StudyMeta(source_path="synthetic", format="png"), study_id=f"synthetic-{seed}")
