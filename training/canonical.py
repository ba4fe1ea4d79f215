"""Canonical chest (CIA-Net M4) and classical affine registration by normalised cross-correlation.

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
*input* sampling coordinates, so ``warp(warp(I, R), T) == warp(I, R @ T)`` (3x3 products).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrviewer.core.models.alignment import affine_matrix, invert_affine, warp

log = logging.getLogger(__name__)

__all__ = [
    "to3x3", "compose", "decompose", "ncc", "register_affine", "lung_bounds",
    "crop_theta", "build_canonical", "sharpness",
]


# ---- affine algebra (affine_grid convention) ---------------------------------------------
def to3x3(theta: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> homogeneous ``[B, 3, 3]``."""
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Affine of ``warp(warp(I, first), second)`` as one warp: ``first @ second`` ([B, 2, 3] each).

    ``warp(I, A)(p) = I(A p)``, so ``warp(warp(I, A), B)(p) = warp(I, A)(B p) = I(A B p)``.
    """
    return (to3x3(first) @ to3x3(second))[:, :2, :]


def decompose(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotation (deg), isotropic scale (sqrt det) and shift (normalised units) of ``[B, 2, 3]``."""
    a = theta[:, :, :2]
    rot = torch.rad2deg(torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]))
    scale = torch.linalg.det(a).abs().sqrt()
    return {"rotation_deg": rot, "scale": scale, "tx": theta[:, 0, 2], "ty": theta[:, 1, 2]}


# ---- similarity ---------------------------------------------------------------------------
def ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation per sample of ``[B, 1, H, W]`` tensors (b may have batch 1)."""
    a = a.flatten(1)
    b = b.flatten(1).expand_as(a)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _down(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def sharpness(img: torch.Tensor) -> float:
    """Mean squared gradient magnitude of ``[H, W]`` or ``[1, 1, H, W]`` (higher = sharper)."""
    x = img.reshape(1, 1, *img.shape[-2:]).float()
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return float(gx.pow(2).mean() + gy.pow(2).mean())


# ---- registration -------------------------------------------------------------------------
def register_affine(moving: torch.Tensor, fixed: torch.Tensor, *, init: torch.Tensor | None = None,
                    levels: Sequence[int] = (32, 64), iters: int = 80, lr: float = 0.02,
                    rotation_starts_deg: Sequence[float] = (-8.0, 0.0, 8.0), isotropic: bool = False,
                    batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``theta [B, 2, 3]`` with ``warp(moving, theta) ~ fixed``, and the final NCC [B].

    Gradient ascent (Adam) on the NCC of blurred images over ``(log s_x, log s_y, t_x, t_y, theta)``
    (the alignment network's parameters, cia-net Eq. 1), composed *after* ``init``
    (``theta = init @ A(p)``), coarse-to-fine over ``levels`` (pixels), from every rotation in
    ``rotation_starts_deg``; the start with the best NCC wins. ``moving`` [B, 1, H, W] and
    ``fixed`` [1, 1, h, w] in any consistent intensity range. Needs no network.
    """
    moving = moving.detach().float()
    fixed = fixed.detach().float()
    n = moving.shape[0]
    if init is None:
        init = affine_matrix(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])).expand(n, 2, 3)
    init = init.detach().float().expand(n, 2, 3).contiguous()
    thetas, scores = [], []
    for s in range(0, n, batch):
        th, sc = _register_chunk(moving[s:s + batch], fixed, init[s:s + batch], levels, iters, lr,
                                 rotation_starts_deg, isotropic)
        thetas.append(th)
        scores.append(sc)
    return torch.cat(thetas), torch.cat(scores)


def _register_chunk(moving, fixed, init, levels, iters, lr, starts, isotropic):
    b = moving.shape[0]
    k = len(starts)
    p0 = torch.zeros(k, b, 5)
    for i, r in enumerate(starts):
        p0[i, :, 4] = math.radians(r)
    p = p0.reshape(k * b, 5).clone().requires_grad_(True)
    init_k = init.repeat(k, 1, 1)
    opt = torch.optim.Adam([p], lr=lr)

    def theta_of(q: torch.Tensor) -> torch.Tensor:
        raw = q.clone()
        if isotropic:
            raw = torch.cat([q[:, :1], q[:, :1], q[:, 2:]], dim=1)
        a = affine_matrix(torch.cat([raw[:, :2].exp(), raw[:, 2:]], dim=1))
        return compose(init_k, a)

    score = torch.zeros(k * b)
    for lvl in levels:
        sigma = 1.0 * lvl / 64.0
        mv = _blur(_down(moving, lvl * 2), sigma * 2).repeat(k, 1, 1, 1)
        fx = _blur(_down(fixed, lvl), sigma)
        for _ in range(iters):
            w = warp(mv, theta_of(p), out_size=lvl, padding_mode="border")
            score = ncc(w, fx)
            loss = -score.sum() + 1e-2 * p[:, :2].pow(2).sum()  # weak prior against degenerate scales
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        th = theta_of(p)
        lvl = levels[-1]
        w = warp(_blur(_down(moving, lvl * 2), 2.0 * lvl / 64).repeat(k, 1, 1, 1), th, out_size=lvl,
                 padding_mode="border")
        score = ncc(w, _blur(_down(fixed, lvl), lvl / 64)).view(k, b)
        best = score.argmax(0)
        th = th.view(k, b, 2, 3)[best, torch.arange(b)]
        return th.detach(), score[best, torch.arange(b)].detach()


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
    m = _blur(torch.from_numpy(np.asarray(mean, np.float32))[None, None], max(h, w) / 128.0)[0, 0].numpy()
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


def crop_theta(box: Sequence[float]) -> torch.Tensor:
    """``[1, 2, 3]`` affine whose warp output is the box ``(x0, y0, x1, y1)`` (fractions) of the input."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = x1 - x0, y1 - y0
    cx, cy = x0 + x1 - 1.0, y0 + y1 - 1.0  # box centre in [-1, 1]
    return torch.tensor([[[sx, 0.0, cx], [0.0, sy, cy]]])


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
