"""Which model proposals an annotator sees, and how their scores are labelled (no Qt).

A study's pipeline run proposes boxes for every class from several methods (anatomy, attention
mining, CAM, CIA, Grad-CAM): dozens of boxes whose ``score`` means different things. The
annotator's screen shows a few of them:

* :func:`select_proposals`: per class, the ``top_k`` boxes over the proposal sources (the
  preferred method first, :func:`cxrviewer.core.panels.proposal_sources`; references such as the
  location prior never), scores below what is worth showing dropped (:func:`min_score_for`),
  near-duplicates of a kept box (IoU >= :data:`DUPLICATE_IOU`) skipped;
* :func:`score_text`: the score as what it is, ``"p 0.62"`` for a probability, ``"map 1.94"``
  for a raw map value (the explainer's declared ``box_score``).

Filtering is for display only: the annotation store keeps every proposal.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, TypeVar

from cxrviewer.core.explain.registry import registered_explainers
from cxrviewer.core.panels import PRIOR, proposal_sources, reference_sources

__all__ = ["DUPLICATE_IOU", "MAX_AREA_FRACTION", "MIN_MAP_SCORE", "MIN_PROBABILITY", "box_score_kind", "min_score_for",
           "proposal_source", "score_text", "select_proposals"]

#: probabilities below this are not shown: the model rules the finding out. Low, because the
#: annotator has already chosen the class and asks where, and calibrated probabilities of NIH
#: findings are small (prevalences of 0.2-10 %; anatomy's Mass box on the demo's phantom: p 0.07)
MIN_PROBABILITY = 0.02
#: raw map scores at or below this are not shown (no positive evidence inside the box)
MIN_MAP_SCORE = 0.0
#: a box overlapping an already kept box of its class this much is a duplicate
DUPLICATE_IOU = 0.7
#: a box covering more of the image than this says nothing about where (with ``image_shape``)
MAX_AREA_FRACTION = 0.8


class ScoredBox(Protocol):
    """Anything with a class label, a score and a geometry (a :class:`~.geometry.Box`, a store row)."""

    label: str
    score: float | None
    x: float
    y: float
    w: float
    h: float


B = TypeVar("B", bound=ScoredBox)


def proposal_source(name: str) -> str:
    """The method of a stored proposal's model name ``"<model>:<source>"`` (the name itself when
    it has no source part)."""
    return name.rsplit(":", 1)[-1]


def box_score_kind(source: str) -> str:
    """``"probability"`` or ``"map"``: what the boxes of method ``source`` carry as score (an
    unknown source: ``"map"``, never claimed to be a probability)."""
    name = proposal_source(source)
    cls = next((c for c in registered_explainers() if c.name == name), None)
    return cls.box_score if cls is not None else "map"


def min_score_for(source: str) -> float:
    """The lowest score of ``source`` worth showing (by what its score is)."""
    return MIN_PROBABILITY if box_score_kind(source) == "probability" else MIN_MAP_SCORE


def score_text(source: str, box: ScoredBox) -> str:
    """The box's score as what it is: ``"p 0.62"``, ``"map 1.94"``, or '' without a score."""
    if box.score is None:
        return ""
    kind = "p" if box_score_kind(source) == "probability" else "map"
    return f"{kind} {box.score:.2f}"


def _iou(a: ScoredBox, b: ScoredBox) -> float:
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def _passes(source: str, box: ScoredBox, min_score: float | None) -> bool:
    """A given ``min_score`` is inclusive; the default map floor (0) is not: a map score must be
    positive evidence."""
    if box.score is None:
        return True
    if min_score is not None:
        return box.score >= min_score
    if box_score_kind(source) == "probability":
        return box.score >= MIN_PROBABILITY
    return box.score > MIN_MAP_SCORE


def select_proposals(boxes_by_source: Mapping[str, Sequence[B]], *, classes: Collection[str] | None,
                     top_k: int = 3, min_score: float | None = None,
                     image_shape: tuple[int, int] | None = None) -> list[tuple[str, B]]:
    """Per class of ``classes`` (None: every class) the ``top_k`` proposals worth showing.

    Sources are taken in the app's preference order (:func:`proposal_sources`; unknown ones
    after, by name; references such as the prior never), boxes within a source best score first
    (a box without a score last). Dropped: scores below ``min_score`` (None: the floor for what
    the source's score is, :func:`min_score_for`), near-duplicates of a kept box of the same
    class and, given the image's ``(height, width)``, boxes over :data:`MAX_AREA_FRACTION` of it.
    Keys may be sources or stored model names ``"<model>:<source>"``. Returns
    ``(key, box)`` pairs, class by class in first-seen order.
    """
    refs = reference_sources() | {PRIOR}
    order = {s: i for i, s in enumerate(proposal_sources())}
    keys = sorted((k for k in boxes_by_source if proposal_source(k) not in refs),
                  key=lambda k: (order.get(proposal_source(k), len(order)), proposal_source(k), k))
    wanted = None if classes is None else set(classes)
    max_area = None if image_shape is None else MAX_AREA_FRACTION * image_shape[0] * image_shape[1]
    kept: dict[str, list[tuple[str, B]]] = {}
    for key in keys:
        ranked = sorted(boxes_by_source[key], key=lambda b: (b.score is None, -(b.score or 0.0)))
        for box in ranked:
            if wanted is not None and box.label not in wanted:
                continue
            chosen = kept.setdefault(box.label, [])
            if len(chosen) >= top_k or not _passes(proposal_source(key), box, min_score):
                continue
            if max_area is not None and box.w * box.h > max_area:
                continue
            if any(_iou(box, other) >= DUPLICATE_IOU for _, other in chosen):
                continue
            chosen.append((key, box))
    return [pair for chosen in kept.values() for pair in chosen]
