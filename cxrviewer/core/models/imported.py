"""Imported classifiers: a torchvision or timm network split into features + final linear layer.

``imported_classifier(library=..., model=..., num_classes=..., in_channels=3)`` builds the
library's network with random weights (``weights=None`` / ``pretrained=False``; a bundle's
weights replace them) and keeps it whole as ``net`` (so its state dict is the library's,
prefixed ``net.``). It exposes the outputs of :class:`~cxrviewer.core.models.classifier.CamClassifier`:
``{"logits", "features", "cam"}``, ``cam_weights()``, ``feature_layer()`` and per-class
``feature_masks`` for attention mining, so CAM and Grad-CAM work on it.

The split, per network family:

=========================  =============================  ==========================  ==========
library / network          features (before pooling)      head                        CAM
=========================  =============================  ==========================  ==========
torchvision ResNet/ResNeXt conv1 .. layer4                fc                          exact
torchvision DenseNet       ReLU(features)                 classifier                  exact
torchvision RegNet         stem, trunk_output             fc                          exact
torchvision EfficientNet,  features                       classifier's Linear          exact
MobileNetV2 (Dropout+Linear)
torchvision ConvNeXt       features                       LayerNorm2d, Flatten, Linear  per image
timm CNNs                  forward_features               get_classifier() (avg pool)  exact
timm ConvNeXt-style        forward_features               head.norm, head.fc           per image
=========================  =============================  ==========================  ==========

"exact": ``logits == cam.mean((2, 3)) + b`` (global average pooling then the linear layer).
"per image": a LayerNorm after pooling is linearised with the image's pooled mean and standard
deviation, so ``logits == cam.mean((2, 3)) + b'`` still holds for that image, but the map is
scaled by a per-image factor and ``cam_weights()`` (``W * gamma``) is not the whole story. Any
other head (two linear layers, attention pooling, transformers) is refused with a
:class:`ModelError`. timm is optional: without it the factory raises :class:`ModelError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.classifier import CamClassifier, _fit_masks
from cxrviewer.core.models.registry import register_model

LIBRARIES: tuple[str, ...] = ("torchvision", "timm")

#: modules allowed in a torchvision ``classifier`` Sequential besides its final Linear
_PASSIVE = (nn.Dropout, nn.Identity, nn.Flatten)


class TimmMissingError(ModelError):
    """timm is needed for this network but is not installed."""


@dataclass(frozen=True)
class Split:
    """How to cut a library network: the features function, the head's module paths, CAM exactness."""

    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    linear: str  # path of the final nn.Linear in ``net``
    norm: str | None = None  # path of a LayerNorm applied after pooling, if any

    @property
    def cam_exact(self) -> bool:
        """No LayerNorm between pooling and the linear layer: ``logits == cam.mean + b`` for any image."""
        return self.norm is None


def _resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _sequential_head(net: nn.Module, name: str) -> str:
    """Path of the last Linear of ``net.classifier`` when the rest is Dropout/Identity/Flatten."""
    head = getattr(net, "classifier", None)
    if isinstance(head, nn.Linear):
        return "classifier"
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear) \
            and all(isinstance(m, _PASSIVE) for m in list(head)[:-1]):
        return f"classifier.{len(head) - 1}"
    raise ModelError(f"torchvision '{name}' has a classifier head other than dropout + one linear layer; "
                     f"CAM needs global pooling followed by a single linear layer")


def torchvision_split(net: nn.Module, name: str) -> Split:
    """The :class:`Split` of a torchvision classification network (see module docstring)."""
    from torchvision import models as tvm

    if isinstance(net, tvm.ResNet):
        return Split(_resnet_features, "fc")
    if isinstance(net, tvm.DenseNet):
        return Split(lambda n, x: torch.relu(n.features(x)), "classifier")
    if isinstance(net, tvm.RegNet):
        return Split(lambda n, x: n.trunk_output(n.stem(x)), "fc")
    if isinstance(net, tvm.ConvNeXt):
        head = net.classifier
        if not (len(head) == 3 and isinstance(head[2], nn.Linear)):
            raise ModelError(f"torchvision '{name}': unexpected ConvNeXt head")
        return Split(lambda n, x: n.features(x), "classifier.2", norm="classifier.0")
    if isinstance(net, (tvm.EfficientNet, tvm.MobileNetV2)):
        return Split(lambda n, x: n.features(x), _sequential_head(net, name))
    raise ModelError(f"torchvision '{name}' ({type(net).__name__}) is not supported for import: CAM needs a "
                     f"convolutional network with global average pooling and one linear layer (ResNet, "
                     f"ResNeXt, Wide ResNet, DenseNet, RegNet, EfficientNet, MobileNetV2, ConvNeXt)")


def timm_split(net: nn.Module, name: str) -> Split:
    """The :class:`Split` of a timm network: ``forward_features`` and its classifier (see docstring)."""
    linear = net.get_classifier() if callable(getattr(net, "get_classifier", None)) else None
    if not isinstance(linear, nn.Linear):
        raise ModelError(f"timm '{name}': its classifier is {type(linear).__name__}, not one linear layer; "
                         f"not supported for import")
    path = next((p for p, m in net.named_modules() if m is linear), None)
    pool = getattr(net, "global_pool", None)
    if not isinstance(pool, nn.Module):  # ConvNeXt keeps it in its head; a ViT's is the string 'token'/'avg'
        pool = getattr(getattr(net, "head", None), "global_pool", pool)
    pool_type = str(getattr(pool, "pool_type", "") or "") if isinstance(pool, nn.Module) else ""
    if pool_type not in ("avg", "fast_avg"):
        what = pool_type or (pool if isinstance(pool, str) else type(pool).__name__)
        raise ModelError(f"timm '{name}': pooling {what!r} is not global average pooling over a convolutional "
                         f"feature map; not supported for import")
    norm = getattr(getattr(net, "head", None), "norm", None)
    norm_path = "head.norm" if isinstance(norm, nn.LayerNorm) else None
    if norm is not None and norm_path is None and not isinstance(norm, nn.Identity):
        raise ModelError(f"timm '{name}': a {type(norm).__name__} after pooling is not supported for import")
    return Split(lambda n, x: n.forward_features(x), str(path), norm=norm_path)


def _on_meta_or_cpu(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``; if it cannot run on the ``meta`` device (RegNet computes its widths from
    tensors), build it on the CPU instead, so a bundle's size check still counts it."""
    try:
        return build()
    except NotImplementedError:
        if torch.empty(0).device.type != "meta":
            raise
        with torch.device("cpu"):
            return build()


def build_library_model(library: str, model: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The library's network ``model`` with random weights (nothing is downloaded)."""
    if library == "torchvision":
        from torchvision import models as tvm

        if in_channels != 3:
            raise ModelError("torchvision networks take 3 input channels")
        try:
            return _on_meta_or_cpu(lambda: tvm.get_model(model, weights=None, num_classes=int(num_classes)))
        except (ValueError, KeyError) as exc:
            raise ModelError(f"torchvision has no classification model {model!r}: {exc}") from exc
    if library == "timm":
        try:
            import timm
        except ImportError as exc:
            raise TimmMissingError(f"the network '{model}' needs timm, which is not installed "
                                   f"(pip install timm)") from exc
        try:
            return _on_meta_or_cpu(lambda: timm.create_model(model, pretrained=False, num_classes=int(num_classes),
                                                             in_chans=int(in_channels)))
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ModelError(f"timm cannot build {model!r}: {exc}") from exc
    raise ModelError(f"unknown model library {library!r}; expected one of {', '.join(LIBRARIES)}")


class ImportedClassifier(CamClassifier):
    """A library network as a CAM classifier (outputs as :class:`CamClassifier`; see module docstring)."""

    def __init__(self, library: str = "torchvision", model: str = "efficientnet_b0", num_classes: int = 14,
                 in_channels: int = 3) -> None:
        nn.Module.__init__(self)  # not CamClassifier's: the network is the library's, kept whole
        if int(num_classes) < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        self.net = build_library_model(library, model, num_classes, in_channels)
        self.split = torchvision_split(self.net, model) if library == "torchvision" else timm_split(self.net, model)
        self.feature_out = nn.Identity()  # the Grad-CAM target: its output is "features"
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.pool, self.lse_r, self.transition = "avg", 10.0, None
        self.feature_channels = int(self._linear().in_features)
        if self._linear().out_features != self.num_classes:
            raise ModelError(f"'{model}' head has {self._linear().out_features} outputs, not {num_classes}")

    @property
    def cam_exact(self) -> bool:
        """Whether ``logits == cam.mean + bias`` with image-independent weights (no LayerNorm head)."""
        return self.split.cam_exact

    def _linear(self) -> nn.Linear:
        return self.net.get_submodule(self.split.linear)

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        """The network's final linear layer (read through ``net``; not registered twice)."""
        return self._linear()

    def extract(self, x: torch.Tensor, **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The library's feature map before global pooling (a 1-channel input is repeated to 3)."""
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        f = self.split.features(self.net, x)
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise ModelError(f"the imported network's features are not a [B, K, h, w] map "
                             f"(got {tuple(getattr(f, 'shape', ()))}); CAM needs a convolutional feature map")
        return self.feature_out(f), {}

    def feature_layer(self) -> nn.Module:
        """Module whose output is ``"features"`` (the Grad-CAM target layer)."""
        return self.feature_out

    def cam_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)``; with a LayerNorm head ``(W * gamma, W @ beta + b)`` (image-independent part only)."""
        lin = self._linear()
        if self.split.norm is None:
            return lin.weight, lin.bias
        norm = self.net.get_submodule(self.split.norm)
        w = lin.weight * norm.weight[None, :]
        b = lin.weight @ norm.bias + (lin.bias if lin.bias is not None else 0)
        return w, b

    def head(self, f: torch.Tensor, out: dict[str, torch.Tensor],
             feature_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CAM and logits; a LayerNorm after pooling is linearised with this image's statistics."""
        if self.split.norm is None:
            return super().head(f, out, feature_masks)
        norm = self.net.get_submodule(self.split.norm)
        pooled = f.mean((2, 3))
        mu = pooled.mean(1)[:, None, None, None]
        sigma = torch.sqrt(pooled.var(1, unbiased=False) + norm.eps)[:, None, None, None]
        w, b = self.cam_weights()
        cam = torch.einsum("ck,bkhw->bchw", w, (f - mu) / sigma)
        s = cam if feature_masks is None else cam * _fit_masks(feature_masks, cam)
        out.update(logits=s.mean((2, 3)) + b, features=f, cam=cam)
        return out


def _imported_inputs(batch: int, size: int, in_channels: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 3, size, size, generator=g) * 2 - 1,)


@register_model(
    "imported_classifier",
    family="classifier",
    description="A torchvision/timm classifier imported with 'cxrviewer import-model': library features -> "
                "global average pool -> its linear layer, CAM as cam_classifier",
    default_kwargs={"library": "torchvision", "model": "efficientnet_b0", "num_classes": 14, "in_channels": 3},
    test_kwargs={"library": "torchvision", "model": "resnet18"},
    inputs=_imported_inputs,
)
def imported_classifier(**kwargs: Any) -> ImportedClassifier:
    """A torchvision or timm classifier split into features + linear head (module docstring)."""
    return ImportedClassifier(**kwargs)
