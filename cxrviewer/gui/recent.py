"""File > Recent studies and File > Recent annotation projects (kept in the settings).

Each list holds the last :data:`MAX_RECENT` entries, the most recent first. A study entry is
what one open asked for (one file, one folder, or several files opened together); a project
entry is one ``.cxrann`` file. An entry whose files are gone is shown disabled ("not found");
choosing one that vanished after the menu opened drops it with a note. "Clear recent" empties
the list.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu, QWidget

from . import settings

MAX_RECENT = 10
STUDIES = "recent/studies"
PROJECTS = "recent/projects"


def recent_entries(key: str) -> list[list[str]]:
    """The entries of list ``key`` (:data:`STUDIES` or :data:`PROJECTS`), most recent first;
    each entry is a list of paths. A malformed setting reads as an empty list."""
    raw = settings.app_settings().value(key, "")
    try:
        value = json.loads(str(raw)) if raw else []
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    out = []
    for entry in value:
        paths = [entry] if isinstance(entry, str) else entry
        if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
            out.append(paths)
    return out[:MAX_RECENT]


def _store(key: str, entries: Sequence[Sequence[str]]) -> None:
    settings.app_settings().setValue(key, json.dumps([list(e) for e in entries[:MAX_RECENT]]))


def add_recent(key: str, paths: Sequence[str | os.PathLike[str]]) -> list[list[str]]:
    """Put ``paths`` (absolute) first in list ``key``, dropping an older copy; returns the list."""
    entry = [str(Path(p).absolute()) for p in paths]
    if not entry:
        return recent_entries(key)
    entries = [entry] + [e for e in recent_entries(key) if e != entry]
    _store(key, entries)
    return entries[:MAX_RECENT]


def remove_recent(key: str, entry: Sequence[str]) -> None:
    """Drop ``entry`` from list ``key``."""
    _store(key, [e for e in recent_entries(key) if e != list(entry)])


def clear_recent(key: str) -> None:
    """Empty list ``key``."""
    _store(key, [])


def entry_exists(entry: Sequence[str]) -> bool:
    """Whether every path of the entry is still there."""
    return all(Path(p).exists() for p in entry)


def _short(folder: Path) -> str:
    """``folder`` with the home folder written ``~``."""
    try:
        return str(Path("~") / folder.relative_to(Path.home()))
    except ValueError:
        return str(folder)


def entry_label(entry: Sequence[str]) -> str:
    """Menu text: the file or folder name, "+ N more" for several files, and its folder."""
    first = Path(entry[0])
    more = f" + {len(entry) - 1} more" if len(entry) > 1 else ""
    return f"{first.name}{more}  ({_short(first.parent)})"


class RecentMenu(QMenu):
    """A File > Recent submenu, rebuilt from the settings each time it opens.

    ``on_open(entry)`` is called with the chosen entry's paths; ``on_note(text)`` with a note
    when a chosen entry was gone (it is dropped from the list).
    """

    def __init__(self, title: str, key: str, on_open: Callable[[list[str]], object],
                 on_note: Callable[[str], object], parent: QWidget | None = None) -> None:
        super().__init__(title, parent)
        self.key = key
        self._on_open = on_open
        self._on_note = on_note
        self.setToolTipsVisible(True)
        self.aboutToShow.connect(self.rebuild)
        self.rebuild()

    def rebuild(self) -> None:
        """One action per entry (numbered 1-9, 0; disabled when its files are gone), then Clear recent."""
        self.clear()
        entries = recent_entries(self.key)
        for i, entry in enumerate(entries):
            exists = entry_exists(entry)
            number = f"&{(i + 1) % 10} " if i < 10 else ""
            act = QAction(number + entry_label(entry).replace("&", "&&") + ("" if exists else "  — not found"), self)
            act.setToolTip("\n".join(entry) if exists else "Not found: " + "\n".join(entry))
            act.setData(entry)
            act.setEnabled(exists)
            act.triggered.connect(lambda _=False, e=entry: self.choose(e))
            self.addAction(act)
        if not entries:
            empty = self.addAction("(none yet)")
            empty.setEnabled(False)
        self.addSeparator()
        self.clear_action = self.addAction("Clear recent", self.clear_list)
        self.clear_action.setEnabled(bool(entries))

    def entries(self) -> list[list[str]]:
        """The entries shown (tests)."""
        return [a.data() for a in self.actions() if isinstance(a.data(), list)]

    def choose(self, entry: list[str]) -> bool:
        """Open ``entry``, or drop it with a note when its files are gone; True when opened."""
        if not entry_exists(entry):
            remove_recent(self.key, entry)
            self._on_note(f"Removed from the recent list (not found): {', '.join(entry)}")
            self.rebuild()
            return False
        self._on_open(list(entry))
        return True

    def clear_list(self) -> None:
        """Clear recent."""
        clear_recent(self.key)
        self.rebuild()
