"""The explanation-method contract and its registry.

A method is one file under ``cxrviewer/core/explain/``: an :class:`Explainer` subclass
registered with :func:`register_explainer` (cf. pytorch-grad-cam's ``BaseCAM`` and timm's
``register_model``). The class declares (scalars as class keywords or class attributes)

* ``name`` / ``title`` / ``short`` (status-bar abbreviation) and ``order`` (pipeline order),
* ``requires``: the pipeline roles (:data:`cxrviewer.core.roles.ROLES`) that must be loaded,
* ``maps``: what it produces (:class:`MapSpec`: frame and value meaning of each array),
* ``panels``: how its maps are shown (:class:`PanelSpec`: panel kind, colour-scale quantity),
* ``box_rule`` / ``box_map``: how its boxes are proposed (a :class:`~.boxes.BoxRule`), or none
  (a method that overrides ``propose_boxes`` sets ``proposes_boxes``, as the ``prior`` does),
* ``box_score``: what its boxes' ``score`` is (:data:`BOX_SCORES`: ``probability`` or ``map``,
  the default: a raw map value, never shown as a probability),

and implements :meth:`Explainer.compute`, which the pipeline calls with an
:class:`~cxrviewer.core.explain.context.ExplainContext` (the shared model passes) and which
returns an :class:`ExplainerOutput`. The pipeline, the HDF5 layout, ``panels.png``, the GUI's
panel list, the status-bar stages and ``cxr-train evaluate`` are all generated from here.

:meth:`Explainer.explain` is the single-model API (a model's forward-output dict and one class
index -> named ``[B, h, w]`` maps), for scripts and training code.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch

from cxrviewer.core.errors import ExplainError
from cxrviewer.core.explain.labels import with_article
from cxrviewer.core.geometry import Box
from cxrviewer.core.roles import ROLE_TITLES

if TYPE_CHECKING:
    from cxrviewer.core.explain.boxes import BoxRule
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

log = logging.getLogger(__name__)

__all__ = ["BOX_SCORES", "ExplainError", "Explainer", "ExplainerOutput", "MapSpec", "PanelSpec", "applicable_explainers",
           "get_explainer", "list_explainers", "register_explainer", "registered_explainers", "registry_version",
           "unregister_explainer"]

#: value meanings of a :class:`MapSpec`
VALUES = ("score", "probability", "mask", "image", "labels", "vector", "affine", "index")
#: frames of a :class:`MapSpec`: ``original`` = at ``Results.map_shape`` in original-image
#: coordinates; ``aligned`` = the aligned image's own frame; ``own`` = the array's own frame
#: (e.g. a bank image or a network grid); ``none`` = not an image (a vector or a matrix)
FRAMES = ("original", "aligned", "own", "none")
#: what a method's ``Box.score`` is: ``probability`` (0..1, e.g. a calibrated class probability
#: or CIA-Net's grid probability) or ``map`` (the raw map values' mean inside the box)
BOX_SCORES = ("probability", "map")


@dataclass(frozen=True)
class MapSpec:
    """One array an explainer produces.

    ``per_class``: ``[C, h, w]`` over the explainer's classes; ``steps``: stored per class name
    as ``{class: [T, h, w]}`` (computed for some classes only).
    """

    name: str
    title: str
    value: str = "score"
    frame: str = "original"
    per_class: bool = True
    steps: bool = False

    def __post_init__(self) -> None:
        if self.value not in VALUES or self.frame not in FRAMES:
            raise ValueError(f"map {self.name!r}: value must be one of {VALUES}, frame one of {FRAMES}")


@dataclass(frozen=True)
class PanelSpec:
    """One panel of the viewer (and tile of ``panels.png``) showing one of the explainer's maps.

    ``kind``: ``heat`` (a raw map through a colour map), ``image`` (a grey image of its own),
    ``masks`` (binary masks painted in fixed colours). ``step`` picks ``[t-1]`` of a ``steps``
    map; ``outline`` names a ``steps`` map whose ``[t-1]`` is outlined (erased regions).
    ``quantity`` is the colour-scale group and the colour bar's label; ``fixed_range`` pins the
    scale (probabilities 0..1). ``order`` places the panel in the grid; ``caption`` is the short
    text above it (class name and probability follow).
    """

    key: str
    title: str
    map: str
    kind: str = "heat"
    quantity: str = ""
    step: int = 0
    outline: str = ""
    fixed_range: tuple[float, float] | None = None
    order: int = 100
    per_class: bool = True
    caption: str = ""  # short form of ``title`` above the panel (default: the title)


@dataclass
class ExplainerOutput:
    """What :meth:`Explainer.compute` returns: arrays by map name, JSON-able attributes, and
    optional runtime state kept in ``Results.state`` (never written to a file)."""

    maps: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    state: Any = None


class Explainer:
    """Base class of every explanation method (see the module docstring)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    short: ClassVar[str] = ""
    order: ClassVar[int] = 100
    #: pipeline roles that must all be loaded for :meth:`compute`
    requires: ClassVar[tuple[str, ...]] = ()
    #: model families :meth:`explain` accepts (single-model API)
    families: ClassVar[tuple[str, ...]] = ()
    #: True when :meth:`explain` needs ``model`` and ``inputs``
    needs_model: ClassVar[bool] = False
    maps: ClassVar[tuple[MapSpec, ...]] = ()
    panels: ClassVar[tuple[PanelSpec, ...]] = ()
    box_rule: ClassVar["BoxRule | None"] = None
    box_map: ClassVar[str] = ""
    #: which method's proposals the viewer shows first (lower first)
    box_priority: ClassVar[int] = 100
    #: True when :meth:`compute_class` can add maps for more classes after a run
    on_demand: ClassVar[bool] = False
    #: True for a reference (the fixed-box ``prior``): its boxes are scored and drawn on request,
    #: never offered as proposals nor chosen as the default box method
    reference: ClassVar[bool] = False
    #: what ``Box.score`` of this method's boxes is (one of :data:`BOX_SCORES`)
    box_score: ClassVar[str] = "map"

    _META: ClassVar[tuple[str, ...]] = ("title", "short", "order", "requires", "families", "needs_model",
                                        "on_demand", "box_map", "box_priority", "reference", "box_score")

    def __init_subclass__(cls, **meta: Any) -> None:
        """Scalar metadata may be given as class keywords: ``class X(Explainer, title=..., order=...)``."""
        unknown = set(meta) - set(Explainer._META)
        if unknown:
            raise TypeError(f"unknown explainer metadata {sorted(unknown)}; known: {', '.join(Explainer._META)}")
        super().__init_subclass__()
        for key, value in meta.items():
            setattr(cls, key, value)
        if cls.box_score not in BOX_SCORES:
            raise TypeError(f"{cls.__name__}.box_score must be one of {BOX_SCORES}, not {cls.box_score!r}")

    # -- the pipeline API ------------------------------------------------------
    @classmethod
    def applies(cls, roles: Collection[str]) -> bool:
        """Whether the pipeline can run this method with bundles of ``roles`` loaded."""
        return all(r in roles for r in cls.requires)

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        """Maps for every class in original coordinates (None: nothing to show for this study)."""
        raise NotImplementedError(f"{type(self).__name__} has no pipeline computation")

    def compute_class(self, results: "Results", class_index: int) -> bool:
        """Make sure the on-demand maps of one more class exist (False: they cannot be computed
        from these results, e.g. read from a file without the kept features)."""
        return False

    def classes(self, results: "Results") -> tuple[str, ...]:
        """The class names of this method's per-class maps in ``results``."""
        own = results.attrs.get(self.name, {}).get("classes")
        return tuple(own) if own else tuple(results.classes)

    @property
    def proposes_boxes(self) -> bool:
        """Whether the pipeline asks :meth:`propose_boxes` (default: when there is a box rule)."""
        return self.box_rule is not None

    def propose_boxes(self, results: "Results") -> list[Box] | None:
        """Boxes (original pixels) from ``box_map`` by ``box_rule``, every class. A method that
        overrides this may return None: it proposes nothing for this study (no ``boxes`` entry)."""
        return self._rule_boxes(results, None)

    def class_boxes(self, results: "Results", names: Collection[str] | None = None) -> list[Box] | None:
        """:meth:`propose_boxes` of the classes ``names`` only (None: every class). The box rule
        runs on those classes' maps alone; a method with its own ``propose_boxes`` is filtered by label."""
        if type(self).propose_boxes is not Explainer.propose_boxes:
            boxes = self.propose_boxes(results)
            return boxes if boxes is None or names is None else [b for b in boxes if b.label in names]
        return self._rule_boxes(results, names)

    def _rule_boxes(self, results: "Results", names: Collection[str] | None) -> list[Box]:
        """``box_rule`` on ``box_map`` at box resolution (:func:`~.boxes.box_resolution`: float32,
        64-128 px), boxes scaled to ``results.image_shape``."""
        if self.box_rule is None:
            return []
        maps = results.get(self.name, self.box_map)
        if maps is None:
            return []
        classes = self.classes(results)
        idx = [i for i, n in enumerate(classes) if names is None or n in names]
        if not idx:
            return []
        from cxrviewer.core.explain.boxes import box_resolution

        picked = maps if len(idx) == len(classes) else np.asarray(maps)[idx]
        small = box_resolution(picked, nearest=self.box_rule.kind == "grid")
        return [b for i, m in zip(idx, small)
                for b in self.box_rule(m, label=classes[i], image_size=results.image_shape)]

    def caption(self, results: "Results", panel: PanelSpec, class_index: int | None) -> str:
        """Extra caption text for ``panel`` (e.g. the disease-mask source); '' by default."""
        return ""

    # -- what the method cannot show, and why (the viewer's placeholders, analyze's summary) ----
    def missing(self, roles: Collection[str]) -> str:
        """Why the method cannot run with bundles of ``roles`` loaded ('' when it can), e.g.
        ``needs a CIA model (not loaded)``."""
        if self.applies(roles):
            return ""
        lacking = [with_article(f"{ROLE_TITLES.get(r, r)} model") for r in self.requires if r not in roles]
        return f"needs {' and '.join(lacking) or 'other models'} (not loaded)"

    def empty_reason(self, results: "Results") -> str:
        """Why the method ran on ``results`` but has nothing to show (its notice says more)."""
        return "nothing to show for this study: see Messages"

    def class_reason(self, results: "Results", name: str) -> str:
        """Why the method's output in ``results`` holds no map (or box) of class ``name``; '' when
        it has one. Short and without the class name (callers add it), e.g. ``NIH classes only``."""
        return "" if name in self.classes(results) else "no map from this model"

    def model_role(self, results: "Results") -> str:
        """The role whose model name is shown under this method's panels."""
        return self.requires[0] if self.requires else ""

    # -- the single-model API -------------------------------------------------
    def applies_to(self, model: torch.nn.Module | None = None, family: str | None = None) -> bool:
        """Whether :meth:`explain` can explain ``model`` (or a model of ``family``)."""
        fam = family if family is not None else getattr(model, "family", None)
        return fam in self.families

    def explain(self, output: Mapping[str, torch.Tensor], class_index: int, *,
                model: torch.nn.Module | None = None, inputs: Any = None,
                **context: Any) -> dict[str, np.ndarray]:
        """Named ``[B, h, w]`` maps of one class from one model's forward output."""
        raise ExplainError(f"explanation method '{self.name}' has no single-model form")

    def __call__(self, output: Mapping[str, torch.Tensor], class_index: int, **kw: Any) -> dict[str, np.ndarray]:
        return self.explain(output, class_index, **kw)

    def _require(self, output: Mapping[str, Any], key: str) -> Any:
        if key not in output:
            raise ExplainError(f"explanation method '{self.name}' needs the model output '{key}', "
                               f"but the model returned only {sorted(output)}")
        return output[key]


_REGISTRY: dict[str, type[Explainer]] = {}
_VERSION = [0]
E = TypeVar("E", bound=type[Explainer])


def register_explainer(name: str) -> Callable[[E], E]:
    """Class decorator: register an :class:`Explainer` subclass under ``name``."""

    def deco(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"explainer '{name}' is already registered")
        keys = {p.key for c in _REGISTRY.values() if c is not cls for p in c.panels}
        clash = keys & {p.key for p in cls.panels}
        if clash:
            raise ValueError(f"explainer '{name}': panel key(s) {sorted(clash)} already used")
        cls.name = name
        _REGISTRY[name] = cls
        _VERSION[0] += 1
        return cls

    return deco


def unregister_explainer(name: str) -> None:
    """Remove ``name`` from the registry (tests that register a toy method clean up with it)."""
    if _REGISTRY.pop(name, None) is not None:
        _VERSION[0] += 1


def registry_version() -> int:
    """A number that changes whenever a method is registered or removed (for callers' caches)."""
    return _VERSION[0]


def registered_explainers() -> list[type[Explainer]]:
    """Every registered explainer class in pipeline order."""
    return _ordered()


def _ordered() -> list[type[Explainer]]:
    return sorted(_REGISTRY.values(), key=lambda c: (c.order, c.name))


def list_explainers(family: str | None = None) -> list[str]:
    """Registered method names in pipeline order, optionally only those whose single-model form
    accepts ``family``."""
    return [c.name for c in _ordered() if family is None or family in c.families]


def get_explainer(name: str) -> Explainer:
    """A fresh instance of the explainer registered as ``name`` (unknown -> :class:`ExplainError`)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ExplainError(f"unknown explanation method '{name}'; known: {', '.join(list_explainers())}") from None


def applicable_explainers(roles: Collection[str]) -> list[Explainer]:
    """Instances of every registered method the loaded ``roles`` allow, in pipeline order."""
    return [c() for c in _ordered() if c.applies(roles)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach, move to CPU and convert to float32 numpy."""
    return t.detach().to("cpu", torch.float32).numpy()
