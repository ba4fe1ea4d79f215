"""Manifest-driven preprocessing: image in [0, 1] -> network input, and maps back.

Everything a network needs to see its input as during training comes from the
bundle manifest (:class:`cxrviewer.core.bundle.Manifest`), never from GUI code:

``crop``
    ``{"kind": "none"}`` or ``{"kind": "box", "box": [x0, y0, x1, y1]}`` with
    the corners as fractions of the image width/height (e.g. a lung crop).
``input_size``
    ``[H, W]``; the (cropped) image is resized to it, bilinear with
    anti-aliasing (aspect ratio is not kept, as in NIH/JSRT training).
``normalisation``
    ``{"kind": "minus1_1"}`` (``2x - 1``, the disease-masks recipe),
    ``{"kind": "zero_one"}``, ``{"kind": "mean_std", "mean": m, "std": s}`` or
    ``{"kind": "channel_mean_std", "mean": [m0, m1, m2], "std": [s0, s1, s2]}``
    (the grayscale image repeated into one channel per mean/std, each
    normalised with its own pair: ImageNet-style 3-channel networks, e.g.
    imported torchvision/timm models; the kinds of :data:`NORMALISATIONS`),
    optionally with ``"stretch"`` (see :func:`stretch_spec`).

:class:`Preprocess` holds all of it, built once from a manifest
(:meth:`Preprocess.from_manifest`); the pipeline, the training datasets and the
evaluation feed networks through it. :func:`maps_to_frame` is the inverse
geometric step: a map over the network input is resized back into the crop box
of the image frame it came from.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

CropBox = tuple[int, int, int, int]  # (y0, y1, x0, x1) in frame pixels


def crop_box_pixels(crop: Mapping[str, Any] | None, shape: tuple[int, int]) -> CropBox | None:
    """The manifest crop as ``(y0, y1, x0, x1)`` pixels of an image of ``shape``; None = whole."""
    if not crop or crop.get("kind", "none") == "none":
        return None
    box = crop.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"crop box must be [x0, y0, x1, y1] fractions, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = shape
    yy0, yy1 = int(round(max(0.0, y0) * h)), int(round(min(1.0, y1) * h))
    xx0, xx1 = int(round(max(0.0, x0) * w)), int(round(min(1.0, x1) * w))
    if yy1 - yy0 < 2 or xx1 - xx0 < 2:
        raise ValueError(f"crop box {box!r} is empty for an image of {shape}")
    if (yy0, yy1, xx0, xx1) == (0, h, 0, w):
        return None
    return (yy0, yy1, xx0, xx1)


Pixels = TypeVar("Pixels", torch.Tensor, np.ndarray)
_Map = Callable[[Any, Any, Any], Any]
#: ``mean``/``std`` of a normalisation: one number, or one per channel (``channel_mean_std``)
Stat = float | tuple[float, ...]
#: Most channels ``channel_mean_std`` may make (the bundle schema's ``in_channels`` limit).
MAX_NORM_CHANNELS = 16


def _per_channel(x: Any, values: tuple[float, ...]) -> Any:
    """``values`` shaped ``[C, 1, 1]`` like ``x`` (tensor or array), for broadcasting over channels."""
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.tensor(values, dtype=dtype, device=x.device).view(-1, 1, 1)
    dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float32
    return np.asarray(values, dtype=dtype).reshape(-1, 1, 1)


def _to_channels(x: Any, m: tuple[float, ...], s: tuple[float, ...]) -> Any:
    """Gray ``[..., 1, H, W]`` (or ``[H, W]``) in [0, 1] -> ``[..., C, H, W]``, channel c = (x - m_c) / s_c."""
    return (x - _per_channel(x, m)) / _per_channel(x, s)


def _from_channels(x: Any, m: tuple[float, ...], s: tuple[float, ...]) -> Any:
    """Inverse of :func:`_to_channels`: the channels' mean back in [0, 1], ``[..., 1, H, W]``."""
    y = x * _per_channel(x, s) + _per_channel(x, m)
    if isinstance(y, torch.Tensor):
        return y.mean(-3, keepdim=True)
    return y.mean(axis=-3, keepdims=True).astype(y.dtype, copy=False)


#: The normalisation kinds: name -> (from [0, 1], back to [0, 1]), each ``f(x, mean, std)``.
NORMALISATIONS: dict[str, tuple[_Map, _Map]] = {
    "minus1_1": (lambda x, m, s: x * 2.0 - 1.0, lambda x, m, s: (x + 1.0) / 2.0),
    "zero_one": (lambda x, m, s: x, lambda x, m, s: x),
    "mean_std": (lambda x, m, s: (x - m) / max(s, 1e-8), lambda x, m, s: x * s + m),
    "channel_mean_std": (_to_channels, _from_channels),
}
#: Spellings older manifests used, mapped to the name above when a manifest is read.
LEGACY_NORMALISATION_KINDS: dict[str, str] = {"zero_1": "zero_one"}


def _channel_stats(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``channel_mean_std``'s lists: equal lengths (1..16), finite numbers, every std > 0."""
    if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
        raise ValueError("channel_mean_std needs 'mean' and 'std' lists, one number per channel")
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if not 1 <= len(m) <= MAX_NORM_CHANNELS or len(m) != len(s):
        raise ValueError(f"channel_mean_std needs equally long 'mean' and 'std' lists of 1..{MAX_NORM_CHANNELS} "
                         f"numbers, got {len(m)} and {len(s)}")
    if not all(np.isfinite(m)) or not all(np.isfinite(s)) or min(s) <= 0:
        raise ValueError("channel_mean_std 'mean'/'std' must be finite and every std > 0")
    return m, s


def _norm_params(norm: Mapping[str, Any] | None) -> tuple[str, Stat, Stat]:
    """``(kind, mean, std)`` of a manifest ``normalisation`` (default ``minus1_1``)."""
    norm = norm or {}
    kind = str(norm.get("kind", "minus1_1"))
    if kind not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation kind {kind!r}")
    if kind == "channel_mean_std":
        return (kind, *_channel_stats(norm.get("mean"), norm.get("std")))
    return kind, float(norm.get("mean", 0.5)), float(norm.get("std", 0.25))


def normalise(x01: Pixels, norm: Mapping[str, Any] | None) -> Pixels:
    """Map values in [0, 1] to the network's range (see module docstring)."""
    kind, mean, std = _norm_params(norm)
    return NORMALISATIONS[kind][0](x01, mean, std)


def denormalise(x: Pixels, norm: Mapping[str, Any] | None) -> Pixels:
    """Inverse of :func:`normalise` (back to [0, 1])."""
    kind, mean, std = _norm_params(norm)
    return NORMALISATIONS[kind][1](x, mean, std)


def as_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[H, W]`` / ``[1, 1, H, W]`` array in [0, 1] -> float32 tensor ``[1, 1, H, W]``."""
    t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    t = t.float()
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"expected a grayscale image [H, W], got shape {tuple(t.shape)}")
    return t


def resize(t: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size``; anti-aliased when shrinking with bilinear."""
    size = (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == size:
        return t
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest")
    shrink = t.shape[-2] > size[0] or t.shape[-1] > size[1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def percentile_stretch(x01: torch.Tensor, low: float = 1.0, high: float = 99.0) -> torch.Tensor:
    """Per-image contrast stretch of ``[B, 1, H, W]`` (or ``[H, W]``) values to [0, 1].

    ``(x - p_low) / (p_high - p_low)`` clipped, percentiles per image; an almost
    flat image is returned unchanged. Used by bundles trained on low-contrast data
    (the JSRT U-Net) whose manifest asks for it.
    """
    shape = x01.shape
    x = x01.reshape(-1, shape[-2] * shape[-1]) if x01.dim() >= 3 else x01.reshape(1, -1)
    q = torch.quantile(x.float(), torch.tensor([low / 100.0, high / 100.0], device=x.device), dim=1)
    lo, hi = q[0][:, None], q[1][:, None]
    span = hi - lo
    ok = span > 1e-3
    y = torch.where(ok, (x - lo) / span.clamp_min(1e-3), x).clamp(0.0, 1.0)
    return y.reshape(shape).to(x01.dtype)


def stretch_spec(manifest: Any) -> Mapping[str, Any] | None:
    """The contrast stretch a bundle expects before normalisation, or None.

    Read from ``normalisation.stretch`` or, for bundles that recorded it with their
    training recipe, ``provenance.preprocess`` (``{"kind": "percentile_stretch",
    "low": 1, "high": 99}``).
    """
    spec = (getattr(manifest, "normalisation", None) or {}).get("stretch")
    if spec is None:
        spec = (getattr(manifest, "provenance", None) or {}).get("preprocess")
    if isinstance(spec, Mapping) and spec.get("kind") == "percentile_stretch":
        return spec
    return None


def stretch_bounds(spec: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """``(low, high)`` percentiles of a ``percentile_stretch`` spec, or None for any other."""
    if not isinstance(spec, Mapping) or spec.get("kind") != "percentile_stretch":
        return None
    return float(spec.get("low", 1.0)), float(spec.get("high", 99.0))


def apply_stretch(t01: torch.Tensor, manifest: Any) -> torch.Tensor:
    """Apply the manifest's contrast stretch (if any) to an image in [0, 1]."""
    bounds = stretch_bounds(stretch_spec(manifest))
    return t01 if bounds is None else percentile_stretch(t01, *bounds)


@dataclass(frozen=True)
class Preprocess:
    """How a network wants its input: crop, input size, contrast stretch and normalisation.

    Built from a bundle manifest with :meth:`from_manifest` (as timm's pretrained cfg);
    :meth:`to_manifest` gives the manifest fields back. ``input_size=None`` keeps the
    image's size (a training dataset that resizes on its own).
    """

    input_size: tuple[int, int] | None = None  # (H, W)
    crop: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1) fractions
    normalisation: str = "minus1_1"  # a kind of NORMALISATIONS
    mean: Stat = 0.5  # mean_std (a number) and channel_mean_std (one per channel) only
    std: Stat = 0.25  # mean_std (a number) and channel_mean_std (one per channel) only
    stretch: tuple[float, float] | None = None  # percentile_stretch (low, high)

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation kind {self.normalisation!r}")
        if self.normalisation == "channel_mean_std":
            m, s = _channel_stats(self.mean, self.std)
            object.__setattr__(self, "mean", m)
            object.__setattr__(self, "std", s)
        if self.crop is not None and len(self.crop) != 4:
            raise ValueError(f"crop box must be [x0, y0, x1, y1] fractions, got {self.crop!r}")

    @classmethod
    def from_normalisation(cls, norm: str | Mapping[str, Any] | None,
                           input_size: int | tuple[int, int] | None = None) -> "Preprocess":
        """No crop or stretch; ``norm`` is a kind name or a manifest ``normalisation`` mapping."""
        kind, mean, std = _norm_params({"kind": norm} if isinstance(norm, str) else norm)
        size = (int(input_size), int(input_size)) if isinstance(input_size, int) else input_size
        return cls(input_size=tuple(int(s) for s in size) if size else None,
                   normalisation=kind, mean=mean, std=std)

    @classmethod
    def from_manifest(cls, manifest: Any) -> "Preprocess":
        """From a :class:`~cxrviewer.core.bundle.Manifest` (or anything with its attributes)."""
        base = cls.from_normalisation(getattr(manifest, "normalisation", None),
                                      tuple(manifest.input_size))
        crop = getattr(manifest, "crop", None) or {}
        box = None
        if crop.get("kind", "none") != "none":
            box = crop.get("box")
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise ValueError(f"crop box must be [x0, y0, x1, y1] fractions, got {box!r}")
            box = tuple(float(v) for v in box)
        return cls(input_size=base.input_size, crop=box, normalisation=base.normalisation,
                   mean=base.mean, std=base.std, stretch=stretch_bounds(stretch_spec(manifest)))

    def to_manifest(self) -> dict[str, Any]:
        """The manifest fields ``input_size``, ``crop`` and ``normalisation`` (``save_bundle`` kwargs)."""
        norm: dict[str, Any] = {"kind": self.normalisation}
        if self.normalisation == "mean_std":
            norm.update(mean=self.mean, std=self.std)
        elif self.normalisation == "channel_mean_std":
            norm.update(mean=list(self.mean), std=list(self.std))  # type: ignore[arg-type]
        if self.stretch is not None:
            norm["stretch"] = {"kind": "percentile_stretch", "low": self.stretch[0], "high": self.stretch[1]}
        crop = {"kind": "box", "box": list(self.crop)} if self.crop else {"kind": "none"}
        size = list(self.input_size) if self.input_size else None
        return {"input_size": size, "crop": crop, "normalisation": norm}

    def crop_box(self, shape: tuple[int, int]) -> CropBox | None:
        """The crop as ``(y0, y1, x0, x1)`` pixels of an image of ``shape``; None = whole."""
        return crop_box_pixels({"kind": "box", "box": list(self.crop)} if self.crop else None, shape)

    def crop_resize(self, frame01: torch.Tensor) -> tuple[torch.Tensor, CropBox | None]:
        """Crop, resize and stretch ``frame01 [B, C, H, W]`` in [0, 1] (no normalisation).

        Returns ``(x01 at input_size, crop box in frame pixels or None)``.
        """
        box = self.crop_box((frame01.shape[-2], frame01.shape[-1]))
        t = frame01
        if box is not None:
            y0, y1, x0, x1 = box
            t = t[..., y0:y1, x0:x1]
        if self.input_size is not None:
            t = resize(t, self.input_size)
        return self.apply_stretch(t), box

    def apply_stretch(self, x01: torch.Tensor) -> torch.Tensor:
        """The contrast stretch alone (identity when the manifest asks for none)."""
        return x01 if self.stretch is None else percentile_stretch(x01, *self.stretch)

    def normalise(self, x01: Pixels) -> Pixels:
        """Values in [0, 1] -> the network's range (tensor or array)."""
        return NORMALISATIONS[self.normalisation][0](x01, self.mean, self.std)

    def denormalise(self, x: Pixels) -> Pixels:
        """Network range -> [0, 1] (inverse of :meth:`normalise`)."""
        return NORMALISATIONS[self.normalisation][1](x, self.mean, self.std)

    def stretch_normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """Stretch + normalise an image the caller already cropped and resized."""
        return self.normalise(self.apply_stretch(x01))

    def normalise_array(self, img01: np.ndarray) -> np.ndarray:
        """float32 array in [0, 1] (any shape) -> network range, bit-identical to :meth:`normalise`."""
        t = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32))
        return self.normalise(t).numpy()

    def __call__(self, frame01: torch.Tensor) -> tuple[torch.Tensor, CropBox | None]:
        """:meth:`crop_resize` then :meth:`normalise`: ``(network input, crop box or None)``."""
        x01, box = self.crop_resize(frame01)
        return self.normalise(x01), box


def prepare_input(image01: np.ndarray | torch.Tensor, manifest: Any,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, CropBox | None]:
    """Crop, resize and normalise an image in [0, 1] as the bundle ``manifest`` says.

    Returns ``(x [1, 1, H, W] on device, crop box in image pixels or None)``.
    """
    return Preprocess.from_manifest(manifest)(as_image_tensor(image01).to(device))


def maps_to_frame(maps: torch.Tensor, frame_shape: tuple[int, int], box: CropBox | None,
                  source_shape: tuple[int, int] | None = None, *, mode: str = "bilinear",
                  fill: float = 0.0) -> torch.Tensor:
    """Put maps ``[N, h, w]`` computed over a network input back onto an image frame.

    ``box`` is the crop (in pixels of an image of ``source_shape``, default
    ``frame_shape``) the input was cut from; outside it the result is ``fill``.
    Returns ``[N, *frame_shape]`` (raw values; bilinear or nearest).
    """
    if maps.dim() == 2:
        maps = maps[None]
    m = maps[None].float()  # [1, N, h, w]
    fh, fw = frame_shape
    if box is None:
        return resize(m, (fh, fw), mode=mode)[0]
    sh, sw = source_shape or frame_shape
    y0, y1, x0, x1 = box
    sy, sx = fh / sh, fw / sw
    fy0, fy1 = int(round(y0 * sy)), max(int(round(y1 * sy)), int(round(y0 * sy)) + 1)
    fx0, fx1 = int(round(x0 * sx)), max(int(round(x1 * sx)), int(round(x0 * sx)) + 1)
    out = m.new_full((1, m.shape[1], fh, fw), float(fill))
    out[..., fy0:fy1, fx0:fx1] = resize(m, (fy1 - fy0, fx1 - fx0), mode=mode)
    return out[0]
