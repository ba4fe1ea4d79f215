"""The canonical chest (CIA-Net M4): ``resources/canonical_chest.png`` and its ``.json`` record.

Written by ``cxr-train canonical`` (training/commands/canonical.py); the alignment
trainer, the CIA trainer (``--negatives canonical``) and ``init-bundle`` read it here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checksum import sha256_file


def default_canonical_path() -> Path:
    """``resources/canonical_chest.png`` of the checkout or the frozen app (may not exist)."""
    from .bundle import default_models_dir

    return default_models_dir().parent / "canonical_chest.png"


def canonical_ref(path: str | os.PathLike) -> dict[str, str]:
    """The manifest's ``canonical_chest`` reference to an image: file name + SHA-256."""
    return {"file": Path(path).name, "sha256": sha256_file(path)}


def load_canonical(path: str | os.PathLike | None = None, size: int | None = None, *,
                   antialias: bool = True) -> torch.Tensor:
    """The canonical chest as ``[1, 1, S, S]`` float32 in [0, 1].

    ``path`` defaults to :func:`default_canonical_path`; ``size`` None keeps the
    image's size, otherwise it is resized bilinearly, anti-aliased unless
    ``antialias=False`` (the CIA trainer's canonical negatives).
    """
    from PIL import Image

    with Image.open(path if path is not None else default_canonical_path()) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(a)[None, None]
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return t.clamp(0, 1)


def canonical_crop_box(path: str | os.PathLike) -> tuple[float, float, float, float] | None:
    """The lung-crop box ``(x0, y0, x1, y1)`` recorded beside the canonical PNG (``<name>.json``), if any."""
    meta = Path(path).with_suffix(".json")
    if meta.is_file():
        box = json.loads(meta.read_text(encoding="utf-8")).get("crop_box")
        if box and len(box) == 4:
            return tuple(float(v) for v in box)
    return None
