"""The annotation dock: project, review status, class, boxes, image-level labels, training.

Pure widgets: it shows what :class:`~cxrviewer.gui.annotation_controller.AnnotationController`
gives it and reports the user's choices by signal; it never touches the store.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFormLayout, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QProgressBar, QPushButton, QSizePolicy, QTableWidget,
                               QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget)

from ...core.classes import CLASSES
from ...core.labelsets import NIH14
from ...core.proposals import score_text
from ..views.box_editor import EditorItem, ItemKey

#: Shown in the label combos; index 0 = not set.
LABEL_CHOICES: tuple[str, ...] = ("—", "present", "absent", "uncertain")
NIH_TITLE = NIH14.display_name
STATUS_TEXT = {"unseen": "unseen", "in_progress": "in progress", "done": "done", "verified": "verified"}


def provenance_text(item: EditorItem) -> str:
    """"manual, ann", "model m:anatomy p 0.83", "proposal m:cam map 1.20" for the box list (the
    score as what it is, :func:`~cxrviewer.core.proposals.score_text`)."""
    score = "" if item.score is None else f" {score_text(item.model_name or '', item)}"
    if item.kind == "proposal":
        return f"proposal {item.model_name or ''}{score}".strip()
    if item.source == "model":
        who = f", by {item.annotator}" if item.annotator else ""
        return f"model {item.model_name or ''}{score}{who}"
    return f"manual, {item.annotator}" if item.annotator else "manual"


class AnnotationDock(QWidget):
    """Store path/notice, review status, current class, box list, image labels, fine-tune.

    The class combo and the image-label table list the open project's labels
    (:meth:`set_labels`; the NIH 14 until a project says otherwise).
    """

    statusChosen = Signal(str)
    classChosen = Signal(str)
    selectionChosen = Signal(list)  # [ItemKey]
    labelChosen = Signal(str, object)  # class, state or None
    finetuneRequested = Signal()
    cancelRequested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)

        self.path_label = QLabel("No annotation project open")
        self.path_label.setWordWrap(True)
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.notice_label = QLabel("")
        self.notice_label.setWordWrap(True)
        self.notice_label.setStyleSheet("color: #c0392b; font-weight: bold;")
        self.notice_label.hide()
        lay.addWidget(self.path_label)
        lay.addWidget(self.notice_label)

        form = QFormLayout()
        self.status_combo = QComboBox()
        for s in STATUS_TEXT:
            self.status_combo.addItem(STATUS_TEXT[s], s)
        self.class_combo = QComboBox()
        self.labels: tuple[str, ...] = ()
        self.label_set_label = QLabel("")
        self.mode_label = QLabel("view mode")
        self.save_label = QLabel("")
        self.save_label.setToolTip("Whether every edit is on disk (fsynced): the store's sync "
                                   "thread reports it; nothing waits for it")
        # texts that change while drawing must never widen the dock (the image would jump)
        for lab in (self.path_label, self.notice_label, self.mode_label, self.save_label,
                    self.label_set_label):
            lab.setWordWrap(True)
            lab.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        form.addRow("Review", self.status_combo)
        form.addRow("Labels", self.label_set_label)
        form.addRow("Class", self.class_combo)
        form.addRow("Mode", self.mode_label)
        form.addRow("Disk", self.save_label)
        lay.addLayout(form)

        self.box_list = QTreeWidget()
        self.box_list.setHeaderLabels(["Class", "Provenance", "x, y, w × h"])
        self.box_list.setRootIsDecorated(False)
        self.box_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.box_list.header().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        boxes = QGroupBox("Boxes (dashed = model proposals)")
        bl = QVBoxLayout(boxes)
        bl.addWidget(self.box_list)
        lay.addWidget(boxes, 3)

        self.labels_table = QTableWidget(0, 2)
        self.labels_table.setHorizontalHeaderLabels(["Class", "Image label"])
        self.labels_table.verticalHeader().setVisible(False)
        self.labels_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.label_combos: dict[str, QComboBox] = {}
        self.set_labels(CLASSES, NIH_TITLE)
        labels = QGroupBox("Image-level labels")
        ll = QVBoxLayout(labels)
        ll.addWidget(self.labels_table)
        lay.addWidget(labels, 4)

        lay.addWidget(self._train_group())

        self.status_combo.activated.connect(
            lambda i: self.statusChosen.emit(str(self.status_combo.itemData(i))))
        self.class_combo.activated.connect(lambda i: self.classChosen.emit(self.labels[i]))
        self.box_list.itemSelectionChanged.connect(self._on_list_selection)
        self.finetune_btn.clicked.connect(self.finetuneRequested)
        self.cancel_btn.clicked.connect(self.cancelRequested)
        self._keys: list[ItemKey] = []
        self.save_state = "none"
        self.set_enabled(False)

    def _train_group(self) -> QGroupBox:
        """"Fine-tune on my annotations": start, progress, cancel."""
        train = QGroupBox("Fine-tune on my annotations")
        tl = QHBoxLayout(train)
        self.finetune_btn = QPushButton("Start…")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        tl.addWidget(self.finetune_btn)
        tl.addWidget(self.progress, 1)
        tl.addWidget(self.cancel_btn)
        return train

    # ---- controller -> dock ----------------------------------------------------------
    def set_store_info(self, path: str | None, notice: str | None = None) -> None:
        self.path_label.setText(f"Project: {path}" if path else "No annotation project open "
                                "(File > Open/New annotation project)")
        self.path_label.setToolTip(path or "")
        self.notice_label.setText(notice or "")
        self.notice_label.setVisible(bool(notice))

    def set_enabled(self, on: bool) -> None:
        for w in (self.status_combo, self.box_list, self.labels_table):
            w.setEnabled(on)

    #: :meth:`set_save_state` texts and colours
    SAVE_STATES = {"none": ("", ""), "saved": ("all edits saved", "#2e7d32"),
                   "saving": ("saving…", "#9a7d0a"), "failed": ("NOT SAVED: ", "#c0392b"),
                   "read_only": ("read-only: nothing is written", "")}

    def set_save_state(self, state: str, detail: str = "") -> None:
        """Show whether the edits are on disk: ``none``/``saved``/``saving``/``failed``/``read_only``."""
        text, color = self.SAVE_STATES[state]
        self.save_label.setText(text + (detail if state == "failed" else ""))
        self.save_label.setStyleSheet(f"color: {color};" if color else "")
        self.save_state = state

    def set_mode_text(self, text: str) -> None:
        self.mode_label.setText(text)

    def set_labels(self, labels: Sequence[str], title: str = "") -> None:
        """The project's labels: the class combo and one image-label row each (rebuilt only
        when they changed); ``title`` names the label set."""
        self.label_set_label.setText(title)
        labels = tuple(labels)
        if labels == self.labels:
            return
        current = self.class_combo.currentText()
        self.labels = labels
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(list(labels))
        if current in labels:
            self.class_combo.setCurrentIndex(labels.index(current))
        self.class_combo.blockSignals(False)
        self.labels_table.clearContents()
        self.labels_table.setRowCount(len(labels))
        self.label_combos = {}
        for r, name in enumerate(labels):
            self.labels_table.setCellWidget(r, 0, QLabel(name))
            combo = QComboBox()
            combo.addItems(list(LABEL_CHOICES))
            combo.currentIndexChanged.connect(lambda i, n=name: self._on_label(n, i))
            self.labels_table.setCellWidget(r, 1, combo)
            self.label_combos[name] = combo

    def set_class(self, label: str) -> None:
        if label in self.labels:
            self.class_combo.setCurrentIndex(self.labels.index(label))

    def show_study(self, items: Sequence[EditorItem], labels: Mapping[str, str],
                   status: str | None) -> None:
        """Fill the box list, the image-label combos and the review status.

        The same rows as shown (an edit moved or relabelled a box) are updated in place;
        the list is rebuilt only when rows come or go.
        """
        rows = [(it.key, it.kind, (it.label, provenance_text(it),
                                   f"{it.x:.0f}, {it.y:.0f}, {it.w:.0f} × {it.h:.0f}")) for it in items]
        self.box_list.blockSignals(True)
        if [k for k, _, _ in rows] == self._keys:
            changed = False
            for i, (_, _, texts) in enumerate(rows):
                row = self.box_list.topLevelItem(i)
                for c, text in enumerate(texts):
                    if row.text(c) != text:
                        row.setText(c, text)
                        changed = True
        else:
            self._fill_rows(rows)
            changed = True
        if changed:
            for c in range(3):
                self.box_list.resizeColumnToContents(c)
        self.box_list.blockSignals(False)
        for name, combo in self.label_combos.items():
            combo.blockSignals(True)
            state = labels.get(name)
            combo.setCurrentIndex(LABEL_CHOICES.index(state) if state in LABEL_CHOICES else 0)
            combo.blockSignals(False)
        self.status_combo.blockSignals(True)
        if status in STATUS_TEXT:
            self.status_combo.setCurrentIndex(list(STATUS_TEXT).index(status))
        self.status_combo.blockSignals(False)

    def _fill_rows(self, rows: Sequence[tuple[ItemKey, str, tuple[str, str, str]]]) -> None:
        self.box_list.clear()
        self._keys = []
        italic = QFont()
        italic.setItalic(True)
        for key, kind, texts in rows:
            row = QTreeWidgetItem(list(texts))
            if kind == "proposal":
                for c in range(3):
                    row.setFont(c, italic)
                    row.setForeground(c, QBrush(QColor("#8888aa")))
            self.box_list.addTopLevelItem(row)
            self._keys.append(key)

    def set_selection(self, keys: Sequence[ItemKey]) -> None:
        self.box_list.blockSignals(True)
        wanted = set(keys)
        for i, k in enumerate(self._keys):
            self.box_list.topLevelItem(i).setSelected(k in wanted)
        self.box_list.blockSignals(False)

    def set_progress(self, fraction: float | None, text: str = "", *, running: bool = True) -> None:
        """Training progress (``None`` = unknown/busy); ``running`` enables Cancel."""
        if fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.progress.setFormat(text or "%p%")
        self.cancel_btn.setEnabled(running)
        self.finetune_btn.setEnabled(not running)

    # ---- dock -> controller ------------------------------------------------------------
    def _on_list_selection(self) -> None:
        rows = sorted(self.box_list.indexOfTopLevelItem(it) for it in self.box_list.selectedItems())
        self.selectionChosen.emit([self._keys[r] for r in rows if 0 <= r < len(self._keys)])

    def _on_label(self, name: str, index: int) -> None:
        self.labelChosen.emit(name, None if index <= 0 else LABEL_CHOICES[index])
