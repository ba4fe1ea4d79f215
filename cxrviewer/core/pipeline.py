"""Study + model bundles -> :class:`~cxrviewer.core.results.Results`: every explanation from one backbone pass.

The pipeline prepares the working frame (``preprocess``), then runs, in order, every registered
explainer (:mod:`cxrviewer.core.explain.registry`) that the loaded roles
(:mod:`cxrviewer.core.roles`) allow, each as one stage, then proposes boxes with each
explainer's box rule (``boxes``). The explainers share the model passes through an
:class:`~cxrviewer.core.explain.context.ExplainContext`: alignment runs first and later networks
see the aligned image; the classifier runs once for CAM, Grad-CAM and attention mining. All maps
are in ORIGINAL image coordinates at ``map_shape`` (the original scaled so its longest side is
at most ``map_max_side``); boxes are in original pixels.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import explain as _explain  # noqa: F401  (registers the explanation methods)
from .bundle import LoadedBundle, find_bundles, load_bundle
from .models.fold import fold_batchnorm
from .device import DeviceInfo, run_with_oom_fallback, select_device
from .errors import BundleError, CxrError, LabelSetError, ModelError
from .explain.attention_mining import eager_classes
from .explain.context import ExplainContext, scaled_shape
from .explain.registry import Explainer, applicable_explainers
from .preprocess import as_image_tensor, crop_box_pixels, resize
from .results import Results
from .roles import ROLES, assign_roles
from .study import Study

log = logging.getLogger(__name__)

#: ``Results.state`` key of the classes whose boxes were proposed (runs with ``all_classes=False``)
BOXED_CLASSES = "_boxed_classes"

__all__ = ["Pipeline", "PipelineCancelled", "Results", "UnknownClassError", "assign_roles", "class_named",
           "stages_for_roles"]


def _non_finite_map(maps: Mapping[str, Any], prefix: str = "") -> str | None:
    """The name of the first floating-point map (nested by class) holding NaN/Inf, else None."""
    for key, v in maps.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping):
            found = _non_finite_map(v, f"{name}/")
            if found is not None:
                return found
        elif v is None:
            continue
        elif isinstance(v, torch.Tensor):
            if not (v.is_floating_point() or v.is_complex()):
                continue
            if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64):
                if not np.isfinite(v.detach().numpy()).all():  # (numpy's check: ~10x torch's on the CPU)
                    return name
            elif not bool(torch.isfinite(v).all()):
                return name
        elif isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all():
            return name
    return None


class PipelineCancelled(CxrError):
    """The caller's ``cancel()`` returned true between two stages."""


class UnknownClassError(LabelSetError):
    """A class name the loaded model does not have (the message lists the model's classes)."""


def class_named(name: str, classes: Sequence[str], labels: Any = None) -> str:
    """The class of ``classes`` (a model's, in its order) that ``name`` stands for: the same name,
    the same up to case, spaces, ``_`` and ``-``, or a synonym in the model's label set ``labels``
    (a :class:`~cxrviewer.core.labelsets.LabelSet`: ``Opacity`` is Lung Opacity), or the same NIH
    class (``Infiltration`` finds a model's ``Infiltrate``); :class:`UnknownClassError` (listing
    ``classes``) when none."""
    from .labelsets import NIH14, normalise

    if name in classes:
        return name
    by_form = {normalise(c): c for c in classes}
    found = by_form.get(normalise(name))
    if found is None and labels is not None:
        canon = labels.canonical(name)
        found = by_form.get(normalise(canon)) if canon is not None else None
    if found is None and NIH14.canonical(name) is not None:  # both name the same NIH class
        found = next((c for c in classes if NIH14.canonical(c) == NIH14.canonical(name)), None)
    if found is None:
        listed = ", ".join(classes) if classes else "none (no classifier is loaded)"
        raise UnknownClassError(f"unknown class {name!r}; the model's classes are: {listed}")
    return found


def stages_for_roles(roles: Sequence[str]) -> list[str]:
    """The stage names a run with bundles of ``roles`` reports (an upper bound: an explainer
    with nothing to show for a study, e.g. disease masks without psi or anatomy, is skipped)."""
    return ["preprocess", *(e.name for e in applicable_explainers(roles)), "boxes"]


class Pipeline:
    """Runs the bundles of each role on a study (see module docstring).

    ``device``: a :class:`DeviceInfo`, ``"auto"``/``"cpu"``/``"cuda"`` or None (auto).
    ``methods``: explainer names to run (default: every registered one the roles allow).
    ``options``: more :meth:`ExplainContext.option` values, e.g. ``anatomy_model`` (a localiser model
    dict, cxrviewer/core/explain/anatomy.py) or the explainers' other documented options.
    ``am_steps`` / ``am_top_k`` / ``am_classes``: attention-mining steps T, how many of the most
    probable classes get their steps at once, and classes that always do.
    ``all_classes``: True (default): boxes of every class, as the app, ``cxrviewer analyze``, the
    evaluation and the benchmarks use them; False: boxes of those eager classes only
    (``am_top_k`` most probable and ``am_classes``), the others on demand (:meth:`compute_class`,
    :meth:`class_boxes`); a notice in the results says which classes have boxes.
    """

    def __init__(self, bundles: Mapping[str, LoadedBundle], device: DeviceInfo | str | None = None, *,
                 map_max_side: int = 512, frame_max_side: int = 1024, am_steps: int = 3,
                 am_top_k: int = 3, am_classes: Sequence[str] = (), all_classes: bool = True,
                 methods: Sequence[str] | None = None, options: Mapping[str, Any] | None = None) -> None:
        self._check(bundles)
        self.bundles = dict(bundles)
        if "dm" in self.bundles and "classifier" not in self.bundles:
            self.bundles["classifier"] = self.bundles.pop("dm")
        self.device = device if isinstance(device, DeviceInfo) else select_device(device or "auto")
        self.map_max_side = int(map_max_side)
        self.frame_max_side = int(frame_max_side)
        self.all_classes = bool(all_classes)
        self.options = {"am_steps": int(am_steps), "am_top_k": int(am_top_k), "am_classes": tuple(am_classes),
                        **dict(options or {})}
        self.explainers: list[Explainer] = [e for e in applicable_explainers(self.bundles)
                                            if methods is None or e.name in methods]
        self._on = None
        self._move(self.device)

    @staticmethod
    def _check(bundles: Mapping[str, LoadedBundle]) -> None:
        unknown = set(bundles) - set(ROLES)
        if unknown:
            raise CxrError(f"unknown pipeline role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
        for role, b in bundles.items():
            fam = b.manifest.family
            want = "classifier" if role in ("classifier", "dm") else role
            if fam != want:
                raise BundleError(f"a {fam} bundle cannot serve as the {role}", path=str(b.path))
        al = bundles.get("alignment")
        if al is not None and crop_box_pixels(al.manifest.crop, (100, 100)) is not None:
            raise BundleError("an alignment bundle must see the whole image (crop 'none')", path=str(al.path))
        cia = bundles.get("cia")
        if cia is not None and "normal_bank_images" not in cia.extras:
            raise BundleError("the CIA bundle has no normal bank (extras 'normal_bank_images')", path=str(cia.path))

    # -- construction helpers ------------------------------------------------------
    @classmethod
    def from_dirs(cls, dirs: Any, device: DeviceInfo | str | None = None, **kw: Any) -> "Pipeline":
        """Load every bundle in ``dirs`` and assign roles (:func:`assign_roles`)."""
        paths = find_bundles(dirs)
        if not paths:
            raise BundleError(f"no model bundles (*.cxrbundle) in {dirs}")
        loaded = [load_bundle(p) for p in paths]
        return cls(assign_roles(loaded), device, **kw)

    def _move(self, device: DeviceInfo) -> None:
        if self._on == device.device:
            return
        for b in self.bundles.values():
            # the pipeline only infers: BN folded into the convolutions (models/fold.py, the same
            # values to float rounding; realistic set on 2 CPU cores: 0.966x the time per study)
            fold_batchnorm(b.model)
            # channels-last: the convolution layout oneDNN (and cuDNN with autocast) run fastest; the
            # values are the same to float rounding (realistic set on 2 CPU cores: 2.34 -> 1.98 s/study)
            b.model.to(device.device, memory_format=torch.channels_last)
        self._on = device.device
        self.device = device

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes of the results: the classifier's (else the CIA model's), in its order."""
        for role in ("classifier", "cia"):
            if role in self.bundles:
                return self.bundles[role].manifest.classes
        return ()

    def class_named(self, name: str) -> str:
        """The model's class that ``name`` stands for (:func:`class_named` over its label set)."""
        labels = next((self.bundles[r].manifest.labels for r in ("classifier", "cia") if r in self.bundles), None)
        return class_named(name, self.classes, labels)

    # -- public API -----------------------------------------------------------------
    def run(self, study: Study, *, on_stage: Callable[[str, Results], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Results:
        """Run every stage the bundles allow; on CUDA out-of-memory the run restarts on the CPU."""
        fr = run_with_oom_fallback(self._run, study, on_stage, cancel, device=self.device)
        res: Results = fr.value
        if fr.notice:
            res.notices.append(fr.notice)
        return res

    @property
    def stages(self) -> list[str]:
        """The stages a run reports, in order (see :func:`stages_for_roles`)."""
        return ["preprocess", *(e.name for e in self.explainers), "boxes"]

    def compute_class(self, results: Results, class_index: int) -> None:
        """Add on-demand maps (attention-mining steps) for one more class from the kept features,
        and its boxes when the run made boxes of some classes only (``all_classes=False``)."""
        self._add_class_boxes(results, class_index)
        self._compute_maps(results, class_index)

    def _compute_maps(self, results: Results, class_index: int) -> None:
        able = [e for e in self.explainers if e.on_demand and e.name in results.maps]
        if not able or not all([e.compute_class(results, class_index) for e in able]):
            raise CxrError("these results keep no features (loaded from a file or no AM-capable "
                           "classifier); run the pipeline again to mine another class")

    def class_boxes(self, results: Results, class_index: int) -> dict[str, list[Any]]:
        """Boxes of class ``class_index`` by method (``{explainer: [Box]}``, original pixels), from
        the maps in ``results`` (not touched); what an ``all_classes`` run would have proposed."""
        name = results.classes[class_index]
        out: dict[str, list[Any]] = {}
        for ex in self.explainers:
            if ex.proposes_boxes and ex.name in results.maps:
                boxes = ex.class_boxes(results, {name})
                if boxes is not None:
                    out[ex.name] = boxes
        return out

    def _add_class_boxes(self, results: Results, class_index: int) -> None:
        boxed = results.state.get(BOXED_CLASSES)
        name = results.classes[class_index]
        if boxed is None or name in boxed:
            return
        for source, boxes in self.class_boxes(results, class_index).items():
            results.boxes.setdefault(source, []).extend(boxes)
        boxed.add(name)

    def class_maps(self, results: Results, class_index: int) -> dict[str, dict[str, Any]]:
        """On-demand maps of one more class, computed on a copy (``results`` is not touched):
        ``{explainer: {map: array}}`` for :meth:`Results.add_class_maps`."""
        tmp = results.snapshot()
        tmp.state = results.state
        self._compute_maps(tmp, class_index)  # maps only: class_boxes gives the boxes
        name = results.classes[class_index]
        out: dict[str, dict[str, Any]] = {}
        for e in self.explainers:
            for key, v in tmp.maps.get(e.name, {}).items():
                if e.on_demand and isinstance(v, dict) and name in v:
                    out.setdefault(e.name, {})[key] = v[name]
        return out

    # -- internals ------------------------------------------------------------------
    def _new_results(self, study: Study, device: DeviceInfo) -> Results:
        res = Results(study_id=study.study_id, source_path=study.meta.source_path,
                      pixel_sha256=study.pixel_sha256(), image_shape=study.shape,
                      map_shape=scaled_shape(study.shape, self.map_max_side), classes=self.classes,
                      device=str(device))
        res.models = {role: {**b.manifest.summary(), "bundle": b.path.name} for role, b in self.bundles.items()}
        return res

    def _check_finite(self, ex: Explainer, out: Any, ctx: ExplainContext, res: Results) -> None:
        """Refuse a model whose outputs hold NaN/Inf (broken weights or input), naming it: the
        classifier's probabilities, every float map the explainer ``ex`` made from its models and
        the context's shared outputs (lung/heart masks, alignment affine)."""
        p = res.probabilities
        if p is not None and not bool(np.isfinite(p).all()):
            bad = [c for c, v in zip(res.classes, np.asarray(p).ravel()) if not np.isfinite(v)]
            listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            self._refuse("classifier", f"non-finite probabilities (NaN/Inf) for {res.study_id} ({listed or 'all'})")
        key = _non_finite_map(out.maps) if out is not None else None
        if key is not None:
            role = next((r for r in ex.requires if r in self.bundles), "classifier")
            self._refuse(role, f"non-finite values (NaN/Inf) in the {ex.name} map '{key}' for {res.study_id}")
        shared = _non_finite_map({"segmentation": ctx.seg_work, "alignment": ctx.theta})
        if shared is not None:  # what later networks would see (lung/heart masks, the aligned frame)
            self._refuse(shared, f"non-finite values (NaN/Inf) in its {shared} output for {res.study_id}")

    def _refuse(self, role: str, what: str) -> None:
        b = self.bundles.get(role)
        name = b.name if b is not None else role
        raise ModelError(f"model '{name}' produced {what}; its output was refused",
                         path=str(b.path) if b is not None else None)

    def _run(self, study: Study, on_stage: Callable[[str, Results], None] | None,
             cancel: Callable[[], bool] | None, *, device: DeviceInfo) -> Results:
        self._move(device)
        dev = device.device
        res = self._new_results(study, device)
        clock = [time.perf_counter()]

        def stage(name: str) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            res.timings[name] = now - clock[0]
            if on_stage is not None:
                on_stage(name, res)
            if cancel is not None and cancel():
                raise PipelineCancelled(f"analysis of {study.study_id} cancelled after {name}")
            clock[0] = time.perf_counter()

        if cancel is not None and cancel():
            raise PipelineCancelled(f"analysis of {study.study_id} cancelled")
        frame_shape = scaled_shape(study.shape, self.frame_max_side)
        frame = resize(as_image_tensor(study.model_input).clamp(0, 1), frame_shape).to(dev)
        ctx = ExplainContext(res, self.bundles, device, frame, self.options)
        stage("preprocess")
        try:
            for ex in self.explainers:
                out = ex.compute(ctx)
                self._check_finite(ex, out, ctx, res)
                if out is not None:  # None: nothing to show for this study (its notice says why)
                    res.maps[ex.name] = out.maps
                    if out.attrs:
                        res.attrs[ex.name] = out.attrs
                    if out.state is not None:
                        res.state[ex.name] = out.state
                stage(ex.name)  # every stage reports (progress, timing, cancel), whether or not it had output
        finally:
            ctx.release()
        self._propose_boxes(res)
        stage("boxes")
        return res

    def _propose_boxes(self, res: Results) -> None:
        """Every box method's boxes: of every class, or (``all_classes=False``) of the eager ones."""
        names: set[str] | None = None
        if not self.all_classes and res.classes:
            k = int(self.options.get("am_top_k", 3))
            names = {res.classes[c] for c in eager_classes(res, k, self.options.get("am_classes", ()))}
            res.state[BOXED_CLASSES] = set(names)
            listed = ", ".join(n for n in res.classes if n in names)
            res.notices.append(f"boxes of {listed or 'no class'} only (the {k} most probable classes and "
                               "those asked for); the other classes' boxes are made when a class is chosen")
        for ex in self.explainers:
            if ex.proposes_boxes and ex.name in res.maps:
                boxes = ex.class_boxes(res, names)  # None: this method proposes nothing for this study
                if boxes is not None:
                    res.boxes[ex.name] = boxes
