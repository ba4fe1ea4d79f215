"""The fine-tune panel (issue 20): live curves from the trainer's structured log, time left, cancel that
keeps the best epoch as a bundle, and the before/after table with "Use the new model".

Fast tests use a stand-in trainer that writes ``OUT.run/log.jsonl`` as
:class:`training.trainers.loop.Trainer` does (step, epoch and selection records), a checkpoint file
per epoch, and honours ``--epochs`` on a resumed run the way the real loop does (nothing left to
train: it writes the bundle at once); a stand-in ``compare`` writes fixed JSON. The real
``cxr-train cia`` + ``cxr-train compare`` on phantoms are in the ``slow`` tests below.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from cxrviewer.gui.finetune import FineTuneController, salvage_arguments
from cxrviewer.gui.finetune_log import RunLog, RunProgress, format_duration, run_dir_of, total_epochs

FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    a = sys.argv[1:]
    def opt(name, default=None):
        return a[len(a) - 1 - a[::-1].index(name) + 1] if name in a else default
    out, epochs, delay = opt("--out"), int(opt("--epochs")), float(opt("--delay", "0.05"))
    run = out + ".run"
    os.makedirs(run, exist_ok=True)
    ck = os.path.join(run, "checkpoint.pt")
    if "--no-resume" in a and os.path.exists(ck):
        os.remove(ck)
    start = int(open(ck).read()) + 1 if os.path.exists(ck) else 0
    logf = open(os.path.join(run, "log.jsonl"), "a")
    def log(rec):
        logf.write(json.dumps(rec) + "\\n"); logf.flush()
    hist = []
    for e in range(start, epochs):
        for s in range(4):
            sys.stderr.write(f"epoch {e + 1}/{epochs} [##   ] {s + 1}/4 loss 0.5\\n"); sys.stderr.flush()
            if s % 2 == 0:
                log({"kind": "step", "epoch": e, "step": s, "loss": 1.0 / (1 + e + s / 4)})
            time.sleep(delay)
        rec = {"kind": "epoch", "epoch": e, "loss": 1.0 / (1 + e), "seconds": delay * 4, "images_per_s": 40.0,
               "metrics": {"mean_auroc": 0.5 + 0.04 * e, "loc_iou_0.3": min(1.0, 0.1 * e)}}
        log(rec)
        open(ck, "w").write(str(e))
    log({"kind": "selection", "epoch": max(epochs - 1, 0), "reason": "best"})
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "manifest.json"), "w").write(json.dumps({"epochs": epochs, "resumed_at": start}))
    print(json.dumps({"bundle": out}))
""")

FAKE_COMPARE = textwrap.dedent("""
    import json, sys
    a = sys.argv[1:]
    out = a[a.index("--out") + 1]
    old = a[a.index("--old") + 1] if "--old" in a else None
    res = {"n_studies": 16, "iou": 0.3, "caveat": "trained on them",
           "new": {"name": "new", "path": a[a.index("--new") + 1], "mean_auroc": 0.71, "loc_iou_0.3": 0.5,
                   "n_labelled": 16, "n_boxed": 12, "auroc": {"Nodule": 0.7}, "loc": {"Nodule": 0.5}},
           "prior": {"name": "fixed-box prior", "title": "prior (shipped)", "loc_iou_0.3": 0.25, "n_boxed": 12}}
    if old:
        res["old"] = {"name": "old-cia", "path": old, "mean_auroc": 0.6, "loc_iou_0.3": 0.125,
                      "n_labelled": 16, "n_boxed": 12}
    json.dump(res, open(out, "w"))
    print(json.dumps({"compare": out}))
""")


@pytest.fixture
def fakes(tmp_path):
    t, c = tmp_path / "fake_trainer.py", tmp_path / "fake_compare.py"
    t.write_text(FAKE_TRAINER)
    c.write_text(FAKE_COMPARE)
    return t, c


def test_log_tail_progress_and_command_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    rl = RunLog(path)
    assert rl.poll() == []  # no file yet
    path.write_text('{"kind": "step", "epoch": 0, "step": 0, "loss": 2.0}\n{"kind": "ep')
    assert [r["kind"] for r in rl.poll()] == ["step"]  # the half-written line waits
    with open(path, "a") as f:
        f.write('och", "epoch": 0, "loss": 1.5}\nnot json\n')
    assert rl.poll() == [{"kind": "epoch", "epoch": 0, "loss": 1.5}]
    prog = RunProgress(4, t0=100.0)
    prog.add({"kind": "epoch", "epoch": 0}, now=110.0)  # first epoch: 10 s from the start
    assert prog.fraction == 0.25 and prog.seconds_left(112.0) == pytest.approx(28.0)
    prog.add({"kind": "epoch", "epoch": 1}, now=116.0)  # 6 s per epoch since
    assert prog.fraction == 0.5 and prog.seconds_left(116.0) == pytest.approx(12.0)
    prog.add({"kind": "step", "epoch": 2, "step": 0, "eta_s": 5.0}, now=117.0)  # the trainer's own estimate wins
    assert prog.seconds_left(118.0) == pytest.approx(4.0)
    resumed = RunProgress(4, t0=0.0)  # a resumed run: two epochs already in its log, not timed
    for e in (0, 1):
        resumed.add({"kind": "epoch", "epoch": e}, now=0.5, timed=False)
    assert resumed.done == 2 and resumed.seconds_left(1.0) is None
    resumed.add({"kind": "epoch", "epoch": 2}, now=9.0)  # the first epoch this process ran: 9 s
    assert resumed.seconds_left(9.0) == pytest.approx(9.0)
    assert format_duration(None) == "estimating…" and format_duration(125) == "2 min 05 s"
    args = ["cia", "--data", "/d", "--out", "/m/x.cxrbundle", "--epochs", "3", "--no-resume"]
    assert run_dir_of(args) == Path("/m/x.cxrbundle.run") and total_epochs(args) == 3
    assert run_dir_of([*args, "--run-dir", "/r"]) == Path("/r")
    (tmp_path / "config.yaml").write_text("epochs: 7\nlr: 0.001\n")
    assert total_epochs(["cia", "--config", "c.yaml"], tmp_path) == 7  # the trainer's resolved config
    assert salvage_arguments(args, 2) == ["cia", "--data", "/d", "--out", "/m/x.cxrbundle", "--epochs", "3",
                                          "--epochs", "2"]


def _controller(qtbot):
    from tests.gui.test_box_editor import Host

    from cxrviewer.gui.annotation_feedback import AnnotationFeedback

    host = Host()
    qtbot.addWidget(host)
    ctrl = FineTuneController(AnnotationFeedback(None), host)
    ctrl.baseline = lambda _args: None
    return host, ctrl


def test_panel_plots_live_then_shows_before_after_and_offers_the_switch(qtbot, fakes, tmp_path):
    trainer, compare = fakes
    host, ctrl = _controller(qtbot)
    out = tmp_path / "ft.cxrbundle"
    points_while_training: list[int] = []

    def seen(_recs):
        job = ctrl.job
        if job is not None and job.stage == "train" and job.proc.state() != job.proc.ProcessState.NotRunning:
            points_while_training.append(ctrl.panel.n_points)

    args = [str(trainer), "--out", str(out), "--epochs", "5", "--delay", "0.05", "--no-resume"]
    job = ctrl.start(tmp_path / "p.cxrann", out=out, program=sys.executable, args=args, compare=True,
                     baseline="/models/old-cia.cxrbundle", compare_program=(sys.executable, [str(compare)]))
    assert job is not None
    job.records.connect(seen)
    with qtbot.waitSignal(job.finished, timeout=60_000):
        pass
    panel = ctrl.panel
    assert max(points_while_training) >= 3, points_while_training  # the curve grew while training ran
    assert panel.epoch_x == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert panel.series["loss"] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert panel.series["mean_auroc"] == pytest.approx([0.5, 0.54, 0.58, 0.62, 0.66])
    assert len(panel.step_x) == 8 and all(0 < x <= 5 for x in panel.step_x)  # epochs 2-5: their places known
    assert panel._kept_line is not None and panel._kept_line.value() == 5
    rows = panel.table_rows()
    assert rows == [["Before: old-cia", "0.600", "0.125"], ["After: new", "0.710", "0.500"],
                    ["Fixed-box prior", "—", "0.250"]]
    assert panel.table.item(2, 0).toolTip() == "prior (shipped)" and panel.table.item(1, 1).toolTip() == "Nodule: 0.700"
    assert "16 of your studies" in panel.compare_note.text() and "optimistic" in panel.compare_note.toolTip()
    assert job.comparison["new"]["path"] == str(out) and not panel.switch_btn.isHidden()
    with qtbot.waitSignal(ctrl.switchRequested) as got:
        panel.switch_btn.click()
    assert got.args == [str(out)] and not panel.switch_btn.isEnabled()
    assert not panel.cancel_btn.isEnabled() and panel.progress.value() == 1000


def test_cancel_mid_run_keeps_the_best_epoch_as_a_bundle(qtbot, fakes, tmp_path):
    trainer, _ = fakes
    host, ctrl = _controller(qtbot)
    out = tmp_path / "cancelled.cxrbundle"
    args = [str(trainer), "--out", str(out), "--epochs", "200", "--delay", "0.05", "--no-resume"]
    job = ctrl.start(tmp_path / "p.cxrann", out=out, program=sys.executable, args=args)
    assert job is not None and ctrl.panel.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: job.tracker.done >= 2, timeout=60_000)
    stages: list[str] = []
    job.stageChanged.connect(stages.append)
    with qtbot.waitSignal(ctrl.bundleReady, timeout=60_000) as got:
        ctrl.panel.cancel_btn.click()
    assert got.args == [str(out)] and job.salvaged and stages[0] == "salvage"
    manifest = json.loads((out / "manifest.json").read_text())
    assert 2 <= manifest["epochs"] < 200 and manifest["resumed_at"] == manifest["epochs"]  # trained nothing more
    qtbot.waitUntil(lambda: job.stage == "done", timeout=10_000)
    assert "best epoch kept" in ctrl.panel.title_label.text() and not ctrl.panel.switch_btn.isHidden()


def test_cancel_before_any_epoch_keeps_nothing(qtbot, fakes, tmp_path):
    trainer, _ = fakes
    host, ctrl = _controller(qtbot)
    out = tmp_path / "never.cxrbundle"
    job = ctrl.start(tmp_path / "p.cxrann", out=out, program=sys.executable,
                     args=[str(trainer), "--out", str(out), "--epochs", "3", "--delay", "5"])
    with qtbot.waitSignal(job.progress, timeout=30_000, check_params_cb=lambda f, _t: f > 0):
        pass  # the first step line
    with qtbot.waitSignal(job.failed, timeout=30_000) as got:
        job.cancel()
    assert got.args == ["fine-tuning cancelled"] and not out.exists() and job.stage == "done"


# ---- the real trainer and compare on phantoms (slow: three cxr-train processes) ----------------------
SIZE = 48
TINY = ["--backbone", "tiny", "--arch-kwargs", '{"head_channels": 8}', "--optimizer", "adam",
        "--box-fraction", "1.0", "--bank-size", "4", "--size", str(SIZE), "--no-augment", "--device", "cpu",
        "--seed", "0", "--batch-size", "4", "--no-resume"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """16 phantoms, every one annotated: its labels of three classes and its boxes."""
    from cxrviewer.core.annotations import AnnotationStore
    from cxrviewer.core.annotations.model import StudyIdentity
    from cxrviewer.core.classes import CLASSES
    from training.data import load_records
    from training.phantoms import PhantomConfig, write_phantom_dataset

    root = tmp_path_factory.mktemp("ft_panel")
    cfg = PhantomConfig(contrast=2.0, normal_fraction=0.4, max_findings=1, lesion_scale=1.5,
                        class_weights=(("Cardiomegaly", 1.0), ("Effusion", 1.0), ("Nodule", 1.0)))
    write_phantom_dataset(root / "ph", n=16, size=SIZE, seed=7, config=cfg)
    store = root / "p.cxrann"
    with AnnotationStore(store, annotator="t") as s:
        for i, r in enumerate(load_records(root / "ph")):
            st = s.ensure_study(StudyIdentity(file_name=r.path.name, sha256=f"{i:064x}"), width=SIZE, height=SIZE,
                                path=r.path)
            for c, v in zip(CLASSES, r.labels):
                if c in ("Cardiomegaly", "Effusion", "Nodule"):
                    s.set_label(st.id, c, "present" if v else "absent")
            for b in r.boxes:
                s.add_box(st.id, b.label, b.x, b.y, b.w, b.h)
    return store


@pytest.mark.slow
def test_real_finetune_plots_live_and_compares(qtbot, project, tmp_path):
    from cxrviewer.core.bundle import default_models_dir

    host, ctrl = _controller(qtbot)
    out = tmp_path / "ft.cxrbundle"
    old = default_models_dir() / "nih-cia.cxrbundle"
    args = ["cia", "--annotations", str(project), "--out", str(out), "--epochs", "5", *TINY]
    job = ctrl.start(project, out=out, args=args, compare=True, baseline=str(old))
    points: list[int] = []
    job.records.connect(lambda _r: points.append(ctrl.panel.n_points) if job.stage == "train"
                        and job.proc.state() != job.proc.ProcessState.NotRunning else None)
    with qtbot.waitSignal(job.finished, timeout=600_000):
        pass
    rows = ctrl.panel.table_rows()
    print({"points_before_end": max(points), "points_total": ctrl.panel.n_points, "table": rows})
    assert max(points) >= 3 and job.comparison is not None, (points, ctrl.panel.compare_note.text())
    assert rows[0][0].startswith("Before: nih-cia") and rows[1][0] == "After: ft" and rows[2][0] == "Fixed-box prior"
    assert all(r[2] != "—" for r in rows) and rows[1][1] != "—"  # localisation for all three, AUROC for the new
    assert job.comparison["n_studies"] == 16 and job.comparison["new"]["n_boxed"] > 0


@pytest.mark.slow
def test_real_cancel_leaves_a_loadable_bundle(qtbot, project, tmp_path):
    from cxrviewer.core.bundle import load_bundle

    host, ctrl = _controller(qtbot)
    out = tmp_path / "cancelled.cxrbundle"
    args = ["cia", "--annotations", str(project), "--out", str(out), "--epochs", "300", *TINY]
    job = ctrl.start(project, out=out, args=args)
    qtbot.waitUntil(lambda: job.tracker.done >= 2, timeout=600_000)
    with qtbot.waitSignal(ctrl.bundleReady, timeout=600_000) as got:
        ctrl.cancel()
    b = load_bundle(got.args[0])
    held = b.manifest.provenance.get("selection") or {}
    print({"epochs_done_at_cancel": job.tracker.done, "bundle": got.args[0], "selection": held})
    assert job.salvaged and b.manifest.role == "cia" and Path(got.args[0]) == out
    assert held["epochs_run"] == job.tracker.done and held["reason"] == "best"  # the epochs run, the best kept


def test_the_panel_docks_at_the_bottom_of_the_main_window(qtbot, fakes, tmp_path):
    from PySide6.QtCore import Qt

    from cxrviewer.gui.main_window import MainWindow

    trainer, _ = fakes
    win = MainWindow()
    qtbot.addWidget(win)
    ann = win.annotations
    assert ann.open_store(tmp_path / "p.cxrann")
    out = tmp_path / "ft.cxrbundle"
    job = ann.start_finetune(out=out, program=sys.executable,
                             args=[str(trainer), "--out", str(out), "--epochs", "3", "--delay", "0.01"])
    dock = ann.finetune.dock
    assert dock is not None and dock.objectName() == "dock_finetune" and dock.widget() is ann.finetune.panel
    assert win.dockWidgetArea(dock) == Qt.DockWidgetArea.BottomDockWidgetArea and not dock.isHidden()
    with qtbot.waitSignal(job.finished, timeout=60_000):
        pass
    assert ann.finetune.panel.epoch_x == [1.0, 2.0, 3.0] and job.bundle == str(out)
    ann.shutdown()
