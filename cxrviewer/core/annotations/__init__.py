"""Annotations: a crash-safe SQLite store, an undoable edit log, exports and imports.

Qt-free; the GUI box editor drives an :class:`AnnotationSession` (an
:class:`AnnotationStore`, its :class:`UndoStack` and the shown study);
``cxr-train`` reads a store through :func:`iter_training_records`.
"""
from __future__ import annotations

from .export import (
    EXPORTERS, IMPORT_HINT, IMPORTERS, NIH_BBOX_HEADER, UnmappedClassesError, atomic_write, coco_class_names,
    resolve_classes, export_coco, export_store, export_nih_csv, export_voc, export_yolo,
    import_coco, import_nih_csv, read_nih_csv, safe_stem,
)
from ..errors import AnnotationConflictError
from .migrations import MIGRATIONS, SCHEMA_VERSION
from .model import (
    BOX_SOURCES, LABEL_CODES, LABEL_STATES, PROPOSAL_STATUSES, REVIEW_STATUSES, AnnotatedBox,
    Edit, EditConflictError, InvalidBoxError, Op, Proposal, StudyIdentity, StudyRecord,
    TrainingRecord, clamp_box,
)
from .session import (
    AnnotationSession, BoxClipboard, EditRefused, StudySnapshot, created_box_ids, is_committed,
    proposals_from_results,
)
from .store import (
    SUFFIX, AnnotationStore, BatchResult, HistoryEntry, UndoStack, UnmappedProposalError,
    extend_label_set, iter_training_records,
)

__all__ = [
    "AnnotatedBox", "AnnotationConflictError", "AnnotationSession", "AnnotationStore", "BOX_SOURCES", "BatchResult",
    "BoxClipboard", "Edit", "EditConflictError", "EditRefused", "StudySnapshot", "created_box_ids",
    "is_committed", "proposals_from_results",
    "HistoryEntry", "InvalidBoxError", "LABEL_CODES", "LABEL_STATES", "MIGRATIONS", "Op",
    "PROPOSAL_STATUSES", "Proposal", "REVIEW_STATUSES", "SCHEMA_VERSION", "SUFFIX",
    "StudyIdentity", "StudyRecord", "TrainingRecord", "UndoStack", "clamp_box",
    "iter_training_records", "EXPORTERS", "IMPORTERS", "export_store", "NIH_BBOX_HEADER", "atomic_write", "export_coco", "export_nih_csv",
    "export_voc", "export_yolo", "import_coco", "import_nih_csv", "read_nih_csv",
    "safe_stem", "IMPORT_HINT", "UnmappedClassesError", "UnmappedProposalError", "coco_class_names",
    "extend_label_set", "resolve_classes",
]
