"""What each panel shows, generated from the explainer registry (pure numpy, no Qt).

The viewer's panel grid and ``panels.png`` (:mod:`cxrviewer.core.render`) both ask
:func:`panel_list` which panels exist and :func:`panel_data` what one of them shows for a
class, so a newly registered explainer appears in both without touching either.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrviewer.core import explain as _explain  # noqa: F401  (registers the explanation methods)
from cxrviewer.core.explain.labels import names_text
from cxrviewer.core.explain.registry import (Explainer, PanelSpec, get_explainer, registered_explainers,
                                             registry_version)
from cxrviewer.core.geometry import Box
from cxrviewer.core.model_card import BELOW_PRIOR, below_prior, model_card
from cxrviewer.core.results import Results

__all__ = ["BELOW_PRIOR", "BelowPrior", "PRIOR", "PanelData", "PanelRef", "alignment_note", "below_prior_by_role",
           "class_panel", "default_box_method", "needs_class_maps", "not_available", "not_available_lines",
           "panel_below_prior", "panel_data", "panel_list", "panel_model", "panel_ref", "prior_boxes",
           "proposal_sources", "reference_sources", "scale_label", "split_below_prior", "wrap_caption"]

#: the explainer of the location prior (one fixed reference box per class, never a proposal)
PRIOR = "prior"
#: role -> the classes whose maps scored below the location prior in that role's model card
BelowPrior = Mapping[str, Collection[str]]


@dataclass(frozen=True)
class PanelRef:
    """A panel and the explainer that fills it."""

    spec: PanelSpec
    explainer: Explainer

    @property
    def key(self) -> str:
        return self.spec.key


@functools.lru_cache(maxsize=4)
def _index(version: int) -> tuple[tuple[PanelRef, ...], dict[str, PanelRef], tuple[str, ...]]:
    """Panels in grid order, panels by key and the proposal order of registry ``version``
    (built once per registry change, not on every repaint)."""
    classes = registered_explainers()
    refs = tuple(sorted((PanelRef(p, c()) for c in classes for p in c.panels),
                        key=lambda r: (r.spec.order, r.spec.key)))
    sources = tuple(c.name for c in sorted(classes, key=lambda c: (c.box_priority, c.order))
                    if c().proposes_boxes and not c.reference)
    return refs, {r.key: r for r in refs}, sources


def panel_list(roles: Collection[str] | None = None) -> list[PanelRef]:
    """Every registered panel in grid order (only those the ``roles`` allow, when given)."""
    refs = _index(registry_version())[0]
    return [r for r in refs if roles is None or r.explainer.applies(roles)]


def panel_ref(key: str) -> PanelRef:
    """The panel called ``key`` (KeyError lists the known ones)."""
    refs, by_key, _ = _index(registry_version())
    try:
        return by_key[key]
    except KeyError:
        raise KeyError(f"unknown panel {key!r}; panels: {', '.join(r.key for r in refs)}") from None


def proposal_sources() -> list[str]:
    """Explainers that propose boxes, in the order the viewer prefers their proposals (lowest
    ``box_priority`` first); a reference (the prior) is never a proposal source."""
    return list(_index(registry_version())[2])


def reference_sources() -> frozenset[str]:
    """Explainers whose boxes are references (the ``prior``): drawn on request, never proposals."""
    return frozenset(c.name for c in registered_explainers() if getattr(c, "reference", False))


def default_box_method(available: Collection[str] | None = None) -> str | None:
    """The app's default box method: the first of :func:`proposal_sources` in ``available`` (e.g. a
    result's ``boxes``; None: any registered), i.e. attention mining, else CAM, else contrast."""
    return next((n for n in proposal_sources() if available is None or n in available), None)


def needs_class_maps(res: Results, name: str) -> bool:
    """Whether an on-demand method (attention-mining steps) has no maps of class ``name`` yet."""
    for c in registered_explainers():
        if not c.on_demand or c.name not in res.maps:
            continue
        for spec in c.maps:
            if spec.steps and name not in (res.get(c.name, spec.name) or {}):
                return True
    return False


@dataclass
class PanelData:
    """One panel's content for one class (arrays are the results' own, never copied).

    ``*_key`` tuples identify what is shown (id of the source array, index), so a viewer can
    tell whether anything changed without comparing arrays.
    """

    caption: str
    filled: bool = False
    heat: np.ndarray | None = None  # raw map at map_shape, original coordinates
    image: np.ndarray | None = None  # a base image of its own (aligned image, paired normal)
    image_levels: tuple[float, float] = (0.0, 1.0)
    masks: np.ndarray | None = None  # [K, h, w] binary masks painted in fixed colours
    outline: np.ndarray | None = None  # [h, w] binary region drawn as an outline over the map
    frame: str = "original"  # the MapSpec frame of what is shown ("aligned": spans the original's extent)
    heat_key: tuple = ()
    image_key: tuple = ()
    overlay_key: tuple = ()
    below_prior: bool = False  # the producing model's card says this class's maps are below the prior


def _class_name(res: Results, c: int | None) -> str:
    return res.classes[c] if c is not None and c < len(res.classes) else ""


def _prob(res: Results, c: int | None) -> str:
    if c is None or res.probabilities is None or c >= len(res.probabilities):
        return ""
    return f" p={res.probabilities[c]:.2f}"


def _caption(ref: PanelRef, res: Results, c: int | None, extra: str) -> str:
    """``caption · class p=..`` then the explainer's extra text (e.g. ``(erased outlined)``)."""
    text = ref.spec.caption or ref.spec.title
    if ref.spec.per_class and c is not None:
        text += f" · {_class_name(res, c)}{_prob(res, c) if ref.spec.kind == 'heat' and not ref.spec.step else ''}"
    return f"{text} {extra}" if extra else text


def _step_data(ref: PanelRef, res: Results, c: int, caption: str) -> PanelData:
    s = ref.spec
    name = _class_name(res, c)
    steps = (res.get(ref.explainer.name, s.map) or {}).get(name)
    if steps is None or s.step > steps.shape[0]:
        return PanelData(caption)
    erased = (res.get(ref.explainer.name, s.outline) or {}).get(name) if s.outline else None
    has = erased is not None and 1 < s.step <= erased.shape[0] + 1
    return PanelData(caption, True, heat=steps[s.step - 1], outline=erased[s.step - 1] if has else None,
                     heat_key=(id(steps), s.step), overlay_key=(id(erased), s.step) if has else ())


def panel_data(key: str, res: Results | None, c: int | None, below: BelowPrior | None = None) -> PanelData:
    """What panel ``key`` shows for class index ``c`` of ``res``; the caption ends in
    ``· below the location prior`` when :func:`panel_below_prior` says so (``below``: role -> classes,
    default :func:`below_prior_by_role` of the results' own model summaries)."""
    d = _panel_data(key, res, c)
    if d.filled and res is not None and panel_below_prior(key, res, c, below):
        d.caption = f"{d.caption} · {BELOW_PRIOR}"
        d.below_prior = True
    return d


def _panel_data(key: str, res: Results | None, c: int | None) -> PanelData:
    ref = panel_ref(key)
    s = ref.spec
    if res is None:
        return PanelData(s.title)
    ex = ref.explainer
    arr = res.get(ex.name, s.map)
    if s.per_class and (c is None or not res.classes):
        return PanelData(s.title + ("" if res.classes else " (no classifier)"))
    if arr is None:
        return PanelData(f"{s.title}: {ex.missing(res.models) or ex.empty_reason(res)}")
    if s.per_class and not s.step:
        why = ex.class_reason(res, _class_name(res, c))
        if why:  # e.g. an anatomy box for a class outside the NIH set
            return PanelData(f"{s.caption or s.title} · {_class_name(res, c)}: {why}")
    caption = _caption(ref, res, c, ex.caption(res, s, c))
    if s.step:
        return _step_data(ref, res, c, caption)  # type: ignore[arg-type]
    if s.per_class:
        idx = ex.classes(res).index(_class_name(res, c)) if _class_name(res, c) in ex.classes(res) else None
        if idx is None or idx >= arr.shape[0]:
            return PanelData(f"{caption} (this model has no map for {_class_name(res, c)})")
        arr, key_ = arr[idx], (id(arr), idx)
    else:
        key_ = (id(arr),)
    if s.kind == "image":
        hi = 255.0 if arr.dtype == np.uint8 else 1.0
        frame = next((m.frame for m in ex.maps if m.name == s.map), "own")
        return PanelData(caption, True, image=arr, image_levels=(0.0, hi), image_key=key_, frame=frame)
    if s.kind == "masks":
        return PanelData(caption, True, masks=arr, overlay_key=key_)
    if s.quantity == "probability" and s.per_class and "source" in res.attrs.get(ex.name, {}):
        caption = f"{caption} {_mask_note(res, ref, arr)}"
    return PanelData(caption, True, heat=arr, heat_key=key_)


def _lacking(ex: Explainer, res: Results) -> dict[str, list[str]]:
    """Reason -> the classes of ``res`` that ``ex``'s output has no map or box of, for that reason."""
    out: dict[str, list[str]] = {}
    for name in res.classes:
        why = ex.class_reason(res, name)
        if why:
            out.setdefault(why, []).append(name)
    return out


def not_available(roles: Collection[str], res: Results | None = None) -> dict[str, str]:
    """What the model set cannot show, and why: panel key -> reason (``needs a CIA model with a
    normal bank (not loaded)``; with results, also ``nothing to show for this study ...`` and the
    classes a method has no map of: ``NIH classes only: not for Lung Opacity, Fracture``). A method
    without panels (the prior) or whose panels show no class (contrast) reports its boxes as
    ``<method> boxes``. ``roles``: the loaded roles (``res.models`` for results)."""
    out: dict[str, str] = {}
    for cls in registered_explainers():
        ex = cls()
        why = ex.missing(roles)
        ran = res is not None and (ex.name in res.maps or ex.name in res.attrs)
        if not why and res is not None and not ran and ex.name in res.timings:
            why = ex.empty_reason(res)
        if why:
            out.update({p.key: why for p in ex.panels} or ({ex.name: why} if ex.proposes_boxes else {}))
            continue
        lacking = _lacking(ex, res) if ran else {}  # type: ignore[arg-type]
        if lacking:
            text = "; ".join(f"{why}: not for {names_text(names)}" for why, names in lacking.items())
            keys = [p.key for p in ex.panels if p.per_class and not p.step] or (
                [f"{ex.name} boxes"] if ex.proposes_boxes else [])
            out.update({k: text for k in keys})
    return out


def not_available_lines(roles: Collection[str], res: Results | None = None,
                        found: Mapping[str, str] | None = None) -> list[str]:
    """:func:`not_available` (or its ``found`` result) as ``Title: reason`` lines (panel titles; a
    method's boxes by the method's title)."""
    lines = []
    for key, why in (not_available(roles, res) if found is None else found).items():
        try:
            title = panel_ref(key).spec.title
        except KeyError:
            name, _, boxes = key.partition(" ")
            title = f"{get_explainer(name).title}{' boxes' if boxes else ''}"
        lines.append(f"{title}: {why}")
    return lines


#: colour-bar names of the quantities (others: the PanelSpec's ``quantity``)
QUANTITY_LABELS = {"activation": "CAM/AM map", "am_final": "AM final H_f", "probability": "ψ probability",
                   "gradcam": "Grad-CAM", "contrast": "contrast dM"}


def scale_label(key: str) -> str:
    """The name of the quantity panel ``key`` maps (its colour bar's label)."""
    spec = panel_ref(key).spec
    return QUANTITY_LABELS.get(spec.quantity, spec.quantity or spec.title)


def _mask_note(res: Results, ref: PanelRef, heat: np.ndarray) -> str:
    """What a probability-mask panel shows: its source and how much of the image is >= 0.5."""
    src = res.attrs.get(ref.explainer.name, {}).get("source")
    finite = np.asarray(heat, np.float32)
    finite = finite[np.isfinite(finite)]
    share = float((finite >= 0.5).mean()) if finite.size else 0.0
    what = {"pdm": "not a finding: the class's usual region, from the lung/heart segmentation",
            "dm": "from the DM model", "classifier": "from the classifier"}.get(str(src), str(src or "source unknown"))
    return f"[{what}; ψ≥0.5 on {share:.0%} of the map]"


def panel_model(key: str, res: Results) -> str:
    """The name of the model whose output panel ``key`` shows ('' when unknown)."""
    ex = panel_ref(key).explainer
    return str(res.models.get(ex.model_role(res), {}).get("name", ""))


def class_panel(key: str) -> bool:
    """Whether panel ``key`` shows a map of the selected class (CAM, Grad-CAM, attention mining, the
    CIA contrast with its class grid, disease masks), not an image or class-free masks."""
    ref = panel_ref(key)
    return ref.spec.kind != "image" and any(m.per_class for m in ref.explainer.maps)


def below_prior_by_role(res: Results, manifests: Mapping[str, Any] | None = None) -> dict[str, frozenset[str]]:
    """role -> classes below the location prior in the card of the model that filled that role.

    ``manifests``: bundle folder name (``res.models[role]["bundle"]``) -> its manifest (a ``Manifest``
    or a dict), e.g. the current model set's; a role without one uses its summary in ``res.models``
    when that carries ``model_card`` or a ``below_prior`` list.
    """
    out: dict[str, frozenset[str]] = {}
    for role, summary in res.models.items():
        found = (manifests or {}).get(str(summary.get("bundle", "")))
        if found is not None:
            classes = below_prior(found)
        elif model_card(summary):
            classes = below_prior(summary)
        else:
            classes = frozenset(str(c) for c in summary.get("below_prior") or ())
        if classes:
            out[role] = classes
    return out


def panel_below_prior(key: str, res: Results, c: int | None, below: BelowPrior | None = None) -> bool:
    """Whether panel ``key`` shows class ``c`` from a model whose card puts that class below the prior
    (see :func:`below_prior_by_role`; the producing model is the explainer's ``model_role``)."""
    name = _class_name(res, c)
    if not name or not class_panel(key):
        return False
    below = below_prior_by_role(res) if below is None else below
    return name in below.get(panel_ref(key).explainer.model_role(res), ())


def prior_boxes(res: Results | None, names: Collection[str]) -> tuple[Box, ...]:
    """The location prior's fixed box of each class in ``names`` (original pixels; empty without a prior)."""
    if res is None or not names:
        return ()
    boxes = res.boxes.get(PRIOR)
    if boxes is None and res.attr(PRIOR, "boxes"):
        boxes = get_explainer(PRIOR).propose_boxes(res)
    return tuple(b for b in boxes or () if b.label in names)


def alignment_note(res: Results | None) -> tuple[str, bool] | None:
    """(text, rejected) of the alignment check of ``res`` for a status line (None: not checked).

    Rejected: ``Alignment rejected (NCC 0.55 < 0.70): maps on the unaligned image``; accepted:
    ``Aligned, NCC 0.91``.
    """
    q = res.attr("alignment", "quality") if res is not None else None
    if not isinstance(q, (int, float)):
        return None
    if res.attr("alignment", "rejected"):  # type: ignore[union-attr]
        lo = res.attr("alignment", "min_quality")  # type: ignore[union-attr]
        bound = f" < {lo:.2f}" if isinstance(lo, (int, float)) else ""
        return f"Alignment rejected (NCC {q:.2f}{bound}): maps on the unaligned image", True
    return f"Aligned, NCC {q:.2f}", False


def split_below_prior(caption: str) -> tuple[str, str]:
    """(the rest, ``· below the location prior``) of a marked caption; (caption, '') otherwise."""
    tail = f" · {BELOW_PRIOR}"
    return (caption[:-len(tail)], tail[1:]) if caption.endswith(tail) else (caption, "")


def wrap_caption(text: str, fits: Callable[[str], bool]) -> list[str]:
    """``text`` as lines ``fits`` accepts: broken before its `` · `` parts first (a continued line
    starts with ``·``), then between words; a word too long for a line is cut with ``…``."""
    parts = text.split(" · ")
    lines: list[str] = []
    for seg in [parts[0], *("· " + p for p in parts[1:])]:
        if lines and fits(f"{lines[-1]} {seg}"):
            lines[-1] = f"{lines[-1]} {seg}"
            continue
        start = len(lines)
        for word in seg.split(" "):
            if len(lines) > start and fits(f"{lines[-1]} {word}"):
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word if fits(word) else _elide(word, fits))
    return lines


def _elide(word: str, fits: Callable[[str], bool]) -> str:
    while len(word) > 1 and not fits(word + "…"):
        word = word[:-1]
    return word + "…"
