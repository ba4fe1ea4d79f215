""""Fine-tune on my annotations": ``cxr-train`` in a separate process, with progress and cancel.

Training runs in its own process (:class:`QProcess`), never in the GUI process:
torch gets its own cores and memory, a crash cannot take the viewer down, and
the app stays usable meanwhile. Progress is parsed from the trainer's output
(``training.trainers.loop.Progress`` lines ``epoch 2/5 [####    ] 12/40 loss …``);
the bundle path from its last JSON line (``{"bundle": "…"}``) or ``--out``.

Signals of :class:`FineTuneJob`: ``progress(float fraction, str text)`` (fraction -1
while unknown), ``output(str line)``, ``bundleReady(str path)`` when the process
succeeded and the bundle exists, ``failed(str message)`` (also after
:meth:`FineTuneJob.cancel`), ``finished(int exit_code)``.

:class:`FineTuneController` is a window's one run: it builds the command line from the
annotation project and the settings, reports progress and outcome, and stops the process
when the window closes; connect its ``bundleReady`` to the model picker.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from . import settings
from .annotation_feedback import AnnotationFeedback
from .annotation_io import user_data_dir

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


class FineTuneJob(QObject):
    """One training process (see the module docstring)."""

    progress = Signal(float, str)
    output = Signal(str)
    bundleReady = Signal(str)
    failed = Signal(str)
    finished = Signal(int)

    KILL_AFTER_MS = 5000

    def __init__(self, args: Sequence[str], out: str | os.PathLike, *,
                 program: str | None = None, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        prog, prefix = (program, []) if program else train_program()
        self.program = prog
        self.arguments = list(prefix) + [str(a) for a in args]
        self.out = str(out)
        self.bundle: str | None = None
        self.fraction: float = -1.0
        self.lines: list[str] = []
        self.cancelled = False
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

    @property
    def command_line(self) -> str:
        return " ".join([self.program, *self.arguments])

    def start(self) -> None:
        log.info("fine-tune: %s", self.command_line)
        self.progress.emit(-1.0, "starting…")
        self.proc.start(self.program, self.arguments)

    @property
    def running(self) -> bool:
        return self.proc.state() != QProcess.ProcessState.NotRunning

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM), kill it after :attr:`KILL_AFTER_MS`."""
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

    # ---- process output ---------------------------------------------------------
    def _read(self) -> None:
        data = bytes(self.proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        self._buf += data.replace("\r", "\n")
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        self.lines.append(line)
        del self.lines[:-500]
        self.output.emit(line)
        b = parse_bundle(line)
        if b:
            self.bundle = b
        f = parse_progress(line)
        if f is not None:
            self.fraction = f
            self.progress.emit(f, line[-120:])

    def _on_finished(self, code: int, _status=None) -> None:
        self._kill_timer.stop()
        if self._buf:
            self._line(self._buf)
            self._buf = ""
        if self.cancelled:
            self.failed.emit("fine-tuning cancelled")
        elif code != 0:
            tail = "\n".join(self.lines[-8:])
            self.failed.emit(f"fine-tuning failed (exit code {code}):\n{tail}")
        else:
            path = self.bundle or self.out
            if Path(path).exists():
                self.bundle = path
                self.progress.emit(1.0, "done")
                self.bundleReady.emit(path)
            else:
                self.failed.emit(f"training ended but wrote no bundle at {path}")
        self.finished.emit(int(code))

    def _on_error(self, err) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            self.failed.emit(f"could not start {self.program}: {self.proc.errorString()}")
            self.finished.emit(-1)


class FineTuneController(QObject):
    """"Fine-tune on my annotations" of one window: at most one :class:`FineTuneJob` at a time.

    Signals: ``progressChanged(fraction or None, text, running)`` for a progress bar,
    ``bundleReady(str path)`` when the new bundle exists. Messages go to ``feedback``.
    """

    progressChanged = Signal(object, str, bool)
    bundleReady = Signal(str)

    def __init__(self, feedback: AnnotationFeedback, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.feedback = feedback
        self.job: FineTuneJob | None = None

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    @staticmethod
    def output_dir() -> Path:
        """Where new bundles go: a model-set folder of their own (``<data dir>/finetuned``)."""
        return user_data_dir() / "finetuned"

    def start(self, store: Path | None, folder: Path | None = None, *,
              out: str | os.PathLike | None = None, command: str = "cia",
              data: str | os.PathLike | None = None, extra: Sequence[str] = (),
              program: str | None = None, args: Sequence[str] | None = None,
              env: dict[str, str] | None = None) -> FineTuneJob | None:
        """Run ``cxr-train <command> --data DIR --annotations STORE --out OUT …`` in its own process.

        ``store``: the open annotation project (None: refused). ``data`` defaults to
        ``folder`` (the opened folder). ``args``/``program`` replace the whole command
        line (tests, custom trainers).
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
        if args is None:
            data = data if data is not None else folder
            if data is None:
                self.feedback.error("Fine-tuning needs a training folder (NIH layout): open one, "
                                    "or set finetune/data in the settings")
                return None
            args = finetune_arguments(store, out, command=command, data=data, extra=extra)
        job = FineTuneJob(args, out, program=program, env=env, parent=self)
        job.progress.connect(lambda f, t: self.progressChanged.emit(None if f < 0 else f, t, True))
        job.bundleReady.connect(self._on_bundle_ready)
        job.failed.connect(self._on_failed)
        self.job = job
        self.progressChanged.emit(None, "starting…", True)
        job.start()
        self.feedback.info("Fine-tuning started in a separate process; the viewer stays usable")
        return job

    def start_from_settings(self, store: Path | None, folder: Path | None = None) -> None:
        """The menu entry; settings ``finetune/command`` (cia), ``finetune/data``,
        ``finetune/extra_args`` (a JSON list, e.g. ``["--backbone", "resnet18", "--epochs", "5"]``)."""
        st = settings.app_settings()
        try:
            extra = json.loads(str(st.value("finetune/extra_args", "[]")))
        except ValueError:
            extra = []
        data = st.value("finetune/data", "") or None
        self.start(store, folder, command=str(st.value("finetune/command", "cia")),
                   data=str(data) if data else None, extra=[str(e) for e in extra])

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()  # type: ignore[union-attr]
            self.feedback.info("Cancelling fine-tuning…")

    def shutdown(self) -> None:
        """Stop a running process (cancel, then kill) and wait for it."""
        job = self.job
        if job is not None and job.running:
            job.cancel()
            if not job.wait(job.KILL_AFTER_MS + 1000):
                job.kill()
                job.wait(2000)

    def _on_bundle_ready(self, path: str) -> None:
        self.progressChanged.emit(1.0, "new bundle ready", False)
        self.feedback.info(f"Fine-tuned bundle ready: {path}")
        self.bundleReady.emit(path)

    def _on_failed(self, message: str) -> None:
        self.progressChanged.emit(0.0, "cancelled" if "cancel" in message else "failed", False)
        self.feedback.error(message.splitlines()[0] if message else "fine-tuning failed")
        if "\n" in message:
            log.warning("%s", message)
