"""M1: disease masks (DM) from a trained classifier, and the DM attention retraining.

Recipe (disease-masks-attention.txt Sec. 3-4): align -> train a CAM classifier on the aligned
images -> generate the masks (Eq. 2-3) -> copy the classifier into a ``dm`` model holding psi
and retrain it with ``f' = psi * f + f`` (Eq. 4-5) for more epochs.

- :func:`align_dataset` warps a dataset with an alignment network (disease-masks Eq. 6; theta
  computed once per image on the un-augmented image, boxes warped too).
- :func:`accumulate_disease_masks` streams Eq. 2-3 over a dataset (P_c >= 0.8 filter,
  flip-sum for the seven symmetric classes, N(), mean, threshold T) without keeping every CAM;
  it gives exactly ``cxrviewer.core.explain.disease_masks.disease_masks_from_cams``.
- :func:`pseudo_masks_from_anatomy` averages per-image pseudo disease masks (PDM, Sec. 4.4)
  from phantom/JSRT-style anatomy masks or a segmentation network, for the DM-vs-PDM comparison.
- :func:`train_disease_masks` runs generate + retrain; :func:`save_dm_bundle` writes a bundle with
  role ``"dm"`` and psi as the extra array ``"disease_masks"``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cxrviewer.core.classes import CLASSES, SYMMETRIC_CLASSES
from cxrviewer.core.errors import CxrError, ModelError
from cxrviewer.core.preprocess import Preprocess

from ..data.dataset import dataset_preprocess
from .classify import auroc_table, predict, train_classifier
from .loop import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "AlignedDataset",
    "DiseaseMaskResult",
    "accumulate_disease_masks",
    "align_dataset",
    "anatomy_from_folder",
    "anatomy_from_segmentation",
    "dm_from_classifier",
    "pseudo_masks_from_anatomy",
    "save_dm_bundle",
    "train_disease_masks",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_augmentation(ds: Dataset) -> Iterator[Dataset]:
    """Temporarily switch off the augmentation of a ChestDataset/CachedDataset (or a wrapper)."""
    target = ds
    while not hasattr(target, "augment_cfg") and (hasattr(target, "base") or hasattr(target, "dataset")):
        target = getattr(target, "base", None) or getattr(target, "dataset")  # AlignedDataset / Subset
    saved = getattr(target, "augment_cfg", None)
    if hasattr(target, "augment_cfg"):
        target.augment_cfg = None
    try:
        yield ds
    finally:
        if hasattr(target, "augment_cfg"):
            target.augment_cfg = saved


def _loader(ds: Dataset, batch_size: int) -> DataLoader:
    from ..data import collate

    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------
def _warp_boxes(boxes: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``[M, 5]`` (class, x, y, w, h in pixels) of the original image into the warped one.

    ``theta`` maps output normalised coordinates to input ones (``F.affine_grid``), so the
    corners go through its inverse; the result is the axis-aligned bound, clipped to the image.
    """
    if boxes.numel() == 0:
        return boxes
    from cxrviewer.core.models.alignment import invert_affine

    h, w = size
    inv = invert_affine(theta[None].double())[0]
    x0, y0 = boxes[:, 1].double(), boxes[:, 2].double()
    x1, y1 = x0 + boxes[:, 3].double(), y0 + boxes[:, 4].double()
    xs = torch.stack([x0, x1, x0, x1], 1) * 2.0 / w - 1.0  # pixel edges -> [-1, 1] (align_corners=False)
    ys = torch.stack([y0, y0, y1, y1], 1) * 2.0 / h - 1.0
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    u = ((u + 1.0) * w / 2.0).clamp(0, w)
    v = ((v + 1.0) * h / 2.0).clamp(0, h)
    out = boxes.clone()
    out[:, 1] = u.min(1).values.to(boxes.dtype)
    out[:, 2] = v.min(1).values.to(boxes.dtype)
    out[:, 3] = (u.max(1).values - u.min(1).values).to(boxes.dtype)
    out[:, 4] = (v.max(1).values - v.min(1).values).to(boxes.dtype)
    return out


class AlignedDataset(Dataset):
    """A dataset whose images (and boxes) are warped by fixed per-item affines ``theta [N, 2, 3]``.

    The warp happens in [0, 1] intensity space with zero padding (outside the body is dark),
    then the dataset's normalisation is re-applied.
    """

    def __init__(self, base: Dataset, thetas: torch.Tensor) -> None:
        if len(thetas) != len(base):
            raise ValueError(f"{len(thetas)} affines for {len(base)} items")
        self.base = base
        self.thetas = thetas.detach().float().cpu()
        self.preprocess = dataset_preprocess(base)

    @property
    def normalisation(self) -> str:
        """The normalisation kind of the images (that of ``base``)."""
        return self.preprocess.normalisation

    def __len__(self) -> int:
        return len(self.base)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.base.labels)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def warp_image(self, img: torch.Tensor, i: int) -> torch.Tensor:
        """Warp one ``[ch, H, W]`` map (any values) with item ``i``'s affine."""
        from cxrviewer.core.models.alignment import warp

        return warp(img[None].float(), self.thetas[i][None])[0]

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        pre = self.preprocess
        item["image"] = pre.normalise(self.warp_image(pre.denormalise(item["image"]), i).clamp(0, 1))
        if torch.is_tensor(item.get("boxes")) and item["boxes"].numel():
            item["boxes"] = _warp_boxes(item["boxes"], self.thetas[i], tuple(item["image"].shape[-2:]))
        return item


def _bundle_batches(bundle: Any, ds: Dataset, *, family: str, option: str, batch_size: int,
                    device: torch.device | str | None) -> Iterator[tuple[torch.nn.Module, torch.Tensor, tuple]]:
    """Yield ``(model, x, size)`` for every un-augmented batch of ``ds``: ``x`` as the bundle (model
    or ``LoadedBundle``) expects it (its input size, recorded preprocessing and normalisation),
    ``size`` the batch's own image size. Raises :class:`CxrError` when the model is not ``family``."""
    model = getattr(bundle, "model", bundle)
    manifest = getattr(bundle, "manifest", None)
    if getattr(model, "family", family) != family:
        article = "an" if family[0] in "aeiou" else "a"
        raise CxrError(f"--{option} must be {article} {family} bundle, not a {model.family} one")
    pre = Preprocess.from_manifest(manifest) if manifest is not None else Preprocess()
    device = torch.device(device) if device is not None else _device_of(model)
    model = model.to(device).eval()
    ds_pre = dataset_preprocess(ds)
    with no_augmentation(ds):
        for batch in _loader(ds, batch_size):
            x01 = ds_pre.denormalise(batch["image"].to(device).float())
            size = tuple(x01.shape[-2:])
            if pre.input_size is not None and size != pre.input_size:
                x01 = F.interpolate(x01, size=pre.input_size, mode="bilinear", align_corners=False, antialias=True)
            # the bundle's contrast stretch and normalisation, as the app's pipeline applies them
            yield model, pre.stretch_normalise(x01), size


def _crop_box_of(alignment: Any) -> tuple[float, float, float, float] | None:
    """The canonical lung-crop box of an alignment ``LoadedBundle`` (None: a bare model or no canonical)."""
    from cxrviewer.core.canonical import canonical_crop_box
    from cxrviewer.core.explain.alignment import canonical_path

    if getattr(alignment, "manifest", None) is None:
        return None
    try:
        path = canonical_path(alignment)
    except FileNotFoundError:
        return None
    return canonical_crop_box(path) if path is not None else None


@torch.no_grad()
def compute_thetas(alignment: Any, ds: Dataset, *, batch_size: int = 32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Affines ``[N, 2, 3]`` of an alignment network (model or ``LoadedBundle``) on the un-augmented ``ds``,
    onto the whole registered chest as the app's models see it (``full_frame_theta`` with the bundle's
    canonical crop box; the network's lung-crop affine for a bare model). No NCC refinement or
    rejection here: ``--align`` (an aligned cache, the app's own step) is the exact path."""
    from cxrviewer.core.canonical import full_frame_theta

    out = [model(x)["theta"].float().cpu()
           for model, x, _ in _bundle_batches(alignment, ds, family="alignment", option="alignment",
                                              batch_size=batch_size, device=device)]
    thetas = torch.cat(out) if out else torch.zeros(0, 2, 3)
    return full_frame_theta(thetas, _crop_box_of(alignment))


def align_dataset(ds: Dataset, alignment: Any, *, batch_size: int = 32,
                  device: torch.device | str | None = None) -> AlignedDataset:
    """``ds`` warped onto the canonical chest by an alignment network (disease-masks Eq. 6)."""
    return AlignedDataset(ds, compute_thetas(alignment, ds, batch_size=batch_size, device=device))


# ---------------------------------------------------------------------------------------
# disease masks (Eq. 2-3)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def accumulate_disease_masks(
    model: torch.nn.Module,
    ds: Dataset,
    *,
    min_prob: float = 0.8,
    threshold: float = 0.5,
    binary: bool = True,
    require_label: bool = False,
    symmetric_classes: Sequence[str] = SYMMETRIC_CLASSES,
    classes: Sequence[str] = CLASSES,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """``psi [C, h, w]`` and ``N_c`` (images per class) from the CAMs of ``model`` on ``ds``.

    Streaming form of disease-masks-attention.txt Eq. 3 (identical to
    ``explain.disease_masks.disease_masks_from_cams`` on the stacked CAMs): image ``d`` enters
    class ``c`` when ``P_c(x_d) >= min_prob`` (Eq. 2, sigmoid of the GAP'd CAM), its map is
    ``Lbar = H(L) + L`` for the symmetric classes, rescaled to [0, 1] by ``N``, averaged over the
    ``N_c`` images and thresholded by ``T`` (0/1 when ``binary``). The model runs in eval mode on
    the un-augmented images; ``require_label`` (not in the paper) also needs a positive label.
    """
    from cxrviewer.core.explain.disease_masks import normalize_maps

    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    sym = torch.tensor([name in set(symmetric_classes) for name in classes])
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(classes), dtype=torch.long)
    try:
        with no_augmentation(ds):
            for batch in _loader(ds, batch_size):
                out = model(batch["image"].to(device))
                cams = out["cam"].float().cpu()
                if cams.shape[1] != len(classes):
                    raise ModelError(f"model gives {cams.shape[1]} CAMs for {len(classes)} classes")
                probs = torch.sigmoid(out["logits"].float()).cpu()
                keep = probs >= min_prob
                if require_label:
                    keep &= batch["labels"] > 0.5
                lbar = torch.where(sym[None, :, None, None], torch.flip(cams, dims=[-1]) + cams, cams)
                normed = normalize_maps(lbar)
                if sums is None:
                    sums = torch.zeros(cams.shape[1:], dtype=torch.float64)
                sums += (normed.double() * keep[:, :, None, None]).sum(0)
                counts += keep.sum(0)
    finally:
        model.train(was_training)
    if sums is None:
        raise CxrError("no images to build disease masks from")
    mean = (sums / counts.clamp_min(1)[:, None, None]).float()
    psi = (mean >= threshold).float() if binary else mean * (mean >= threshold).float()
    psi[counts == 0] = 0.0
    for name, n in zip(classes, counts.tolist()):
        if n == 0:
            log.warning("disease mask for %s: no image with P >= %.2f; mask left empty (f' = f)", name, min_prob)
    return psi, [int(n) for n in counts.tolist()]


# ---------------------------------------------------------------------------------------
# pseudo disease masks (Sec. 4.4)
# ---------------------------------------------------------------------------------------
AnatomyFn = Callable[[int], np.ndarray]


def anatomy_from_folder(records: Sequence[Any], size: int, *, folder: str | Path | None = None) -> AnatomyFn:
    """``i -> [3, size, size]`` (left lung, right lung, heart; area-resized, values in [0, 1])
    from ``masks/{left_lung,right_lung,heart}/<image name>`` beside ``images/`` (phantoms, JSRT layout)."""
    from PIL import Image

    from cxrviewer.core.models.unet import SEGMENTATION_CLASSES

    def fn(i: int) -> np.ndarray:
        img_path = Path(records[i].path)
        root = Path(folder) if folder is not None else img_path.parent.parent
        out = []
        for name in SEGMENTATION_CLASSES:
            p = root / "masks" / name / img_path.name
            if not p.is_file():
                p = p.with_suffix(".png")
            if not p.is_file():
                raise CxrError(f"no {name} mask for {img_path.name} (looked for {p}); "
                               "use --segmentation BUNDLE instead", path=str(p))
            m = Image.open(p).convert("L").resize((size, size), Image.BOX)
            out.append(np.asarray(m, np.float32) / 255.0)
        return np.stack(out)

    return fn


@torch.no_grad()
def anatomy_from_segmentation(segmentation: Any, ds: Dataset, *, batch_size: int = 16,
                              device: torch.device | str | None = None) -> AnatomyFn:
    """``i -> [3, S, S]`` anatomy probabilities from a segmentation network (model or LoadedBundle)
    run on the (un-augmented, possibly aligned) images of ``ds``."""
    maps = []
    for model, x, size in _bundle_batches(segmentation, ds, family="segmentation", option="segmentation",
                                          batch_size=batch_size, device=device):
        p = torch.sigmoid(model(x)["logits"].float())[:, :3]
        if tuple(p.shape[-2:]) != size:
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        maps.append((p > 0.5).float().cpu())
    allmaps = torch.cat(maps).numpy()
    return lambda i: allmaps[i]


def pseudo_masks_from_anatomy(anatomy: AnatomyFn, n: int, *, grid: tuple[int, int] | None = None,
                              warp: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                              threshold: float = 0.5, classes: Sequence[str] = CLASSES) -> torch.Tensor:
    """Pseudo disease masks (disease-masks Sec. 4.4) averaged over ``n`` training images.

    Per image: ``explain.disease_masks.pseudo_disease_masks`` of its anatomy (optionally warped
    by ``warp(maps [3,S,S], i)`` when the images are aligned); the mean over images is
    thresholded at ``threshold`` (a region where at least half the chests have it), then
    area-averaged onto ``grid`` (the feature grid of the DM model) so psi holds the covered
    fraction of each feature cell.
    """
    from cxrviewer.core.explain.disease_masks import pseudo_disease_masks

    if n < 1:
        raise CxrError("no training images for the pseudo disease masks")
    total: np.ndarray | None = None
    for i in range(n):
        a = np.asarray(anatomy(i), np.float32)
        if warp is not None:
            a = warp(torch.from_numpy(a), i).numpy()
        pdm = pseudo_disease_masks(a[0], a[1], a[2], classes=classes)
        total = pdm.astype(np.float64) if total is None else total + pdm
    assert total is not None
    psi = torch.from_numpy((total / n >= threshold).astype(np.float32))
    if grid is not None and tuple(psi.shape[-2:]) != tuple(grid):
        psi = F.adaptive_avg_pool2d(psi[None], grid)[0]
    return psi


# ---------------------------------------------------------------------------------------
# DM model + retraining (Eq. 4-5)
# ---------------------------------------------------------------------------------------
def dm_from_classifier(classifier: torch.nn.Module, psi: torch.Tensor) -> torch.nn.Module:
    """A ``dm`` model with the classifier's backbone/head weights and ``psi`` as its disease masks.

    The classifier must be a plain CAM classifier with average pooling (same backbone and head,
    so every state-dict key maps; only the ``disease_masks`` buffer is new). ``mask_size`` is
    psi's grid (square grids; otherwise the larger side).
    """
    from cxrviewer.core.models import create_model

    arch = getattr(classifier, "arch", None)
    if arch not in ("cam_classifier", "dm"):
        raise ModelError(f"disease masks need a cam_classifier (or dm) network to start from, not {arch!r}")
    kw = dict(getattr(classifier, "arch_kwargs", {}) or {})
    if kw.get("pool", "avg") != "avg":
        raise ModelError("the DM model needs average pooling (disease-masks Eq. 2); the classifier uses "
                         f"{kw.get('pool')!r}")
    dm_kw = {k: kw[k] for k in ("backbone", "num_classes", "in_channels", "transition_channels") if k in kw}
    dm_kw["mask_size"] = int(max(psi.shape[-2:]))
    model = create_model("dm", **dm_kw)
    state = {k: v for k, v in classifier.state_dict().items() if k != "disease_masks"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"disease_masks"}:
        raise ModelError(f"classifier weights do not map onto the dm model: missing {missing}, "
                         f"unexpected {unexpected}")
    model.set_disease_masks(psi.float())
    model.to(_device_of(classifier))
    return model


@dataclass
class DiseaseMaskResult:
    """What :func:`train_disease_masks` made."""

    model: torch.nn.Module
    psi: torch.Tensor  # [C, h, w] as stored in the model
    counts: list[int]  # N_c (images per class that built the mask; -1 for PDM)
    source: str  # "dm" (Eq. 3) or "pdm"
    history: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)  # classifier AUROC on val before retraining
    feature_grid: tuple[int, int] = (0, 0)


def _feature_grid(model: torch.nn.Module, ds: Dataset) -> tuple[int, int]:
    x = ds[0]["image"][None].to(_device_of(model))
    was = model.training
    model.eval()
    with torch.no_grad():
        g = tuple(model(x)["cam"].shape[-2:])
    model.train(was)
    return int(g[0]), int(g[1])


def train_disease_masks(
    classifier: torch.nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    *,
    pseudo: AnatomyFn | None = None,
    pseudo_warp: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    min_prob: float = 0.8,
    threshold: float = 0.5,
    require_label: bool = False,
    binary: bool = True,
    stop_after_epoch: int | None = None,
) -> DiseaseMaskResult:
    """Generate psi from ``classifier`` on ``train_ds`` (Eq. 2-3) and retrain a DM model (Eq. 4-5).

    ``train_ds``/``val_ds`` should already be aligned when the recipe uses alignment
    (:func:`align_dataset`). With ``pseudo`` (an anatomy function, see
    :func:`anatomy_from_folder` / :func:`anatomy_from_segmentation`) psi is the averaged PDM
    instead of Eq. 3. ``cfg.epochs`` is the number of retraining epochs (paper: 5 more).
    """
    from cxrviewer.core.device import select_device

    device = select_device(cfg.device).device
    classifier = classifier.to(device)
    before: dict = {}
    if val_ds is not None and len(val_ds):
        before = auroc_table(np.asarray(val_ds.labels), predict(classifier, val_ds, batch_size=cfg.batch_size))
    grid = _feature_grid(classifier, train_ds)
    if pseudo is None:
        psi, counts = accumulate_disease_masks(classifier, train_ds, min_prob=min_prob, threshold=threshold,
                                               binary=binary, require_label=require_label,
                                               batch_size=cfg.batch_size, device=device)
        source = "dm"
    else:
        psi = pseudo_masks_from_anatomy(pseudo, len(train_ds), grid=grid, warp=pseudo_warp, threshold=threshold)
        counts, source = [-1] * psi.shape[0], "pdm"
    log.info("disease masks (%s) on a %dx%d grid; images per class: %s", source, *grid,
             dict(zip(CLASSES, counts)))
    model = dm_from_classifier(classifier, psi)
    model, history = train_classifier(model, train_ds, val_ds, cfg, stop_after_epoch=stop_after_epoch)
    psi_stored = model.disease_masks.detach().cpu().clone()
    return DiseaseMaskResult(model=model, psi=psi_stored, counts=counts, source=source, history=history,
                             before=before, feature_grid=grid)


def save_dm_bundle(result: DiseaseMaskResult, out: str | Path, *, input_size: int, provenance: dict,
                   research_demo: bool = True) -> Path:
    """Bundle with role ``"dm"``; psi also as the extra array ``"disease_masks"`` for display."""
    from cxrviewer.core.bundle import save_bundle

    prov = dict(provenance)
    prov.setdefault("research_demo", research_demo)
    prov.setdefault("disease_mask_source", result.source)
    prov.setdefault("disease_mask_counts", dict(zip(CLASSES, result.counts)))
    src = "pseudo disease masks from anatomy (Sec. 4.4)" if result.source == "pdm" else \
        "disease masks from the classifier's CAMs (Eq. 3)"
    return save_bundle(result.model.cpu(), out, classes=list(CLASSES), input_size=input_size,
                       normalisation={"kind": "minus1_1"}, provenance=prov, role="dm",
                       description=f"DM attention classifier (disease-masks Eq. 4-5); psi: {src}",
                       extras={"disease_masks": result.psi.numpy().astype(np.float32)},
                       extras_info={"disease_masks": f"psi [C, h, w] on the feature grid of the (aligned) "
                                                     f"input, values in [0, 1]; {src}"},
                       overwrite=True)
