"""Canonical chest (CIA-Net M4), built by groupwise NCC registration of normal radiographs.

cia-net-alignment-contrast-attention.txt Sec. 3.1 / disease-masks-attention.txt Sec. 3.2: the
canonical chest is the average of normal radiographs, cropped tightly around the lungs; the
alignment network warps every image towards it (cia-net Eq. 1, disease-masks Eq. 6).

Here the average is sharpened by *groupwise* re-averaging: every normal is registered to the
current average (a 5-parameter affine ``(s_x, s_y, t_x, t_y, theta)``, the same model as the
network, found by gradient ascent on the normalised cross-correlation, coarse-to-fine, from a
few rotation starts), the aligned images are averaged again, and so on for ``iterations``
rounds. The mean of the per-image affines is factored out each round, so the frame does not
drift. The lung field is then found on the final average (:func:`lung_bounds`) and the average
is cropped to it with a small margin.

All affines follow ``F.affine_grid``: ``theta`` maps *output* (aligned) normalised coordinates to
*input* sampling coordinates, so ``warp(warp(I, R), T) == warp(I, R @ T)`` (3x3 products). The
registration and the affine algebra live in ``cxrviewer/core/registration.py`` (the app's
alignment check uses the same code) and are re-exported here.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cxrviewer.core.canonical import crop_theta  # noqa: F401  (one implementation, re-exported)
from cxrviewer.core.models.alignment import affine_matrix, invert_affine, warp
from cxrviewer.core.registration import blur, compose, decompose, ncc, register_affine, to3x3

log = logging.getLogger(__name__)

__all__ = [
    "to3x3", "compose", "decompose", "ncc", "register_affine", "lung_bounds",
    "crop_theta", "build_canonical", "sharpness",
]


# ---- helpers of the canonical builder --------------------------------------------------
def sharpness(img: torch.Tensor) -> float:
    """Mean squared gradient magnitude of ``[H, W]`` or ``[1, 1, H, W]`` (higher = sharper)."""
    x = img.reshape(1, 1, *img.shape[-2:]).float()
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return float(gx.pow(2).mean() + gy.pow(2).mean())


def _mean_affine(thetas: torch.Tensor) -> torch.Tensor:
    """Affine of the mean (log-scale, shift, rotation) of a set of affines (drift removal)."""
    d = decompose(thetas)
    a = thetas[:, :, :2]
    sx = a[:, :, 0].norm(dim=1).log().mean().exp()
    sy = a[:, :, 1].norm(dim=1).log().mean().exp()
    p = torch.stack([sx, sy, d["tx"].mean(), d["ty"].mean(), torch.deg2rad(d["rotation_deg"]).mean()])
    return affine_matrix(p[None])


# ---- lung field and crop ------------------------------------------------------------------
def lung_bounds(mean: np.ndarray, margin: float = 0.04, bottom_margin: float = 0.07) -> tuple[float, float, float, float]:
    """Lung-field box ``(x0, y0, x1, y1)`` as fractions of ``mean`` [H, W] (values in [0, 1]).

    In an average radiograph the lungs are the two large dark regions inside the brighter body
    (mediastinum between them, diaphragm below, shoulders above); the air outside the body is
    dark too but touches the image border. The (blurred) image is thresholded at decreasing
    percentiles of its central 90 % (50th down to 6th); the first, i.e. most generous, threshold
    whose dark components that do not touch the border include one large region on each side
    of the midline gives the box (union of those two), grown by ``margin`` of the image size
    (``bottom_margin`` below: the costophrenic recesses are only faintly dark in an average).
    Falls back to the central 80 % when no threshold works.
    """
    from skimage.measure import label, regionprops

    h, w = mean.shape
    m = blur(torch.from_numpy(np.asarray(mean, np.float32))[None, None], max(h, w) / 128.0)[0, 0].numpy()
    ch, cw = int(0.05 * h), int(0.05 * w)
    central = m[ch:h - ch, cw:w - cw]
    for q in range(50, 5, -2):
        lab = label(m < np.percentile(central, q), connectivity=1)
        left = right = None
        for r in sorted(regionprops(lab), key=lambda r: -r.area):
            y0, x0, y1, x1 = r.bbox
            if y0 == 0 or x0 == 0 or y1 == h or x1 == w or r.area < 0.02 * h * w:
                continue
            cx = r.centroid[1] / w
            if cx < 0.5 and left is None:
                left = r
            elif cx >= 0.5 and right is None:
                right = r
        if left is None or right is None:
            continue
        y0 = min(left.bbox[0], right.bbox[0]) / h
        x0 = min(left.bbox[1], right.bbox[1]) / w
        y1 = max(left.bbox[2], right.bbox[2]) / h
        x1 = max(left.bbox[3], right.bbox[3]) / w
        if (x1 - x0) < 0.3 or (y1 - y0) < 0.3:
            continue
        log.info("lung_bounds: threshold at the %dth percentile, box %.3f %.3f %.3f %.3f", q, x0, y0, x1, y1)
        return (max(0.0, x0 - margin), max(0.0, y0 - margin), min(1.0, x1 + margin),
                min(1.0, y1 + bottom_margin))
    log.warning("lung_bounds: no pair of lung-like dark regions found; using the central 80%%")
    return (0.1, 0.1, 0.9, 0.9)


# ---- canonical builder --------------------------------------------------------------------
def build_canonical(images: torch.Tensor, *, size: int = 256, iterations: int = 3,
                    aligner: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    crop: bool = True, margin: float = 0.04, reg_levels: Sequence[int] = (32, 64),
                    reg_iters: int = 80) -> dict:
    """Canonical chest from normal images ``[N, 1, H, W]`` in [0, 1] (cia-net Sec. 3.1).

    Round 0 is the plain mean (or, with a trained alignment network ``aligner(images) -> theta
    [N, 2, 3]``, the mean of the network-aligned images, which are already in the canonical
    crop frame, so no further crop is made); every further round registers each image to the
    current mean (:func:`register_affine`, initialised from the previous round), factors out
    the mean affine and re-averages. The final mean is cropped to :func:`lung_bounds`
    (``crop=False`` keeps the full frame) and resampled to ``size`` x ``size``.

    Returns ``{"image" [size, size] float32 in [0, 1], "plain_mean", "full_mean" (uncropped,
    input resolution), "thetas" [N, 2, 3], "crop_box", "ncc" per round (mean NCC of the
    aligned images to their average), "sharpness" per round}``.
    """
    images = images.detach().float()
    n = images.shape[0]
    eye = affine_matrix(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])).expand(n, 2, 3).contiguous()
    plain = images.mean(0, keepdim=True)[0, 0].clone()
    thetas = eye
    if aligner is not None:  # start in the trained network's frame (already the canonical crop)
        with torch.no_grad():
            thetas = torch.cat([aligner(images[s:s + 32]).float() for s in range(0, n, 32)])
        crop = False
    aligned = torch.cat([warp(images[s:s + 64], thetas[s:s + 64], padding_mode="border")
                         for s in range(0, n, 64)])
    mean = aligned.mean(0, keepdim=True)
    mean0 = _mean_affine(thetas)
    hist_ncc = [float(ncc(aligned, mean).mean())]
    del aligned
    hist_sharp = [sharpness(mean)]
    for it in range(iterations):
        first = it == 0 and aligner is None
        thetas, _ = register_affine(images, mean, init=thetas, levels=reg_levels, iters=reg_iters,
                                    rotation_starts_deg=(-6.0, 0.0, 6.0) if first else (0.0,))
        # keep the average pose fixed (at its round-0 value): no drift of the frame
        fix = compose(invert_affine(_mean_affine(thetas)), mean0)
        thetas = compose(thetas, fix.expand(n, 2, 3))
        aligned = torch.cat([warp(images[s:s + 64], thetas[s:s + 64], padding_mode="border")
                             for s in range(0, n, 64)])
        mean = aligned.mean(0, keepdim=True)
        hist_ncc.append(float(ncc(aligned, mean).mean()))
        hist_sharp.append(sharpness(mean))
        log.info("canonical round %d: mean NCC to the average %.4f, sharpness %.3g",
                 it + 1, hist_ncc[-1], hist_sharp[-1])
    full = mean[0, 0]
    box = lung_bounds(full.numpy(), margin=margin) if crop else (0.0, 0.0, 1.0, 1.0)
    # crop from the aligned images themselves (one resampling from the originals)
    ct = crop_theta(box)
    acc = torch.zeros(1, 1, size, size)
    for s in range(0, n, 64):
        th = compose(thetas[s:s + 64], ct.expand(thetas[s:s + 64].shape[0], 2, 3))
        acc += warp(images[s:s + 64], th, out_size=size, padding_mode="border").sum(0, keepdim=True)
    canon = (acc / n)[0, 0].clamp(0, 1)
    return {"image": canon.numpy().astype(np.float32), "plain_mean": plain.numpy(),
            "full_mean": full.numpy(), "thetas": thetas, "crop_box": tuple(float(v) for v in box),
            "ncc": hist_ncc, "sharpness": hist_sharp}
