"""Turn a user's checkpoint into a cxrviewer model bundle (``cxrviewer import-model``; Qt-free).

Formats (:data:`FORMATS`):

``torchxrayvision``
    torchxrayvision's DenseNet-121 (``xrv.models.DenseNet``; its weight files are whole modules
    saved with ``torch.save(model)``, so they need ``allow_pickle``) or, with ``--arch resnet50``,
    its ResNet-50 (a state dict of torchvision's ResNet-50 with a 1-channel ``conv1``; 512 px
    by default): 1 channel, 224 px, its
    intensity scaling ``(2 x - 1) * 1024`` (``mean_std`` with mean 0.5, std 1/2048), its 18
    labels (label set ``torchxrayvision18``). Its ``op_threshs`` buffer is dropped: bundles
    give logits.
``chexnet``
    CheXNet re-implementations: torchvision DenseNet-121 under ``state_dict`` with ``module.``
    / ``module.densenet121.`` prefixes and a ``Sequential(Linear, Sigmoid)`` head; 3 channels,
    ImageNet mean/std, 224 px, the 14 NIH labels in CheXNet's order.
``torchvision``
    a torchvision classification model's state dict (``--arch``: resnet18/34/50 and
    densenet121 become our ``cam_classifier``, the backbone our trainers use; any other
    supported network becomes ``imported_classifier``); ImageNet mean/std, 224 px.
``timm``
    a timm model's state dict (``--arch`` the timm name; timm must be installed); mean/std and
    input size from timm's pretrained config of that name.

Checkpoints are read by :mod:`.checkpoint` (``.safetensors``, or ``torch.load(weights_only=True)``;
pickles only with ``allow_pickle``, in a child process). The manifest's ``provenance`` records
``imported``, the format, the checkpoint's file name, size and SHA-256, the source labels and
architecture, and whether CAM is exact.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import BUNDLE_SUFFIX, save_bundle
from ..errors import CxrError, LabelSetError
from ..labelsets import NIH14, TORCHXRAYVISION18, LabelSet, get_label_set, guess_label_set
from .checkpoint import Checkpoint, ImportModelError, PickleRequiredError, read_checkpoint
from .layouts import OUR_BACKBONES, Converted, to_imported, to_our_backbone

__all__ = ["FORMATS", "ImportModelError", "PickleRequiredError", "import_checkpoint"]

FORMATS: tuple[str, ...] = ("torchxrayvision", "chexnet", "torchvision", "timm")
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
#: CheXNet's (arnoweng/CheXNet) output order
CHEXNET_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
#: torchxrayvision's intensity scaling, [0, 1] -> [-1024, 1024]: (x - 0.5) / (1 / 2048)
XRV_NORMALISATION: dict[str, Any] = {"kind": "mean_std", "mean": 0.5, "std": 1.0 / 2048.0}


@dataclass
class _Plan:
    """What a format contributes: the converted network, input recipe and default labels."""

    converted: Converted
    arch_label: str
    input_size: int
    normalisation: dict[str, Any]
    default_classes: tuple[str, ...] | None
    default_set: LabelSet | None


def _imagenet(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    return {"kind": "channel_mean_std", "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _plan(fmt: str, ckpt: Checkpoint, arch: str | None, input_size: int | None) -> _Plan:
    """Convert the checkpoint per ``fmt`` (see module docstring)."""
    if fmt in ("torchxrayvision", "chexnet"):
        arch = arch or "densenet121"
        allowed = ("densenet121", "resnet50") if fmt == "torchxrayvision" else ("densenet121",)
        if arch not in allowed:
            raise ImportModelError(f"--format {fmt} supports --arch {' or '.join(allowed)}, not {arch!r}")
        conv = to_our_backbone(ckpt.state, arch)
        if fmt == "torchxrayvision":  # xrv.models.ResNet's weights are resnet50-res512: 512 px
            return _Plan(conv, arch, input_size or (512 if arch == "resnet50" else 224), dict(XRV_NORMALISATION),
                         TORCHXRAYVISION18.labels, TORCHXRAYVISION18)
        return _Plan(conv, arch, input_size or 224, _imagenet(), CHEXNET_CLASSES, NIH14)
    if not arch:
        raise ImportModelError(f"--format {fmt} needs --arch (the {fmt} model name, e.g. resnet50, efficientnet_b0)")
    if fmt == "torchvision":
        conv = to_our_backbone(ckpt.state, arch) if arch in OUR_BACKBONES else to_imported(ckpt.state, "torchvision", arch)
        return _Plan(conv, arch, input_size or 224, _imagenet(), None, None)
    conv = to_imported(ckpt.state, "timm", arch)
    cfg = getattr(conv.model.net, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or (3, 224, 224)
    return _Plan(conv, f"timm {arch}", input_size or int(size[-1]),
                 _imagenet(cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD), None, None)


def _resolve_labels(n_out: int, classes: Sequence[str] | None, label_set: str | os.PathLike | None,
                    plan: _Plan, ckpt: Checkpoint) -> tuple[tuple[str, ...], LabelSet]:
    """The bundle's class names and their label set (see :func:`import_checkpoint`)."""
    try:
        chosen = get_label_set(label_set) if label_set else None
    except (LabelSetError, OSError) as exc:
        raise ImportModelError(f"--label-set: {exc}") from exc
    if classes:
        names = tuple(str(c).strip() for c in classes)
    elif plan.default_classes and len(plan.default_classes) == n_out:
        names = plan.default_classes
    elif chosen is not None and len(chosen) == n_out:
        names = chosen.labels
    else:
        raise ImportModelError(f"the checkpoint's head has {n_out} outputs: name them with --classes "
                               f"({n_out} names, in output order) or a --label-set of {n_out} labels")
    if len(names) != n_out:
        raise ImportModelError(f"--classes names {len(names)} classes but the checkpoint's head has {n_out} outputs")
    if chosen is None:
        default = plan.default_set
        chosen = default if default is not None and all(c in default for c in names) else guess_label_set(names)
    if chosen is None:
        try:
            chosen = LabelSet(f"{ckpt.path.stem[:60]}-classes", names, title=f"classes of {ckpt.path.name[:80]}")
        except LabelSetError as exc:
            raise ImportModelError(f"--classes: {exc}") from exc
    unknown = [c for c in names if c not in chosen]
    if unknown:
        raise ImportModelError(f"--classes {', '.join(map(repr, unknown[:5]))} are not in the label set "
                               f"{chosen.display_name!r}; name another --label-set or fix the names")
    return tuple(chosen.canonical(c) or c for c in names), chosen


def _provenance(fmt: str, ckpt: Checkpoint, plan: _Plan, source_labels: Sequence[str]) -> dict[str, Any]:
    conv = plan.converted
    return {
        "imported": True, "trained": True, "research_demo": False,
        "format": fmt, "checkpoint": ckpt.path.name, "checkpoint_sha256": ckpt.sha256,
        "checkpoint_bytes": ckpt.bytes, "source_architecture": plan.arch_label,
        "source_labels": list(source_labels), "pickled_checkpoint": ckpt.pickled,
        "dropped_tensors": conv.dropped, "cam_exact": conv.cam_exact,
    }


def import_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                      arch: str | None = None, classes: Sequence[str] | None = None,
                      label_set: str | os.PathLike | None = None, allow_pickle: bool = False,
                      input_size: int | None = None, overwrite: bool = False,
                      warn: Callable[[str], None] | None = None) -> Path:
    """Convert ``checkpoint`` (format ``fmt``) into the bundle ``out``; returns its path.

    ``classes``: names of the outputs in order (default: the format's list, else the
    ``label_set``'s labels when their number matches). ``label_set``: a built-in set name or a
    .json/.txt file; default: the format's set, else the smallest built-in set holding every
    class, else a set made of the classes. Raises :class:`ImportModelError` (or another
    :class:`~cxrviewer.core.errors.CxrError`) with one line; nothing is written then.
    """
    if fmt not in FORMATS:
        raise ImportModelError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    target = Path(out)
    if not target.name.endswith(BUNDLE_SUFFIX):
        target = target.with_name(target.name + BUNDLE_SUFFIX)
    if target.exists() and not overwrite:
        raise ImportModelError("the bundle already exists (choose another --out)", path=str(target))
    ckpt = read_checkpoint(checkpoint, allow_pickle=allow_pickle, warn=warn)
    plan = _plan(fmt, ckpt, arch, input_size)
    conv = plan.converted
    names, chosen = _resolve_labels(conv.num_classes, classes, label_set, plan, ckpt)
    source = ckpt.meta.get("targets") if isinstance(ckpt.meta.get("targets"), list) else None
    source_labels = source or plan.default_classes or names
    cam = ("CAM exact (global average pooling + linear)" if conv.cam_exact else
           "CAM approximate: a LayerNorm after pooling is linearised per image")
    description = (f"{plan.arch_label} imported from a {fmt} checkpoint ({ckpt.path.name}); {len(names)} classes; "
                   f"{cam}")
    try:
        return save_bundle(conv.model, target, classes=names, input_size=plan.input_size,
                           normalisation=plan.normalisation, description=description[:1000],
                           provenance=_provenance(fmt, ckpt, plan, source_labels), label_set=chosen,
                           overwrite=overwrite)
    except CxrError:
        raise
    except (OSError, ValueError) as exc:
        raise ImportModelError(f"cannot write the bundle: {exc}", path=str(target)) from exc
