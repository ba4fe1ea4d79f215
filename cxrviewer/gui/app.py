"""GUI entry point: ``run_gui(paths, demo, models_dir)`` used by ``cxrviewer``."""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _resource_roots() -> list[Path]:
    """Where ``resources/`` may be: the checkout/wheel, then a PyInstaller bundle."""
    roots = [Path(__file__).resolve().parents[2] / "resources",
             Path(__file__).resolve().parents[1] / "resources"]
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        roots.insert(0, Path(frozen) / "resources")
    return roots


def demo_paths() -> list[str]:
    """Demo studies: the phantom NIH folder ``resources/demo/`` and the real DICOM chest in
    ``resources/demo_dicom/`` (shipped: nothing is downloaded; a missing one is logged)."""
    found: list[str] = []
    for name, pattern in (("demo", None), ("demo_dicom", "*.dcm")):
        for root in _resource_roots():
            folder = root / name
            if folder.is_dir() and any(folder.iterdir()):
                found += [str(folder)] if pattern is None else sorted(str(p) for p in folder.glob(pattern))
                break
        else:
            log.warning("demo study folder resources/%s is missing", name)
    return found


def reserve_gui_core() -> int:
    """Let torch use every core but one, so the GUI thread always has a core (returns threads)."""
    from ..core.device import leave_one_core

    return leave_one_core()


def run_gui(paths: Sequence[str], demo: bool = False, models_dir: str | None = None) -> int:
    """Open the main window on ``paths`` (files/folders); ``demo`` adds the demo studies."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

    reserve_gui_core()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("cxrviewer")
    app.setOrganizationName("cxrviewer")
    win = MainWindow(popup_errors=True, models_dir=models_dir)
    win.show()
    to_open = [str(p) for p in paths]
    if demo:
        extra = demo_paths()
        to_open += extra
        if not extra:
            win.statusBar().showMessage("No demo studies found (resources/demo/ is absent and "
                                        "pydicom-data is not installed)")
    if to_open:
        QTimer.singleShot(0, lambda: win.open_paths(to_open))
    return int(app.exec())


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
