"""Pipeline roles: which loaded bundle does what (the one roles table).

``alignment``     affine alignment to the canonical chest (cia-net Eq. 1, disease-masks Eq. 6)
``segmentation``  left lung / right lung / heart U-Net (lung-heart Sec. 3.2)
``classifier``    any classifier-family bundle: probabilities, CAM, Grad-CAM, attention mining
``dm``            a disease-mask classifier (disease-masks Eq. 4-5) whose psi is shown
``cia``           CIA-Net with its normal bank (cia-net Eq. 3, Sec. 4.4 pairing)

:func:`assign_roles` works on anything with a manifest (loaded bundles in the pipeline, bare
manifests in the viewer's model picker), so the viewer and the pipeline always agree.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("alignment", "segmentation", "classifier", "dm", "cia")
#: how a role is named in the viewer's messages
ROLE_TITLES: dict[str, str] = {"alignment": "alignment", "segmentation": "lung/heart segmentation",
                               "classifier": "classifier", "dm": "DM", "cia": "CIA"}
#: architectures whose models carry disease masks psi (``model.disease_masks``)
DM_ARCHITECTURES: tuple[str, ...] = ("dm",)

T = TypeVar("T")


def _manifest(item: Any) -> Any:
    return getattr(item, "manifest", item)


def is_dm(item: Any) -> bool:
    """Whether a bundle (or manifest) is a disease-mask classifier."""
    model = getattr(item, "model", None)
    if model is not None:
        return hasattr(model, "disease_masks")
    m = _manifest(item)
    return m.role == "dm" or m.architecture in DM_ARCHITECTURES


def assign_roles(items: Sequence[T], key: Any = None) -> dict[str, T]:
    """Give each bundle (or manifest) a pipeline role: the manifest's ``role`` hint, else by family.

    A DM classifier becomes ``dm`` when another classifier is present, else the ``classifier``.
    The first item (sorted by ``key``, default the bundle path) wins a role; later ones are
    skipped with a warning.
    """
    key = key or (lambda b: str(getattr(b, "path", "")))
    roles: dict[str, T] = {}
    classifiers = [b for b in items if _manifest(b).family == "classifier"]
    for b in sorted(items, key=key):
        m = _manifest(b)
        role = m.role
        if role not in ROLES:
            if m.family == "classifier":
                role = "dm" if is_dm(b) and len(classifiers) > 1 else "classifier"
            else:
                role = m.family
        if role == "dm" and "classifier" not in roles and not any(
                _manifest(c).role != "dm" and not is_dm(c) for c in classifiers):
            role = "classifier"
        if role in roles:
            log.warning("two bundles for role %s: using %s, skipping %s", role, key(roles[role]), key(b))
            continue
        roles[role] = b
    return roles
