""""Fine-tune on my annotations": a separate process with progress, cancel and bundleReady.

A stand-in trainer script prints the progress lines of ``training.trainers.loop``
and writes a bundle folder, so this runs in about a second without torch.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
from PySide6.QtCore import QTimer

from cxrviewer.gui.finetune import FineTuneJob, finetune_arguments, parse_bundle, parse_progress

FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    out, epochs, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for e in range(1, epochs + 1):
        for step in (5, 10):
            sys.stderr.write(f"epoch {e}/{epochs} [####      ] {step}/10 loss 0.5 3.0 img/s\\n")
            sys.stderr.flush()
            time.sleep(delay)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "manifest.json"), "w").write("{}")
    print(json.dumps({"bundle": out, "mean_auroc": 0.5}))
""")


@pytest.fixture
def trainer(tmp_path):
    p = tmp_path / "fake_trainer.py"
    p.write_text(FAKE_TRAINER)
    return p


def test_parse_progress_and_bundle_lines():
    assert parse_progress("epoch 2/4 [####      ] 5/10 loss 0.5 3.0 img/s") == pytest.approx(0.375)
    assert parse_progress("epoch 3/3") == pytest.approx(2 / 3)
    assert parse_progress("mining 40%") == pytest.approx(0.4)
    assert parse_progress("loading data") is None
    assert parse_bundle('{"bundle": "/x/y.cxrbundle", "mean_auroc": 0.7}') == "/x/y.cxrbundle"
    assert parse_bundle("{not json}") is None
    args = finetune_arguments("/p.cxrann", "/o.cxrbundle", data="/nih", extra=["--epochs", "2"])
    assert args == ["cia", "--data", "/nih", "--annotations", "/p.cxrann", "--out", "/o.cxrbundle",
                    "--epochs", "2"]


def test_job_reports_progress_and_bundle(qtbot, trainer, tmp_path):
    out = tmp_path / "new.cxrbundle"
    job = FineTuneJob([str(trainer), str(out), "3", "0.01"], out, program=sys.executable)
    fractions: list[float] = []
    job.progress.connect(lambda f, _t: fractions.append(f))
    with qtbot.waitSignal(job.bundleReady, timeout=30_000) as got:
        job.start()
    assert got.args == [str(out)] and (out / "manifest.json").exists()
    good = [f for f in fractions if f >= 0]
    assert good == sorted(good) and good[-1] == 1.0 and len(good) >= 6  # monotone, reached the end
    assert any(0.3 < f < 0.7 for f in good)


def test_cancel_keeps_the_app_responsive(qtbot, trainer, tmp_path):
    out = tmp_path / "never.cxrbundle"
    job = FineTuneJob([str(trainer), str(out), "50", "0.2"], out, program=sys.executable)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    with qtbot.waitSignal(job.progress, timeout=30_000, check_params_cb=lambda f, _t: f > 0):
        job.start()
    assert job.running and len(ticks) > 0  # the GUI thread kept running while training
    with qtbot.waitSignal(job.failed, timeout=15_000) as got:
        job.cancel()
    timer.stop()
    assert "cancel" in got.args[0] and not job.running and not out.exists()


def test_failed_run_reports_the_output(qtbot, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.stderr.write('cxr-train: error: unrecognized arguments\\n')\nsys.exit(2)\n")
    job = FineTuneJob([str(bad)], tmp_path / "x", program=sys.executable)
    with qtbot.waitSignal(job.failed, timeout=30_000) as got:
        job.start()
    assert "exit code 2" in got.args[0] and "unrecognized" in got.args[0]


def test_controller_runs_finetune_and_emits_bundle_ready(qtbot, trainer, tmp_path):
    from tests.gui.test_box_editor import Host, make_study

    from cxrviewer.gui.annotation_controller import AnnotationController

    host = Host()
    qtbot.addWidget(host)
    ctrl = AnnotationController.attach(host, annotator="t")
    assert ctrl.open_store(tmp_path / "p.cxrann")
    host.state.set_study(make_study())
    out = tmp_path / "ft.cxrbundle"
    with qtbot.waitSignal(ctrl.bundleReady, timeout=30_000) as got:
        job = ctrl.start_finetune(out=out, program=sys.executable,
                                  args=[str(trainer), str(out), "2", "0.01"])
        assert job is not None and ctrl.dock.cancel_btn.isEnabled()
        ctrl.add_box("Mass", 10, 10, 50, 50)  # the app stays usable meanwhile
    assert got.args == [str(out)]
    assert ctrl.dock.progress.value() == 1000 and not ctrl.dock.cancel_btn.isEnabled()
    assert len(ctrl.store.boxes(ctrl.record.id)) == 1
    ctrl.shutdown()
