"""Anatomy-guided localisation: one box per class from the patient's own lungs and heart.

Disease-masks-attention Eq. 3 makes a class's location prior the average of its training boxes
in a common frame; here the frame is the patient's anatomy (lung-heart-feature-weighting Sec. 3.2
masks): every training box is stored relative to an anchor box of that patient — the whole image,
the thorax (both lungs), the heart, or the lung on the box's own side (mirrored, so left and right
findings pool into one template). ``training/localiser.py`` (``cxr-train localiser``) learns, per
class and from training folds only,

* one template per anchor (the box that maximises training hits at T(IoU) 0.1-0.7), and which
  anchor is best for the class by the templates' held-out hit rates (Cardiomegaly: the heart;
  diffuse findings: the thorax), or the location prior itself (:data:`PRIOR`, the ``prior``
  explainer's median box) when no anchor beats it held out;
* a side model: a logistic regression p(left | evidence) on the lung-mask asymmetry (area, height),
  the zone intensity asymmetry of the lungs and, with a classifier, the class's CAM mass in each
  lung (disease-masks Eq. 1);
* the calibration of the classifier's probability (Platt, fitted on held-out folds).

At run time (:class:`AnatomyExplainer`) the side template wins over the symmetric one only when
``max(p_left, 1 - p_left) * side_score > symmetric_score`` (both hit rates held out over inner
folds of the training boxes), i.e. when
the evidence makes the one-sided box the better bet. The posterior map per class is the mixture of
the candidate boxes weighted by those expected hit rates, shaped by the lung/heart masks; the box
is its most probable candidate and its score the calibrated class probability.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.labels import NIH_ONLY, nih_lookup, nih_name
from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, MapSpec, PanelSpec, register_explainer
from cxrviewer.core.geometry import Box

if TYPE_CHECKING:
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

__all__ = ["ANCHORS", "FEATURES", "PRIOR", "AnatomyExplainer", "anatomy_boxes", "anatomy_features",
           "anatomy_shaping", "cam_log_ratio", "check_model", "decide", "default_model_path", "from_norm", "load_model",
           "posterior_map", "side_probability", "to_norm"]

#: the anchors a symmetric template may be relative to (``side`` templates use the lung boxes)
ANCHORS = ("image", "thorax", "heart")
#: the symmetric choice that is the location prior itself (image fractions; training/localiser.py
#: keeps it when no anatomy template beats it on held-out boxes)
PRIOR = "prior"
#: the evidence of the side model, in this order (``cam_log_ratio`` only with a classifier)
FEATURES = ("log_area_ratio", "log_height_ratio", "upper_diff", "middle_diff", "lower_diff", "cam_log_ratio")
#: the pipeline option that overrides the shipped model (a dict as written by training/localiser.py)
OPTION = "anatomy_model"

Quad = tuple[float, float, float, float]  # (x0, y0, x1, y1)


def default_model_path() -> Path:
    """``resources/priors/anatomy_localiser.json`` of the checkout or the frozen app (may not exist)."""
    from cxrviewer.core.bundle import default_models_dir

    return default_models_dir().parent / "priors" / "anatomy_localiser.json"


@lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> dict[str, Any]:
    try:
        return check_model(json.loads(Path(path).read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExplainError(f"cannot read the localiser model {path}: {exc}") from exc


def check_model(model: Any, source: str = "the given model") -> dict[str, Any]:
    """``model`` when it is a localiser model as training/localiser.py writes it (per class a
    ``sym`` template on a known anchor, optionally a ``side`` one), else :class:`ExplainError`."""
    def bad(why: str) -> ExplainError:
        return ExplainError(f"{source} is not a localiser model: {why}")

    if not isinstance(model, Mapping) or not isinstance(model.get("classes", {}), Mapping):
        raise bad("expected an object with 'classes'")
    for c, cls in model.get("classes", {}).items():
        sym = cls.get("sym") if isinstance(cls, Mapping) else None
        if not _scored(sym) or sym.get("anchor") not in (*ANCHORS, PRIOR):
            raise bad(f"class {c!r}: 'sym' needs an anchor in {(*ANCHORS, PRIOR)}, a 4-number box and a score")
        if cls.get("side") is not None and not _scored(cls["side"]):
            raise bad(f"class {c!r}: 'side' needs a 4-number box and a score")
    return dict(model)


def _scored(t: Any) -> bool:
    """A template: a mapping with a 4-number ``box`` and a number ``score``."""
    box = t.get("box") if isinstance(t, Mapping) else None
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(x, (int, float)) for x in box)
            and isinstance(t.get("score"), (int, float)))


def load_model(path: str | Path | None = None) -> dict[str, Any]:
    """The localiser model at ``path`` (default :func:`default_model_path`); ``{}`` when absent;
    :class:`ExplainError` when unreadable or malformed (:func:`check_model`)."""
    p = Path(path) if path is not None else default_model_path()
    return dict(_read(str(p), p.stat().st_mtime)) if p.is_file() else {}


def _extent(mask: np.ndarray) -> Quad | None:
    """``(x0, y0, x1, y1)`` of a mask in cells (0.5/99.5 percentiles: a stray speck does not count)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 16:
        return None
    x0, x1 = np.percentile(xs, (0.5, 99.5))
    y0, y1 = np.percentile(ys, (0.5, 99.5))
    return (float(x0), float(y0), float(x1) + 1.0, float(y1) + 1.0)


def anatomy_boxes(masks: np.ndarray, image_shape: tuple[int, int]) -> dict[str, Quad] | None:
    """Anchor boxes in image pixels from lung/heart masks ``[3, h, w]`` (two lungs, heart):
    ``L``/``R`` the image-left/right lung, ``heart``, ``thorax`` (both lungs) and ``image``.
    None when a lung is missing (no anatomy to anchor on)."""
    h, w = masks.shape[-2:]
    sx, sy = image_shape[1] / w, image_shape[0] / h
    lungs = [_extent(masks[i] > 0) for i in range(2)]
    if lungs[0] is None or lungs[1] is None:
        return None
    lungs.sort(key=lambda b: b[0] + b[2])
    heart = _extent(masks[2] > 0) if masks.shape[0] > 2 else None

    def px(b: Quad) -> Quad:
        return (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)

    left, right = px(lungs[0]), px(lungs[1])
    thorax = (min(left[0], right[0]), min(left[1], right[1]), max(left[2], right[2]), max(left[3], right[3]))
    if heart is None:  # no heart mask: the middle of the thorax's lower half stands in
        tw, th = thorax[2] - thorax[0], thorax[3] - thorax[1]
        hq = (thorax[0] + 0.3 * tw, thorax[1] + 0.5 * th, thorax[0] + 0.75 * tw, thorax[1] + 0.9 * th)
    else:
        hq = px(heart)
    return {"L": left, "R": right, "heart": hq, "thorax": thorax,
            "image": (0.0, 0.0, float(image_shape[1]), float(image_shape[0]))}


def _lung_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left lung, image-right lung) masks, whichever channel each is."""
    cx = [float(np.nonzero(masks[i])[1].mean()) if masks[i].any() else float(i) for i in range(2)]
    return (masks[0] > 0, masks[1] > 0) if cx[0] <= cx[1] else (masks[1] > 0, masks[0] > 0)


def anatomy_features(masks: np.ndarray, image: np.ndarray, anchors: Mapping[str, Quad]) -> list[float]:
    """The side evidence that needs no classifier (:data:`FEATURES` without the CAM term): lung-mask
    area and height asymmetry (log left/right) and the mean-intensity difference (left - right) of
    the upper, middle and lower thirds of the thorax's height over each lung's columns. ``image`` in [0, 1] at the masks' size."""
    ml, mr = _lung_masks(masks)
    h, w = masks.shape[-2:]
    ih, iw = (anchors["image"][3], anchors["image"][2])
    sx, sy = w / iw, h / ih
    hl = anchors["L"][3] - anchors["L"][1]
    hr = anchors["R"][3] - anchors["R"][1]
    out = [math.log((ml.sum() + 1.0) / (mr.sum() + 1.0)), math.log(max(hl, 1.0) / max(hr, 1.0))]
    for lo, hi in ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)):
        means = []
        for key in ("L", "R"):  # the lung's columns, the thorax's rows (a raised base still counts)
            x0, _, x1, _ = anchors[key]
            _, y0, _, y1 = anchors["thorax"]
            ya = int(round((y0 + lo * (y1 - y0)) * sy))
            yb = max(int(round((y0 + hi * (y1 - y0)) * sy)), ya + 1)
            xa = int(round(x0 * sx))
            xb = max(int(round(x1 * sx)), xa + 1)
            means.append(float(image[ya:yb, xa:xb].mean()) if image[ya:yb, xa:xb].size else 0.0)
        out.append(means[0] - means[1])
    return out


def cam_log_ratio(cam: np.ndarray, masks: np.ndarray) -> list[float]:
    """Per class, log of the mean [0, 1]-normalised CAM (disease-masks Eq. 1) in the image-left
    lung over that in the image-right lung. ``cam [C, h, w]`` at the masks' size."""
    ml, mr = _lung_masks(masks)
    out = []
    for m in np.asarray(cam, np.float64):
        n = (m - m.min()) / (float(np.ptp(m)) + 1e-9)
        a = float(n[ml].mean()) if ml.any() else 0.0
        b = float(n[mr].mean()) if mr.any() else 0.0
        out.append(math.log((a + 1e-3) / (b + 1e-3)))
    return out


def to_norm(box: Quad, anchor: Quad, *, mirror: bool = False) -> list[float]:
    """A box as fractions of an anchor box (mirrored left-right when ``mirror``)."""
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    n = [(box[0] - anchor[0]) / w, (box[1] - anchor[1]) / h, (box[2] - anchor[0]) / w, (box[3] - anchor[1]) / h]
    return [1.0 - n[2], n[1], 1.0 - n[0], n[3]] if mirror else n


def from_norm(n: Sequence[float], anchor: Quad, *, mirror: bool = False) -> Quad:
    """Inverse of :func:`to_norm`."""
    if mirror:
        n = [1.0 - n[2], n[1], 1.0 - n[0], n[3]]
    w, h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    return (anchor[0] + n[0] * w, anchor[1] + n[1] * h, anchor[0] + n[2] * w, anchor[1] + n[3] * h)


def side_probability(side: Mapping[str, Any], features: Sequence[float], cam: float | None) -> float:
    """p(image-left | evidence) of a class's side model (its ``with_cam`` regression when the CAM
    term is known and the model has one, else ``anatomy``; ``p_left`` without either)."""
    reg = side.get("with_cam") if cam is not None and side.get("with_cam") else side.get("anatomy")
    if not reg:
        return float(side.get("p_left", 0.5))
    x = list(features) + ([cam] if len(reg["w"]) > len(features) else [])
    z = sum(wi * (xi - m) / s for wi, xi, m, s in zip(reg["w"], x, reg["mean"], reg["std"])) + reg["b"]
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def decide(cls: Mapping[str, Any], anchors: Mapping[str, Quad], features: Sequence[float],
           cam: float | None) -> tuple[Quad, str, list[tuple[Quad, float]]]:
    """The box of one class, its choice (``sym:<anchor>`` or ``side:L|R``) and the weighted
    candidates ``[(box, expected hit rate)]`` the posterior map is made of (module docstring)."""
    sym = cls["sym"]
    sym_box = from_norm(sym["box"], anchors["image" if sym["anchor"] == PRIOR else sym["anchor"]])
    cands = [(sym_box, float(sym["score"]))]
    side = cls.get("side")
    if not side:
        return sym_box, f"sym:{sym['anchor']}", cands
    p_left = side_probability(side, features, cam)
    boxes = {s: from_norm(side["box"], anchors[s], mirror=(s == "R")) for s in ("L", "R")}
    cands += [(boxes["L"], p_left * float(side["score"])), (boxes["R"], (1.0 - p_left) * float(side["score"]))]
    best = max(range(3), key=lambda i: cands[i][1])
    if best == 0:
        return sym_box, f"sym:{sym['anchor']}", cands
    return cands[best][0], "side:" + ("L" if best == 1 else "R"), cands


def posterior_map(cands: Sequence[tuple[Quad, float]], shape: tuple[int, int], image_shape: tuple[int, int],
                  shaping: np.ndarray) -> np.ndarray:
    """The location posterior of one class on a ``shape`` grid: the candidates' boxes (smoothed)
    weighted by their expected hit rates, times ``shaping`` (:func:`anatomy_shaping`), scaled to a
    maximum of 1. The smoothing runs on a grid 4x coarser (the map is smooth at that scale)."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    h, w = max(1, shape[0] // 4), max(1, shape[1] // 4)
    sx, sy = w / image_shape[1], h / image_shape[0]
    m = np.zeros((h, w), np.float32)
    for (x0, y0, x1, y1), wt in cands:
        ya, yb = int(max(0, math.floor(y0 * sy))), int(min(h, math.ceil(y1 * sy)))
        xa, xb = int(max(0, math.floor(x0 * sx))), int(min(w, math.ceil(x1 * sx)))
        if yb > ya and xb > xa:
            m[ya:yb, xa:xb] += max(float(wt), 0.0)
    m = ndimage.gaussian_filter(m, sigma=max(h, w) / 32.0)
    up = F.interpolate(torch.from_numpy(m)[None, None], size=tuple(shape), mode="bilinear", align_corners=False)
    m = up[0, 0].numpy() * shaping
    top = float(m.max())
    return m / top if top > 0 else m


def anatomy_shaping(masks: np.ndarray) -> np.ndarray:
    """The posterior's anatomy weight: 1 on the lungs and heart, 0.3 elsewhere (float32)."""
    return (0.3 + 0.7 * (masks.max(axis=0) > 0)).astype(np.float32)


def _calibrated(model: Mapping[str, Any], classes: Sequence[str], probs: np.ndarray | None,
                classifier_sha: str | None) -> tuple[dict[str, float], str]:
    """Box scores: Platt-calibrated probabilities when the model's calibration belongs to the
    loaded classifier, else its raw probabilities, else the training prevalence."""
    cal = model.get("calibration") or {}
    if probs is None:
        return {c: float((nih_lookup(model["classes"], c) or {}).get("prevalence", 0.0)) for c in classes}, "prevalence"
    p = {c: float(v) for c, v in zip(classes, probs)}
    if not cal or cal.get("classifier_sha256") != classifier_sha:
        return p, "uncalibrated"
    out = {}
    for c, v in p.items():
        a, b = nih_lookup(cal["a"], c), nih_lookup(cal["b"], c)
        if a is None or b is None:
            out[c] = v
            continue
        logit = math.log(max(v, 1e-6) / max(1.0 - v, 1e-6))
        out[c] = 1.0 / (1.0 + math.exp(-(a * logit + b)))
    return out, "platt"


@register_explainer("anatomy")
class AnatomyExplainer(Explainer, title="Anatomy-guided localisation", short="anat", order=150,
                       requires=("segmentation",), box_priority=-1):
    """One box per class from the patient's lungs and heart and the side evidence (module docstring)."""

    maps = (MapSpec("posterior", "location posterior (relative, max 1)", "probability"),)
    panels = (PanelSpec("anatomy", "Anatomy-guided location posterior", "posterior", quantity="location posterior",
                        fixed_range=(0.0, 1.0), order=5, caption="Anatomy"),)
    proposes_boxes = True
    box_score = "probability"  # the calibrated class probability (or the prevalence)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        masks = ctx.results.get("segmentation", "masks")
        anchors = anatomy_boxes(np.asarray(masks), ctx.results.image_shape) if masks is not None else None
        if anchors is None:
            ctx.results.notices.append("anatomy-guided localisation: the lungs were not found; no boxes")
            return None
        masks = np.asarray(masks)
        ev = self._evidence(ctx, masks, anchors)
        try:
            model, source = self._model(ctx)
        except ExplainError as exc:  # a broken localiser file costs its boxes, not the other maps
            ctx.results.notices.append(f"anatomy-guided localisation: {exc}; evidence only, no boxes")
            return ExplainerOutput({}, {"source": None, **ev})
        if not model.get("classes"):  # the evidence alone (what training/localiser.py learns from)
            ctx.results.notices.append("anatomy-guided localisation: no localiser model "
                                       f"({source}); evidence only, no boxes")
            return ExplainerOutput({}, {"source": None, **ev})
        if not ctx.results.classes:  # no classifier loaded: no class to place a box for
            ctx.results.notices.append("anatomy-guided localisation: no classifier, so no classes; "
                                       "evidence only, no boxes")
            return ExplainerOutput({}, {"source": source, **ev})
        return self._localise(ctx, model, source, masks, anchors, ev)

    @staticmethod
    def _evidence(ctx: "ExplainContext", masks: np.ndarray, anchors: Mapping[str, Quad]) -> dict[str, Any]:
        """The anchors and the side evidence of this study (JSON-able attributes)."""
        import torch.nn.functional as F

        res = ctx.results
        small = F.interpolate(ctx.frame.detach().float().cpu(), size=tuple(masks.shape[-2:]), mode="area")[0, 0]
        cam = res.get("cam", "cam")
        cams = cam_log_ratio(cam, masks) if cam is not None and len(cam) == len(res.classes) else None
        return {"anchors": {k: [round(v, 2) for v in q] for k, q in anchors.items()},
                "features": [round(v, 6) for v in anatomy_features(masks, small.numpy(), anchors)],
                "cam_log_ratio": None if cams is None else [round(v, 6) for v in cams]}

    def _localise(self, ctx: "ExplainContext", model: Mapping[str, Any], source: str, masks: np.ndarray,
                  anchors: Mapping[str, Quad], ev: Mapping[str, Any]) -> ExplainerOutput:
        res = ctx.results
        clf = ctx.bundles.get("classifier")
        scores, how = _calibrated(model, res.classes, res.probabilities, clf.manifest.weights_sha256 if clf else None)
        shaping = anatomy_shaping(masks)  # once per study, shared by every class
        cams = ev["cam_log_ratio"]
        post, boxes, choice = [], {}, {}
        for i, c in enumerate(res.classes):
            cls = nih_lookup(model["classes"], c)  # NIH classes only: others get no box
            if not cls:
                post.append(np.zeros(masks.shape[-2:], np.float32))
                continue
            box, choice[c], cands = decide(cls, anchors, ev["features"], cams[i] if cams is not None else None)
            post.append(posterior_map(cands, masks.shape[-2:], res.image_shape, shaping))
            boxes[c] = [round(v, 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])]
        attrs = {"source": source, "scores": {c: round(scores[c], 5) for c in boxes}, "score_kind": how,
                 "boxes": boxes, "choice": choice, **ev, "frame": "original pixels (x, y, w, h)"}
        return ExplainerOutput({"posterior": np.stack(post).astype(np.float32)}, attrs)

    @staticmethod
    def _model(ctx: "ExplainContext") -> tuple[dict[str, Any], str]:
        given = ctx.option(OPTION, None)
        if isinstance(given, Mapping):
            name = str(given.get("name", "pipeline option"))
            return check_model(given, name), name
        return load_model(), f"resources/priors/{default_model_path().name}"

    def propose_boxes(self, results: "Results") -> list[Box] | None:
        """One box per class (original pixels), scored by the calibrated class probability; None
        when the study has evidence only (no localiser model): nothing is proposed."""
        boxes = results.attr(self.name, "boxes")
        if boxes is None:
            return None
        scores = results.attr(self.name, "scores") or {}
        return [Box(c, *boxes[c], scores.get(c)) for c in results.classes if c in boxes]

    def empty_reason(self, results: "Results") -> str:
        attrs = results.attrs.get(self.name)
        if attrs and attrs.get("source") is None:
            return "no localiser model (resources/priors/anatomy_localiser.json): evidence only, no boxes"
        return super().empty_reason(results)

    def class_reason(self, results: "Results", name: str) -> str:
        boxes = results.attr(self.name, "boxes")
        if boxes is None or name in boxes:
            return ""
        return NIH_ONLY if nih_name(name) is None else "no NIH training boxes"

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        if class_index is None:
            return ""
        c = results.classes[class_index]
        choice = (results.attr(self.name, "choice") or {}).get(c, "")
        where = {"side:L": "image-left lung", "side:R": "image-right lung", f"sym:{PRIOR}": "location prior"}.get(
            choice, choice.replace("sym:", ""))
        kind = {"platt": "calibrated p", "uncalibrated": "uncalibrated p", "prevalence": "prevalence"}.get(
            str(results.attr(self.name, "score_kind")), "score")
        score = (results.attr(self.name, "scores") or {}).get(c)
        parts = [x for x in (f"box: {where}" if where else "", f"{kind} {score:.2f}" if score is not None else "") if x]
        return "".join(f"· {x} " for x in parts).rstrip()  # after "Anatomy · <class> p=..", the same separator
