"""GUI entry point: ``run_gui(paths, demo, models_dir)`` used by ``cxrviewer``.

Before Qt starts on Linux, ``display_problem`` checks that there is a display and that the
system libraries of Qt's X11 (xcb) platform plugin are installed, so a stock machine gets a
one-line message with the apt-get command instead of Qt's abort.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..core.logfile import LogFile, install_log_file

log = logging.getLogger(__name__)

#: The system libraries PySide6's xcb platform plugin loads (the NEEDED entries of
#: plugins/platforms/libqxcb.so, libQt6XcbQpa, libQt6Gui, libQt6DBus that PySide6 does not
#: ship), each with the Debian/Ubuntu package that provides it.
XCB_LIBRARIES: dict[str, str] = {
    "libxcb.so.1": "libxcb1",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgthread-2.0.so.0": "libglib2.0-0",
    "libdbus-1.so.3": "libdbus-1-3",
}


def _library_dirs() -> list[Path]:
    """Folders a shared library may be in: LD_LIBRARY_PATH, PySide6's Qt/lib, a frozen bundle,
    the system's (multiarch) library folders."""
    dirs = [Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    spec = importlib.util.find_spec("PySide6")  # finds the package without importing Qt
    for loc in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(Path(loc) / "Qt" / "lib")
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        dirs.append(Path(frozen))
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    for base in ("/lib", "/usr/lib", "/usr/local/lib"):
        dirs += [Path(base) / arch] if arch else []
        dirs.append(Path(base))
    dirs += [Path("/lib64"), Path("/usr/lib64")]
    return dirs


def library_present(soname: str) -> bool:
    """Whether the dynamic loader can find ``soname`` (a file lookup first, then dlopen)."""
    if any((d / soname).exists() for d in _library_dirs()):
        return True
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def _plugin_load_error() -> str | None:
    """The soname that keeps PySide6's libqxcb.so from loading, None when it loads (or is not found)."""
    spec = importlib.util.find_spec("PySide6")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        plugin = Path(root) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
        if plugin.is_file():
            try:
                ctypes.CDLL(str(plugin))
            except OSError as exc:
                m = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", str(exc))
                return m.group(1) if m else None
    return None


def missing_libraries(present: Callable[[str], bool] | None = None) -> list[str]:
    """The sonames of Qt's xcb plugin that are not installed, in ``XCB_LIBRARIES`` order."""
    present = present or library_present
    missing = [name for name in XCB_LIBRARIES if not present(name)]
    if not missing:
        extra = _plugin_load_error()  # a library this table does not know (a newer Qt)
        missing = [extra] if extra else []
    return missing


def _missing_message(missing: Sequence[str]) -> str:
    packages = list(dict.fromkeys(XCB_LIBRARIES[m] for m in missing if m in XCB_LIBRARIES))
    unknown = [m for m in missing if m not in XCB_LIBRARIES]
    text = f"cxrviewer: Qt cannot start its display plugin (xcb): missing {', '.join(missing)}."
    if packages:
        text += " Install them with: sudo apt-get install " + " ".join(packages)
    if unknown:
        text += (" (and the package that provides " if packages else " Install the package that provides ") \
            + ", ".join(unknown) + (")" if packages else "")
    return text


def display_problem(env: Mapping[str, str] | None = None, platform: str | None = None,
                    present: Callable[[str], bool] | None = None) -> str | None:
    """A one-line reason why Qt cannot open a window here, or None (checked on Linux only).

    Checked when Qt would use its xcb plugin: QT_QPA_PLATFORM unset or ``xcb``. No DISPLAY
    (and no WAYLAND_DISPLAY) is a problem; so are missing xcb libraries when Qt will use X11
    (DISPLAY set and no Wayland session, or QT_QPA_PLATFORM=xcb). Under Wayland, Qt uses its
    Wayland plugin, so the X11 libraries are not required.
    """
    env = os.environ if env is None else env
    if not (platform or sys.platform).startswith("linux"):
        return None
    qpa = env.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if qpa and qpa != "xcb":
        return None  # offscreen, wayland, vnc, ...: not the xcb plugin
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        return ("cxrviewer: no display (DISPLAY is not set): start it in a desktop session or with ssh -X; "
                "without a display, 'cxrviewer --self-test' checks the installation "
                "(or run with QT_QPA_PLATFORM=offscreen)")
    if not qpa and env.get("WAYLAND_DISPLAY"):
        return None
    if not env.get("DISPLAY"):
        return "cxrviewer: QT_QPA_PLATFORM=xcb but DISPLAY is not set: unset QT_QPA_PLATFORM under Wayland"
    missing = missing_libraries(present)
    return _missing_message(missing) if missing else None


def _resource_roots() -> list[Path]:
    """Where ``resources/`` may be: the checkout/wheel, then a PyInstaller bundle."""
    roots = [Path(__file__).resolve().parents[2] / "resources",
             Path(__file__).resolve().parents[1] / "resources"]
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        roots.insert(0, Path(frozen) / "resources")
    return roots


def find_demo() -> tuple[list[str], list[str]]:
    """(paths, missing): the demo studies, the phantom NIH folder ``resources/demo/`` and the
    real DICOM chest in ``resources/demo_dicom/`` (shipped: nothing is downloaded), and the
    ``resources/...`` folders that are missing (each is logged)."""
    found: list[str] = []
    missing: list[str] = []
    for name, pattern in (("demo", None), ("demo_dicom", "*.dcm")):
        for root in _resource_roots():
            folder = root / name
            paths = [str(folder)] if pattern is None else sorted(str(p) for p in folder.glob(pattern))
            if folder.is_dir() and any(folder.iterdir()) and paths:
                found += paths
                break
        else:
            log.warning("demo study folder resources/%s is missing", name)
            missing.append(f"resources/{name}/")
    return found, missing


def demo_paths() -> list[str]:
    """The demo studies that are present (see :func:`find_demo`)."""
    return find_demo()[0]


def reserve_gui_core() -> int:
    """Let torch use every core but one, so the GUI thread always has a core (returns threads)."""
    from ..core.device import leave_one_core

    return leave_one_core()


def start_log_file() -> LogFile:
    """The rotating ``cxrviewer.log`` (:mod:`cxrviewer.core.logfile`) with a first line naming the
    version and platform; an unwritable folder is returned as ``error``, never raised."""
    from .. import __version__

    result = install_log_file()
    if result.path is not None:
        log.info("cxrviewer %s started (Python %s, %s)", __version__, sys.version.split()[0], sys.platform)
    return result


def _log_uncaught(previous: Callable) -> Callable:
    """An excepthook that writes an uncaught exception (e.g. in a Qt slot) to the log, then calls
    ``previous`` (a windowed build has no stderr: the log file is where it can be read)."""
    def hook(exc_type, exc, tb) -> None:
        log.critical("uncaught exception", exc_info=(exc_type, exc, tb))
        previous(exc_type, exc, tb)

    return hook


def run_gui(paths: Sequence[str], demo: bool = False, models_dir: str | None = None) -> int:
    """Open the main window on ``paths`` (files/folders); ``demo`` adds the demo studies.

    Starts the log file first (:func:`start_log_file`) and reopens the window as the user left
    it (``MainWindow.restore_session``). Returns 1 with a one-line message on stderr when Qt
    cannot open a window here (:func:`display_problem`).
    """
    problem = display_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QLabel

    from .main_window import MainWindow

    logfile = start_log_file()
    reserve_gui_core()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("cxrviewer")
    app.setOrganizationName("cxrviewer")
    win = MainWindow(popup_errors=True, models_dir=models_dir)
    win.restore_session()
    win.show()
    if logfile.error:  # never fatal: said in the Messages panel
        log.warning("No log file this session: %s", logfile.error)
        win.statusBar().showMessage(f"No log file: {logfile.error}", 15000)
    win.annotations.reopen_last()  # the annotation project of the last session (tests' windows never do)
    to_open = [str(p) for p in paths]
    if demo:
        extra, missing = find_demo()
        to_open += extra
        if missing:  # said in the status bar for as long as the window is open
            note = QLabel(f"Demo study missing: {', '.join(missing)}")
            note.setObjectName("demoMissing")
            note.setToolTip("Missing demo study folder(s): " + ", ".join(missing)
                            + " (part of the installation; reinstall or check out the repository again)")
            win.statusBar().addPermanentWidget(note)
    if to_open:
        QTimer.singleShot(0, lambda: win.open_paths(to_open))
    previous_hook = sys.excepthook
    sys.excepthook = _log_uncaught(previous_hook)
    try:
        return int(app.exec())
    finally:
        sys.excepthook = previous_hook
        log.info("cxrviewer closed")


def capture_window(out: str | Path, paths: Sequence[str] | None = None, *, models_dir: str | None = None,
                   row: int = 0, class_name: str | None = None, size: tuple[int, int] = (1680, 1020),
                   timeout_s: float = 600.0, device: str = "cpu") -> dict:
    """Open the window (offscreen works), analyse study ``row`` and save a screenshot to ``out``.

    For the README screenshot and packaging self-tests: ``paths`` default to the demo
    studies; ``class_name`` selects a class once the analysis is done. Returns what was
    shown (study, class, filled panels, seconds to the last panel, models).
    """
    import time

    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

    reserve_gui_core()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    win = MainWindow(models_dir=models_dir, device=device)
    win.resize(*size)
    win.show()
    done: list[object] = []
    win.inference.finished.connect(lambda sha, res, src: done.append(res))
    end = time.perf_counter() + timeout_s

    def spin(cond) -> None:
        while not cond():
            if time.perf_counter() > end:
                raise TimeoutError("the window did not finish in time")
            app.processEvents()
            time.sleep(0.005)

    t0 = time.perf_counter()
    win.open_paths(list(paths) if paths else demo_paths())
    spin(lambda: len(win.state.worklist) > 0)
    if row != win.state.current_index:
        done.clear()
        win.state.set_current_index(row)
    spin(lambda: bool(done))
    elapsed = time.perf_counter() - t0
    res = done[-1]
    if class_name and class_name in res.classes:
        c = res.classes.index(class_name)
        win.findings.select_class(c)
        win.select_class(c)
        spin(lambda: not win.model_runner.busy)
        app.processEvents()
    win.findings_dock.show()
    win.findings_dock.raise_()  # tabbed with other docks: show the findings
    win.grid.flush()
    for _ in range(20):
        app.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    win.grab().save(str(out))
    info = {"study": win.state.current_ref.display_name if win.state.current_ref else "",
            "class": win.grid.class_name, "filled_panels": win.grid.filled_keys(),
            "seconds_to_last_panel": round(elapsed, 2), "models": res.models}
    win.close()
    return info


if __name__ == "__main__":  # python -m cxrviewer.gui.app OUT.png [--models DIR] [--row N] [--class NAME]
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Screenshot of the demo window (offscreen works)")
    ap.add_argument("out")
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--models", default=None)
    ap.add_argument("--row", type=int, default=0)
    ap.add_argument("--class", dest="class_name", default=None)
    a = ap.parse_args()
    print(json.dumps(capture_window(a.out, a.paths or None, models_dir=a.models, row=a.row,
                                    class_name=a.class_name), indent=1, default=str))
