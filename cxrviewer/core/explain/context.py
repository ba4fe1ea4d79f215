"""What an explainer gets from the pipeline: the study's working frame and the shared model passes.

Frames: the *working frame* is the study image scaled so its longest side is at most
``frame_max_side``. After the ``alignment`` explainer ran, :attr:`ExplainContext.work` is the
aligned working frame: the whole registered chest (the canonical full-frame extent, not the
lung crop the alignment is checked on; :func:`cxrviewer.core.canonical.full_frame_theta`). The
classifier, DM and CIA networks see it (a manifest ``crop`` cuts fractions of it), and every map
they produce is drawn back onto the original through the inverse warp (:class:`Mapper`). Maps are stored at
``map_shape`` (the original scaled to ``map_max_side``) in original-image coordinates.

The classifier runs ONCE (:meth:`ExplainContext.classifier_pass`): a forward hook on
``model.feature_layer()`` turns the feature map into a leaf that requires grad, so CAM,
Grad-CAM (a backward through the head only) and attention mining all share one backbone pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.errors import CxrError
from cxrviewer.core.preprocess import CropBox, Preprocess, maps_to_frame

if TYPE_CHECKING:
    from cxrviewer.core.bundle import LoadedBundle
    from cxrviewer.core.device import DeviceInfo
    from cxrviewer.core.results import MapRecipe, NativeLog, Results

__all__ = ["ClassifierPass", "ExplainContext", "Mapper", "accepts", "capture_activation"]


@contextlib.contextmanager
def capture_activation(layer: nn.Module | None) -> Iterator[dict[str, torch.Tensor]]:
    """Hook ``layer`` for one forward: its output is stored as ``store["act"]``, re-attached as a
    grad leaf when the model is frozen or runs under ``no_grad``. ``layer=None`` captures nothing."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        act = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(act, torch.Tensor):
            return None
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
            store["act"] = act
            return type(out)([act, *out[1:]]) if isinstance(out, (tuple, list)) else act
        store["act"] = act
        return None

    handle = layer.register_forward_hook(hook) if layer is not None else None
    try:
        yield store
    finally:
        if handle is not None:
            handle.remove()


_GRIDS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_GRIDS_LOCK = threading.Lock()


def _inverse_grid(theta_inv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The sampling grid of ``theta_inv`` for an output of ``size`` (as
    :func:`cxrviewer.core.models.alignment.warp` makes it), kept for the last few affines: a study's
    maps all go back through the same inverse warp, and building the grid costs ~3x the sampling."""
    theta = theta_inv.detach().float().cpu()
    key = (tuple(theta.reshape(-1).tolist()), size)
    with _GRIDS_LOCK:
        grid = _GRIDS.get(key)
    if grid is None:
        grid = F.affine_grid(theta[:1], [1, 1, *size], align_corners=False)
        with _GRIDS_LOCK:
            _GRIDS[key] = grid
            while len(_GRIDS) > 4:
                _GRIDS.popitem(last=False)
    return grid


@dataclass
class Mapper:
    """Maps from a network input back to original-image map coordinates (CPU).

    With a ``log`` (the study's :class:`~cxrviewer.core.results.NativeLog`), every call records
    its native input and :class:`~cxrviewer.core.results.MapRecipe`, so the results writer can
    store the small native grid instead of the upsampled map (inputs at least half the map's
    size on a side are not recorded: storing them would save little)."""

    map_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    box: CropBox | None
    theta_inv: torch.Tensor | None  # [1, 2, 3]
    log: "NativeLog | None" = None

    def __call__(self, maps: torch.Tensor, *, nearest: bool = False, record: bool = True) -> np.ndarray:
        """``[N, h, w]`` raw maps -> ``[N, *map_shape]`` float32; outside = the map's minimum.
        ``record=False``: not logged for the results writer (a caller that thresholds the maps
        stores masks, which never match a recorded float map)."""
        m = maps.detach().float().cpu()
        if m.dim() == 2:
            m = m[None]
        lo = m.amin(dim=(-2, -1), keepdim=True)
        shifted = m - lo  # so zero fill outside crop / warp means "the map's minimum"
        mode = "nearest" if nearest else "bilinear"
        out = maps_to_frame(shifted, self.map_shape, self.box, self.frame_shape, mode=mode)
        if self.theta_inv is not None:
            grid = _inverse_grid(self.theta_inv, tuple(out.shape[-2:]))
            out = F.grid_sample(out[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
        res = np.asarray((out + lo).numpy(), dtype=np.float32)  # (already float32: no copy of the stack)
        if record and self.log is not None and 4 * m.shape[-2] * m.shape[-1] <= self.map_shape[0] * self.map_shape[1]:
            self.log.add(m.numpy(), res, self.recipe(mode))
        return res

    def recipe(self, mode: str = "bilinear") -> "MapRecipe":
        """This map-back as a :class:`~cxrviewer.core.results.MapRecipe` (plain numbers)."""
        from cxrviewer.core.results import MapRecipe

        theta = None if self.theta_inv is None else tuple(float(v) for v in self.theta_inv.reshape(-1)[:6].tolist())
        box = None if self.box is None else tuple(int(v) for v in self.box)
        return MapRecipe(tuple(self.map_shape), tuple(self.frame_shape), box, theta, mode)  # type: ignore[arg-type]


@dataclass
class ClassifierPass:
    """The classifier's one forward: output dict, logits (with the head's graph when
    ``act`` is set), the hooked feature map ``act`` and the map-back for its input crop."""

    bundle: "LoadedBundle"
    out: Mapping[str, torch.Tensor]
    logits: torch.Tensor
    act: torch.Tensor | None
    box: CropBox | None
    mapper: Mapper


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def scaled_shape(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``shape`` scaled so its longest side is at most ``max_side`` (never enlarged)."""
    h, w = shape
    s = min(1.0, float(max_side) / max(h, w))
    return (max(1, int(round(h * s))), max(1, int(round(w * s))))


@dataclass
class ExplainContext:
    """The shared state of one pipeline run (see the module docstring)."""

    results: "Results"
    bundles: Mapping[str, "LoadedBundle"]
    device: "DeviceInfo"
    frame: torch.Tensor  # [1, 1, fh, fw] on the device, values in [0, 1]
    options: Mapping[str, Any] = field(default_factory=dict)
    work: torch.Tensor | None = None  # the (aligned) frame the classifier / DM / CIA see
    theta: torch.Tensor | None = None  # [1, 2, 3] original -> aligned (whole registered chest) sampling
    theta_inv: torch.Tensor | None = None  # CPU float32
    seg_work: torch.Tensor | None = None  # [1, 3, fh, fw] lung/heart probabilities, working frame
    _classifier: ClassifierPass | None = None

    def __post_init__(self) -> None:
        if self.work is None:
            self.work = self.frame

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.frame.shape[-2]), int(self.frame.shape[-1]))

    @property
    def map_shape(self) -> tuple[int, int]:
        return tuple(self.results.map_shape)  # type: ignore[return-value]

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)

    def preprocess(self, role: str) -> Preprocess:
        """The manifest-driven preprocessing of the bundle serving ``role``."""
        return Preprocess.from_manifest(self.bundles[role].manifest)

    def forward(self, role: str, frame: torch.Tensor | None = None, *,
                input_size: tuple[int, int] | None = None) -> tuple[Mapping[str, torch.Tensor], CropBox | None]:
        """Run the ``role`` bundle (no grad) on ``frame`` (default: the aligned working frame),
        preprocessed as its manifest says (at ``input_size`` when given); returns its output dict
        and the input crop box."""
        pre = self.preprocess(role)
        if input_size is not None:
            pre = dataclasses.replace(pre, input_size=tuple(input_size))
        x01, box = pre.crop_resize(self.work if frame is None else frame)
        with torch.no_grad(), self.device.autocast():
            return self.bundles[role].model(pre.normalise(x01)), box

    def mapper(self, box: CropBox | None, *, aligned: bool = True) -> Mapper:
        """Map-back for a network input cut at ``box`` from the (aligned, if ``aligned``) frame."""
        from cxrviewer.core.results import NativeLog

        if self.results.native is None:
            self.results.native = NativeLog()
        return Mapper(self.map_shape, self.frame_shape, box, self.theta_inv if aligned else None,
                      self.results.native)

    def set_alignment(self, theta: torch.Tensor) -> None:
        """Use the affine ``theta`` [1, 2, 3] (original -> whole registered chest, as
        :func:`~cxrviewer.core.explain.alignment.align_for_models` gives it) from now on: later
        networks see the aligned frame, their maps come back through its inverse."""
        from cxrviewer.core.models.alignment import invert_affine, warp

        self.theta = theta
        self.work = warp(self.frame, theta).clamp(0, 1)
        self.theta_inv = invert_affine(theta.double()).float().cpu()

    def classifier_pass(self) -> ClassifierPass:
        """The classifier's single forward (run on first use, then shared)."""
        if self._classifier is None:
            if "classifier" not in self.bundles:
                raise CxrError("no classifier bundle is loaded")
            self._classifier = self._run_classifier()
            logits = self._classifier.logits
            self.results.probabilities = (torch.sigmoid(logits.detach().float())[0].cpu().numpy()
                                          .astype(np.float32))
        return self._classifier

    def release(self) -> None:
        """Drop the classifier's autograd graph (after every explainer ran)."""
        if self._classifier is not None:
            self._classifier.act = None
            self._classifier.logits = self._classifier.logits.detach()

    def _run_classifier(self) -> ClassifierPass:
        b = self.bundles["classifier"]
        model = b.model
        pre = Preprocess.from_manifest(b.manifest)
        x01, box = pre.crop_resize(self.work)
        extra: dict[str, torch.Tensor] = {}
        if self.seg_work is not None and accepts(model, "lung_heart_mask"):
            m = self.seg_work[:, :3].amax(1, keepdim=True)  # merged binary mask M_g (lung-heart Eq. 3)
            m_in, _ = pre.crop_resize(m)
            extra["lung_heart_mask"] = (m_in > 0.5).float()
        layer = model.feature_layer() if callable(getattr(model, "feature_layer", None)) else None
        with capture_activation(layer) as store, torch.enable_grad(), self.device.autocast():
            out = model(pre.normalise(x01), **extra)
        return ClassifierPass(b, out, out["logits"][:1], store.get("act"), box, self.mapper(box))
