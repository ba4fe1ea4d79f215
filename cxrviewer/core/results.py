"""What the pipeline computed for one study: maps by explainer name, boxes, timings, provenance.

``maps[explainer][map]`` holds the arrays each explainer declares
(:class:`~cxrviewer.core.explain.registry.MapSpec`): per-class maps ``[C, h, w]`` at
``map_shape`` in ORIGINAL image coordinates, step maps as ``{class name: [T, h, w]}``, and
whatever else the method declares (an aligned image, an affine). ``attrs[explainer]`` holds its
JSON-able attributes (e.g. its own class list, the disease-mask source). Boxes are in original
pixels, keyed by the explainer that proposed them. ``state`` is runtime-only (kept features for
on-demand maps) and never written to a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrviewer.core.geometry import Box

__all__ = ["RESULTS_FORMAT_VERSION", "Results"]

RESULTS_FORMAT_VERSION = 2


@dataclass
class Results:
    """Everything the pipeline computed for one study (see the module docstring)."""

    study_id: str
    source_path: str
    pixel_sha256: str
    image_shape: tuple[int, int]
    map_shape: tuple[int, int]
    classes: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # explainer -> boxes (original px)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> manifest summary
    notices: list[str] = field(default_factory=list)
    format_version: int = RESULTS_FORMAT_VERSION
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def get(self, explainer: str, name: str) -> Any | None:
        """The array ``name`` of ``explainer`` (None when that method did not run or has no such map)."""
        return self.maps.get(explainer, {}).get(name)

    def attr(self, explainer: str, name: str, default: Any = None) -> Any:
        """An attribute of ``explainer``'s output (e.g. ``attr("disease_mask", "source")``)."""
        return self.attrs.get(explainer, {}).get(name, default)

    @property
    def map_scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per map cell."""
        return (self.image_shape[0] / self.map_shape[0], self.image_shape[1] / self.map_shape[1])

    def class_index(self, name: str) -> int:
        return self.classes.index(name)

    def top_classes(self, k: int = 1) -> list[int]:
        """Indices of the ``k`` most probable classes (empty without a classifier)."""
        if self.probabilities is None:
            return []
        return [int(i) for i in np.argsort(-self.probabilities, kind="stable")[:k]]

    def boxes_for(self, label: str, source: str | None = None) -> list[Box]:
        srcs = [source] if source else list(self.boxes)
        return [b for s in srcs for b in self.boxes.get(s, []) if b.label == label]

    def add_class_maps(self, name: str, maps: dict[str, dict[str, np.ndarray]]) -> None:
        """Store on-demand step maps of class ``name`` (``{explainer: {map: [T, h, w]}}``)."""
        for explainer, m in maps.items():
            for key, arr in m.items():
                self.maps.setdefault(explainer, {}).setdefault(key, {})[name] = arr

    def snapshot(self) -> "Results":
        """A copy another thread may keep: containers copied, arrays shared, runtime state dropped."""
        return Results(
            study_id=self.study_id, source_path=self.source_path, pixel_sha256=self.pixel_sha256,
            image_shape=self.image_shape, map_shape=self.map_shape, classes=self.classes,
            probabilities=self.probabilities,
            maps={e: {k: dict(v) if isinstance(v, dict) else v for k, v in m.items()} for e, m in self.maps.items()},
            attrs={e: dict(a) for e, a in self.attrs.items()}, boxes={k: list(v) for k, v in self.boxes.items()},
            timings=dict(self.timings), device=self.device, models=dict(self.models), notices=list(self.notices),
            format_version=self.format_version)
