"""Rebindable keyboard shortcuts: one registry per window, saved in the settings.

Every QAction with a key goes through a :class:`ShortcutRegistry`, which

* applies the user's keys (``shortcuts/<id>`` in :func:`cxrviewer.gui.settings.app_settings`,
  a JSON list of portable key texts; absent = the defaults),
* handles **modes**: an entry registered with ``mode="annotate"`` is live only
  while :meth:`ShortcutRegistry.set_mode` is ``"annotate"`` and then *shadows*
  (temporarily strips) the same key from every other action of the window --
  so Space resets the view normally and marks a study done in annotation mode,
* lists everything in :class:`ShortcutsDialog` (Help > Keyboard shortcuts…),
  where any key can be changed, cleared or reset; conflicts are refused.

Using it for other actions (e.g. the main window's, the model panels'):

.. code-block:: python

    from cxrviewer.gui.shortcuts import registry_for
    reg = registry_for(window)                       # one registry per window
    reg.register("view.invert", act_invert, ["I"], "Invert grey scale", category="View")
    reg.register("annot.done", act_done, ["Space"], "Mark done", mode="annotate")

Actions of the window that were never registered are adopted by
:meth:`ShortcutRegistry.adopt_actions` (id ``window.<text>``) so they are listed
and rebindable too; registering them explicitly gives better ids and categories.
"""
from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView,
                               QKeySequenceEdit, QLabel, QPushButton, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from . import settings

log = logging.getLogger(__name__)

_PORTABLE = QKeySequence.SequenceFormat.PortableText
_NATIVE = QKeySequence.SequenceFormat.NativeText


def normalise(key: str | QKeySequence | QKeySequence.StandardKey) -> list[str]:
    """Portable texts of a key spec (a standard key may expand to several)."""
    if isinstance(key, QKeySequence.StandardKey):
        return [s.toString(_PORTABLE) for s in QKeySequence.keyBindings(key) if not s.isEmpty()]
    seq = key if isinstance(key, QKeySequence) else QKeySequence(str(key))
    text = seq.toString(_PORTABLE)
    return [text] if text else []


def _norm_all(keys: Iterable[str | QKeySequence | QKeySequence.StandardKey]) -> list[str]:
    out: list[str] = []
    for k in keys:
        for t in normalise(k):
            if t not in out:
                out.append(t)
    return out


@dataclass
class ShortcutEntry:
    """One registered action: id, its default and current keys, where it applies."""

    id: str
    action: QAction
    defaults: list[str]
    description: str
    category: str = "General"
    mode: str | None = None  # None = always; else only while the registry is in this mode
    keys: list[str] = field(default_factory=list)

    def active(self, mode: str | None) -> bool:
        return self.mode is None or self.mode == mode


class ShortcutRegistry(QObject):
    """Registered actions of one window, their keys, modes and persistence."""

    changed = Signal()

    SETTINGS_GROUP = "shortcuts"

    def __init__(self, host: QWidget | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent if parent is not None else host)
        self.host = host
        self._entries: dict[str, ShortcutEntry] = {}
        self._mode: str | None = None
        self._shadowed: dict[int, tuple[QAction, list[str]]] = {}  # foreign action -> its keys
        self._by_action: dict[int, str] = {}  # id(QAction) -> registered id (entries keep it alive)

    # ---- registration -----------------------------------------------------------
    def register(self, sid: str, action: QAction, defaults: Sequence[str | QKeySequence | QKeySequence.StandardKey] = (),
                 description: str = "", *, category: str = "General",
                 mode: str | None = None) -> QAction:
        """Register ``action`` under ``sid`` with default keys; applies saved keys."""
        self._restore_shadowed(action)
        entry = ShortcutEntry(sid, action, _norm_all(defaults),
                              description or action.text().replace("&", "").rstrip("…."),
                              category, mode)
        saved = self._load(sid)
        entry.keys = list(entry.defaults) if saved is None else saved
        self._entries[sid] = entry
        self._by_action[id(action)] = sid  # (not a Qt property: PySide6 6.12 leaks None refs there)
        if self.host is not None and action not in self.host.actions():
            self.host.addAction(action)  # keys work with menus hidden too
        self.apply()
        return action

    def adopt_actions(self, actions: Iterable[QAction] | None = None, *,
                      category: str = "Window") -> list[str]:
        """Register every action with keys that is not registered yet (ids ``window.<text>``)."""
        if actions is None:
            actions = self.host.actions() if self.host is not None else []
        added = []
        for act in list(actions):
            if id(act) in self._by_action:
                continue
            keys = self._shadowed.get(id(act), (act, None))[1]
            keys = keys if keys is not None else [s.toString(_PORTABLE) for s in act.shortcuts()]
            taken = {k for e in self._entries.values() if e.mode is None for k in e.keys}
            clash = [k for k in keys if k in taken]
            if clash:
                log.warning("shortcut %s of %r is taken by a registered action; dropped",
                            "/".join(clash), act.text())
            keys = [k for k in keys if k and k not in taken]
            if not keys:
                continue
            text = act.text().replace("&", "").rstrip("…. ")
            slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "action"
            sid, n = f"window.{slug}", 2
            while sid in self._entries:
                sid, n = f"window.{slug}_{n}", n + 1
            self.register(sid, act, keys, text, category=category)
            added.append(sid)
        return added

    def entry(self, sid: str) -> ShortcutEntry:
        return self._entries[sid]

    def entries(self) -> list[ShortcutEntry]:
        return list(self._entries.values())

    def __contains__(self, sid: object) -> bool:
        return sid in self._entries

    # ---- keys -------------------------------------------------------------------
    def keys(self, sid: str) -> list[str]:
        return list(self._entries[sid].keys)

    def conflicts_for(self, sid: str, keys: Sequence[str]) -> list[str]:
        """Ids of other entries live at the same time as ``sid`` that use one of ``keys``."""
        me = self._entries[sid]
        wanted = set(_norm_all(keys))
        out = []
        for e in self._entries.values():
            if e.id == sid or not wanted.intersection(e.keys):
                continue
            if me.mode is None or e.mode is None or me.mode == e.mode:
                # a mode entry shadows a global one on purpose; same-mode/global pairs clash
                if (me.mode is None) == (e.mode is None):
                    out.append(e.id)
        return out

    def set_keys(self, sid: str, keys: Sequence[str | QKeySequence], *, persist: bool = True) -> None:
        """Bind ``sid`` to ``keys`` (empty = no key); ValueError on a conflict."""
        norm = _norm_all(keys)
        clash = self.conflicts_for(sid, norm)
        if clash:
            names = ", ".join(self._entries[c].description for c in clash)
            raise ValueError(f"{' / '.join(norm)} is already used by {names}")
        e = self._entries[sid]
        e.keys = norm
        if persist:
            st = settings.app_settings()
            if norm == e.defaults:
                st.remove(f"{self.SETTINGS_GROUP}/{sid}")
            else:
                st.setValue(f"{self.SETTINGS_GROUP}/{sid}", json.dumps(norm))
            st.sync()
        self.apply()

    def reset(self, sid: str | None = None) -> None:
        """Back to the defaults (one entry, or all)."""
        for e in ([self._entries[sid]] if sid else list(self._entries.values())):
            e.keys = list(e.defaults)
            settings.app_settings().remove(f"{self.SETTINGS_GROUP}/{e.id}")
        self.apply()

    def _load(self, sid: str) -> list[str] | None:
        raw = settings.app_settings().value(f"{self.SETTINGS_GROUP}/{sid}")
        if raw is None or raw == "":
            return None
        try:
            data = json.loads(str(raw))
            return _norm_all(str(k) for k in data)
        except (ValueError, TypeError):
            log.warning("ignoring unreadable shortcut setting for %s: %r", sid, raw)
            return None

    # ---- modes ------------------------------------------------------------------
    @property
    def mode(self) -> str | None:
        return self._mode

    def set_mode(self, mode: str | None) -> None:
        if mode != self._mode:
            self._mode = mode
            self.apply()

    def active_keys(self) -> dict[str, str]:
        """Key -> id of the entry it triggers now."""
        out: dict[str, str] = {}
        for e in self._entries.values():
            if e.mode is not None and e.mode == self._mode:
                for k in e.keys:
                    out[k] = e.id
        for e in self._entries.values():
            if e.mode is None:
                for k in e.keys:
                    out.setdefault(k, e.id)
        return out

    def apply(self) -> None:
        """Push the keys to the actions for the current mode (and shadow foreign actions)."""
        mode_keys = {k for e in self._entries.values()
                     if e.mode is not None and e.mode == self._mode for k in e.keys}
        for e in self._entries.values():
            if not e.active(self._mode):
                keys: list[str] = []
            elif e.mode is None:
                keys = [k for k in e.keys if k not in mode_keys]
            else:
                keys = list(e.keys)
            e.action.setShortcuts([QKeySequence(k) for k in keys])
        self._shadow_foreign(set(self.active_keys()))
        self.changed.emit()

    def _foreign_actions(self) -> list[QAction]:
        if self.host is None:
            return []
        seen: dict[int, QAction] = {}
        for act in list(self.host.actions()) + self.host.findChildren(QAction):
            if id(act) not in self._by_action:
                seen[id(act)] = act
        return list(seen.values())

    def _shadow_foreign(self, live: set[str]) -> None:
        for act in self._foreign_actions():
            original = self._shadowed.get(id(act), (act, None))[1]
            if original is None:
                original = [s.toString(_PORTABLE) for s in act.shortcuts()]
            keep = [k for k in original if k and k not in live]
            if len(keep) != len([k for k in original if k]):
                self._shadowed[id(act)] = (act, original)
                act.setShortcuts([QKeySequence(k) for k in keep])
            elif id(act) in self._shadowed:
                self._restore_shadowed(act)

    def _restore_shadowed(self, act: QAction) -> None:
        got = self._shadowed.pop(id(act), None)
        if got is not None:
            act.setShortcuts([QKeySequence(k) for k in got[1]])

    # ---- help -------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str, str]]:
        """(category, description, keys in native text, mode note) sorted by category."""
        out = []
        for e in sorted(self._entries.values(), key=lambda e: (e.category, e.description)):
            keys = ", ".join(QKeySequence(k).toString(_NATIVE) for k in e.keys) or "—"
            note = "" if e.mode is None else f"in {e.mode} mode"
            out.append((e.category, e.description, keys, note))
        return out

    def help_html(self) -> str:
        """An HTML table of every shortcut (for a help page or the README)."""
        parts, cat = [], None
        for c, desc, keys, note in self.rows():
            if c != cat:
                if cat is not None:
                    parts.append("</table>")
                parts.append(f"<h3>{html.escape(c)}</h3><table cellpadding='3'>")
                cat = c
            extra = f" <i>({html.escape(note)})</i>" if note else ""
            parts.append(f"<tr><td><b>{html.escape(keys)}</b></td><td>{html.escape(desc)}{extra}</td></tr>")
        if cat is not None:
            parts.append("</table>")
        return "\n".join(parts)


def registry_for(host: QWidget) -> ShortcutRegistry:
    """The window's registry (created on first use)."""
    for reg in host.findChildren(ShortcutRegistry, options=Qt.FindChildOption.FindDirectChildrenOnly):
        if reg.host is host:
            return reg
    return ShortcutRegistry(host)  # parented to the host: found again next time


class ShortcutsDialog(QDialog):
    """Every shortcut, by category; select a row and press keys to rebind it."""

    def __init__(self, registry: ShortcutRegistry, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.registry = registry
        self.setWindowTitle("Keyboard shortcuts — cxrviewer")
        self.setWindowModality(Qt.WindowModality.NonModal)
        self.resize(680, 620)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Mouse: wheel zooms, right drag = window/level, left drag pans or "
                             "(annotation) moves/resizes a box, W/N then left drag draws one."))
        self.table = QTableWidget(0, 4, self)
        self.table.setHorizontalHeaderLabels(["Category", "Action", "Keys", "When"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        lay.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(QLabel("New key:"))
        self.key_edit = QKeySequenceEdit(self)
        row.addWidget(self.key_edit)
        self.assign_btn = QPushButton("Assign")
        self.add_btn = QPushButton("Add")
        self.clear_btn = QPushButton("Clear")
        self.reset_btn = QPushButton("Reset")
        self.reset_all_btn = QPushButton("Reset all")
        for b in (self.assign_btn, self.add_btn, self.clear_btn, self.reset_btn, self.reset_all_btn):
            row.addWidget(b)
        lay.addLayout(row)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        lay.addWidget(self.message)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        lay.addWidget(buttons)
        self.assign_btn.clicked.connect(lambda: self._bind(replace=True))
        self.add_btn.clicked.connect(lambda: self._bind(replace=False))
        self.clear_btn.clicked.connect(self._clear)
        self.reset_btn.clicked.connect(self._reset)
        self.reset_all_btn.clicked.connect(lambda: (registry.reset(), self.refresh()))
        self._ids: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        entries = sorted(self.registry.entries(), key=lambda e: (e.category, e.description))
        self._ids = [e.id for e in entries]
        self.table.setRowCount(len(entries))
        for r, e in enumerate(entries):
            keys = ", ".join(QKeySequence(k).toString(_NATIVE) for k in e.keys) or "—"
            vals = (e.category, e.description, keys, "" if e.mode is None else f"{e.mode} mode")
            for c, v in enumerate(vals):
                self.table.setItem(r, c, QTableWidgetItem(v))
        self.table.resizeColumnToContents(0)
        self.table.resizeColumnToContents(2)

    def current_id(self) -> str | None:
        r = self.table.currentRow()
        return self._ids[r] if 0 <= r < len(self._ids) else None

    def select_id(self, sid: str) -> None:
        if sid in self._ids:
            self.table.selectRow(self._ids.index(sid))

    def bind(self, sid: str, key: str, *, replace: bool = True) -> bool:
        """Bind (or add) ``key`` to ``sid``; False with a message on a conflict."""
        keys = [key] if replace else self.registry.keys(sid) + [key]
        try:
            self.registry.set_keys(sid, keys)
        except ValueError as exc:
            self.message.setText(str(exc))
            return False
        self.message.setText("")
        self.refresh()
        self.select_id(sid)
        return True

    def _bind(self, replace: bool) -> None:
        sid = self.current_id()
        seq = self.key_edit.keySequence()
        if sid is None or seq.isEmpty():
            self.message.setText("Select an action and press the new key first.")
            return
        self.bind(sid, seq.toString(_PORTABLE), replace=replace)

    def _clear(self) -> None:
        sid = self.current_id()
        if sid is not None:
            self.registry.set_keys(sid, [])
            self.refresh()
            self.select_id(sid)

    def _reset(self) -> None:
        sid = self.current_id()
        if sid is not None:
            self.registry.reset(sid)
            self.refresh()
            self.select_id(sid)
