"""JSRT + SCR data for the lung/heart U-Net (lung-heart-feature-weighting.txt Sec. 3.2).

Layout (``/work/shared/data/jsrt``; research and education use only)::

    images/<stem>.jpg                      1024 px, 8-bit, low contrast
    masks/{left_lung,right_lung,heart}/<stem>.png   binary 0/255

JSRT has one image per patient, so the 5-fold split is image-wise (seeded
permutation of the sorted stems; fold ``k`` = every ``n_folds``-th image).

**Preprocessing (identical at training and inference).** JSRT radiographs are
low contrast, so every image gets a per-image contrast normalisation:

1. read as grey levels in [0, 1] (``u8 / 255``);
2. resize to the network input size (bilinear, anti-aliased:
   :func:`cxrviewer.core.preprocess.resize`);
3. :func:`percentile_stretch`: ``(x - p1) / (p99 - p1)`` clipped to [0, 1], with
   the 1st and 99th percentiles of *that resized image*;
4. the manifest normalisation (``minus1_1``: ``2x - 1``).

The bundle records step 3 as ``provenance["preprocess"] = PREPROCESS`` so the
pipeline can apply it; :func:`seg_preprocess` is steps 2-4 as the core
:class:`~cxrviewer.core.preprocess.Preprocess` (:func:`preprocess_input` runs it).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxrviewer.core.preprocess import percentile_stretch  # noqa: F401  (re-exported: trainers use it)
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxrviewer.core.errors import CxrError
from cxrviewer.core.preprocess import Preprocess, stretch_bounds

log = logging.getLogger(__name__)

#: Output channels of the U-Net, in order (cxrviewer.core.models.unet.SEGMENTATION_CLASSES).
SEG_CLASSES: tuple[str, ...] = ("left_lung", "right_lung", "heart")
#: Per-image contrast normalisation recorded in the bundle manifest provenance.
PREPROCESS: dict = {"kind": "percentile_stretch", "low": 1.0, "high": 99.0,
                    "where": "after resizing to input_size, before normalisation"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: The U-Net's input range (``minus1_1``, as trainers/segment.py writes in the manifest).
_NETWORK = Preprocess()


@dataclass(frozen=True)
class SegRecord:
    """One JSRT image with its mask files (``masks[name] -> path``)."""

    stem: str
    image: Path
    masks: dict[str, Path] = field(default_factory=dict)


def load_jsrt_records(folder: str | Path, classes: Sequence[str] = SEG_CLASSES) -> list[SegRecord]:
    """Records of every image in ``folder/images`` that has all ``classes`` masks, sorted by stem."""
    root = Path(folder)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise CxrError(f"{root} is not a JSRT folder (no images/ sub-folder)")
    out: list[SegRecord] = []
    skipped = 0
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        masks = {c: root / "masks" / c / (p.stem + ".png") for c in classes}
        if all(m.is_file() for m in masks.values()):
            out.append(SegRecord(p.stem, p, masks))
        else:
            skipped += 1
    if skipped:
        log.warning("%d images of %s lack masks and were skipped", skipped, root)
    if not out:
        raise CxrError(f"no images with {list(classes)} masks in {root}")
    return out


def split_folds(records: Sequence[SegRecord], fold: int = 0, n_folds: int = 5,
                seed: int = 0) -> tuple[list[SegRecord], list[SegRecord]]:
    """(train, held-out) image-wise split: fold ``fold`` of a seeded permutation of the stems."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
    recs = sorted(records, key=lambda r: r.stem)
    perm = np.random.default_rng(seed).permutation(len(recs))
    held = set(int(i) for i in perm[fold::n_folds])
    return ([r for i, r in enumerate(recs) if i not in held], [r for i, r in enumerate(recs) if i in held])


# ---------------------------------------------------------------------------------------
def read_gray01(path: str | Path) -> np.ndarray:
    """Image file -> float32 [H, W] in [0, 1] (8 or 16 bit, RGB(A) converted to grey)."""
    from skimage import io

    a = io.imread(str(path))
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    if a.dtype == np.uint16:
        return (a.astype(np.float32) / 65535.0)
    a = a.astype(np.float32)
    return a / 255.0 if a.max() > 1.0 else a


def read_mask(path: str | Path) -> np.ndarray:
    """Binary mask file (0/255) -> bool [H, W]."""
    return read_gray01(path) > 0.5


def seg_preprocess(size: int | tuple[int, int], preprocess: dict | None = PREPROCESS) -> Preprocess:
    """Steps 2-4 of the module docstring for input ``size``; ``preprocess`` is the stretch spec."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(input_size=(int(hw[0]), int(hw[1])), normalisation=_NETWORK.normalisation,
                      stretch=stretch_bounds(preprocess))


def preprocess_input(image01: np.ndarray | torch.Tensor, size: int | tuple[int, int],
                     preprocess: dict | None = PREPROCESS) -> torch.Tensor:
    """Image in [0, 1] -> U-Net input ``[1, 1, S, S]`` in [-1, 1] (module docstring, steps 2-4)."""
    from cxrviewer.core.preprocess import as_image_tensor

    return seg_preprocess(size, preprocess)(as_image_tensor(image01))[0]


def load_arrays(records: Sequence[SegRecord], size: int,
                classes: Sequence[str] = SEG_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed inputs ``[N, 1, S, S]`` (in [-1, 1]) and soft masks ``[N, C, S, S]`` in [0, 1].

    Masks are resized with the same anti-aliased bilinear filter (area fractions).
    """
    from cxrviewer.core.preprocess import resize

    xs, ys = [], []
    for r in records:
        xs.append(preprocess_input(read_gray01(r.image), size)[0])
        m = torch.stack([torch.from_numpy(read_mask(r.masks[c]).astype(np.float32)) for c in classes])
        ys.append(resize(m[None], (size, size))[0].clamp(0, 1))
    return torch.stack(xs), torch.stack(ys)


# ---------------------------------------------------------------------------------------
@dataclass
class SegAugment:
    """Small affine (rotation, scale, shift) applied to image and masks alike + intensity jitter."""

    rotate_deg: float = 8.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.06  # fraction of the half-size (normalised coordinates)
    gamma: tuple[float, float] = (0.75, 1.35)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.08
    noise: float = 0.02


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg: SegAugment, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``x [B,1,S,S]`` (in [-1,1]) and masks ``y [B,C,S,S]`` with one warp per image."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    ang = u(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180.0
    s = u(*cfg.scale)
    tx, ty = u(-cfg.shift, cfg.shift), u(-cfg.shift, cfg.shift)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = _NETWORK.denormalise(x)
    x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    g = u(*cfg.gamma)[:, None, None, None]
    c = u(*cfg.contrast)[:, None, None, None]
    br = u(-cfg.brightness, cfg.brightness)[:, None, None, None]
    x01 = x01.clamp(1e-6, 1.0) ** g
    x01 = (x01 - 0.5) * c + 0.5 + br
    if cfg.noise > 0:
        x01 = x01 + cfg.noise * torch.randn(x01.shape, generator=gen)
    return _NETWORK.normalise(x01.clamp(0, 1)), y.clamp(0, 1)


class SegDataset(Dataset):
    """In-memory data set of preprocessed inputs and soft masks; items are (index) tensors.

    Augmentation runs per batch in :meth:`collate` (one vectorised warp), seeded
    by (seed, epoch) through :meth:`set_epoch` so a resumed run sees the same data.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, augment: SegAugment | None = None,
                 seed: int = 0) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError("image and mask counts differ")
        self.x, self.y, self.augment, self.seed = x, y, augment, int(seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_records(cls, records: Sequence[SegRecord], size: int, **kw) -> "SegDataset":
        x, y = load_arrays(records, size)
        return cls(x, y, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.gen = torch.Generator().manual_seed(self.seed * 7919 + int(epoch))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ii = torch.as_tensor(idx, dtype=torch.long)
        x, y = self.x[ii], self.y[ii]
        if self.augment is not None:
            x, y = augment_batch(x, y, self.augment, self.gen)
        return {"image": x, "masks": y}


def synthetic_chests(n: int, size: int = 64, seed: int = 0, noise: float = 0.08
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy "radiographs": two dark lung ellipses and a bright heart ellipse on noise.

    Returns inputs ``[n, 1, S, S]`` in [-1, 1] and binary masks ``[n, 3, S, S]``
    (left lung = image right, right lung = image left, heart), for learning tests.
    """
    g = torch.Generator().manual_seed(int(seed))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def r(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=g))

    xs, ys = [], []
    for _ in range(n):
        def ell(cx: float, cy: float, ax: float, ay: float) -> torch.Tensor:
            return (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2) <= 1.0

        dx, dy = r(-0.08, 0.08), r(-0.08, 0.08)
        right = ell(-0.42 + dx + r(-0.04, 0.04), -0.05 + dy, r(0.22, 0.3), r(0.5, 0.62))
        left = ell(0.42 + dx + r(-0.04, 0.04), -0.05 + dy, r(0.22, 0.3), r(0.5, 0.62))
        heart = ell(0.08 + dx + r(-0.05, 0.05), 0.35 + dy, r(0.22, 0.3), r(0.18, 0.24))
        left, right = left & ~heart, right & ~heart
        img = torch.full((size, size), r(0.55, 0.7))
        img = torch.where(left | right, torch.tensor(r(0.2, 0.35)), img)
        img = torch.where(heart, torch.tensor(r(0.75, 0.9)), img)
        img = img + noise * torch.randn((size, size), generator=g)
        xs.append(_NETWORK.normalise(img.clamp(0, 1)[None]))
        ys.append(torch.stack([left, right, heart]).float())
    return torch.stack(xs), torch.stack(ys)
