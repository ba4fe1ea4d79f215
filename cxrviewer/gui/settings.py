"""Persistent GUI settings (QSettings in an INI file).

The file lives in ``$CXRVIEWER_CONFIG_DIR`` when set (tests point it at a
temporary folder, see tests/conftest.py), else in Qt's per-user config folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings


def app_settings() -> QSettings:
    """The cxrviewer settings store (a new handle each call; cheap)."""
    cfg = os.environ.get("CXRVIEWER_CONFIG_DIR")
    if cfg:
        Path(cfg).mkdir(parents=True, exist_ok=True)
        return QSettings(str(Path(cfg) / "cxrviewer.ini"), QSettings.Format.IniFormat)
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "cxrviewer", "cxrviewer")


def last_dir() -> str:
    """Folder of the last File > Open (home when unknown)."""
    value = app_settings().value("paths/last_dir", "")
    return str(value) if value and Path(str(value)).is_dir() else str(Path.home())


def set_last_dir(path: str | os.PathLike[str]) -> None:
    p = Path(path)
    app_settings().setValue("paths/last_dir", str(p if p.is_dir() else p.parent))


def model_dirs() -> list[str]:
    """Model folders the user added (Models > Add model folder…)."""
    value = app_settings().value("models/user_dirs", [])
    if isinstance(value, str):
        value = [value] if value else []
    return [str(v) for v in (value or [])]


def set_model_dirs(dirs: list[str]) -> None:
    app_settings().setValue("models/user_dirs", list(dirs))


def active_model_dir() -> str:
    return str(app_settings().value("models/active", "") or "")


def set_active_model_dir(path: str) -> None:
    app_settings().setValue("models/active", str(path))


def show_prior() -> bool:
    """View > Show location prior (off until the user turns it on)."""
    value = app_settings().value("view/show_prior", False)
    return value is True or str(value).lower() in ("true", "1")


def set_show_prior(on: bool) -> None:
    app_settings().setValue("view/show_prior", bool(on))
