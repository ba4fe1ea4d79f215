"""Typed errors with user-readable messages.

Every error cxrviewer raises on purpose derives from :class:`CxrError`, so a
caller (GUI, CLI, training) can catch one class and show ``str(err)`` to a
person. Messages name the file and say what is wrong and, where possible, what
to do about it.
"""
from __future__ import annotations


def _printable(text: str) -> str:
    """``text`` with control and bidi characters escaped (``\\x1b``, ``\\u202e``): a file name in a
    message can never reorder or hide the text around it."""
    return "".join(c if c.isprintable() or c == " " else
                   (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in str(text))


class CxrError(Exception):
    """Base class of every error cxrviewer raises deliberately."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path  # raw: callers open it
        super().__init__(f"{_printable(path)}: {message}" if path else message)


# ---- study loading -------------------------------------------------------
class StudyLoadError(CxrError):
    """A study file could not be read."""


class UnsupportedFormatError(StudyLoadError):
    """The file is not a format cxrviewer reads (or not what its name says)."""


class CorruptFileError(StudyLoadError):
    """The file is truncated, malformed or internally inconsistent."""


class MissingDecoderError(StudyLoadError):
    """Compressed pixel data needs a decoder plugin that is not installed."""


class DecodeTimeoutError(StudyLoadError):
    """The pixel decoder did not finish in time (or crashed) in its child process."""


class ImageTooLargeError(StudyLoadError):
    """Declared image size exceeds the safety limit (checked before allocation)."""


class InvalidPixelTransformError(StudyLoadError):
    """Rescale slope/intercept or VOI window in the header is unusable."""


# ---- models, bundles, devices --------------------------------------------
class BundleError(CxrError):
    """A model bundle is missing, truncated, unsafe or disagrees with its manifest."""


class ModelError(CxrError):
    """A network could not be built or run (unknown architecture, bad arguments)."""


class ImportModelError(ModelError):
    """A checkpoint cannot be turned into a bundle (unreadable, wrong layout, unknown classes)."""


class ExplainError(CxrError):
    """An explanation method cannot run on this model/output (unknown method, missing output)."""


# ---- annotations -----------------------------------------------------------
class AnnotationStoreError(CxrError):
    """An annotation store cannot be opened or written."""


class AnnotationConflictError(AnnotationStoreError):
    """Another editor changed (or deleted) the row since this one read it; nothing was written."""


class ExportError(CxrError):
    """An export or import failed; nothing was written over the target."""


# ---- label sets -----------------------------------------------------------
class LabelSetError(CxrError):
    """A label-set file or name that cannot be used (unknown, malformed, too large)."""


class UnmappedLabelsError(CxrError):
    """Names that are not in the target label set and have no mapping.

    ``unmapped``: the names, in first-seen order; ``label_set``: the target set's name.
    """

    def __init__(self, message: str, unmapped: tuple[str, ...] | list[str], label_set: str,
                 path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.unmapped = tuple(unmapped)
        self.label_set = label_set
