"""The location prior: one fixed box per class, the median training box (a reference, not a prediction).

The numbers are fractions of the image, ``[x, y, w, h]`` in [0, 1] (x and w of the width, y and h
of the height), so one prior serves every image size. They come, first found wins, from the
pipeline option :data:`OPTION` (``Pipeline.options["location_prior"]``: ``cxr-train evaluate``
puts the prior of the evaluated fold's TRAINING boxes there, with a ``title`` naming it), from the
classifier (or CIA) bundle's own training boxes when its manifest carries
``provenance["location_prior"]``, else from the shipped ``resources/priors/nih_median_boxes.json`` (the official NIH boxes, written by
``benchmarks/make_location_prior.py``). Both have the layout of :func:`location_prior`:
``{"boxes": {class: [x, y, w, h]}, "count": {class: n}, ...provenance}``.

The explainer computes no map: :meth:`PriorExplainer.compute` records the fractions of the
results' classes as attributes, and :meth:`PriorExplainer.propose_boxes` scales them to the
image (score None). It has no box rule, so it is never the viewer's proposal source
(:func:`cxrviewer.core.panels.proposal_sources`); the GUI may draw it as a grey reference box.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrviewer.core.explain.labels import NIH_ONLY, nih_lookup, nih_name
from cxrviewer.core.explain.metrics import floor_boxes
from cxrviewer.core.explain.registry import Explainer, ExplainerOutput, register_explainer
from cxrviewer.core.geometry import Box

if TYPE_CHECKING:
    from cxrviewer.core.bundle import LoadedBundle
    from cxrviewer.core.explain.context import ExplainContext
    from cxrviewer.core.results import Results

__all__ = ["OPTION", "PROVENANCE_KEY", "PriorExplainer", "SHIPPED_TITLE", "bundle_prior", "default_prior_path",
           "load_prior", "location_prior"]

#: the manifest provenance key a bundle's own prior is stored under
PROVENANCE_KEY = "location_prior"
#: the pipeline option that overrides the bundle's and the shipped prior: a :func:`location_prior`
#: mapping, optionally with ``title`` (its name in tables) and ``source`` (recorded in the attributes)
OPTION = "location_prior"
#: the bundles whose classes are the results' classes (see ``Pipeline.classes``), asked in this order
_ROLES = ("classifier", "cia")
#: the title of the shipped prior in evaluation tables: it was computed from ALL NIH boxes
SHIPPED_TITLE = "prior (shipped, all NIH boxes: optimistic on NIH)"


def default_prior_path() -> Path:
    """``resources/priors/nih_median_boxes.json`` of the checkout or the frozen app (may not exist)."""
    from cxrviewer.core.bundle import default_models_dir

    return default_models_dir().parent / "priors" / "nih_median_boxes.json"


def location_prior(boxes: Iterable[Box]) -> dict[str, Any]:
    """The prior of fractional ``boxes`` (each already divided by its image's width/height):
    ``{"boxes": {class: [x, y, w, h]}, "count": {class: n}}``, the coordinate-wise median per class."""
    boxes = list(boxes)
    medians = floor_boxes(boxes)
    count: dict[str, int] = {}
    for b in boxes:
        count[b.label] = count.get(b.label, 0) + 1
    return {"boxes": {c: [round(v, 6) for v in (m.x, m.y, m.w, m.h)] for c, m in sorted(medians.items())},
            "count": dict(sorted(count.items()))}


@lru_cache(maxsize=4)
def _read(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_prior(path: str | Path | None = None) -> dict[str, Any]:
    """The prior file at ``path`` (default :func:`default_prior_path`); ``{}`` when it is absent."""
    p = Path(path) if path is not None else default_prior_path()
    return dict(_read(str(p))) if p.is_file() else {}


def bundle_prior(bundles: Mapping[str, "LoadedBundle"]) -> tuple[str, Mapping[str, Any]] | None:
    """``(bundle name, prior)`` of the first classifier/CIA bundle that carries its own prior."""
    for role in _ROLES:
        b = bundles.get(role)
        prior = b.manifest.provenance.get(PROVENANCE_KEY) if b is not None else None
        if isinstance(prior, Mapping) and prior.get("boxes"):
            return (b.manifest.name or b.path.name, prior)
    return None


def _fractions(prior: Mapping[str, Any], classes: Iterable[str]) -> dict[str, list[float]]:
    """The prior's ``[x, y, w, h]`` of each of ``classes`` it has (by name, else by the NIH class
    the name stands for: ``Infiltrate`` gets Infiltration's box), clipped to the image."""
    out = {}
    for c in classes:
        v = nih_lookup(prior.get("boxes", {}), c)
        if v is not None and len(v) == 4:
            x, y = min(max(float(v[0]), 0.0), 1.0), min(max(float(v[1]), 0.0), 1.0)
            out[c] = [x, y, min(max(float(v[2]), 0.0), 1.0 - x), min(max(float(v[3]), 0.0), 1.0 - y)]
    return out


@register_explainer("prior")
class PriorExplainer(Explainer, title="prior (fixed median box)", short="prior", order=200, box_priority=1000,
                      reference=True):
    """The fixed median box per class (see the module docstring); needs no network."""

    requires = ()
    proposes_boxes = True  # boxes from the prior's fractions, not from a map and a box rule

    def compute(self, ctx: "ExplainContext") -> ExplainerOutput | None:
        given = ctx.option(OPTION, None)
        own = bundle_prior(ctx.bundles)
        if isinstance(given, Mapping):  # even without boxes: no training boxes, no prior box
            attrs: dict[str, Any] = {"source": str(given.get("source", "option")),
                                     "title": str(given.get("title", "prior (given to the pipeline)"))}
            prior = given
        elif own is not None:
            attrs = {"source": "bundle", "bundle": own[0], "title": self.title}
            prior = own[1]
        else:
            path = default_prior_path()
            attrs = {"source": "shipped", "file": f"resources/priors/{path.name}", "title": SHIPPED_TITLE}
            prior = load_prior(path)
        boxes = _fractions(prior, ctx.results.classes)
        if not boxes:
            return None
        attrs.update(classes=list(boxes), boxes=boxes, frame="fractions of the image (x, y, w, h)")
        return ExplainerOutput({}, attrs)

    def empty_reason(self, results: "Results") -> str:
        return f"no prior box for any of this model's classes ({NIH_ONLY} in the shipped prior)"

    def class_reason(self, results: "Results", name: str) -> str:
        if name in (results.attr(self.name, "boxes") or {}):
            return ""
        shipped = results.attr(self.name, "source") == "shipped"
        if shipped:
            return NIH_ONLY if nih_name(name) is None else "no NIH training boxes"
        return "no training boxes in the prior"

    def propose_boxes(self, results: "Results") -> list[Box]:
        """One box per class of the results that has a prior, in original pixels (score None)."""
        fractions = results.attr(self.name, "boxes") or {}
        h, w = results.image_shape
        return [Box(c, x * w, y * h, bw * w, bh * h, None)
                for c in results.classes if c in fractions for x, y, bw, bh in [fractions[c]]]
