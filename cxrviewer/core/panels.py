"""What each panel shows, generated from the explainer registry (pure numpy, no Qt).

The viewer's panel grid and ``panels.png`` (:mod:`cxrviewer.core.render`) both ask
:func:`panel_list` which panels exist and :func:`panel_data` what one of them shows for a
class, so a newly registered explainer appears in both without touching either.
"""
from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from cxrviewer.core import explain as _explain  # noqa: F401  (registers the explanation methods)
from cxrviewer.core.explain.registry import Explainer, PanelSpec, registered_explainers, registry_version
from cxrviewer.core.results import Results
from cxrviewer.core.roles import ROLE_TITLES

__all__ = ["PanelData", "PanelRef", "default_box_method", "needs_class_maps", "panel_data", "panel_list",
           "panel_model", "panel_ref", "proposal_sources"]


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
                    if c.box_rule is not None)
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
    """Explainers with a box rule, in the order the viewer prefers their proposals (the prior has
    none: a reference box, never a proposal)."""
    return list(_index(registry_version())[2])


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


def panel_data(key: str, res: Results | None, c: int | None) -> PanelData:
    """What panel ``key`` shows for class index ``c`` of ``res``."""
    ref = panel_ref(key)
    s = ref.spec
    if res is None:
        return PanelData(s.title)
    ex = ref.explainer
    arr = res.get(ex.name, s.map)
    if s.per_class and (c is None or not res.classes):
        return PanelData(s.title + ("" if res.classes else " (no classifier)"))
    if arr is None:
        missing = ex.name not in res.maps
        return PanelData(s.title + (f" (no {ROLE_TITLES.get(ex.model_role(res), ex.model_role(res))} model)"
                                    if missing else ""))
    caption = _caption(ref, res, c, ex.caption(res, s, c))
    if s.step:
        return _step_data(ref, res, c, caption)  # type: ignore[arg-type]
    if s.per_class:
        idx = ex.classes(res).index(_class_name(res, c)) if _class_name(res, c) in ex.classes(res) else None
        if idx is None or idx >= arr.shape[0]:
            return PanelData(caption)
        arr, key_ = arr[idx], (id(arr), idx)
    else:
        key_ = (id(arr),)
    if s.kind == "image":
        hi = 255.0 if arr.dtype == np.uint8 else 1.0
        frame = next((m.frame for m in ex.maps if m.name == s.map), "own")
        return PanelData(caption, True, image=arr, image_levels=(0.0, hi), image_key=key_, frame=frame)
    if s.kind == "masks":
        return PanelData(caption, True, masks=arr, overlay_key=key_)
    return PanelData(caption, True, heat=arr, heat_key=key_)


def panel_model(key: str, res: Results) -> str:
    """The name of the model whose output panel ``key`` shows ('' when unknown)."""
    ex = panel_ref(key).explainer
    return str(res.models.get(ex.model_role(res), {}).get("name", ""))
