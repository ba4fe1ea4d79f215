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
    """Demo studies: ``resources/demo/`` if present, plus pydicom-data's RG1_UNCR.dcm."""
    found: list[str] = []
    for root in _resource_roots():
        demo = root / "demo"
        if demo.is_dir() and any(demo.iterdir()):
            found.append(str(demo))
            break
    try:
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm")
        if rg1:
            found.append(str(rg1))
    except Exception as err:  # noqa: BLE001 - optional test data, any failure means "absent"
        log.debug("pydicom-data not usable: %s", err)
    return found


def run_gui(paths: Sequence[str], demo: bool = False, models_dir: str | None = None) -> int:
    """Open the main window on ``paths`` (files/folders); ``demo`` adds the demo studies."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow

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
