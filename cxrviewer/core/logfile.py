"""The rotating log file: ``cxrviewer.log`` in the user's log folder (Qt-free).

A windowed (frozen) build has no console, so the desktop app and ``cxrviewer --self-test``
also write the ``cxrviewer`` loggers' records to a file the user can find (Help > Open log
folder): 1 MiB per file, the five previous files kept (``cxrviewer.log.1`` ... ``.5``).

The folder (:func:`user_log_dir`) is ``$CXRVIEWER_LOG_DIR`` when set, else
``$CXRVIEWER_CONFIG_DIR/logs`` (the isolated folder tests and the self-test use), else the
platform's per-user log folder (the ``platformdirs`` convention): ``%LOCALAPPDATA%\\cxrviewer\\Logs``
on Windows, ``~/Library/Logs/cxrviewer`` on macOS, ``$XDG_STATE_HOME/cxrviewer/log``
(``~/.local/state/cxrviewer/log``) elsewhere. A folder that cannot be written never stops
the caller: :func:`install_log_file` returns the reason instead of raising.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOG_DIR_ENV = "CXRVIEWER_LOG_DIR"
LOG_NAME = "cxrviewer.log"
MAX_BYTES = 1024 * 1024
BACKUP_COUNT = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
#: the logger the file handler is attached to (every cxrviewer module logs below it)
LOGGER_NAME = "cxrviewer"


@dataclass(frozen=True)
class LogFile:
    """What :func:`install_log_file` did: the file (None when it could not be opened) and why not."""

    folder: Path
    path: Path | None
    error: str = ""


def user_log_dir(env: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The folder of ``cxrviewer.log`` (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if env.get(LOG_DIR_ENV):
        return Path(env[LOG_DIR_ENV])
    if env.get("CXRVIEWER_CONFIG_DIR"):
        return Path(env["CXRVIEWER_CONFIG_DIR"]) / "logs"
    plat = platform or sys.platform
    home = Path(env.get("HOME") or env.get("USERPROFILE") or Path.home())
    if plat.startswith("win"):
        base = Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else home / "AppData" / "Local"
        return base / "cxrviewer" / "Logs"
    if plat == "darwin":
        return home / "Library" / "Logs" / "cxrviewer"
    state = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else home / ".local" / "state"
    return state / "cxrviewer" / "log"


class _CxrFileHandler(logging.handlers.RotatingFileHandler):
    """Our handler's own class, so a second install replaces it (one log file per process)."""


def installed_log_file() -> Path | None:
    """The file the ``cxrviewer`` logger writes to now, None before :func:`install_log_file`."""
    for h in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(h, _CxrFileHandler):
            return Path(h.baseFilename)
    return None


def current_log_dir() -> Path:
    """The folder of the installed log file, else where it would go (:func:`user_log_dir`)."""
    path = installed_log_file()
    return path.parent if path is not None else user_log_dir()


def remove_log_file() -> None:
    """Detach and close the installed file handler (tests; nothing else needs to)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in [h for h in logger.handlers if isinstance(h, _CxrFileHandler)]:
        logger.removeHandler(h)
        h.close()


def install_log_file(folder: str | os.PathLike[str] | None = None, *, max_bytes: int = MAX_BYTES,
                     backups: int = BACKUP_COUNT) -> LogFile:
    """Attach a rotating ``cxrviewer.log`` in ``folder`` (default :func:`user_log_dir`) to the
    ``cxrviewer`` logger, replacing one installed before; never raises for an unwritable
    folder (the returned ``error`` says why, ``path`` is None)."""
    target = Path(folder) if folder is not None else user_log_dir()
    path = target / LOG_NAME
    if installed_log_file() == path:
        return LogFile(target, path)
    try:
        target.mkdir(parents=True, exist_ok=True)
        handler = _CxrFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    except OSError as exc:
        return LogFile(target, None, f"cannot write the log file in {target}: {exc.strerror or exc}")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    remove_log_file()
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    return LogFile(target, path)
