"""Benchmark: the worst GUI stall while drawing/moving/resizing boxes in the box editor.

    python benchmarks/box_editor_stall.py [--gestures 30] [--boxes 40] [--out FILE.json]

A scripted sequence of real mouse gestures (draw, move, resize; press, 24 moves,
release, one event every 8 ms like a 125 Hz mouse) runs on the event loop
against a 2,048 x 2,500 study with ``--boxes`` boxes and 3 proposals, with the
annotation store on disk (``synchronous=FULL``: every release commits one edit
with an fsync). A 1 ms ``QTimer`` probe records the gaps between its ticks: the
largest gap is the longest time the GUI could not respond (event handling +
repaint + the commit on release). Also timed: the handler of each mouse event
(moves vs releases) and 1,000 boxes saved through the controller (the GUI path:
transaction + fsync + redraw), 20 per study over 50 studies.

Offscreen Qt by default (``QT_QPA_PLATFORM`` overrides); writes JSON to
``benchmarks/results/box_editor_stall.json`` and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("CXRVIEWER_CONFIG_DIR", tempfile.mkdtemp(prefix="cxr-bench-cfg-"))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gestures", type=int, default=30)
    ap.add_argument("--boxes", type=int, default=40, help="boxes already on the study")
    ap.add_argument("--save-boxes", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="folder for the store (default: a temp folder)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "box_editor_stall.json"))
    args = ap.parse_args(argv)

    import numpy as np
    import pyqtgraph as pg

    import cxrviewer.gui  # noqa: F401 - applies the PySide6 6.12 refcount workaround first
    from PySide6.QtCore import QElapsedTimer, QEvent, QEventLoop, QPointF, Qt, QTimer
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtWidgets import QApplication, QMainWindow

    from cxrviewer.core.geometry import Box
    from cxrviewer.core.study import Study, StudyMeta
    from cxrviewer.gui.annotation_controller import AnnotationController
    from cxrviewer.gui.state import ViewerState
    from cxrviewer.gui.views.image_panel import ImagePanel

    pg.setConfigOption("mouseRateLimit", 0)
    app = QApplication.instance() or QApplication([])

    def study(shape, seed):
        rng = np.random.default_rng(seed)
        stored = rng.integers(0, 4096, size=shape, dtype=np.uint16)
        mod = stored.astype(np.float32)
        return Study(stored=stored, modality=mod, model_input=mod / 4095.0, window=(2048.0, 4096.0),
                     invert_display=False, meta=StudyMeta(source_path=f"/bench/{seed}.png", format="png",
                                                          photometric="MONOCHROME2", bits_stored=12))

    class Host(QMainWindow):
        def __init__(self) -> None:
            super().__init__()
            self.state = ViewerState(self)
            self.panel = ImagePanel(self)
            self.panel.bind(self.state)
            self.setCentralWidget(self.panel)
            self.statusBar().showMessage("ready")  # (created lazily it would resize the panel)
            self.resize(1280, 900)

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    host = Host()
    host.show()
    app.processEvents()
    ctrl = AnnotationController.attach(host, annotator="bench")
    ctrl.open_store(folder / "stall.cxrann")
    H, W = 2500, 2048
    host.state.set_study(study((H, W), 0))
    ctrl.set_annotation_mode(True)
    rng = np.random.default_rng(1)
    with ctrl.store.batch("seed") as _b:
        for _ in range(args.boxes):
            x, y = rng.uniform(0, W - 300), rng.uniform(0, H - 300)
            ctrl.store.add_box(ctrl.record.id, "Mass", x, y, rng.uniform(40, 250), rng.uniform(40, 250))
    ctrl.add_model_proposals([Box("Nodule", 100 + 300 * i, 2100, 120, 120, 0.5) for i in range(3)], "bench")
    ctrl.refresh()
    app.processEvents()

    panel = host.panel
    vp = panel.viewport()

    def vpos(x, y):
        return QPointF(panel.mapFromScene(panel.view.mapViewToScene(QPointF(x, y))))

    # the script: (kind, image p0, image p1)
    script = []
    for g in range(args.gestures):
        kind = ("draw", "move", "resize")[g % 3]
        cx, cy = 300 + (g * 97) % 1300, 300 + (g * 131) % 1700
        script.append((kind, cx, cy))

    events: list[tuple] = []  # (type, pos, tag)
    for kind, cx, cy in script:
        events.append(("prep", kind, cx, cy))
    ticks: list[float] = []
    move_ms: list[float] = []
    release_ms: list[float] = []
    clock = QElapsedTimer()
    clock.start()
    probe = QTimer()
    probe.setTimerType(Qt.TimerType.PreciseTimer)
    probe.setInterval(1)
    probe.timeout.connect(lambda: ticks.append(clock.nsecsElapsed() / 1e6))

    queue: list[tuple] = []

    def plan(kind, cx, cy):
        """Mouse events of one gesture (in image coordinates, mapped when sent)."""
        if kind == "draw":
            ctrl.toggle_draw()
            p0, p1 = (cx, cy), (cx + 180, cy + 140)
        else:
            boxes = ctrl.store.boxes(ctrl.record.id)
            b = boxes[-1]
            ctrl.editor.select([("box", b.id)])
            if kind == "move":
                p0 = (b.x + b.w / 2, b.y + b.h / 2)
                p1 = (p0[0] + 120, p0[1] + 90)
            else:
                p0 = (b.x + b.w, b.y + b.h)
                p1 = (p0[0] + 60, p0[1] + 40)
        steps = 24
        out = [("press", p0)]
        out += [("move", (p0[0] + (p1[0] - p0[0]) * i / steps, p0[1] + (p1[1] - p0[1]) * i / steps))
                for i in range(1, steps + 1)]
        out.append(("release", p1))
        return out

    def send(kind, p):
        pos = vpos(*p)
        gpos = vp.mapToGlobal(pos)
        lb = Qt.MouseButton.LeftButton
        if kind == "press":
            ev = QMouseEvent(QEvent.Type.MouseButtonPress, pos, gpos, lb, lb, Qt.KeyboardModifier.NoModifier)
        elif kind == "move":
            ev = QMouseEvent(QEvent.Type.MouseMove, pos, gpos, Qt.MouseButton.NoButton, lb,
                             Qt.KeyboardModifier.NoModifier)
        else:
            ev = QMouseEvent(QEvent.Type.MouseButtonRelease, pos, gpos, lb, Qt.MouseButton.NoButton,
                             Qt.KeyboardModifier.NoModifier)
        t0 = time.perf_counter()
        QApplication.sendEvent(vp, ev)
        dt = (time.perf_counter() - t0) * 1e3
        (move_ms if kind == "move" else release_ms if kind == "release" else []).append(dt)

    gestures = list(script)
    n_edits0 = len(ctrl.store.edit_ids())

    def step():
        if not queue:
            if not gestures:
                driver.stop()
                QTimer.singleShot(50, loop.quit)
                return
            queue.extend(plan(*gestures.pop(0)))
        kind, p = queue.pop(0)
        send(kind, p)

    driver = QTimer()
    driver.setTimerType(Qt.TimerType.PreciseTimer)
    driver.setInterval(8)
    driver.timeout.connect(step)
    t_start = time.perf_counter()
    loop = QEventLoop()  # (app.quit() would close the window, and with it the store)
    probe.start()
    driver.start()
    loop.exec()
    probe.stop()
    wall = time.perf_counter() - t_start
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    n_edits = len(ctrl.store.edit_ids()) - n_edits0

    # 1,000 boxes through the controller (GUI path), 20 per study
    per_study = 20
    n_studies = max(1, args.save_boxes // per_study)
    studies = [study((1024, 1024), 100 + i) for i in range(n_studies)]
    save_ms: list[float] = []
    n_before = sum(len(ctrl.store.boxes(r.id)) for r in ctrl.store.studies())
    t0 = time.perf_counter()
    for i, st in enumerate(studies):
        host.state.set_study(st)
        for j in range(per_study):
            t1 = time.perf_counter()
            ctrl.add_box("Nodule", 20 + 45 * j, 30 + 40 * j, 40, 35)
            save_ms.append((time.perf_counter() - t1) * 1e3)
    save_total = time.perf_counter() - t0
    n_saved = sum(len(ctrl.store.boxes(r.id)) for r in ctrl.store.studies()) - n_before

    result = {
        "benchmark": "box_editor_stall",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "qpa": os.environ.get("QT_QPA_PLATFORM"),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "image": [H, W],
        "boxes_on_study": args.boxes,
        "gestures": len(script),
        "edits_committed": n_edits,
        "store_synchronous": "FULL",
        "wall_s": round(wall, 3),
        "probe_ticks": len(ticks),
        "worst_stall_ms": round(max(gaps), 2) if gaps else None,
        "p99_gap_ms": round(_pct(gaps, 0.99), 2),
        "worst_handler_ms": round(max(move_ms + release_ms), 2),
        "median_gap_ms": round(statistics.median(gaps), 3) if gaps else None,
        "move_handler_ms": {"median": round(statistics.median(move_ms), 3),
                            "p99": round(_pct(move_ms, 0.99), 3), "max": round(max(move_ms), 3)},
        "release_commit_ms": {"median": round(statistics.median(release_ms), 3),
                              "p99": round(_pct(release_ms, 0.99), 3),
                              "max": round(max(release_ms), 3)},
        "save_boxes_via_gui": {"n": n_saved, "studies": n_studies, "total_s": round(save_total, 3),
                               "per_box_ms_median": round(statistics.median(save_ms), 3),
                               "per_box_ms_max": round(max(save_ms), 3)},
        "note": ("worst_stall_ms = longest gap between 1 ms probe ticks during the scripted "
                 "gestures (event handling + repaint + commit with fsync on release, plus any "
                 "time the OS gave the CPU to other processes: compare loadavg_1min with "
                 "cpu_count); worst_handler_ms = the longest single mouse-event handler"),
    }
    ctrl.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
