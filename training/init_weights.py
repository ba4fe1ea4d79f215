"""Start a training run from the weights of a bundle the user has (``cxr-train ... --init-weights BUNDLE``).

The bundle may be one of ours (any family with a :class:`~cxrviewer.core.models.Backbone`) or an
imported torchvision / CheXNet / torchxrayvision model (``cxrviewer import-model`` writes those as
``cam_classifier`` bundles with a densenet121 or resnet18/34/50 backbone). What is reused:

- **the backbone**: every :class:`Backbone` of the network to train (``backbone``, and CIA-Net's
  attention-branch ``encoder``) gets the bundle's backbone tensors (its ``encoder`` for an
  ``encoder`` when the bundle has one). The backbone names must be equal (densenet121,
  resnet18/34/50, tiny) and the tensors must fit by name and shape, strictly; otherwise
  :class:`InitWeightsError` names both backbones and nothing is changed.
- **the head** too, only when the bundle has the same classes and the same architecture (or is
  the baseline ``cam_classifier`` and the target ``dm``, whose head is the baseline's) and every
  head parameter fits by name and shape. Classes match by spelling and synonym (labelsets); a
  classifier bundle listing them in another order has its class rows reordered. A trainer whose classes differ gets a new, randomly
  initialised head (the usual fine-tuning case: an 18-label torchxrayvision model fine-tuned on
  the NIH-14 boxes).
- **input channels**: our trainers feed grayscale (1 channel). A 3-channel bundle (ImageNet-style)
  has its first convolution folded to 1 channel: the RGB kernels are summed, each scaled by
  ``s / s_c`` when the manifest gives per-channel ``mean``/``std`` (``channel_mean_std``); the constant those channel
  means leave behind is folded into the stem's BatchNorm running mean. A 1-channel image repeated
  into 3 channels then gives exactly the 1-channel result away from the image border (exactly
  everywhere for a scalar normalisation). Other channel mismatches are refused.
- **preprocessing**: the backbone's first layers expect the bundle's intensity normalisation, so
  the trainer trains, evaluates and writes its bundle with it (:func:`apply_normalisation`);
  per-channel statistics become their mean. The bundle's crop, contrast stretch and input size are
  not adopted (the trainer's ``--size`` and whole images are used; a note says so).

:func:`init_from_bundle` does all of it and returns an :class:`InitReport` (what was loaded,
what stayed random, the adaptation, the normalisation) whose :meth:`InitReport.provenance` the
trainers record as ``provenance.init_weights`` of the bundle they write.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.backbones import Backbone

log = logging.getLogger(__name__)

#: (bundle architecture, target architecture) pairs whose heads are the same module
HEAD_COMPATIBLE: frozenset[tuple[str, str]] = frozenset({("cam_classifier", "dm")})

#: the first convolution and the BatchNorm after it, in every backbone's stem
FIRST_CONV = "stem.0.weight"
STEM_BN_MEAN = "stem.1.running_mean"

__all__ = ["InitWeightsError", "InitReport", "backbones_of", "class_order", "fold_first_conv", "init_from_bundle",
           "apply_normalisation", "HEAD_COMPATIBLE"]


class InitWeightsError(ModelError):
    """The ``--init-weights`` bundle does not fit the network being trained."""


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_from_bundle` loaded into a network."""

    path: str
    name: str
    weights_sha256: str | None
    architecture: str
    backbone: str
    in_channels: int
    #: part ("backbone", "encoder", "head") -> number of tensors copied
    loaded: dict[str, int]
    #: parts of the target left at their random initialisation, with the reason
    random: dict[str, str]
    #: the normalisation the trainer must feed (the bundle's; per-channel statistics averaged)
    normalisation: dict[str, Any]
    adapted: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def head_loaded(self) -> bool:
        """True when the head came from the bundle too (same classes and architecture)."""
        return "head" in self.loaded

    def summary(self) -> str:
        """One line for the log: source, tensors per part, what stayed random."""
        parts = ", ".join(f"{k} {n} tensors" for k, n in self.loaded.items())
        rnd = "; ".join(f"{k} random ({why})" for k, why in self.random.items())
        extra = f"; {self.adapted}" if self.adapted else ""
        return f"init weights from {self.name} ({self.architecture}, {self.backbone}): {parts}" + (
            f"; {rnd}" if rnd else "") + extra

    def provenance(self) -> dict[str, Any]:
        """The JSON object recorded as ``provenance.init_weights`` of the bundle a trainer writes."""
        return {"bundle": self.name, "path": self.path, "weights_sha256": self.weights_sha256,
                "architecture": self.architecture, "backbone": self.backbone, "in_channels": self.in_channels,
                "loaded": dict(self.loaded), "random": dict(self.random), "adapted": self.adapted,
                "normalisation": dict(self.normalisation), "notes": list(self.notes)}


def backbones_of(model: torch.nn.Module) -> dict[str, Backbone]:
    """The :class:`Backbone` modules of ``model`` by attribute path (``backbone``, ``encoder``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Backbone) and name}


def _channels(bb: Backbone) -> int:
    return int(bb.stem[0].weight.shape[1])


def _plural(n: int) -> str:
    return f"{n} channel" + ("" if n == 1 else "s")


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def _channel_stats(norm: Mapping[str, Any], n: int) -> tuple[list[float], list[float]] | None:
    """Per-channel ``(means, stds)`` of a ``channel_mean_std`` (or ``mean_std``) normalisation with
    lists, else None."""
    mean, std = norm.get("mean"), norm.get("std")
    if (norm.get("kind") not in ("channel_mean_std", "mean_std") or not isinstance(mean, (list, tuple))
            or not isinstance(std, (list, tuple))):
        return None
    if len(mean) != n or len(std) != n:
        raise InitWeightsError(f"normalisation mean/std have {len(mean)}/{len(std)} values for {_plural(n)}")
    return [float(v) for v in mean], [float(v) for v in std]


def fold_first_conv(state: Mapping[str, torch.Tensor], norm: Mapping[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Backbone ``state`` of a multi-channel stem folded to 1 input channel.

    Returns ``(state, normalisation for the 1-channel input, description)``. With per-channel
    ``mean``/``std`` ``(m_c, s_c)`` the 1-channel input uses ``m = mean(m_c)``, ``s = mean(s_c)``;
    the kernel becomes ``sum_c W_c * s / s_c`` and the constant ``sum_c (m - m_c) / s_c * sum(W_c)``
    per output channel is subtracted from the stem BatchNorm's running mean.
    """
    out = {k: v.clone() for k, v in state.items()}
    w = out[FIRST_CONV].float()
    n = int(w.shape[1])
    stats = _channel_stats(norm, n)
    if stats is None:
        out[FIRST_CONV] = w.sum(1, keepdim=True).to(state[FIRST_CONV].dtype)
        return out, dict(norm), f"first conv {n} -> 1 channel (the {n} channels' kernels summed)"
    means, stds = stats
    m, s = sum(means) / n, sum(stds) / n
    scale = torch.tensor([s / sc for sc in stds], dtype=w.dtype)[None, :, None, None]
    out[FIRST_CONV] = (w * scale).sum(1, keepdim=True).to(state[FIRST_CONV].dtype)
    shift = torch.tensor([(m - mc) / sc for mc, sc in zip(means, stds)], dtype=w.dtype)
    offset = (w.sum((2, 3)) * shift[None, :]).sum(1)
    if STEM_BN_MEAN in out:
        out[STEM_BN_MEAN] = (out[STEM_BN_MEAN].float() - offset).to(state[STEM_BN_MEAN].dtype)
    elif bool(offset.abs().max() > 0):
        raise InitWeightsError("cannot fold the per-channel means: the stem has no BatchNorm after its first conv")
    return out, {"kind": "mean_std", "mean": m, "std": s}, (
        f"first conv {n} -> 1 channel (kernels summed, scaled by std {s:.4g} / per-channel std; "
        f"per-channel means folded into the stem BatchNorm; input normalised with mean {m:.4g}, std {s:.4g})")


def _check_fits(state: Mapping[str, torch.Tensor], target: torch.nn.Module, what: str) -> None:
    """Strict name and shape check of ``state`` against ``target``'s state dict."""
    want = target.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        k = (missing or extra)[0]
        raise InitWeightsError(f"{what}: tensor '{k}' is {'missing from' if missing else 'unexpected in'} the "
                               f"init weights ({len(missing)} missing, {len(extra)} unexpected)")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InitWeightsError(f"{what}: tensor '{k}' has shape {tuple(state[k].shape)} in the init weights "
                                   f"but {tuple(v.shape)} in the network")


def class_order(src_classes: Sequence[str], classes: Sequence[str]) -> list[int] | None:
    """For each trained class, the index of the same class in the bundle (by spelling and synonym,
    :mod:`cxrviewer.core.labelsets`), or None unless the two lists are the same classes one to one."""
    from cxrviewer.core.errors import LabelSetError
    from cxrviewer.core.labelsets import NIH14, LabelSet, map_names

    if len(src_classes) != len(classes):
        return None
    try:
        target = NIH14 if tuple(classes) == NIH14.labels else LabelSet("trained", tuple(classes))
        mapping, unmapped = map_names(src_classes, target)
    except LabelSetError:
        return None
    mapped = [mapping.get(c) for c in src_classes]
    if unmapped or len(set(mapped)) != len(classes):
        return None
    return [mapped.index(c) for c in target.labels]


def _head_state(src_state: Mapping[str, torch.Tensor], src_arch: str, src_classes: Sequence[str],
                model: torch.nn.Module, classes: Sequence[str], skip: Iterable[str]
                ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The non-backbone tensors to copy (class rows in the trained order), or ``(None, why not)``.

    A bundle listing the same classes in another order (or spelling) gives a classifier-family
    head with its ``classifier`` rows permuted; any other head needs the very same order."""
    prefixes = tuple(p + "." for p in skip)
    order = class_order(src_classes, classes)
    if order is None:
        return None, f"classes differ: {len(src_classes)} in the bundle, {len(classes)} trained here"
    arch = str(getattr(model, "arch", ""))
    if src_arch != arch and (src_arch, arch) not in HEAD_COMPATIBLE:
        return None, f"architecture differs: {src_arch} -> {arch}"
    permuted = order != list(range(len(order)))
    if permuted and getattr(model, "family", "") != "classifier":
        return None, "classes in another order"
    params = [k for k, _ in model.named_parameters() if not k.startswith(prefixes)]
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for k in params:
        if k not in src_state or tuple(src_state[k].shape) != tuple(own[k].shape):
            return None, f"head tensor '{k}' does not fit"
    head = {k: src_state[k] for k in own if k in src_state and tuple(src_state[k].shape) == tuple(own[k].shape)}
    if permuted:
        for k in ("classifier.weight", "classifier.bias"):
            if k in head:
                head[k] = head[k][order]
    return head, ""


def _plan(model: torch.nn.Module, src: torch.nn.Module, label: str) -> tuple[dict[str, str], Backbone]:
    """Target backbone path -> source backbone path (``encoder`` from ``encoder`` when the bundle
    has one, else from ``backbone``), after the name and channel checks; and the source backbone."""
    found = backbones_of(src)
    if not found:
        raise InitWeightsError(f"init weights {label} ({getattr(src, 'arch', '?')}) have no backbone our trainers "
                               f"build (densenet121, resnet18/34/50 or tiny)")
    main_key = "backbone" if "backbone" in found else next(iter(found))
    src_bb = found[main_key]
    targets = backbones_of(model)
    if not targets:
        raise InitWeightsError(f"{getattr(model, 'arch', 'the network')} has no backbone; --init-weights does "
                               f"not apply to it")
    s_ch = _channels(src_bb)
    plan = {}
    for path, bb in targets.items():
        t_ch = _channels(bb)
        if bb.name != src_bb.name or not (t_ch == s_ch or t_ch == 1):
            raise InitWeightsError(f"init weights {src_bb.name} ({_plural(s_ch)}) of bundle '{label}' do not fit "
                                   f"backbone {bb.name} ({_plural(t_ch)}) of {getattr(model, 'arch', 'the network')}")
        plan[path] = path if path in found and found[path].name == src_bb.name else main_key
    return plan, src_bb


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def _notes(manifest: Any, in_size: tuple[int, int] | None) -> tuple[str, ...]:
    """What of the bundle's preprocessing the trainer does not adopt."""
    notes = []
    if (manifest.crop or {}).get("kind", "none") != "none":
        notes.append(f"the init bundle crops its input ({manifest.crop}); the trainer feeds whole images")
    if (manifest.normalisation or {}).get("stretch"):
        notes.append("the init bundle stretches contrast before normalising; the trainer does not")
    if in_size is not None and tuple(manifest.input_size) != tuple(in_size):
        notes.append(f"the init bundle was trained at {tuple(manifest.input_size)} px; training at {tuple(in_size)}")
    return tuple(notes)


def init_from_bundle(model: torch.nn.Module, bundle: str | Path, *, classes: Sequence[str] | None = None,
                     input_size: int | None = None) -> InitReport:
    """Load the backbone (and the head, where it fits) of ``bundle`` into ``model``, in place.

    ``classes``: the class list the trainer trains (default the NIH 14). Every check runs before a
    tensor is copied, so on :class:`InitWeightsError` (or the :class:`BundleError` of an unreadable
    bundle) ``model`` is unchanged.
    """
    from cxrviewer.core.bundle import load_bundle
    from cxrviewer.core.classes import CLASSES

    b = load_bundle(bundle)
    label = b.name
    plan, src_bb = _plan(model, b.model, label)
    src_state = b.model.state_dict()
    norm: dict[str, Any] = dict(b.manifest.normalisation)
    adapted = None
    staged: dict[str, dict[str, torch.Tensor]] = {}
    for path, src_path in plan.items():
        st = _sub_state(src_state, src_path)
        target = model.get_submodule(path)
        if FIRST_CONV in st and _channels(target) != int(st[FIRST_CONV].shape[1]):
            st, norm, adapted = fold_first_conv(st, b.manifest.normalisation)
        _check_fits(st, target, f"init weights {src_bb.name} ({label}) -> backbone '{path}'")
        staged[path] = st
    head, why = _head_state(src_state, b.manifest.architecture, b.manifest.classes, model,
                            tuple(CLASSES if classes is None else classes), plan)
    loaded: dict[str, int] = {}
    for path, st in staged.items():
        model.get_submodule(path).load_state_dict(st, strict=True)
        loaded[path] = len(st)
    own = model.state_dict()
    if head:
        with torch.no_grad():
            for k, v in head.items():
                own[k].copy_(v)
        loaded["head"] = len(head)
    prefixes = tuple(p + "." for p in plan)
    rest = sorted({_top(k) for k in own if not k.startswith(prefixes) and (not head or k not in head)})
    random = {part: (why if head is None else "not in the init bundle") for part in rest}
    size = (int(input_size), int(input_size)) if input_size else None
    rep = InitReport(path=str(bundle), name=label, weights_sha256=b.manifest.weights_sha256,
                     architecture=b.manifest.architecture, backbone=src_bb.name, in_channels=_channels(src_bb),
                     loaded=loaded, random=random, normalisation=norm, adapted=adapted,
                     notes=_notes(b.manifest, size))
    log.info("%s", rep.summary())
    return rep


def apply_normalisation(datasets: Iterable[Any], normalisation: Mapping[str, Any]) -> dict[str, Any]:
    """Make ``datasets`` (ChestDataset / CachedDataset) normalise their images as ``normalisation`` says;
    returns the manifest ``normalisation`` they now feed (a contrast stretch is not applied, not listed)."""
    from dataclasses import replace

    from cxrviewer.core.preprocess import Preprocess

    try:
        want = Preprocess.from_normalisation(dict(normalisation))
    except (TypeError, ValueError) as exc:
        raise InitWeightsError(f"the init bundle's normalisation {dict(normalisation)} cannot feed a "
                               f"1-channel trainer: {exc}") from exc
    for ds in datasets:
        if ds is None:
            continue
        pre = getattr(ds, "preprocess", None)
        if not isinstance(pre, Preprocess):
            raise InitWeightsError(f"{type(ds).__name__} has no preprocessing to set the init bundle's "
                                   f"normalisation on")
        ds.preprocess = replace(pre, normalisation=want.normalisation, mean=want.mean, std=want.std)
    return replace(want, stretch=None).to_manifest()["normalisation"]
