"""Model picker: which folder of bundles (a model set) the pipeline uses.

Folders: ``resources/models`` (bundled) plus the user's folders (Models > Add
model folder…, kept in settings). The bundles of the chosen folder are listed
with their role and a plain badge: **untrained** (random weights),
**research demo** (manifest provenance ``research_demo``) or **research use only**
(provenance ``research_use_only``, e.g. JSRT-trained weights), so nobody mistakes a
demo network for a clinical one. A bundle's model card (its evaluation) opens from the
"Model card…" button, the context menu or a double click. "Import model…" (button and context
menu) opens :class:`~cxrviewer.gui.import_model_dialog.ImportModelDialog`; a finished import is
announced by ``bundleImported(path)``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QPoint, QSignalBlocker, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QHeaderView, QLabel, QMenu, QPushButton, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from ...core.catalog import BundleInfo, scan_bundles
from ...core.errors import CxrError
from .model_card import ModelCardDialog, bundle_card_curves, bundle_card_lines

log = logging.getLogger(__name__)

BADGE_COLOURS = {"untrained": "#e0453a", "research demo": "#e8a33a", "research use only": "#c9a227"}


def badge_html(bundles: Sequence[BundleInfo]) -> str:
    """A one-line summary: 'N models · X untrained · Y research demo'."""
    ok = [b for b in bundles if not b.error]
    if not ok:
        return "<b>no models</b>"
    parts = [f"{len(ok)} model{'s' if len(ok) != 1 else ''}"]
    for badge, colour in BADGE_COLOURS.items():
        n = sum(b.badge == badge for b in ok)
        if n:
            parts.append(f"<span style='color:{colour}'><b>{n} {badge}</b></span>")
    return " · ".join(parts)


class ModelPicker(QWidget):
    """Folder combo + bundle list; emits ``modelSetChanged(folder, bundles)`` and, after an
    import, ``bundleImported(path)``."""

    modelSetChanged = Signal(str, object)
    bundleImported = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox(self)
        self.combo.setToolTip("Folder of *.cxrbundle model bundles used for the explanations")
        # a long folder name never widens the dock (and the window): the combo elides instead
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(10)
        self.tree = QTreeWidget(self)
        self.tree.setHeaderLabels(["Bundle", "Role", "Status"])
        self.tree.setRootIsDecorated(False)
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.tree.header().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.header().setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.tree.customContextMenuRequested.connect(self._context_menu)
        self.tree.itemDoubleClicked.connect(lambda item, _col: self.show_card(self.tree.indexOfTopLevelItem(item)))
        self.tree.currentItemChanged.connect(lambda *_: self.card_button.setEnabled(self._row() >= 0))
        self.summary = QLabel(self)
        self.summary.setWordWrap(True)  # badges wrap in a narrow dock instead of setting its width
        self.card_button = QPushButton("Model card…", self)
        self.card_button.setToolTip("The selected bundle's evaluation (AUROC, localisation against the prior)")
        self.card_button.setEnabled(False)
        self.card_button.clicked.connect(lambda: self.show_card(self._row()))
        self.import_button = QPushButton("Import model…", self)
        self.import_button.setToolTip("Turn a torchxrayvision, CheXNet-style, torchvision or timm checkpoint "
                                      "into a model bundle of your own")
        self.import_button.clicked.connect(self.open_import_dialog)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.combo)
        lay.addWidget(self.summary)
        lay.addWidget(self.tree)
        buttons = QHBoxLayout()
        buttons.addWidget(self.import_button)
        buttons.addStretch(1)
        buttons.addWidget(self.card_button)
        lay.addLayout(buttons)
        self.bundles: list[BundleInfo] = []
        self.card_dialog: ModelCardDialog | None = None
        self.import_dialog: Any = None  # ImportModelDialog, imported when first opened
        self.combo.currentIndexChanged.connect(self._on_combo)

    @property
    def folder(self) -> str:
        return str(self.combo.currentData() or "")

    def set_folders(self, folders: Sequence[str | Path], current: str | None = None) -> None:
        """Offer these folders; select ``current`` (else the first) and scan it."""
        with QSignalBlocker(self.combo):
            self.combo.clear()
            seen = set()
            for f in folders:
                f = str(f)
                if f in seen:
                    continue
                seen.add(f)
                n = len(scan_bundles(f)) if Path(f).is_dir() else 0
                self.combo.addItem(f"{Path(f).name or f} ({n})", f)
                self.combo.setItemData(self.combo.count() - 1, f, 3)  # tooltip role
            idx = self.combo.findData(str(current)) if current else 0
            self.combo.setCurrentIndex(max(0, idx))
        self._on_combo()

    def _on_combo(self, *_args) -> None:
        folder = self.folder
        self.bundles = scan_bundles(folder) if folder and Path(folder).is_dir() else []
        self.tree.clear()
        for b in self.bundles:
            status = b.error and "unreadable" or b.badge or "trained"
            role = b.role or ("dm" if b.architecture == "dm" else b.family)
            item = QTreeWidgetItem([b.name, role, status])
            tip = f"{b.path}\n{b.architecture} ({b.family})\n{b.description}"
            if b.classes:
                tip += (f"\n{len(b.classes)} classes" + (f" ({b.label_set})" if b.label_set else "")
                        + ": " + ", ".join(b.classes[:20]) + (", …" if len(b.classes) > 20 else ""))
            if b.metrics:
                tip += "\n" + ", ".join(f"{k}={v}" for k, v in b.metrics.items())
            if b.error:
                tip += f"\n{b.error}"
            item.setToolTip(0, tip)
            if b.error or b.badge:
                item.setForeground(2, QBrush(QColor(BADGE_COLOURS.get(b.badge, "#e0453a"))))
            self.tree.addTopLevelItem(item)
        self.summary.setText(badge_html(self.bundles))
        self.modelSetChanged.emit(folder, list(self.bundles))

    # ---- model cards ---------------------------------------------------------------
    def _row(self) -> int:
        item = self.tree.currentItem()
        return self.tree.indexOfTopLevelItem(item) if item is not None else -1

    def _context_menu(self, pos: QPoint) -> None:
        item = self.tree.itemAt(pos)
        menu = QMenu(self.tree)
        if item is not None:
            row = self.tree.indexOfTopLevelItem(item)
            menu.addAction("Model card…", lambda: self.show_card(row))
        menu.addAction("Import model…", self.open_import_dialog)
        menu.exec(self.tree.viewport().mapToGlobal(pos))

    # ---- importing -------------------------------------------------------------------
    def open_import_dialog(self) -> Any:
        """Show the "Import model" dialog (one at a time; an open one is raised)."""
        from ..import_model_dialog import ImportModelDialog

        dlg = self.import_dialog
        if dlg is None or not dlg.isVisible():
            if dlg is not None:
                dlg.deleteLater()
            dlg = self.import_dialog = ImportModelDialog(self.window())
            dlg.bundleImported.connect(self.bundleImported)
        dlg.show()
        dlg.raise_()
        dlg.activateWindow()
        return dlg

    def select_bundle(self, path: str | Path) -> bool:
        """Make the bundle at ``path`` the current row (False when it is not listed)."""
        for row, b in enumerate(self.bundles):
            if Path(b.path) == Path(path):
                self.tree.setCurrentItem(self.tree.topLevelItem(row))
                return True
        return False

    def show_card(self, row: int) -> ModelCardDialog | None:
        """Open (or refresh) the card window of bundle ``row`` of the list; None for no such row."""
        if not 0 <= row < len(self.bundles):
            return None
        b = self.bundles[row]
        lines = bundle_card_lines(b.path)
        if self.card_dialog is not None:
            self.card_dialog.close()
        self.card_dialog = ModelCardDialog(b.name, lines, self, curves=bundle_card_curves(b.path))
        self.card_dialog.show()
        self.card_dialog.raise_()
        return self.card_dialog

    def manifests(self) -> dict[str, Any]:
        """The manifests of the listed bundles by folder name (what results name as ``bundle``)."""
        from ...core.bundle import read_manifest

        out: dict[str, Any] = {}
        for b in self.bundles:
            if b.error:
                continue
            try:
                out[b.path.name] = read_manifest(b.path)
            except CxrError as exc:
                log.warning("cannot read %s: %s", b.path, exc)
        return out
