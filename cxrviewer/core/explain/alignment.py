"""Alignment to the canonical chest (cia-net Eq. 1, disease-masks Eq. 6) as a pipeline step, checked.

The alignment network predicts an affine ``theta`` (``F.affine_grid`` convention, normalised
coordinates, original -> aligned sampling). When the bundle's manifest names its canonical chest
(``canonical_chest``, found beside the bundle or in ``resources/``, SHA-256 checked), the affine is
then polished by a classical NCC registration to it (:func:`~cxrviewer.core.registration.refine_affine`,
pipeline option ``align_refine``, on by default) and scored: ``quality`` is the NCC of the aligned
image to the canonical chest where the warp has data
(:func:`~cxrviewer.core.registration.alignment_quality`). With a good score the classifier, DM and
CIA networks see the aligned working frame (:meth:`~cxrviewer.core.explain.context.ExplainContext.set_alignment`)
and their maps are drawn back through the inverse warp; ``valid`` marks where those maps land on the
original. Below :data:`MIN_QUALITY` (option ``align_min_quality``) the alignment is rejected: later
networks see the unaligned image, a notice says so, and ``attrs["rejected"]`` is true. The threshold
and its measurement are in docs/alignment.md ("Alignment check").

Two frames: the network, the refinement and the quality check work on the canonical *lung crop*
(the canonical PNG); the later networks see the *whole registered chest*, the crop's full-frame
extent widened by the canonical record's ``model_frame`` (:func:`~cxrviewer.core.canonical.full_frame_theta`
with the canonical's ``crop_box`` placed in that frame), so the lung bases, costophrenic angles
and heart stay in view (docs/field-of-view.md).
:func:`align_for_models` is the one implementation of this step: this explainer and the aligned
training cache (``training.data.cache.build_cache(..., align=bundle)``) both call it. Stored maps:
``affine`` = the full-frame affine the later networks and ``valid`` use, ``crop_affine`` = the
refined lung-crop affine that was checked, ``network_affine`` = the network's lung-crop affine,
``params`` = the parameters of ``crop_affine`` (cia-net Eq. 1).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer

if TYPE_CHECKING:
    from cxrviewer.core.bundle import LoadedBundle
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

__all__ = ["MIN_QUALITY", "AlignmentCheck", "AlignmentExplainer", "align_for_models", "canonical_path",
           "check_alignment", "valid_region"]

#: Lowest accepted quality (NCC to the canonical chest, :func:`alignment_quality`), from
#: benchmarks/alignment_refine.py: real NIH images vs. rotated, lateral-like and noise inputs.
MIN_QUALITY = 0.70

_CANONICAL: dict[tuple[str, str, str], tuple[Path, torch.Tensor] | None] = {}


def valid_region(theta_inv: torch.Tensor, map_shape: tuple[int, int]) -> np.ndarray:
    """Bool ``map_shape``: where maps computed on the aligned frame land on the original."""
    from cxrviewer.core.models.alignment import warp

    ones = torch.ones(1, 1, *map_shape)
    with torch.no_grad():
        return (warp(ones, theta_inv.float())[0, 0] > 0.5).numpy()


def canonical_path(bundle: "LoadedBundle") -> Path | None:
    """The canonical chest PNG an alignment bundle's manifest names (None: it names none).

    Looked for in the bundle folder, its parent and grandparent (``resources/models/X.cxrbundle``
    -> ``resources/``) and beside ``resources/canonical_chest.png`` of the checkout or frozen app;
    a recorded SHA-256 must match. Raises ``FileNotFoundError`` when named but not found.
    """
    from cxrviewer.core.canonical import default_canonical_path
    from cxrviewer.core.checksum import sha256_file

    ref = bundle.manifest.canonical_chest or {}
    name, digest = ref.get("file"), ref.get("sha256")
    if not name:
        return None
    folders = (bundle.path, bundle.path.parent, bundle.path.parent.parent, default_canonical_path().parent)
    for cand in (Path(f) / name for f in folders):
        if cand.is_file() and (not digest or sha256_file(cand) == digest):
            return cand
    raise FileNotFoundError(f"canonical chest {name} named by the alignment bundle {bundle.path.name} was not found")


def _canonical(bundle: "LoadedBundle") -> tuple[Path, torch.Tensor] | None:
    """:func:`canonical_path` and the image ``[1, 1, S, S]`` in [0, 1], cached per bundle."""
    from cxrviewer.core.canonical import load_canonical

    ref = bundle.manifest.canonical_chest or {}
    key = (str(bundle.path), str(ref.get("file")), str(ref.get("sha256")))
    if key not in _CANONICAL:
        path = canonical_path(bundle)
        _CANONICAL[key] = None if path is None else (path, load_canonical(path))
    return _CANONICAL[key]


@dataclass
class AlignmentCheck:
    """The affine to use and how well it matches the canonical chest (None: not checked)."""

    theta: torch.Tensor  # [1, 2, 3]: refined, or the network's
    network_theta: torch.Tensor
    quality: float | None = None
    network_quality: float | None = None
    min_quality: float = MIN_QUALITY
    refined: bool = False
    canonical: str | None = None
    seconds: float = 0.0
    crop_box: tuple[float, float, float, float] | None = None  # the canonical's lung crop in the models' frame
    network_params: torch.Tensor | None = None  # [1, 5] as the network gave them
    problem: str | None = None  # why it was not checked (a named canonical chest is missing)

    @property
    def rejected(self) -> bool:
        return self.quality is not None and not self.quality >= self.min_quality

    def notice(self) -> str:
        """The notice of a rejected alignment (log panel, results.h5)."""
        return (f"alignment rejected: NCC {self.quality:.2f} < {self.min_quality:.2f} to the canonical chest; "
                "maps use the unaligned image")

    def attrs(self) -> dict[str, Any]:
        """JSON-able attributes of the alignment step."""
        def r(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {"quality": r(self.quality), "network_quality": r(self.network_quality),
                "min_quality": self.min_quality, "refined": self.refined, "rejected": self.rejected,
                "checked": self.quality is not None, "canonical_chest": self.canonical,
                "check_s": round(self.seconds, 4), "frame": "full" if self.crop_box is not None else "network",
                "crop_box": None if self.crop_box is None else [round(float(v), 6) for v in self.crop_box]}

    @property
    def full_theta(self) -> torch.Tensor:
        """``theta`` onto the whole registered chest (:func:`~cxrviewer.core.canonical.full_frame_theta`)."""
        from cxrviewer.core.canonical import full_frame_theta

        return full_frame_theta(self.theta, self.crop_box)


def check_alignment(image01: torch.Tensor, canonical01: torch.Tensor, network_theta: torch.Tensor, *,
                    refine: bool = True, min_quality: float = MIN_QUALITY) -> AlignmentCheck:
    """Refine the network's affine (optional) and score both against the canonical chest."""
    import torch.nn.functional as F

    from cxrviewer.core.registration import REFINE_SIZES, alignment_quality, refine_affine

    t0 = time.perf_counter()
    side = 2 * max(REFINE_SIZES)  # all the registration reads; one resize of the (large) frame
    img = F.interpolate(image01.detach().float().cpu(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=True)
    net = network_theta.detach().float().cpu()
    q0 = float(alignment_quality(img, canonical01, net)[0])
    theta, q = net, q0
    if refine:
        theta_r, q_r = refine_affine(img, canonical01, net)
        theta, q = theta_r, float(q_r[0])
    return AlignmentCheck(theta.to(network_theta.device), network_theta, q, q0, float(min_quality), refine,
                          seconds=time.perf_counter() - t0)


def _network_theta(frame01: torch.Tensor, bundle: "LoadedBundle",
                   autocast: Callable[[], AbstractContextManager] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment network's lung-crop affine ``[1, 2, 3]`` and params ``[1, 5]`` on ``frame01``."""
    from cxrviewer.core.preprocess import Preprocess

    pre = Preprocess.from_manifest(bundle.manifest)
    x01, _ = pre.crop_resize(frame01)
    with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
        out = bundle.model(pre.normalise(x01))
    return out["theta"][:1].float(), out["params"][:1].float()


def align_for_models(frame01: torch.Tensor, bundle: "LoadedBundle", *, refine: bool = True,
                     min_quality: float = MIN_QUALITY,
                     autocast: Callable[[], AbstractContextManager] | None = None) -> tuple[torch.Tensor, AlignmentCheck]:
    """The app's alignment step: ``(theta_full [1, 2, 3], check)`` for a frame ``[1, 1, H, W]`` in [0, 1].

    The network's lung-crop affine (cia-net Eq. 1, disease-masks Eq. 6) is refined and scored
    against the bundle's canonical chest (:func:`check_alignment`, unchanged: the check lives on
    the lung crop), then composed onto the whole registered chest with the canonical's
    ``crop_box`` and ``model_frame`` (:func:`~cxrviewer.core.canonical.full_frame_theta`,
    :func:`~cxrviewer.core.canonical.crop_in_frame`). ``check.rejected`` says the
    caller must keep the unaligned frame. The pipeline's alignment explainer and the aligned
    training cache both call this function, so the models train on what the app feeds them.
    """
    from cxrviewer.core.canonical import canonical_crop_box, crop_in_frame, model_frame_box

    net, params = _network_theta(frame01, bundle, autocast)
    try:
        found, problem = _canonical(bundle), None
    except FileNotFoundError as exc:
        found, problem = None, str(exc)
    if found is None:
        check = AlignmentCheck(net, net, problem=problem)
    else:
        path, canon = found
        check = check_alignment(frame01, canon, net, refine=refine, min_quality=min_quality)
        box = canonical_crop_box(path)
        check.canonical = path.name
        check.crop_box = None if box is None else crop_in_frame(box, model_frame_box(path))
    check.network_params = params
    return check.full_theta, check


@register_explainer("alignment")
class AlignmentExplainer(Explainer, title="Alignment to the canonical chest", short="align", order=10,
                         requires=("alignment",)):
    """The aligned image, the refined and the network's affines, the parameters, and the check."""

    maps = (MapSpec("aligned_image", "aligned image in [0, 1]", "image", frame="aligned", per_class=False),
            MapSpec("affine", "affine [2, 3], original -> aligned (whole registered chest) sampling", "affine",
                    frame="none", per_class=False),
            MapSpec("crop_affine", "refined affine [2, 3] onto the canonical lung crop (the checked one)", "affine",
                    frame="none", per_class=False),
            MapSpec("network_affine", "the alignment network's lung-crop affine [2, 3]", "affine", frame="none",
                    per_class=False),
            MapSpec("params", "s_x, s_y, t_x, t_y, theta of crop_affine", "vector", frame="none", per_class=False),
            MapSpec("valid", "where aligned-frame maps land on the original", "mask", per_class=False))
    panels = (PanelSpec("aligned", "Aligned", "aligned_image", kind="image", order=10, per_class=False,
                        caption="Aligned"),)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        from cxrviewer.core.models.alignment import warp
        from cxrviewer.core.registration import affine_params

        theta_full, check = align_for_models(
            ctx.frame, ctx.bundles["alignment"], refine=bool(ctx.option("align_refine", True)),
            min_quality=float(ctx.option("align_min_quality", MIN_QUALITY)), autocast=ctx.device.autocast)
        if check.problem:
            ctx.results.notices.append(f"alignment not checked: {check.problem}")
        if check.rejected:
            ctx.results.notices.append(check.notice())
            aligned = warp(ctx.frame, theta_full).clamp(0, 1)
            valid = np.ones(ctx.map_shape, bool)  # later maps stay in the original frame
        else:
            ctx.set_alignment(theta_full)
            aligned = ctx.work
            valid = valid_region(ctx.theta_inv, ctx.map_shape)
        params = affine_params(check.theta.cpu()) if check.refined else check.network_params
        return ExplainerOutput({
            "aligned_image": aligned[0, 0].cpu().numpy().astype(np.float32),
            "affine": theta_full[0].cpu().double().numpy(),
            "crop_affine": check.theta[0].cpu().double().numpy(),
            "network_affine": check.network_theta[0].cpu().double().numpy(),
            "params": params[0].float().cpu().numpy().astype(np.float32),
            "valid": valid,
        }, attrs=check.attrs())

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        q = results.attr(self.name, "quality")
        if q is None:
            return "to the canonical chest"
        if results.attr(self.name, "rejected"):
            return f"rejected: NCC {q:.2f} < {results.attr(self.name, 'min_quality', MIN_QUALITY):.2f}, maps unaligned"
        return f"to the canonical chest, NCC {q:.2f}"
