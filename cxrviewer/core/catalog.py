"""Model catalogue: what the model picker shows of the bundles in a folder (manifests only).

Reading a manifest loads no weights, so the viewer can list, badge and key model sets
without torch touching the GUI thread.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import find_bundles, read_manifest
from .errors import CxrError

log = logging.getLogger(__name__)

__all__ = ["BundleInfo", "model_classes", "model_set_key", "scan_bundles"]


@dataclass
class BundleInfo:
    """What the model picker shows of one bundle (read from its manifest only)."""

    path: Path
    name: str
    family: str
    architecture: str
    role: str | None
    research_demo: bool
    trained: bool
    weights_sha256: str | None
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    research_use_only: bool = False
    classes: tuple[str, ...] = ()  # the model's classes, in its output order
    label_set: str = ""  # the display name of the label set they come from ('' : none declared)

    @property
    def badge(self) -> str:
        """'untrained', 'research demo', 'research use only' or '' (what the GUI says plainly)."""
        if not self.trained:
            return "untrained"
        if self.research_demo:
            return "research demo"
        if self.research_use_only:
            return "research use only"
        return ""

    @property
    def manifest(self) -> "BundleInfo":
        """Itself: a BundleInfo carries the manifest fields :func:`~cxrviewer.core.roles.assign_roles` reads."""
        return self


def scan_bundles(folder: str | os.PathLike) -> list[BundleInfo]:
    """Manifests of the ``*.cxrbundle`` folders in ``folder`` (unreadable ones flagged)."""
    out: list[BundleInfo] = []
    try:
        paths = find_bundles(folder)
    except (CxrError, OSError) as exc:
        log.warning("cannot scan %s for models: %s", folder, exc)
        return out
    for p in paths:
        try:
            m = read_manifest(p)
        except CxrError as exc:
            out.append(BundleInfo(Path(p), Path(p).name, "?", "?", None, True, False, None, error=str(exc)))
            continue
        prov = m.provenance
        labels = m.labels
        out.append(BundleInfo(Path(p), m.name or Path(p).stem, m.family, m.architecture, m.role,
                              m.research_demo, bool(prov.get("trained", True)), m.weights_sha256,
                              m.description, dict(prov.get("metrics") or {}),
                              research_use_only=bool(prov.get("research_use_only", False)),
                              classes=tuple(m.classes), label_set=labels.display_name if labels else ""))
    return out


def model_classes(bundles: Sequence[BundleInfo]) -> tuple[str, ...]:
    """The classes results of this model set will have: the classifier's, else the CIA model's
    (the pipeline's rule, ``Pipeline.classes``); () without either."""
    from .roles import assign_roles

    roles = assign_roles([b for b in bundles if not b.error])
    return next((tuple(roles[r].classes) for r in ("classifier", "cia") if r in roles), ())


def model_set_key(bundles: Sequence[BundleInfo]) -> str:
    """A short stable key for a set of bundles (names + weight checksums)."""
    items = sorted((b.name, b.architecture, b.weights_sha256 or str(b.path)) for b in bundles if not b.error)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
