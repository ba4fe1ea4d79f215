"""Make docs/images/finetune_panel.png: the main window at 1440x900 with a fine-tune running (live curves).

    D=$(mktemp -d); CXRVIEWER_DATA_DIR=$D/data CXRVIEWER_CONFIG_DIR=$D/config CXRVIEWER_CACHE_DIR=$D/cache \\
    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1440x900x24" \\
        .venv/bin/python docs/make_finetune_screenshot.py /tmp/shot.png [MIN_EPOCHS]
    convert /tmp/shot.png -colors 96 PNG8:docs/images/finetune_panel.png

24 phantoms (256 px) are written to a temporary folder with an annotation project holding their labels
(Cardiomegaly, Effusion, Nodule) and boxes; the window opens the folder and runs "Fine-tune on my
annotations" (a tiny CIA-Net at 64 px, 30 epochs) through the panel; once MIN_EPOCHS (default 10) epochs
have ended, the curves are frozen and the screen is captured with ``xwd -root | convert``.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZE = 256


def make_project(folder: Path) -> tuple[Path, Path]:
    """(phantom folder, annotation project) in ``folder``."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations.model import StudyIdentity
    from cxrviewer.core.classes import CLASSES
    from training.data import load_records
    from training.phantoms import PhantomConfig, write_phantom_dataset

    ph, store = folder / "phantoms", folder / "phantoms.cxrann"
    cfg = PhantomConfig(contrast=2.0, normal_fraction=0.4, max_findings=1, lesion_scale=1.5,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Nodule", 1.0)))
    write_phantom_dataset(ph, n=24, size=SIZE, seed=7, config=cfg)
    with AnnotationStore(store, annotator="demo") as s:
        for i, r in enumerate(load_records(ph)):
            st = s.ensure_study(StudyIdentity(file_name=r.path.name, sha256=f"{i:064x}"), width=SIZE,
                                height=SIZE, path=r.path)
            for c, v in zip(CLASSES, r.labels):
                if c in ("Cardiomegaly", "Effusion", "Nodule"):
                    s.set_label(st.id, c, "present" if v else "absent")
            for b in r.boxes:
                s.add_box(st.id, b.label, b.x, b.y, b.w, b.h)
    return ph, store


def main(out_png: str, min_epochs: int = 10) -> int:
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication

    from cxrviewer.gui.main_window import MainWindow

    folder = Path(tempfile.mkdtemp(prefix="ft_shot_"))
    ph, store = make_project(folder)
    app = QApplication(sys.argv[:1])
    win = MainWindow()
    win.setGeometry(0, 0, 1440, 900)
    win.show()

    def spin(cond, timeout: float = 900.0) -> None:
        end = time.time() + timeout
        while not cond():
            if time.time() > end:
                raise TimeoutError("the window did not get there in time")
            app.processEvents()
            time.sleep(0.02)

    win.open_paths([str(ph)])
    spin(lambda: len(win.state.worklist) > 0)
    ann = win.annotations
    assert ann.open_store(store)
    out = folder / "finetuned.cxrbundle"
    args = ["cia", "--annotations", str(store), "--out", str(out), "--backbone", "tiny",
            "--arch-kwargs", '{"head_channels": 16}', "--optimizer", "adam", "--lr", "3e-3",
            "--box-fraction", "1.0", "--bank-size", "8", "--size", "64", "--no-augment", "--device", "cpu",
            "--seed", "0", "--epochs", "30", "--batch-size", "4", "--no-resume", "--n-folds", "4"]
    job = ann.start_finetune(out=out, args=args, compare=False)
    win.resizeDocks([ann.finetune.dock], [300], Qt.Orientation.Vertical)
    spin(lambda: job.tracker.done >= min_epochs)
    job._poll_timer.stop()  # freeze the curves for the capture
    job.proc.readyReadStandardOutput.disconnect(job._read)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    subprocess.run(f"xwd -root -silent | convert xwd:- png:{out_png}", shell=True, check=True)
    print({"epochs_plotted": len(ann.finetune.panel.epoch_x), "points": ann.finetune.panel.n_points})
    ann.shutdown()
    win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10))
