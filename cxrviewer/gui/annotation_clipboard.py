"""Copy, paste, duplicate and carry boxes between studies.

The copied boxes live in a :class:`~cxrviewer.core.annotations.BoxClipboard` (with the
size of the image they came from, so a paste into another study is scaled); a copy also
puts them on the system clipboard as JSON. Pastes and carries are one undo step each.
"""
from __future__ import annotations

from PySide6.QtGui import QGuiApplication

from ..core.annotations import AnnotationSession, BoxClipboard, Edit
from .annotation_edits import AnnotationEdits
from .annotation_feedback import AnnotationFeedback
from .views.image_panel import ImagePanel


class AnnotationClipboard:
    """Box clipboard of one window (see the module docstring)."""

    def __init__(self, session: AnnotationSession, edits: AnnotationEdits, panel: ImagePanel,
                 feedback: AnnotationFeedback) -> None:
        self.session = session
        self.edits = edits
        self.panel = panel
        self.feedback = feedback
        self.content = BoxClipboard()

    def copy_selected(self) -> int:
        """Copy the selected boxes/proposals; returns how many."""
        boxes = self.edits.selected_boxes()
        if not boxes:
            self.feedback.info("Nothing selected to copy")
            return 0
        shape = self.panel.image_shape
        n = self.content.copy(boxes, (shape[1], shape[0]) if shape else None)
        try:
            QGuiApplication.clipboard().setText(self.content.to_json())
        except Exception:  # noqa: BLE001 - no system clipboard (offscreen)
            pass
        self.feedback.info(f"Copied {n} box(es)", 2000)
        return n

    def paste(self) -> Edit | None:
        return self.edits.run(self.session.paste, self.content, select_created=True)

    def duplicate_selected(self) -> Edit | None:
        """The selected boxes again, shifted by 2 % of the image width (at least 4 px)."""
        shape = self.panel.image_shape or (100, 100)
        off = max(4.0, 0.02 * shape[1])
        return self.edits.run(self.session.duplicate, self.edits.selected_boxes(), (off, off),
                              select_created=True)

    def carry_previous(self) -> Edit | None:
        """Copy the previously shown study's boxes here (scaled), skipping ones already here."""
        return self.edits.run(self.session.carry_previous, select_created=True)
