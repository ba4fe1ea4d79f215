""""Fine-tune on my annotations": ``cxr-train`` in a separate process, with live curves, time left,
cancel, and the old and the new model side by side.

Training runs in its own process (:class:`QProcess`), never in the GUI process:
torch gets its own cores and memory, a crash cannot take the viewer down, and
the app stays usable meanwhile. Progress comes from the trainer's structured log
(``OUT.run/log.jsonl``, :mod:`cxrviewer.gui.finetune_log`): step and epoch records with the loss,
the validation metrics and images/s, from which the fraction done and the time left follow; a
trainer without that log falls back on its progress lines (``epoch 2/5 [####    ] 12/40 loss …``).
The bundle path comes from the trainer's last JSON line (``{"bundle": "…"}``) or ``--out``.

Stages of one :class:`FineTuneJob` (one :class:`QProcess`, run one after the other):

1. ``train``: the ``cxr-train`` command;
2. ``salvage``, only after Cancel: when an epoch has ended, the same command resumed from its
   checkpoint with ``--epochs`` set to the epochs done, so the trainer trains nothing more and
   writes the bundle of its best epoch (``best.pt``) — a cancelled run leaves a loadable bundle;
3. ``compare``, when asked: ``cxr-train compare`` scores the old (``baseline``) and the new bundle
   on the annotation project's studies and writes ``OUT.run/compare.json``.

Signals of :class:`FineTuneJob`: ``progress(float fraction, str text)`` (fraction -1
while unknown), ``records(list)`` (new log records), ``output(str line)``, ``stageChanged(str)``,
``bundleReady(str path)`` when the bundle exists (also after a cancel, stage ``salvage``),
``compared(dict)`` / ``compareFailed(str)``, ``failed(str message)`` (also after
:meth:`FineTuneJob.cancel` with no epoch to keep), ``finished(int exit_code)`` (training's).

:class:`FineTuneController` is a window's one run: it builds the command line from the
annotation project and the settings, shows the fine-tune panel
(:class:`~cxrviewer.gui.widgets.finetune_panel.FineTunePanel`), reports progress and outcome, and
stops the process when the window closes; connect its ``switchRequested`` ("Use the new model")
to the model picker.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Qt, QTimer, Signal
from PySide6.QtWidgets import QDockWidget, QMainWindow, QWidget

from ..core.errors import CxrError
from . import settings
from .annotation_feedback import AnnotationFeedback
from .annotation_io import user_data_dir
from .finetune_log import LOG_NAME, RunLog, RunProgress, number, option, run_dir_of, total_epochs
from .widgets.finetune_panel import FineTunePanel

log = logging.getLogger(__name__)

_EPOCH = re.compile(r"epoch\s+(\d+)\s*/\s*(\d+)(?:\s*\[[^\]]*\])?\s*(?:(\d+)\s*/\s*(\d+))?", re.I)
_PERCENT = re.compile(r"(?:^|\s)(\d{1,3}(?:\.\d+)?)\s*%")


def parse_progress(line: str) -> float | None:
    """Overall fraction done from one trainer output line, or None.

    ``epoch e/E [...] d/t`` -> ``((e - 1) + d / t) / E``; ``epoch e/E`` alone ->
    ``(e - 1) / E``; a bare ``NN%`` -> ``NN / 100``.
    """
    m = _EPOCH.search(line)
    if m:
        e, n_ep = int(m.group(1)), max(int(m.group(2)), 1)
        inner = 0.0
        if m.group(3) and m.group(4):
            inner = int(m.group(3)) / max(int(m.group(4)), 1)
        return max(0.0, min(1.0, ((e - 1) + inner) / n_ep))
    m = _PERCENT.search(line)
    if m:
        return max(0.0, min(1.0, float(m.group(1)) / 100.0))
    return None


def parse_bundle(line: str) -> str | None:
    """The ``bundle`` of a JSON result line (``{"bundle": "...", ...}``), or None."""
    s = line.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return None
    try:
        data = json.loads(s)
    except ValueError:
        return None
    b = data.get("bundle") if isinstance(data, dict) else None
    return str(b) if b else None


def train_program() -> tuple[str, list[str]]:
    """How to start ``cxr-train``: this interpreter with ``-m training.cli`` (works in a venv
    and in a checkout); a frozen app uses the ``cxr-train`` next to it."""
    if getattr(sys, "frozen", False):
        exe = Path(sys.executable).with_name("cxr-train" + (".exe" if os.name == "nt" else ""))
        return str(exe), []
    return sys.executable, ["-m", "training.cli"]


def cxrviewer_program() -> tuple[str, list[str]]:
    """How to start ``cxrviewer SUBCOMMAND …`` as a child: this interpreter with ``-m cxrviewer``;
    a frozen app runs its own executable (on Windows its console twin ``cxrviewer-cli.exe`` when
    present: the windowed one has no stdout)."""
    if getattr(sys, "frozen", False):
        exe = Path(sys.executable)
        cli = exe.with_name("cxrviewer-cli.exe")
        if os.name == "nt" and cli.is_file():
            return str(cli), []
        return str(exe), []
    return sys.executable, ["-m", "cxrviewer"]


def child_environment(env: dict[str, str] | None = None) -> QProcessEnvironment:
    """The environment of a child process of the app: ours, unbuffered output, the checkout on
    ``PYTHONPATH`` (so ``training`` and ``cxrviewer`` import from a checkout), plus ``env``."""
    penv = QProcessEnvironment.systemEnvironment()
    penv.insert("PYTHONUNBUFFERED", "1")
    repo = str(Path(__file__).resolve().parents[2])
    penv.insert("PYTHONPATH", os.pathsep.join(p for p in (repo, penv.value("PYTHONPATH")) if p))
    for k, v in (env or {}).items():
        penv.insert(k, v)
    return penv


def finetune_arguments(store: str | os.PathLike, out: str | os.PathLike, *,
                       command: str = "cia", data: str | os.PathLike | None = None,
                       extra: Sequence[str] = ()) -> list[str]:
    """``cxr-train`` arguments: ``cia [--data DIR] --annotations STORE --out OUT EXTRA``.

    ``cxr-train cia`` reads the store's labels and accepted boxes (they override the
    folder's CSVs for the images it knows; its other images with a readable path are
    added); ``--data`` is the NIH-layout folder the rest of the training set comes from.
    """
    args = [command]
    if data:
        args += ["--data", str(data)]
    args += ["--annotations", str(store), "--out", str(out)]
    return args + [str(a) for a in extra]


def compare_arguments(store: str | os.PathLike, new: str | os.PathLike, out: str | os.PathLike,
                      old: str | os.PathLike | None = None) -> list[str]:
    """``cxr-train`` arguments of the before/after step: ``compare --annotations STORE --new NEW
    [--old OLD] --out OUT``."""
    args = ["compare", "--annotations", str(store), "--new", str(new)]
    if old:
        args += ["--old", str(old)]
    return args + ["--out", str(out)]


def salvage_arguments(args: Sequence[str], epochs_done: int) -> list[str]:
    """The training command line that writes the bundle of a cancelled run from its checkpoint:
    the same one, resumed (``--no-resume`` dropped), ending after the ``epochs_done`` epochs it ran
    (``--epochs``, last wins). The trainer then trains nothing more and keeps its best epoch."""
    return [a for a in args if a != "--no-resume"] + ["--epochs", str(int(epochs_done))]


def default_baseline(args: Sequence[str] = ()) -> str | None:
    """The model a fine-tune is compared with: ``--init-weights`` of its command line, else the
    setting ``finetune/baseline``, else the CIA-Net (else the classifier) bundle of the active
    model set (the shipped one when none was chosen)."""
    init = option(args, "--init-weights")
    if init:
        return init
    chosen = settings.app_settings().value("finetune/baseline", "")
    if chosen and Path(str(chosen)).exists():
        return str(chosen)
    from ..core.bundle import default_models_dir
    from ..core.catalog import scan_bundles
    from ..core.roles import assign_roles

    folder = settings.active_model_dir() or str(default_models_dir())
    try:
        bundles = [b for b in scan_bundles(folder) if not b.error]
    except (CxrError, OSError):
        return None
    roles = assign_roles(bundles)  # the roles the pipeline gives this set
    b = roles.get("cia") or roles.get("classifier")
    return str(b.path) if b is not None else None


class FineTuneJob(QObject):
    """One fine-tune: the training process, then (optionally) ``cxr-train compare`` in the same
    :class:`QProcess` (see the module docstring).

    ``stage``: "train", "salvage" (after a cancel: the bundle of the best epoch so far is written
    from the checkpoint), "compare", "done". ``compare_store`` (an annotation project) turns the
    before/after step on; ``baseline`` is the old bundle it is compared with; ``compare_program``
    (program, argument prefix) replaces ``cxr-train`` for that step (tests).
    """

    progress = Signal(float, str)
    output = Signal(str)
    records = Signal(list)
    stageChanged = Signal(str)
    bundleReady = Signal(str)
    compared = Signal(dict)
    compareFailed = Signal(str)
    failed = Signal(str)
    finished = Signal(int)

    KILL_AFTER_MS = 5000
    POLL_MS = 250

    def __init__(self, args: Sequence[str], out: str | os.PathLike, *,
                 program: str | None = None, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, parent: QObject | None = None,
                 compare_store: str | os.PathLike | None = None, baseline: str | None = None,
                 compare_program: tuple[str, list[str]] | None = None) -> None:
        super().__init__(parent)
        prog, prefix = (program, []) if program else train_program()
        self.program, self.prefix, self.args = prog, list(prefix), [str(a) for a in args]
        self.arguments = self.prefix + self.args
        self.out = str(out)
        self.bundle: str | None = None
        self.fraction: float = -1.0
        self.lines: list[str] = []
        self.cancelled = False
        self.salvaged = False
        self.comparison: dict | None = None
        self.compare_store = str(compare_store) if compare_store else None
        self.baseline = baseline
        self.compare_program = compare_program
        self.stage = "train"
        self.run_dir = run_dir_of(self.args)
        self.log_path = self.run_dir / LOG_NAME if self.run_dir else None
        self.run_log = RunLog(self.log_path) if self.log_path else None
        self.tracker = RunProgress(None, time.monotonic())
        self._structured = False
        self._code = 0
        self._buf = ""
        self.proc = QProcess(self)
        self.proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        if cwd is not None:
            self.proc.setWorkingDirectory(str(cwd))
        self.proc.setProcessEnvironment(child_environment(env))
        self.proc.readyReadStandardOutput.connect(self._read)
        self.proc.finished.connect(self._on_finished)
        self.proc.errorOccurred.connect(self._on_error)
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self.proc.kill)
        self._poll_timer = QTimer(self)
        self._poll_timer.setInterval(self.POLL_MS)
        self._poll_timer.timeout.connect(self.poll)

    @property
    def command_line(self) -> str:
        """The training command line, as one string (logs and messages)."""
        return " ".join([self.program, *self.arguments])

    def start(self) -> None:
        """Start training. A log already in the run folder is read first: a resumed run's epochs are
        shown (and count as done, untimed); with ``--no-resume`` they belong to an earlier run and
        are skipped."""
        self.tracker = RunProgress(total_epochs(self.args, self.run_dir), time.monotonic())
        earlier = self.run_log.poll() if self.run_log is not None else []
        if earlier and "--no-resume" not in self.args:
            for rec in earlier:
                self.tracker.add(rec, time.monotonic(), timed=False)
            self.records.emit(earlier)
        log.info("fine-tune: %s", self.command_line)
        self.progress.emit(-1.0, "starting…")
        self._launch("train", self.program, self.arguments)
        self._poll_timer.start()

    def _launch(self, stage: str, program: str, arguments: Sequence[str]) -> None:
        self.stage = stage
        self._buf = ""
        self.stageChanged.emit(stage)
        self.proc.start(program, list(arguments))

    @property
    def running(self) -> bool:
        """Whether a stage's process is running."""
        return self.stage != "done" and self.proc.state() != QProcess.ProcessState.NotRunning

    def seconds_left(self) -> float | None:
        """Estimated training time left (:class:`~cxrviewer.gui.finetune_log.RunProgress`)."""
        return self.tracker.seconds_left(time.monotonic()) if self.stage == "train" else None

    def cancel(self) -> None:
        """Stop the process (SIGTERM, killed after :attr:`KILL_AFTER_MS`). Cancelling training
        keeps the best epoch so far as a bundle (stage "salvage") when an epoch has ended."""
        if not self.running:
            return
        self.cancelled = True
        self.proc.terminate()
        self._kill_timer.start(self.KILL_AFTER_MS)

    def kill(self) -> None:
        """Kill the process at once (after a cancel that was not heeded)."""
        self.proc.kill()

    def wait(self, ms: int = 30000) -> bool:
        """Block until the process ends (for shutdown and tests)."""
        return self.proc.waitForFinished(ms) if self.running else True

    # ---- process output and the structured log ----------------------------------------------
    def poll(self) -> None:
        """Read the trainer's new log records: progress, time left, ``records``."""
        if self.run_log is None or self.stage != "train":
            return
        recs = self.run_log.poll()
        if not recs:
            return
        now = time.monotonic()
        for rec in recs:
            self.tracker.add(rec, now)
        self.records.emit(recs)
        f = self.tracker.fraction
        if f is not None:
            self._structured = True
            self.fraction = f
            last = self.tracker.last
            loss = number(last.get("loss"))
            text = f"epoch {self.tracker.done}/{self.tracker.epochs}" + (f" · loss {loss:.4f}" if loss else "")
            self.progress.emit(f, text)

    def _read(self) -> None:
        data = bytes(self.proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        self._buf += data.replace("\r", "\n")
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._line(line)
        self.poll()

    def _line(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        self.lines.append(line)
        del self.lines[:-500]
        self.output.emit(line)
        b = parse_bundle(line)
        if b and self.stage in ("train", "salvage"):
            self.bundle = b
        f = parse_progress(line) if self.stage == "train" and not self._structured else None
        if f is not None:
            self.fraction = f
            self.progress.emit(f, line[-120:])

    # ---- stages ------------------------------------------------------------------------------
    def _on_finished(self, code: int, _status=None) -> None:
        self._kill_timer.stop()
        if self._buf:
            self._line(self._buf)
            self._buf = ""
        self.poll()
        stage = self.stage
        if stage == "compare":
            return self._compare_done(code)
        if stage == "train":
            self._poll_timer.stop()
            self._code = int(code)
            if self.cancelled and self._start_salvage():
                return None
        if self.cancelled:
            why = "" if stage == "train" else "; the best epoch was not kept"
            self.failed.emit("fine-tuning cancelled" + why)
        elif code != 0 and stage == "salvage":
            tail = "\n".join(self.lines[-8:])
            self.failed.emit(f"fine-tuning cancelled; keeping the best epoch failed (exit code {code}):\n{tail}")
        elif code != 0:
            tail = "\n".join(self.lines[-8:])
            self.failed.emit(f"fine-tuning failed (exit code {code}):\n{tail}")
        else:
            return self._bundle_done()
        return self._done()

    def _bundle_done(self) -> None:
        path = self.bundle or self.out
        if not Path(path).exists():
            self.failed.emit(f"training ended but wrote no bundle at {path}")
            return self._done()
        self.bundle = path
        self.salvaged = self.stage == "salvage"
        self.progress.emit(1.0, "best epoch kept" if self.salvaged else "done")
        self.bundleReady.emit(path)
        if not self._start_compare():
            self._done()

    def _start_salvage(self) -> bool:
        """After a cancel: write the bundle of the best epoch so far (False: no epoch has ended)."""
        done = self.tracker.done
        if self.run_dir is None or done <= 0 or not (self.run_dir / "checkpoint.pt").is_file():
            return False
        self.cancelled = False  # a second cancel stops the salvage
        self.progress.emit(-1.0, f"cancelled after {done} epochs: keeping the best one…")
        self._launch("salvage", self.program, self.prefix + salvage_arguments(self.args, done))
        return True

    def _start_compare(self) -> bool:
        if not self.compare_store or not self.bundle:
            return False
        prog, prefix = self.compare_program or train_program()
        base = self.run_dir or Path(self.bundle).parent
        self.compare_json = str(base / "compare.json") if self.run_dir else str(Path(self.bundle)) + ".compare.json"
        Path(self.compare_json).unlink(missing_ok=True)
        self.progress.emit(-1.0, "comparing the old and the new model…")
        self._launch("compare", prog, prefix + compare_arguments(self.compare_store, self.bundle,
                                                                 self.compare_json, self.baseline))
        return True

    def _compare_done(self, code: int) -> None:
        try:
            if code != 0 or self.cancelled:
                raise ValueError("cancelled" if self.cancelled else (self.lines[-1] if self.lines else f"exit {code}"))
            data = json.loads(Path(self.compare_json).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            self.compareFailed.emit(str(exc)[-300:])
        else:
            self.comparison = data
            self.compared.emit(data)
        self.progress.emit(1.0, "done")
        self._done()

    def _done(self) -> None:
        self.stage = "done"
        self._poll_timer.stop()
        self.stageChanged.emit("done")
        self.finished.emit(self._code)

    def _on_error(self, err) -> None:
        if err != QProcess.ProcessError.FailedToStart:
            return
        if self.stage == "compare":
            self.compareFailed.emit(f"could not start the comparison: {self.proc.errorString()}")
        else:
            self.failed.emit(f"could not start {self.program}: {self.proc.errorString()}")
            self._code = -1
        self._done()


class FineTuneController(QObject):
    """"Fine-tune on my annotations" of one window: at most one :class:`FineTuneJob` at a time,
    shown in the fine-tune panel (:class:`~cxrviewer.gui.widgets.finetune_panel.FineTunePanel`, a
    "Fine-tuning" dock of the window, or a window of its own beside a plain widget).

    Signals: ``progressChanged(fraction or None, text, running)`` for a progress bar,
    ``bundleReady(str path)`` when the new bundle exists (also the best epoch of a cancelled run),
    ``switchRequested(str path)`` when the user chose "Use the new model" in the panel.
    Messages go to ``feedback``. ``baseline``: a callable giving the bundle the new one is compared
    with (default :func:`default_baseline`).
    """

    progressChanged = Signal(object, str, bool)
    bundleReady = Signal(str)
    switchRequested = Signal(str)

    def __init__(self, feedback: AnnotationFeedback, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.feedback = feedback
        self.job: FineTuneJob | None = None
        self.baseline: Callable[[Sequence[str]], str | None] = default_baseline
        self._panel: FineTunePanel | None = None
        self.dock: QDockWidget | None = None
        self._eta_timer = QTimer(self)
        self._eta_timer.setInterval(1000)
        self._eta_timer.timeout.connect(self._update_time_left)

    @property
    def running(self) -> bool:
        """Whether this window's fine-tune is running (any stage)."""
        return self.job is not None and self.job.running

    @property
    def panel(self) -> FineTunePanel:
        """The fine-tune panel (made on first use)."""
        if self._panel is None:
            self._panel = FineTunePanel()
            self._panel.cancelRequested.connect(self.cancel)
            self._panel.switchRequested.connect(self.switchRequested)
        return self._panel

    def install_dock(self, window: QMainWindow,
                     area: Qt.DockWidgetArea = Qt.DockWidgetArea.BottomDockWidgetArea) -> QDockWidget:
        """The panel as a "Fine-tuning" dock of ``window`` (object name ``dock_finetune``, hidden until a
        run starts); a window that calls this at start gets it in its saved layout and can list its
        ``toggleViewAction()`` in a menu. Without it, the first run docks the panel itself."""
        if self.dock is None:
            self.dock = QDockWidget("Fine-tuning", window)
            self.dock.setObjectName("dock_finetune")
            self.dock.setWidget(self.panel)
            window.addDockWidget(area, self.dock)
            self.dock.hide()
        return self.dock

    def show_panel(self) -> None:
        """Show the panel: a bottom dock of the window this controller belongs to, else a window."""
        panel = self.panel
        win = self._window()
        if self.dock is None and isinstance(win, QMainWindow):
            self.install_dock(win)
        if self.dock is not None:
            self.dock.show()
            self.dock.raise_()
            return
        if panel.parent() is None and win is not None:
            panel.setParent(win, Qt.WindowType.Window)
        panel.setWindowTitle("Fine-tuning")
        panel.resize(1100, 300)
        panel.show()

    def _window(self) -> QWidget | None:
        obj = self.parent()
        while obj is not None and not isinstance(obj, QWidget):
            obj = obj.parent()
        return obj.window() if isinstance(obj, QWidget) else None

    @staticmethod
    def output_dir() -> Path:
        """Where new bundles go: a model-set folder of their own (``<data dir>/finetuned``)."""
        return user_data_dir() / "finetuned"

    def start(self, store: Path | None, folder: Path | None = None, *,
              out: str | os.PathLike | None = None, command: str = "cia",
              data: str | os.PathLike | None = None, extra: Sequence[str] = (),
              program: str | None = None, args: Sequence[str] | None = None,
              env: dict[str, str] | None = None, compare: bool | None = None,
              baseline: str | None = None,
              compare_program: tuple[str, list[str]] | None = None) -> FineTuneJob | None:
        """Run ``cxr-train <command> --data DIR --annotations STORE --out OUT …`` in its own process,
        then ``cxr-train compare`` (old and new model on the project's studies).

        ``store``: the open annotation project (None: refused). ``data`` defaults to
        ``folder`` (the opened folder). ``args``/``program`` replace the whole command
        line (tests, custom trainers). ``compare``: run the before/after step (default: when the
        command line is built here); ``baseline``: the old bundle (default ``self.baseline(args)``).
        """
        if self.running:
            self.feedback.info("A fine-tuning run is already going (Cancel stops it)")
            return None
        if store is None:
            self.feedback.error("Open an annotation project first")
            return None
        if out is None:
            out = self.output_dir() / f"finetuned-{time.strftime('%Y%m%d-%H%M%S')}.cxrbundle"
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        if compare is None:
            compare = args is None
        if args is None:
            data = data if data is not None else folder
            if data is None:
                self.feedback.error("Fine-tuning needs a training folder (NIH layout): open one, "
                                    "or set finetune/data in the settings")
                return None
            args = finetune_arguments(store, out, command=command, data=data, extra=extra)
        if compare and baseline is None:
            baseline = self.baseline(list(args))
        job = FineTuneJob(args, out, program=program, env=env, parent=self,
                          compare_store=store if compare else None, baseline=baseline,
                          compare_program=compare_program)
        self._connect(job)
        self.job = job
        self.progressChanged.emit(None, "starting…", True)
        job.start()
        self._eta_timer.start()
        self.feedback.info("Fine-tuning started in a separate process; the viewer stays usable")
        return job

    def _connect(self, job: FineTuneJob) -> None:
        """Job -> progress bar, panel and messages."""
        panel = self.panel
        panel.reset(f"Fine-tuning: {Path(job.out).name}")
        panel.set_running(True)
        panel.epochs = total_epochs(job.args, job.run_dir)  # (the job's tracker is made by job.start())
        self.show_panel()
        job.progress.connect(lambda f, t: self.progressChanged.emit(None if f < 0 else f, t, True))
        job.progress.connect(lambda f, _t: panel.set_progress(None if f < 0 else f, job.seconds_left(),
                                                             running=job.stage != "done"))
        job.records.connect(panel.add_records)
        job.stageChanged.connect(self._on_stage)
        job.bundleReady.connect(self._on_bundle_ready)
        job.compared.connect(lambda data: panel.show_comparison(data, job.bundle))
        job.compareFailed.connect(panel.show_comparison_error)
        job.failed.connect(self._on_failed)

    def _update_time_left(self) -> None:
        job = self.job
        if job is None or job.stage != "train":
            self._eta_timer.stop()
            return
        f = job.tracker.fraction
        self.panel.set_progress(f, job.seconds_left())

    def _on_stage(self, stage: str) -> None:
        texts = {"salvage": "Cancelled: writing the best epoch so far as a bundle…",
                 "compare": "Comparing the old and the new model on your annotated studies…"}
        panel = self.panel
        if stage in texts:
            panel.set_running(True, texts[stage])
            panel.set_progress(None, None, running=False)
        elif stage == "done":
            panel.set_running(False)
            panel.set_progress(1.0 if self.job is not None and self.job.bundle else 0.0, None, running=False)
            if self.job is not None and self.job.bundle:
                panel.title_label.setText(("Cancelled — best epoch kept: " if self.job.salvaged else "Done: ")
                                          + Path(self.job.bundle).name)
                panel.offer_switch(self.job.bundle)

    def start_from_settings(self, store: Path | None, folder: Path | None = None) -> None:
        """The menu entry; settings ``finetune/command`` (cia), ``finetune/data``,
        ``finetune/extra_args`` (a JSON list, e.g. ``["--backbone", "resnet18", "--epochs", "5"]``),
        ``finetune/baseline`` (the bundle the new one is compared with)."""
        st = settings.app_settings()
        try:
            extra = json.loads(str(st.value("finetune/extra_args", "[]")))
        except ValueError:
            extra = []
        data = st.value("finetune/data", "") or None
        self.start(store, folder, command=str(st.value("finetune/command", "cia")),
                   data=str(data) if data else None, extra=[str(e) for e in extra])

    def cancel(self) -> None:
        """Cancel the run (the best epoch so far is kept as a bundle when an epoch has ended)."""
        if self.running:
            self.job.cancel()  # type: ignore[union-attr]
            self.feedback.info("Cancelling fine-tuning (the best epoch so far is kept)…")

    def shutdown(self) -> None:
        """Stop a running process (cancel, then kill) and wait for it; no salvage or comparison
        starts after it."""
        job = self.job
        if job is not None and job.running:
            job.compare_store = None
            job.run_dir = None  # no salvage on the way out
            job.cancel()
            if not job.wait(job.KILL_AFTER_MS + 1000):
                job.kill()
                job.wait(2000)
        self._eta_timer.stop()

    def _on_bundle_ready(self, path: str) -> None:
        job = self.job
        salvaged = job is not None and job.salvaged
        self.progressChanged.emit(1.0, "best epoch kept" if salvaged else "new bundle ready", False)
        self.feedback.info(("Fine-tuning cancelled; the best epoch so far is kept: " if salvaged
                            else "Fine-tuned bundle ready: ") + path)
        self.bundleReady.emit(path)

    def _on_failed(self, message: str) -> None:
        self.progressChanged.emit(0.0, "cancelled" if "cancel" in message else "failed", False)
        self.panel.set_running(False, message.splitlines()[0] if message else "fine-tuning failed")
        self.feedback.error(message.splitlines()[0] if message else "fine-tuning failed")
        if "\n" in message:
            log.warning("%s", message)
