"""Alignment module training (CIA-Net M4; disease-masks-attention.txt Eq. 6-9) and its evaluation.

The network ``T = A(I)`` (cia-net Eq. 1; ``cxrviewer.core.models.alignment``) predicts the
affine that warps an image into the frame of the canonical chest. Three terms train it:

1. **Anchored self-supervision from known random affines.** For each image ``I`` a random
   affine ``R`` (rotation, scale, shift) makes ``I_R = warp(I, R)``. Because
   ``warp(warp(I, R), T) = warp(I, R @ T)`` (3x3 products, ``F.affine_grid`` convention: a
   matrix maps output to input coordinates), a consistent aligner satisfies
   ``R @ T(I_R) = T(I)``, i.e. ``T(I_R) = R^-1 @ T(I)``. ``T(I)`` itself is anchored by a
   per-image target ``T0(I)``: the classical NCC registration of ``I`` to the canonical chest
   (:func:`training.canonical.register_affine`) or, for phantoms, the recorded ground-truth
   pose composed with one common frame offset. The loss is the L1 distance between the
   predicted ``[2, 3]`` matrix for ``I_R`` and ``R^-1 @ T0(I)``.
   (Optional, ``consistency_weight``: the un-anchored form ``|R @ T(I_R) - sg(T(I))|``,
   which needs a second forward pass.)
2. **Euclidean loss** (disease-masks Eq. 8) between the canonical chest ``A`` and
   ``B(G(warp(I_R, T(I_R))))`` (Eq. 6, 16 x 16 average pooling, bilinear back).
3. **Perceptual loss** (Eq. 7) on stages 2-5 of a *fixed, randomly initialised* "tiny" conv net:
   offline there are no ImageNet weights, so these features are only random filters, and the
   term gets a small weight (``perceptual_weight``).

Total: ``w_param * L_param + w_img * (L_e + w_p * L_p)`` (Eq. 9 is ``L_e + L_p``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxrviewer.core.canonical import canonical_crop_box  # noqa: F401  (benchmarks/alignment_real.py)
from cxrviewer.core.canonical import canonical_ref, load_canonical
from cxrviewer.core.checksum import sha256_file
from cxrviewer.core.models.alignment import affine_matrix, invert_affine, warp
from cxrviewer.core.preprocess import Preprocess

from ..canonical import compose, crop_theta, decompose, ncc, register_affine
from ..data.dataset import dataset_preprocess
from ..losses import alignment_loss_terms
from .loop import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    """Loss weights and the random-perturbation ranges of alignment training."""

    rotation_deg: float = 12.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    shift: float = 0.10  # fraction of the width/height
    identity_fraction: float = 0.1
    param_weight: float = 10.0
    image_weight: float = 0.5
    perceptual_weight: float = 1.0
    consistency_weight: float = 0.0


# ---- random affines --------------------------------------------------------------------------
def random_affines(n: int, *, rotation_deg: float = 10.0, scale: tuple[float, float] = (0.9, 1.1),
                   shift: float = 0.08, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, 2, 3]`` sampling affines: uniform rotation, isotropic scale and shift (fraction of the size).

    ``warp(I, R)`` shows the chest rotated by ``-rotation``, zoomed by ``1/scale`` and moved
    by ``-shift`` (the matrix maps output to input coordinates).
    """
    u = torch.rand(n, 5, generator=generator)
    rot = torch.deg2rad((u[:, 0] * 2 - 1) * rotation_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * shift * 2.0
    ty = (u[:, 3] * 2 - 1) * shift * 2.0
    return affine_matrix(torch.stack([s, s, tx, ty, rot], dim=1))


def perturb(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``warp(x, r)`` for images in [-1, 1], filling outside the field of view with black (-1)."""
    return warp(x + 1.0, r.to(x.dtype)) - 1.0


def recovered_perturbation(theta_orig: torch.Tensor, theta_pert: torch.Tensor) -> torch.Tensor:
    """The perturbation ``R`` implied by the predictions: ``R_hat = T(I) @ T(I_R)^-1``."""
    return compose(theta_orig, invert_affine(theta_pert))


def affine_errors(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample |rotation| (deg), shift (% of width/height, Euclidean) and |scale ratio - 1|."""
    dp, dt = decompose(pred), decompose(true)
    rot = (dp["rotation_deg"] - dt["rotation_deg"] + 180.0) % 360.0 - 180.0
    shift = torch.hypot(dp["tx"] - dt["tx"], dp["ty"] - dt["ty"]) * 50.0  # normalised units -> % of size
    return {"rotation_deg": rot.abs(), "shift_pct": shift, "scale": (dp["scale"] / dt["scale"] - 1.0).abs()}


# ---- perceptual network -----------------------------------------------------------------------
class PerceptualNet(torch.nn.Module):
    """Fixed randomly-initialised "tiny" backbone; returns stages 2-5 (disease-masks Eq. 7).

    No ImageNet weights exist offline; random conv features still respond to edges and
    blobs at several scales, which is what the perceptual term needs to compare structure.
    """

    def __init__(self, seed: int = 1234) -> None:
        super().__init__()
        from cxrviewer.core.models.backbones import build_backbone

        g = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = build_backbone("tiny", 1)
        torch.random.set_rng_state(g)
        self.net.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):  # always eval (BatchNorm statistics stay fixed)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return [out[k] for k in ("stage2", "stage3", "stage4", "stage5") if k in out]


# ---- anchor targets ---------------------------------------------------------------------------
def _images_of(ds: Dataset, batch: int = 64) -> torch.Tensor:
    """All images of a dataset as ``[N, 1, S, S]`` in [0, 1] (no augmentation)."""
    saved = getattr(ds, "augment_cfg", None)
    if saved is not None:
        ds.augment_cfg = None
    try:
        xs = [ds[i]["image"] for i in range(len(ds))]
    finally:
        if saved is not None:
            ds.augment_cfg = saved
    return dataset_preprocess(ds).denormalise(torch.stack(xs))


def registration_targets(images01: torch.Tensor, canonical01: torch.Tensor,
                         crop_box: Sequence[float] | None = None, *, iters: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """``T0(I)``: NCC registration of each image to the canonical chest (initialised at the lung crop)."""
    init = crop_theta(crop_box) if crop_box is not None else None
    return register_affine(images01, canonical01, init=init, iters=iters)


def phantom_pose(truth: dict, key: str) -> torch.Tensor | None:
    """Ground-truth ``[2, 3]`` affine (normalised coords) mapping upright-chest -> written image.

    ``phantom_truth.json`` records pixel matrices (pixel edges at integers); with
    ``u = 2x/W - 1`` this is ``G = S M S^-1``. Then an image satisfies ``I(G q) = U(q)``
    and the aligner should predict ``T(I) = G @ C`` for one frame offset ``C`` common to all.
    """
    images = truth.get("images", truth)
    ent = images.get(key) or images.get(key + ".png")
    if ent is None:
        return None
    m = np.asarray(ent["affine"]["matrix"], np.float64)
    size = float(truth.get("size", 256))
    s = np.array([[2.0 / size, 0, -1.0], [0, 2.0 / size, -1.0], [0, 0, 1.0]])
    full = np.vstack([m, [0, 0, 1.0]])
    g = s @ full @ np.linalg.inv(s)
    return torch.tensor(g[:2], dtype=torch.float32)


def phantom_targets(keys: Sequence[str], truth: dict, reg_targets: torch.Tensor) -> torch.Tensor:
    """``T0 = G_i @ C`` with ``C`` the median over images of ``G_i^-1 @ T_reg(I_i)`` (parameters)."""
    gs = [phantom_pose(truth, k) for k in keys]
    if any(g is None for g in gs):
        return reg_targets
    g = torch.stack(gs)
    offs = compose(invert_affine(g), reg_targets)
    c = _median_affine(offs)
    return compose(g, c.expand(len(keys), 2, 3))


def _median_affine(thetas: torch.Tensor) -> torch.Tensor:
    a = thetas[:, :, :2]
    sx = a[:, :, 0].norm(dim=1).median()
    sy = a[:, :, 1].norm(dim=1).median()
    rot = torch.atan2(a[:, 1, 0], a[:, 0, 0]).median()
    return affine_matrix(torch.stack([sx, sy, thetas[:, 0, 2].median(), thetas[:, 1, 2].median(), rot])[None])


# ---- loss ------------------------------------------------------------------------------------
def make_loss_fn(targets: torch.Tensor, canonical: torch.Tensor, acfg: AlignConfig,
                 perceptual: torch.nn.Module | None = None):
    """``loss_fn(model, batch)`` for :class:`~training.trainers.loop.Trainer` (see module docstring).

    ``targets [N, 2, 3]`` are the anchors ``T0`` by dataset index; ``canonical`` [1, 1, S, S]
    in the network range ([-1, 1]).
    """

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        x = batch["image"]
        b = x.shape[0]
        dev = x.device
        r = random_affines(b, rotation_deg=acfg.rotation_deg, scale=(acfg.scale_min, acfg.scale_max),
                           shift=acfg.shift).to(dev)
        keep = torch.rand(b, device=dev) < acfg.identity_fraction
        r = torch.where(keep[:, None, None], torch.eye(2, 3, device=dev).expand(b, 2, 3), r)
        xr = perturb(x, r)
        t0 = targets.to(dev)[batch["index"].long()]
        want = compose(invert_affine(r), t0)
        if acfg.consistency_weight > 0:
            out_all = model(torch.cat([xr, x]))
            theta = out_all["theta"][:b].float()
            t_orig = out_all["theta"][b:].float().detach()
            l_cons = F.l1_loss(compose(r, theta), t_orig)
        else:
            out = model(xr)
            theta = out["theta"].float()
            l_cons = theta.new_zeros(())
        l_param = F.l1_loss(theta, want)
        logs = {"param": float(l_param.detach())}
        loss = acfg.param_weight * l_param + acfg.consistency_weight * l_cons
        if acfg.image_weight > 0:
            # the aligned image, black outside the field of view, against the canonical chest
            al = warp(xr.float() + 1.0, theta) - 1.0
            terms = alignment_loss_terms(canonical.to(dev), al, perceptual if acfg.perceptual_weight > 0 else None)
            loss = loss + acfg.image_weight * (terms["euclidean"] + acfg.perceptual_weight * terms["perceptual"])
            logs.update(euclidean=float(terms["euclidean"].detach()), perceptual=float(terms["perceptual"].detach()))
        return loss, logs

    return loss_fn


# ---- training --------------------------------------------------------------------------------
def init_at(model: torch.nn.Module, theta: torch.Tensor) -> None:
    """Start the regressor at ``theta`` [1, 2, 3] (a scale-rotation-shift; e.g. the lung crop)."""
    d = decompose(theta)
    a = theta[0, :, :2]
    raw = torch.tensor([float(a[:, 0].norm().log()), float(a[:, 1].norm().log()),
                        float(theta[0, 0, 2]), float(theta[0, 1, 2]), math.radians(float(d["rotation_deg"][0]))])
    with torch.no_grad():
        model.fc.bias.copy_(raw)


def train_alignment(model: torch.nn.Module, train_ds: Dataset, canonical01: torch.Tensor, cfg: TrainConfig, *,
                    acfg: AlignConfig | None = None, val_ds: Dataset | None = None,
                    crop_box: Sequence[float] | None = None, truth: dict | None = None,
                    train_keys: Sequence[str] | None = None, stop_after_epoch: int | None = None,
                    eval_every: int = 1, register_iters: int = 60) -> tuple[torch.nn.Module, list[dict], dict]:
    """Anchor targets (:func:`registration_targets`, :func:`phantom_targets`), then the shared loop.

    Returns ``(model, history, info)``; ``info["anchor"]`` says which anchors were used.
    """
    from ..data import collate

    acfg = acfg or AlignConfig()
    size = int(train_ds[0]["image"].shape[-1])
    canon01 = canonical01 if canonical01.shape[-1] == size else F.interpolate(
        canonical01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    imgs = _images_of(train_ds)
    anchors = Path(cfg.out_dir) / "anchors.pt"  # reused on resume (the registration is deterministic)
    key = hashlib.sha256(imgs.numpy().tobytes() + canon01.numpy().tobytes()).hexdigest()
    saved = torch.load(anchors, weights_only=True) if anchors.is_file() else None
    if saved is not None and saved.get("key") == key:
        targets, scores = saved["targets"], saved["scores"]
    else:
        targets, scores = registration_targets(imgs, canon01, crop_box, iters=register_iters)
        from .loop import dist_info

        if dist_info()[0] == 0:
            anchors.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "targets": targets, "scores": scores}, anchors)
    info: dict[str, Any] = {"anchor": "ncc_registration", "anchor_mean_ncc": float(scores.mean())}
    if truth is not None and train_keys is not None:
        targets = phantom_targets(train_keys, truth, targets)
        info["anchor"] = "phantom_truth"
    log.info("alignment anchors: %s (mean NCC of the registration %.3f)", info["anchor"], info["anchor_mean_ncc"])
    if getattr(model, "fc", None) is not None:
        init_at(model, _median_affine(targets))
    pre = dataset_preprocess(train_ds)
    val_imgs = pre.normalise(_images_of(val_ds)) if val_ds is not None and len(val_ds) else None

    def eval_fn(m: torch.nn.Module) -> dict:
        if val_imgs is None or (eval_every > 1 and (len(trainer.history) + 1) % eval_every):
            return {}
        return recovery_errors(m, val_imgs[:64], seed=0)

    loss_fn = make_loss_fn(targets, pre.normalise(canon01), acfg, PerceptualNet())
    trainer = Trainer(model, train_ds, loss_fn, cfg, eval_fn=eval_fn, collate_fn=collate)
    try:
        history = trainer.fit(stop_after_epoch=stop_after_epoch)
    finally:
        trainer.close()
    return trainer.model, history, info


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def predict_theta(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """``theta [N, 2, 3]`` for images ``x`` [N, 1, S, S] in the network range."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [model(x[s:s + batch].to(dev))["theta"].float().cpu() for s in range(0, x.shape[0], batch)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2, 3)


@torch.no_grad()
def recovery_errors(model: torch.nn.Module, x: torch.Tensor, *, rotation_deg: float = 10.0,
                    scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.08, seed: int = 0,
                    per_sample: bool = False) -> dict:
    """Recovery of known perturbations: ``R_hat = T(I) @ T(I_R)^-1`` versus ``R``.

    Returns medians (and means) of the rotation error (deg), shift error (% of the size) and
    scale error, plus the same for the identity prediction ``R_hat = I`` (the "before").
    """
    g = torch.Generator().manual_seed(seed)
    r = random_affines(x.shape[0], rotation_deg=rotation_deg, scale=scale, shift=shift, generator=g)
    t_orig = predict_theta(model, x)
    t_pert = predict_theta(model, perturb(x, r))
    err = affine_errors(recovered_perturbation(t_orig, t_pert), r)
    base = affine_errors(torch.eye(2, 3).expand_as(r), r)
    out: dict[str, Any] = {"n": int(x.shape[0])}
    for k in err:
        out[f"median_{k}"] = float(err[k].median())
        out[f"mean_{k}"] = float(err[k].mean())
        out[f"identity_median_{k}"] = float(base[k].median())
    if per_sample:
        out["per_sample"] = {k: v.tolist() for k, v in err.items()}
    return out


def refine_with_ncc(x01: torch.Tensor, canonical01: torch.Tensor, theta: torch.Tensor, *,
                    iters: int = 40, levels: Sequence[int] = (64,)) -> torch.Tensor:
    """Polish network affines by NCC registration to the canonical chest, starting from ``theta``.

    Images ``x01`` [N, 1, S, S] in [0, 1]. Not used by the bundle (the app runs the network
    alone); measured by ``benchmarks/alignment_real.py --classical``.
    """
    out, _ = register_affine(x01, canonical01, init=theta, iters=iters, levels=levels,
                             rotation_starts_deg=(0.0,))
    return out


def _load_model(bundle_or_model: Any) -> tuple[torch.nn.Module, int, Preprocess]:
    """``(network, input size or 0, its Preprocess)``; a bare network gets the default ``minus1_1``."""
    if isinstance(bundle_or_model, torch.nn.Module):
        return bundle_or_model, 0, Preprocess()
    if isinstance(bundle_or_model, (str, Path)):
        from cxrviewer.core.bundle import load_bundle

        bundle_or_model = load_bundle(bundle_or_model)
    manifest = bundle_or_model.manifest
    return bundle_or_model.model, int(manifest.input_size[0]), Preprocess.from_manifest(manifest)


def _record_images(records: Sequence[Any], size: int) -> torch.Tensor:
    from ..data.dataset import load_pixels
    from ..data.transforms import resize_image_and_boxes

    xs = [torch.from_numpy(resize_image_and_boxes(load_pixels(r.path), [], size)[0]) for r in records]
    return torch.stack(xs)[:, None].float().clamp(0, 1)


def find_canonical(bundle: Any) -> Path:
    """The canonical chest PNG a bundle's manifest names, looked up beside the bundle.

    Searched: inside the bundle folder, its parent and grandparent (``resources/models/X.cxrbundle``
    -> ``resources/``); the SHA-256 must match when the manifest records one.
    """
    from cxrviewer.core.errors import BundleError

    ref = getattr(bundle.manifest, "canonical_chest", None) or {}
    name = ref.get("file")
    if not name:
        raise BundleError("the alignment bundle names no canonical chest", path=str(bundle.path))
    d = Path(bundle.path)
    for cand in (d / name, d.parent / name, d.parent.parent / name):
        if cand.is_file() and (not ref.get("sha256") or sha256_file(cand) == ref["sha256"]):
            return cand
    raise BundleError(f"canonical chest {name} (SHA-256 {str(ref.get('sha256'))[:12]}...) not found beside "
                      "the bundle; pass it explicitly", path=str(bundle.path))


def evaluate_alignment(bundle_or_model: Any, records: Sequence[Any],
                       canonical: str | Path | torch.Tensor | None = None,
                       truth: dict | str | Path | None = None, *, data_dir: str | Path | None = None,
                       size: int | None = None, rotation_deg: float = 10.0,
                       scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.08, seed: int = 0) -> dict:
    """Alignment metrics on ``records`` (``training.data.Record`` list, or images [N,1,S,S] in [0, 1]).

    ``canonical`` defaults to the PNG the bundle's manifest names (:func:`find_canonical`);
    ``truth`` defaults to ``data_dir/phantom_truth.json`` when that exists.

    - ``ncc_before`` / ``ncc_after``: mean NCC of the (16 px grid-smoothed, Eq. 6) image to the
      canonical chest, without alignment (plain resize) and after the network's warp;
    - ``recovery``: :func:`recovery_errors` on the records perturbed by known random affines
      (rotation up to ``rotation_deg``, scale in ``scale``, shift up to ``shift`` of the size);
    - ``phantom`` (when ``truth``, a ``phantom_truth.json`` dict or path, is given): errors of
      ``G_i^-1 @ T(I_i)`` against their median (the frame offset ``C``), i.e. the ground-truth
      pose error up to the one common offset, and the same for the identity prediction.
    """
    if isinstance(bundle_or_model, (str, Path)):
        from cxrviewer.core.bundle import load_bundle

        bundle_or_model = load_bundle(bundle_or_model)
    if canonical is None:
        if isinstance(bundle_or_model, torch.nn.Module):
            raise ValueError("evaluate_alignment needs the canonical chest for a bare model")
        canonical = find_canonical(bundle_or_model)
    if truth is None and data_dir is not None:
        from ..phantoms import TRUTH_FILE

        tp = Path(data_dir) / TRUTH_FILE
        truth = tp if tp.is_file() else None
    model, bsize, pre = _load_model(bundle_or_model)
    model = model.float().eval()
    size = int(size or bsize or 256)
    if isinstance(records, torch.Tensor):
        x01, keys = records.float(), None
    else:
        x01, keys = _record_images(records, size), [r.key for r in records]
    if x01.shape[-1] != size:
        x01 = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    canon = canonical if isinstance(canonical, torch.Tensor) else load_canonical(canonical, size)
    canon = canon.float().reshape(1, 1, *canon.shape[-2:])
    if canon.shape[-1] != size:
        canon = F.interpolate(canon, size=(size, size), mode="bilinear", align_corners=False)
    x = pre.stretch_normalise(x01)
    theta = predict_theta(model, x)
    aligned01 = warp(x01, theta, padding_mode="border")
    from cxrviewer.core.models.alignment import grid_smooth

    res: dict[str, Any] = {
        "n": int(x.shape[0]), "size": size,
        "ncc_before": float(ncc(grid_smooth(x01), canon).mean()),
        "ncc_after": float(ncc(grid_smooth(aligned01), canon).mean()),
        "recovery": recovery_errors(model, x, rotation_deg=rotation_deg, scale=scale, shift=shift, seed=seed),
    }
    if truth is not None and keys is not None:
        if not isinstance(truth, dict):
            truth = json.loads(Path(truth).read_text(encoding="utf-8"))
        gs = [phantom_pose(truth, k) for k in keys]
        ok = [i for i, g in enumerate(gs) if g is not None]
        if ok:
            g = torch.stack([gs[i] for i in ok])
            for name, th in (("model", theta[ok]), ("identity", torch.eye(2, 3).expand(len(ok), 2, 3))):
                off = compose(invert_affine(g), th)
                c = _median_affine(off).expand_as(off)
                e = affine_errors(off, c)
                res.setdefault("phantom", {})[name] = {f"median_{k}": float(v.median()) for k, v in e.items()} | {
                    f"mean_{k}": float(v.mean()) for k, v in e.items()}
    return res


# ---- bundle ----------------------------------------------------------------------------------
def save_alignment_bundle(model: torch.nn.Module, out: str | Path, *, canonical: str | Path, input_size: int,
                          provenance: dict, half: bool = False) -> Path:
    """Write the alignment bundle (family "alignment") with the canonical chest's name + SHA-256.

    ``half=True`` stores the weights as float16 (they are loaded into the float32 network
    by ``load_state_dict``, which casts), halving the file.
    """
    from cxrviewer.core.bundle import save_bundle

    model = model.cpu().float()
    if half:
        model = model.half()
    prov = dict(provenance)
    prov.setdefault("research_demo", True)
    prov["weights_dtype"] = "float16" if half else "float32"
    try:
        return save_bundle(model, out, classes=[], input_size=input_size, normalisation={"kind": "minus1_1"},
                           canonical_chest=canonical_ref(canonical),
                           description="Alignment to the canonical chest (cia-net Eq. 1, disease-masks Eq. 6-9)",
                           provenance=prov, overwrite=True)
    finally:
        model.float()
