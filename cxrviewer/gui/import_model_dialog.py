"""Models > Import model…: a checkpoint becomes a model bundle, converted by ``cxrviewer import-model``
in a child process (the GUI never imports torch).

The dialog collects the choices (checkpoint, format, architecture, classes or a label set, input
size, a name, "Allow pickle"); :func:`import_arguments` turns them into the command's arguments and
:class:`ImportJob` runs ``cxrviewer import-model …`` with :func:`~cxrviewer.gui.finetune.cxrviewer_program`
(``python -m cxrviewer`` or the frozen app itself) in a session of its own, so Cancel kills the child
and anything it started (the unpickling grandchild of ``--allow-pickle``). Each import is written as
its own model set, ``<user data>/models/NAME/NAME.cxrbundle`` (:func:`imported_models_dir`), never
into the installation. On failure the child's one-line error is shown and nothing stays written;
on success ``bundleImported(path)`` is emitted (the main window then selects that model set).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QCoreApplication, QObject, QProcess, Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

from ..core.bundle import BUNDLE_SUFFIX
from ..core.labelsets import BUILTIN
from . import settings
from .annotation_io import user_data_dir
from .finetune import child_environment, cxrviewer_program

log = logging.getLogger(__name__)

#: formats of ``cxrviewer import-model`` (the same tuple as cxrviewer.core.importers.FORMATS,
#: repeated here because that package imports torch)
FORMATS: tuple[str, ...] = ("torchxrayvision", "chexnet", "torchvision", "timm")
FORMAT_TITLES = {"torchxrayvision": "torchxrayvision (DenseNet-121 / ResNet-50)",
                 "chexnet": "CheXNet-style DenseNet-121",
                 "torchvision": "torchvision classifier (state dict)",
                 "timm": "timm classifier (state dict; timm must be installed)"}
#: architectures offered per format (the combo is editable: any torchvision/timm name works)
ARCHS: dict[str, tuple[str, ...]] = {
    "torchxrayvision": ("densenet121", "resnet50"),
    "chexnet": ("densenet121",),
    "torchvision": ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny"),
    "timm": ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "densenet121"),
}
#: label-set combo entries that are not a built-in set
LABELS_DEFAULT, LABELS_FILE = "", "\x00file"
PICKLE_WARNING = ("Loading a pickled checkpoint runs any code stored in the file, with your permissions. "
                  "Tick this only for a file from a source you trust. It is unpickled in a separate "
                  "process and only its tensors are kept.")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,79}$")


def imported_models_dir() -> Path:
    """Where imported models go: ``<user data dir>/models`` (one model-set folder per import)."""
    return user_data_dir() / "models"


def parse_classes(text: str) -> list[str]:
    """Class names from text separated by commas and/or new lines (blanks dropped)."""
    return [c.strip() for c in re.split(r"[,\n]", text) if c.strip()]


def name_problem(name: str, models_dir: str | os.PathLike | None = None) -> str:
    """Why ``name`` cannot name a new imported model ('' when it can)."""
    if not name:
        return "give the model a name"
    if not _NAME.match(name) or name.endswith("."):
        return "the name may hold letters, digits, space, '.', '_' and '-' (at most 80)"
    folder = Path(models_dir or imported_models_dir()) / name
    if folder.exists():
        return f"a model named {name!r} exists already ({folder}); choose another name"
    return ""


def bundle_target(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """``<models dir>/NAME/NAME.cxrbundle``: the bundle of an import named ``name``."""
    return Path(models_dir or imported_models_dir()) / name / f"{name}{BUNDLE_SUFFIX}"


@dataclass(frozen=True)
class ImportChoices:
    """What the dialog asks for (``label_set``: a built-in name, a file path, or '' for the default)."""

    checkpoint: str
    fmt: str
    out: str
    arch: str = ""
    classes: tuple[str, ...] = ()
    label_set: str = ""
    input_size: int = 0
    allow_pickle: bool = False


def import_arguments(c: ImportChoices) -> list[str]:
    """The ``cxrviewer`` arguments of an import: ``import-model CKPT --format F [--arch A]
    [--classes …] [--label-set L] [--input-size N] [--allow-pickle] --out OUT``.

    ``--arch`` is left out for chexnet (DenseNet-121 only); ``--input-size`` when 0 (default).
    """
    args = ["import-model", str(c.checkpoint), "--format", c.fmt]
    if c.arch.strip() and c.fmt != "chexnet":
        args += ["--arch", c.arch.strip()]
    if c.label_set:
        args += ["--label-set", str(c.label_set)]
    if c.input_size:
        args += ["--input-size", str(int(c.input_size))]
    if c.allow_pickle:
        args.append("--allow-pickle")
    args += ["--out", str(c.out)]
    if c.classes:  # last: nargs="+" then ends at the end of the line
        args += ["--classes", *c.classes]
    return args


def error_line(output: str, code: int) -> str:
    """The child's one-line error: its last ``error: …`` line, else its last line, else the exit code."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if lines:
        return lines[-1][:300]
    return f"the import stopped with exit code {code}"


class ImportJob(QObject):
    """One ``cxrviewer import-model`` child process; ``succeeded(path)`` or ``failed(message)``.

    The child runs in a new session (POSIX) so :meth:`cancel` kills it with everything it
    started. After a failure or a cancel, whatever the child left at ``target`` (a temporary
    folder beside it, the bundle, the model-set folder created for it) is removed.
    """

    succeeded = Signal(str)
    failed = Signal(str)

    def __init__(self, args: Sequence[str], target: str | os.PathLike, *, program: str | None = None,
                 env: dict[str, str] | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        prog, prefix = (program, []) if program else cxrviewer_program()
        self.program = prog
        self.arguments = [*prefix, *(str(a) for a in args)]
        self.target = Path(target)
        self._folder_existed = self.target.parent.exists()
        self._target_existed = self.target.exists()
        self.cancelled = False
        self.output = ""
        self.proc = QProcess(self)
        self.proc.setProcessEnvironment(child_environment(env))
        if os.name == "posix":
            self.proc.setUnixProcessParameters(QProcess.UnixProcessFlag.CreateNewSession)
        self.proc.finished.connect(self._on_finished)
        self.proc.errorOccurred.connect(self._on_error)

    @property
    def command_line(self) -> str:
        """The child's command line (for the log)."""
        return " ".join([self.program, *self.arguments])

    @property
    def running(self) -> bool:
        """Whether the child is starting or running."""
        return self.proc.state() != QProcess.ProcessState.NotRunning

    def start(self) -> None:
        """Start the child (``succeeded``/``failed`` follow)."""
        log.info("import model: %s", self.command_line)
        self.proc.start(self.program, self.arguments)

    def cancel(self) -> None:
        """Kill the child and its descendants at once; ``failed('import cancelled')`` follows."""
        if not self.running:
            return
        self.cancelled = True
        pid = int(self.proc.processId())
        if os.name == "posix" and pid > 0:
            try:
                os.killpg(pid, signal.SIGKILL)
                return
            except OSError:  # already gone, or not its own group
                pass
        self.proc.kill()

    def wait(self, ms: int = 30000) -> bool:
        """Block until the child ends (shutdown, tests)."""
        return self.proc.waitForFinished(ms) if self.running else True

    def _read_all(self) -> str:
        out = bytes(self.proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        err = bytes(self.proc.readAllStandardError().data()).decode("utf-8", "replace")
        self.output += out + err
        return out

    def _clean_up(self) -> None:
        """Remove what the child wrote for ``target`` (it did not exist when the job was made)."""
        folder = self.target.parent
        if folder.is_dir():
            for tmp in folder.glob(f".{self.target.name}.*"):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if not self._target_existed and self.target.exists():
            shutil.rmtree(self.target, ignore_errors=True)
        if not self._folder_existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def _on_finished(self, code: int, _status: object = None) -> None:
        out = self._read_all()
        if self.cancelled:
            self._clean_up()
            self.failed.emit("import cancelled; nothing was written")
            return
        paths = [ln.strip() for ln in out.splitlines() if ln.strip()]
        path = Path(paths[-1]) if paths else self.target
        if code == 0 and path.is_dir():
            self.succeeded.emit(str(path))
            return
        self._clean_up()
        self.failed.emit(error_line(self.output, code) if code != 0 else f"the import wrote no bundle at {path}")

    def _on_error(self, err: QProcess.ProcessError) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            self.failed.emit(f"could not start {self.program}: {self.proc.errorString()}")


class ImportModelDialog(QDialog):
    """The "Import model…" dialog (see the module docstring). ``models_dir``: where imports go."""

    bundleImported = Signal(str)

    def __init__(self, parent: QWidget | None = None, *, models_dir: str | os.PathLike | None = None,
                 program: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Import model")
        self.models_dir = Path(models_dir) if models_dir else imported_models_dir()
        self.program = program  # tests: another program than cxrviewer_program()
        self.job: ImportJob | None = None
        self.label_file = ""
        self._build()
        app = QCoreApplication.instance()
        if app is not None:  # quitting the app kills a running import too
            app.aboutToQuit.connect(self.shutdown)
        self._on_format()
        self._on_pickle(False)
        self._validate()

    # ---- construction --------------------------------------------------------------------
    def _build(self) -> None:
        self.checkpoint = QLineEdit(self)
        self.checkpoint.setPlaceholderText(".pt, .pth, .pth.tar, .bin or .safetensors")
        self.browse = QPushButton("Browse…", self)
        self.browse.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint, 1)
        row.addWidget(self.browse)
        self.fmt = QComboBox(self)
        for f in FORMATS:
            self.fmt.addItem(FORMAT_TITLES[f], f)
        self.arch = QComboBox(self)
        self.arch.setEditable(True)
        self.arch.setToolTip("Network name (torchvision or timm); any supported name can be typed")
        self.labels = QComboBox(self)
        self.labels.addItem("the format's, or guessed from the classes", LABELS_DEFAULT)
        for name, ls in BUILTIN.items():
            self.labels.addItem(f"{ls.display_name} ({len(ls)} labels)", name)
        self.labels.addItem("From file…", LABELS_FILE)
        self.classes = QPlainTextEdit(self)
        self.classes.setPlaceholderText("Class names in output order, separated by commas or new lines "
                                        "(empty: the format's labels or the label set's)")
        self.classes.setFixedHeight(self.classes.fontMetrics().lineSpacing() * 4 + 12)
        self.input_size = QSpinBox(self)
        self.input_size.setRange(0, 4096)
        self.input_size.setSpecialValueText("default")
        self.input_size.setSuffix(" px")
        self.name = QLineEdit(self)
        self.destination = QLabel(self)
        self.destination.setWordWrap(True)
        self.destination.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.pickle = QCheckBox("Allow pickle (runs code from the file)", self)
        self.pickle_warning = QLabel(PICKLE_WARNING, self)
        self.pickle_warning.setWordWrap(True)
        self.pickle_warning.setStyleSheet("color: #b3261e; font-weight: bold;")
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Checkpoint:", row)
        for text, w in (("Format:", self.fmt), ("Architecture:", self.arch), ("Label set:", self.labels),
                        ("Classes:", self.classes), ("Input size:", self.input_size), ("Name:", self.name),
                        ("", self.destination)):
            form.addRow(text, w)
        self._build_bottom(form)

    def _build_bottom(self, form: QFormLayout) -> None:
        self.busy = QProgressBar(self)
        self.busy.setRange(0, 0)  # busy indicator
        self.busy.setTextVisible(False)
        self.busy.hide()
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.buttons = QDialogButtonBox(self)
        self.import_button = self.buttons.addButton("Import", QDialogButtonBox.ButtonRole.AcceptRole)
        self.cancel_button = self.buttons.addButton(QDialogButtonBox.StandardButton.Cancel)
        self.import_button.clicked.connect(self.start_import)
        self.cancel_button.clicked.connect(self.cancel)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.pickle)
        lay.addWidget(self.pickle_warning)
        lay.addWidget(self.busy)
        lay.addWidget(self.status)
        lay.addWidget(self.buttons)
        self.setMinimumWidth(560)
        self.fmt.currentIndexChanged.connect(self._on_format)
        self.labels.activated.connect(self._on_labels)
        self.pickle.toggled.connect(self._on_pickle)
        self.checkpoint.textChanged.connect(self._on_checkpoint)
        self.checkpoint.textChanged.connect(self.checkpoint.setToolTip)
        self.name.textChanged.connect(self._validate)
        self.arch.editTextChanged.connect(self._validate)

    # ---- choices ---------------------------------------------------------------------------
    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", settings.last_dir(),
            "Checkpoints (*.pt *.pth *.tar *.bin *.ckpt *.safetensors);;All files (*)")
        if path:
            settings.set_last_dir(path)
            self.checkpoint.setText(path)

    def _on_checkpoint(self, text: str) -> None:
        """A new checkpoint proposes its stem as the name (unless the user typed one)."""
        stem = Path(text.strip()).name.split(".")[0] if text.strip() else ""
        if stem and not self.name.isModified():
            self.name.setText(re.sub(r"[^A-Za-z0-9._ -]", "_", stem)[:80])
        self._validate()

    def _on_format(self, *_args: object) -> None:
        fmt = self.fmt.currentData()
        current = self.arch.currentText()
        self.arch.clear()
        self.arch.addItems(ARCHS[fmt])
        if current in ARCHS[fmt] or (current and fmt in ("torchvision", "timm")):
            self.arch.setCurrentText(current)
        self.arch.setEnabled(fmt != "chexnet")
        self._validate()

    def _on_labels(self, _index: int) -> None:
        if self.labels.currentData() != LABELS_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Label set file", settings.last_dir(),
                                              "Label sets (*.json *.txt);;All files (*)")
        self.set_label_file(path)

    def set_label_file(self, path: str) -> None:
        """Use the label set in ``path`` ('' returns to the default)."""
        i = self.labels.findData(LABELS_FILE)
        if not path:
            self.label_file = ""
            self.labels.setCurrentIndex(0)
            return
        self.label_file = path
        self.labels.setItemText(i, f"File: {Path(path).name}")
        self.labels.setItemData(i, path, Qt.ItemDataRole.ToolTipRole)
        self.labels.setCurrentIndex(i)

    def _on_pickle(self, on: bool) -> None:
        self.pickle_warning.setVisible(bool(on))
        self._fit()

    def _fit(self) -> None:
        """Height for the shown rows at the current width (wrapped labels included), so a longer
        message or the pickle warning never squeezes the form."""
        lay = self.layout()
        lay.activate()
        h = lay.totalHeightForWidth(self.width()) if lay.hasHeightForWidth() else -1
        self.resize(self.width(), max(h, lay.totalMinimumSize().height()))

    def choices(self) -> ImportChoices:
        """The dialog's choices as an :class:`ImportChoices` (output in :attr:`models_dir`)."""
        data = self.labels.currentData()
        label_set = self.label_file if data == LABELS_FILE else str(data or "")
        return ImportChoices(checkpoint=self.checkpoint.text().strip(), fmt=str(self.fmt.currentData()),
                             out=str(bundle_target(self.name.text().strip(), self.models_dir)),
                             arch=self.arch.currentText().strip() if self.arch.isEnabled() else "",
                             classes=tuple(parse_classes(self.classes.toPlainText())), label_set=label_set,
                             input_size=self.input_size.value(), allow_pickle=self.pickle.isChecked())

    def problem(self) -> str:
        """Why the import cannot start yet ('' when it can)."""
        ckpt = self.checkpoint.text().strip()
        if not ckpt:
            return "choose a checkpoint file"
        if not Path(ckpt).is_file():
            return f"no such file: {ckpt}"
        if self.fmt.currentData() in ("torchvision", "timm") and not self.arch.currentText().strip():
            return "name the architecture"
        return name_problem(self.name.text().strip(), self.models_dir)

    def _validate(self, *_args: object) -> None:
        name = self.name.text().strip()
        self.destination.setText(f"Saved as {bundle_target(name, self.models_dir)}" if name else "")
        running = self.job is not None and self.job.running
        why = self.problem()
        self.import_button.setEnabled(not why and not running)
        self.import_button.setToolTip(why)

    # ---- running ---------------------------------------------------------------------------
    def _set_running(self, on: bool) -> None:
        self.busy.setVisible(on)
        for w in (self.checkpoint, self.browse, self.fmt, self.labels, self.classes, self.input_size,
                  self.name, self.pickle):
            w.setEnabled(not on)
        self.arch.setEnabled(not on and self.fmt.currentData() != "chexnet")
        self.cancel_button.setText("Cancel import" if on else "Cancel")
        self._validate()
        self._fit()

    def _show(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #b3261e;" if error else "")
        self.status.setText(text)
        self._fit()

    def start_import(self) -> ImportJob | None:
        """Run ``cxrviewer import-model`` with the dialog's choices; None when they are incomplete."""
        why = self.problem()
        if why or (self.job is not None and self.job.running):
            if why:
                self._show(why, error=True)
            return None
        c = self.choices()
        job = ImportJob(import_arguments(c), c.out, program=self.program, parent=self)
        job.succeeded.connect(self._on_succeeded)
        job.failed.connect(self._on_failed)
        self.job = job
        self._show("Importing in a separate process" + (" (unpickling in a child process)…"
                                                         if c.allow_pickle else "…"))
        job.start()
        self._set_running(True)
        return job

    def cancel(self) -> None:
        """Cancel a running import (kills the child), else close the dialog."""
        if self.job is not None and self.job.running:
            self._show("Cancelling…")
            self.job.cancel()
        else:
            self.reject()

    def _on_succeeded(self, path: str) -> None:
        self._set_running(False)
        self._show(f"Imported {Path(path).stem}: {path}")
        self.bundleImported.emit(path)
        self.accept()

    def _on_failed(self, message: str) -> None:
        self._set_running(False)
        if message.startswith("import cancelled"):
            self._show(message)
            return
        if "--allow-pickle" in message and not self.pickle.isChecked():
            message += ' (here: tick "Allow pickle" below)'
        self._show(f"Import failed: {message}", error=True)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        """Closing the dialog cancels a running import."""
        self.shutdown()
        super().closeEvent(event)

    def reject(self) -> None:
        """Escape / Close: cancel a running import first."""
        self.shutdown()
        super().reject()

    def shutdown(self) -> None:
        """Kill a running child and wait for it (window closing, tests)."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.job.wait(5000)
