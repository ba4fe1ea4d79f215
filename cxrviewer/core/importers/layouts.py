"""Checkpoint layouts -> registry networks: torchvision-layout DenseNet-121 / ResNet onto our
``cam_classifier`` backbones, anything else onto ``imported_classifier`` (Qt-free).

Our :class:`~cxrviewer.core.models.backbones.Backbone` re-packages torchvision's modules as
``stem`` and ``stage2..stage5``; :data:`DENSENET_RENAMES` and :data:`RESNET_RENAMES` rename a
torchvision (or torchxrayvision, or CheXNet) state dict onto it, so an imported DenseNet-121 or
ResNet has exactly the backbone our trainers build (only ``in_channels`` may differ: 3 for
ImageNet-style checkpoints, 1 for torchxrayvision).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import ImportModelError, fit_state, fix_old_densenet_keys, strip_prefixes

#: torchvision DenseNet-121 name prefix -> ours (cam_classifier on densenet121)
DENSENET_RENAMES: tuple[tuple[str, str], ...] = (
    ("features.conv0.", "backbone.stem.0."), ("features.norm0.", "backbone.stem.1."),
    ("features.denseblock1.", "backbone.stages.stage2."),
    ("features.transition1.", "backbone.stages.stage3.0."), ("features.denseblock2.", "backbone.stages.stage3.1."),
    ("features.transition2.", "backbone.stages.stage4.0."), ("features.denseblock3.", "backbone.stages.stage4.1."),
    ("features.transition3.", "backbone.stages.stage5.0."), ("features.denseblock4.", "backbone.stages.stage5.1."),
    ("features.norm5.", "backbone.stages.stage5.2."),
    ("classifier.0.", "classifier."),  # CheXNet: Sequential(Linear, Sigmoid)
    ("classifier.", "classifier."),
)
#: torchvision ResNet name prefix -> ours (cam_classifier on resnet18/34/50)
RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("conv1.", "backbone.stem.0."), ("bn1.", "backbone.stem.1."),
    ("layer1.", "backbone.stages.stage2."), ("layer2.", "backbone.stages.stage3."),
    ("layer3.", "backbone.stages.stage4."), ("layer4.", "backbone.stages.stage5."),
    ("fc.", "classifier."),
)
#: our backbones that take a torchvision layout: name -> (renames, first conv key, head weight key)
OUR_BACKBONES: dict[str, tuple[tuple[tuple[str, str], ...], str, str]] = {
    "densenet121": (DENSENET_RENAMES, "features.conv0.weight", "classifier.weight"),
    "resnet18": (RESNET_RENAMES, "conv1.weight", "fc.weight"),
    "resnet34": (RESNET_RENAMES, "conv1.weight", "fc.weight"),
    "resnet50": (RESNET_RENAMES, "conv1.weight", "fc.weight"),
}
#: buffers a source network may carry that our networks do not (torchxrayvision's operating points)
IGNORED_KEYS: tuple[str, ...] = ("op_threshs",)


@dataclass
class Converted:
    """A registry network holding the checkpoint's weights, and what was learnt on the way."""

    model: nn.Module
    num_classes: int
    in_channels: int
    dropped: list[str]
    cam_exact: bool = True


def _rename(state: Mapping[str, torch.Tensor], renames: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _source_keys(backbone: str) -> set[str]:
    """The torchvision state-dict names of ``backbone`` (built on the meta device: nothing allocated)."""
    from torchvision import models as tvm

    with torch.device("meta"):
        return set(getattr(tvm, backbone)(weights=None).state_dict())


def _head_shape(state: Mapping[str, torch.Tensor], key: str) -> int:
    for k in (key, key.replace("classifier.", "classifier.0.")):
        if k in state and state[k].dim() == 2:
            return int(state[k].shape[0])
    raise ImportModelError(f"the checkpoint has no final linear layer '{key}' (found e.g. "
                           f"{', '.join(list(state)[-3:])})")


def to_our_backbone(state: Mapping[str, torch.Tensor], backbone: str) -> Converted:
    """``cam_classifier`` on ``backbone`` with a torchvision-layout state dict (prefixes stripped)."""
    from ..models import create_model

    renames, conv_key, head_key = OUR_BACKBONES[backbone]
    expected = _source_keys(backbone)
    st = fix_old_densenet_keys(strip_prefixes(state, expected | {k.replace("classifier.", "classifier.0.")
                                                                 for k in expected}))
    if conv_key not in st:
        raise ImportModelError(f"the checkpoint is not a torchvision-layout {backbone}: no '{conv_key}' "
                               f"(first keys: {', '.join(list(st)[:4])})")
    n_out, c_in = _head_shape(st, head_key), int(st[conv_key].shape[1])
    try:
        model = create_model("cam_classifier", backbone=backbone, num_classes=n_out, in_channels=c_in)
    except Exception as exc:  # noqa: BLE001 - ModelError, or a shape the registry refuses
        raise ImportModelError(f"cannot build {backbone} with {n_out} outputs and {c_in} channels: {exc}") from exc
    dropped = fit_state(model, _rename(st, renames), f"cam_classifier({backbone})", IGNORED_KEYS)
    return Converted(model.eval(), n_out, c_in, dropped)


def to_imported(state: Mapping[str, torch.Tensor], library: str, name: str, in_channels: int = 3) -> Converted:
    """``imported_classifier`` (models/imported.py) for a torchvision/timm network ``name``."""
    from ..models import create_model

    with torch.device("meta"):
        probe = create_model("imported_classifier", library=library, model=name, num_classes=1,
                             in_channels=in_channels)
    expected = {k[len("net."):] for k in probe.state_dict()}
    st = strip_prefixes(state, expected)
    n_out = _head_shape(st, f"{probe.split.linear}.weight")
    model = create_model("imported_classifier", library=library, model=name, num_classes=n_out,
                         in_channels=in_channels)
    dropped = fit_state(model, {f"net.{k}": v for k, v in st.items()}, f"{library} {name}", IGNORED_KEYS)
    _check_split(model.eval(), f"{library} {name}")
    return Converted(model, n_out, in_channels, dropped, cam_exact=model.cam_exact)


def _check_split(model: nn.Module, what: str, size: int = 64) -> None:
    """The split network's logits must equal the library network's (else the head is one we do
    not model, e.g. an MLP after pooling)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, model.in_channels, size, size, generator=g) * 2 - 1
    try:
        with torch.no_grad():
            ours, theirs = model(x)["logits"], model.net(x)
    except Exception as exc:  # noqa: BLE001 - e.g. a transformer that needs another input size
        raise ImportModelError(f"{what} cannot run as a CAM classifier: {type(exc).__name__}: "
                               f"{str(exc).strip()[:160]}") from exc
    if not torch.is_tensor(theirs) or theirs.shape != ours.shape or \
            not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * (1 + float(theirs.abs().max()))):
        raise ImportModelError(f"{what}: its head is not global average pooling + one linear layer "
                               f"(logits of the split network differ); not supported for import")
