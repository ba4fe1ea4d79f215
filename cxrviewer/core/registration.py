"""Classical affine registration to the canonical chest by normalised cross-correlation (NCC).

One implementation for the app and for training: ``training/canonical.py`` registers normals
to their running average with :func:`register_affine` to build the canonical chest, and the
pipeline's alignment step (``cxrviewer/core/explain/alignment.py``) polishes the alignment
network's affine with :func:`refine_affine` and checks it with :func:`alignment_quality`.

The transform is the alignment network's 5-parameter affine ``(s_x, s_y, t_x, t_y, theta)``
(cia-net Eq. 1, disease-masks Eq. 6), found by gradient ascent (Adam) on the NCC of blurred
images, coarse-to-fine, composed *after* a start affine. Every affine follows
``F.affine_grid`` (``align_corners=False``): ``theta`` maps *output* (canonical-frame)
normalised coordinates to *input* sampling coordinates, so
``warp(warp(I, A), B) == warp(I, A @ B)`` (3x3 products, :func:`compose`). Deterministic on a
fixed number of CPU threads; the optional time budget only ever cuts iterations short.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrviewer.core.models.alignment import IDENTITY_PARAMS, affine_matrix, warp

__all__ = ["REFINE_SIZES", "affine_params", "alignment_quality", "blur", "compose", "decompose", "ncc", "refine_affine",
           "register_affine", "to3x3"]

#: Registration levels (px) of :func:`refine_affine`; it reads images at twice the finest one.
REFINE_SIZES: tuple[int, ...] = (32, 64)


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


def affine_params(theta: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> ``[B, 5]`` ``(s_x, s_y, t_x, t_y, theta)`` of cia-net Eq. 1.

    Exact for matrices of that form (the network's); for a composed affine (a rotation after an
    anisotropic scale may add a little shear) the column lengths and the first column's angle.
    """
    a = theta[:, :, :2]
    return torch.stack([a[:, :, 0].norm(dim=1), a[:, :, 1].norm(dim=1), theta[:, 0, 2], theta[:, 1, 2],
                        torch.atan2(a[:, 1, 0], a[:, 0, 0])], dim=1)


# ---- similarity ---------------------------------------------------------------------------
def ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation per sample of ``[B, 1, H, W]`` tensors (``b`` may have batch 1).

    ``mask`` (``[B or 1, 1, H, W]``, 0/1): only those pixels count (e.g. where a warp has data).
    """
    a = a.flatten(1)
    b = b.flatten(1).expand_as(a)
    if mask is None:
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
    else:
        w = mask.flatten(1).to(a.dtype).expand_as(a)
        n = w.sum(1, keepdim=True).clamp_min(1.0)
        a = (a - (a * w).sum(1, keepdim=True) / n) * w
        b = (b - (b * w).sum(1, keepdim=True) / n) * w
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` (replicate padding); ``sigma`` <= 0: unchanged."""
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


Pyramid = dict[int, tuple[torch.Tensor, torch.Tensor]]  # level (px) -> (moving at 2x, fixed), blurred


def _pyramid(moving: torch.Tensor, fixed: torch.Tensor, levels: Sequence[int]) -> Pyramid:
    """Both images prepared once per level: the moving one at twice the level's size, blurred by
    ``2 * level / 64`` px, the fixed one at the level's size, blurred by ``level / 64`` px."""
    return {int(lvl): (blur(_down(moving, 2 * int(lvl)), 2.0 * lvl / 64.0), blur(_down(fixed, int(lvl)), lvl / 64.0))
            for lvl in dict.fromkeys(levels)}


def _masked_ncc(mv: torch.Tensor, fx: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """NCC [B] of ``warp(mv, theta)`` to ``fx`` where the warp samples inside ``mv``."""
    size = int(fx.shape[-1])
    w = warp(mv, theta, out_size=size, padding_mode="border")
    inside = warp(torch.ones_like(mv[:, :1]), theta, out_size=size) > 0.99
    return ncc(w, fx, mask=inside)


def alignment_quality(image01: torch.Tensor, canonical01: torch.Tensor, theta: torch.Tensor, *,
                      size: int = 64) -> torch.Tensor:
    """NCC ``[B]`` of ``warp(image, theta)`` to the canonical chest on the canonical frame.

    Both blurred as at the registration's ``size`` level; only the pixels where the warp samples
    inside the image count (black outside the field of view is not evidence either way).
    """
    image01 = image01.detach().float().cpu()
    mv, fx = _pyramid(image01, canonical01.detach().float().cpu(), (size,))[size]
    return _masked_ncc(mv, fx, theta.detach().float().cpu().expand(image01.shape[0], 2, 3))


# ---- registration -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """How one registration runs (see :func:`register_affine`)."""

    levels: tuple[int, ...]
    iters: int
    lr: float
    starts: tuple[float, ...]
    isotropic: bool
    deadline: float  # time.perf_counter() value after which no more steps are taken (inf: none)
    bounds: tuple[float, float, float] | None = None  # |log s|, |t|, |rotation rad| around the start


def register_affine(moving: torch.Tensor, fixed: torch.Tensor, *, init: torch.Tensor | None = None,
                    levels: Sequence[int] = (32, 64), iters: int = 80, lr: float = 0.02,
                    rotation_starts_deg: Sequence[float] = (-8.0, 0.0, 8.0), isotropic: bool = False,
                    batch: int = 256, time_budget_s: float | None = None,
                    bounds: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``theta [B, 2, 3]`` with ``warp(moving, theta) ~ fixed``, and the final NCC [B].

    Gradient ascent (Adam) on the NCC of blurred images over ``(log s_x, log s_y, t_x, t_y, theta)``
    (the alignment network's parameters, cia-net Eq. 1), composed *after* ``init``
    (``theta = init @ A(p)``), coarse-to-fine over ``levels`` (pixels), ``iters`` steps per level,
    from every rotation in ``rotation_starts_deg``; the start with the best NCC wins. ``moving``
    [B, 1, H, W] and ``fixed`` [1, 1, h, w] in any consistent intensity range, on the CPU.
    ``time_budget_s`` stops the steps early (the affine reached so far is returned); ``bounds``
    ``(log scale, shift, rotation rad)`` keep the parameters within that distance of the start
    (a trust region). Needs no network.
    """
    deadline = math.inf if time_budget_s is None else time.perf_counter() + float(time_budget_s)
    plan = _Plan(tuple(int(v) for v in levels), int(iters), float(lr),
                 tuple(float(r) for r in rotation_starts_deg), bool(isotropic), deadline,
                 None if bounds is None else (float(bounds[0]), float(bounds[1]), float(bounds[2])))
    pyr = _pyramid(moving.detach().float(), fixed.detach().float(), plan.levels)
    return _register(pyr, init, plan, batch)


def _register(pyr: Pyramid, init: torch.Tensor | None, plan: _Plan, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`register_affine` on prepared images, ``batch`` images at a time."""
    n = next(iter(pyr.values()))[0].shape[0]
    if init is None:
        init = affine_matrix(torch.tensor([IDENTITY_PARAMS]))
    init = init.detach().float().expand(n, 2, 3).contiguous()
    thetas, scores = [], []
    for s in range(0, n, batch):
        chunk = {lvl: (mv[s:s + batch], fx) for lvl, (mv, fx) in pyr.items()}
        th, sc = _register_chunk(chunk, init[s:s + batch], plan)
        thetas.append(th)
        scores.append(sc)
    return torch.cat(thetas), torch.cat(scores)


def _register_chunk(pyr: Pyramid, init: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: every start optimised side by side, the best one kept per image."""
    b, k = init.shape[0], len(plan.starts)
    p0 = torch.zeros(k, b, 5)
    for i, r in enumerate(plan.starts):
        p0[i, :, 4] = math.radians(r)
    p = p0.reshape(k * b, 5).clone().requires_grad_(True)
    init_k = init.repeat(k, 1, 1)
    opt = torch.optim.Adam([p], lr=plan.lr)

    def theta_of(q: torch.Tensor) -> torch.Tensor:
        raw = torch.cat([q[:, :1], q[:, :1], q[:, 2:]], dim=1) if plan.isotropic else q
        return compose(init_k, affine_matrix(torch.cat([raw[:, :2].exp(), raw[:, 2:]], dim=1)))

    for lvl in plan.levels:
        mv, fx = pyr[lvl]
        mv = mv.repeat(k, 1, 1, 1)
        for _ in range(plan.iters):
            if time.perf_counter() > plan.deadline:
                break
            score = ncc(warp(mv, theta_of(p), out_size=lvl, padding_mode="border"), fx)
            loss = -score.sum() + 1e-2 * p[:, :2].pow(2).sum()  # weak prior against degenerate scales
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if plan.bounds is not None:
                _clamp(p, plan.bounds)
    with torch.no_grad():
        th = theta_of(p)
        mv, fx = pyr[plan.levels[-1]]
        w = warp(mv.repeat(k, 1, 1, 1), th, out_size=plan.levels[-1], padding_mode="border")
        score = ncc(w, fx).view(k, b)
        best = score.argmax(0)
        th = th.view(k, b, 2, 3)[best, torch.arange(b)]
        return th.detach(), score[best, torch.arange(b)].detach()


def _clamp(p: torch.Tensor, bounds: tuple[float, float, float]) -> None:
    """Keep ``(log s_x, log s_y, t_x, t_y, theta)`` within ``bounds`` (a trust region, in place)."""
    with torch.no_grad():
        for cols, b in zip(((0, 2), (2, 4), (4, 5)), bounds):
            p[:, cols[0]:cols[1]].clamp_(-b, b)


def refine_affine(image01: torch.Tensor, canonical01: torch.Tensor, theta0: torch.Tensor, *,
                  iterations: int = 30, sizes: Sequence[int] = REFINE_SIZES, lr: float = 0.01,
                  time_budget_s: float | None = 1.0, max_rotation_deg: float = 8.0, max_shift: float = 0.16,
                  max_log_scale: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Polish a start affine (the alignment network's, cia-net Eq. 1) by NCC registration.

    ``image01`` [B, 1, H, W] in [0, 1] (any size: only normalised coordinates matter),
    ``canonical01`` [1, 1, S, S], ``theta0`` [B or 1, 2, 3]. Runs :func:`register_affine` from
    ``theta0``: one start, ``iterations`` steps at each of ``sizes``, at most ``time_budget_s``
    seconds, and never further from the start than ``max_rotation_deg``, ``max_shift``
    (normalised units: 0.16 is 8 % of the size) and ``max_log_scale`` (a polish, not a search:
    an input the network could not place is not forced onto the canonical chest). Returns
    ``(theta [B, 2, 3], quality [B])``, the quality being :func:`alignment_quality` at
    ``sizes[-1]``. Never worse than the start: where the polished affine scores lower than
    ``theta0``, ``theta0`` is returned with its score.
    """
    deadline = math.inf if time_budget_s is None else time.perf_counter() + float(time_budget_s)
    plan = _Plan(tuple(int(v) for v in sizes), int(iterations), float(lr), (0.0,), False, deadline,
                 (float(max_log_scale), float(max_shift), math.radians(max_rotation_deg)))
    image01 = image01.detach().float().cpu()
    start = theta0.detach().float().cpu().expand(image01.shape[0], 2, 3)
    pyr = _pyramid(image01, canonical01.detach().float().cpu(), plan.levels)
    theta, _ = _register(pyr, start, plan, batch=256)
    mv, fx = pyr[plan.levels[-1]]
    q, q0 = _masked_ncc(mv, fx, theta), _masked_ncc(mv, fx, start)
    keep = q0 > q
    return torch.where(keep[:, None, None], start, theta), torch.where(keep, q0, q)
