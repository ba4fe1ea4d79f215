"""The fine-tune panel: live loss and validation curves, time left, cancel, and the before/after table.

It shows what :class:`~cxrviewer.gui.finetune.FineTuneJob` reads from the trainer's structured
log (:mod:`cxrviewer.gui.finetune_log`): the loss of every logged step (faint dots, where the
step's place in its epoch is known) and of every epoch (line), the validation loss when the
trainer has one, and every scalar validation metric of the epoch records (mean AUROC,
localisation accuracy at IoU 0.3, ...). When the run ends the epoch the bundle holds is marked
("kept"). Then :meth:`FineTunePanel.show_comparison` fills the before/after table from the JSON of
``cxr-train compare`` and offers "Use the new model" (signal ``switchRequested(path)``).

Signals: ``cancelRequested()``, ``switchRequested(str bundle_path)``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QFont, QPalette
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QProgressBar, QPushButton,
                               QSizePolicy, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ..finetune_log import format_duration, number

#: pretty names of the metrics trainers log (others are shown as they are)
METRIC_NAMES = {"mean_auroc": "mean AUROC", "loc_iou_0.3": "loc. acc. IoU≥0.3", "val_loss": "val. loss"}
#: curve colours (colour-blind safe, Okabe-Ito)
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def metric_name(key: str) -> str:
    """The legend name of a logged metric."""
    return METRIC_NAMES.get(key, key.replace("_", " "))


def _fmt(v: Any) -> str:
    x = number(v)
    return "—" if x is None else f"{x:.3f}"


class FineTunePanel(QWidget):
    """See the module docstring."""

    cancelRequested = Signal()
    switchRequested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("finetune_panel")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.addLayout(self._status_column())
        self.loss_plot = self._plot("Loss")
        self.metric_plot = self._plot("Validation")
        lay.addWidget(self.loss_plot, 3)
        lay.addWidget(self.metric_plot, 3)
        lay.addLayout(self._compare_column(), 3)
        self.reset()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        """A modest height: showing results never asks the window to grow."""
        return QSize(super().sizeHint().width(), 200)

    # ---- construction ---------------------------------------------------------------------------
    def _status_column(self) -> QVBoxLayout:
        col = QVBoxLayout()
        self.title_label = _wrapping(_bold_label("No fine-tuning run yet"))
        self.epoch_label = QLabel("")
        self.speed_label = QLabel("")
        self.eta_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.cancel_btn = QPushButton("Cancel (keep the best epoch)")
        self.cancel_btn.setToolTip("Stop training; the best epoch so far is written as a bundle you can load")
        self.cancel_btn.clicked.connect(self.cancelRequested)
        for w in (self.title_label, self.epoch_label, self.speed_label, self.eta_label, self.progress,
                  self.cancel_btn):
            w.setMaximumWidth(300)
            col.addWidget(w)
        col.addStretch(1)
        return col

    def _plot(self, title: str) -> pg.PlotWidget:
        pal = self.palette()
        plot = pg.PlotWidget(background=pal.color(QPalette.ColorRole.Base))
        fg = pal.color(QPalette.ColorRole.Text)
        item = plot.getPlotItem()
        item.setTitle(title, color=fg.name(), size="10pt")
        item.showGrid(x=True, y=True, alpha=0.25)
        for side in ("left", "bottom"):
            axis = item.getAxis(side)
            axis.setPen(pg.mkPen(fg))
            axis.setTextPen(pg.mkPen(fg))
        item.setLabel("bottom", "epoch", color=fg.name())
        plot.setProperty("plot_title", title)
        plot.setMinimumSize(260, 150)
        plot.setMenuEnabled(False)
        return plot

    def _compare_column(self) -> QVBoxLayout:
        col = QVBoxLayout()
        self.compare_title = _bold_label("Before / after on your annotated studies")
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Model", "Mean AUROC", "Loc. acc."])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        hdr = self.table.horizontalHeader()
        hdr.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for i in (1, 2):
            hdr.setSectionResizeMode(i, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.compare_note = QLabel("")  # one line; the whole text in its tooltip
        self.switch_btn = QPushButton("Use the new model")
        self.switch_btn.setToolTip("Make the new bundle's model set the active one (the app loads it as any model)")
        self.switch_btn.clicked.connect(self._on_switch)
        head = QHBoxLayout()
        head.addWidget(self.compare_title, 1)
        head.addWidget(self.switch_btn)
        col.addLayout(head)
        for w in (self.table, self.compare_note):
            col.addWidget(w)
        col.addStretch(1)
        return col

    # ---- state ---------------------------------------------------------------------------------
    def reset(self, title: str = "No fine-tuning run yet") -> None:
        """Empty curves and table (a new run)."""
        self.epochs: int | None = None
        self.step_x: list[float] = []
        self.step_y: list[float] = []
        self.epoch_x: list[float] = []
        self.series: dict[str, list[float]] = {}  # "loss", "val_loss", metric keys -> y per epoch
        self._steps_per_epoch: dict[int, int] = {}
        self._curves: dict[tuple[int, str], Any] = {}
        self._legends: dict[int, list[tuple[str, str, bool]]] = {}
        self._kept_line: pg.InfiniteLine | None = None
        self.bundle: str | None = None
        self.comparison: dict[str, Any] | None = None
        for plot in (self.loss_plot, self.metric_plot):
            plot.getPlotItem().clear()
            self._set_title(plot)
        self.title_label.setText(title)
        self.epoch_label.setText("")
        self.speed_label.setText("")
        self.eta_label.setText("")
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.cancel_btn.setEnabled(False)
        self.table.setRowCount(0)
        self._fit_table()
        self._note("Scored here when training ends (hover for what)",
                   "When training ends, the old and the new model are scored on your annotated studies "
                   "(cxr-train compare): AUROC where you set labels, localisation accuracy at IoU 0.3 "
                   "against your boxes, and the fixed-box prior beside them.")
        self.switch_btn.setVisible(False)

    def set_running(self, running: bool, text: str = "") -> None:
        """Enable Cancel while a run goes; ``text`` is the title line."""
        self.cancel_btn.setEnabled(running)
        if text:
            self.title_label.setText(text)

    def set_progress(self, fraction: float | None, seconds_left: float | None, *, running: bool = True) -> None:
        """Progress bar (None: busy) and the time-left line."""
        if fraction is None:
            self.progress.setRange(0, 0 if running else 1000)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.eta_label.setText(f"Time left: {format_duration(seconds_left)}" if running else "")

    @property
    def n_points(self) -> int:
        """Points on the loss plot (steps and epochs) — what the tests count."""
        return len(self.step_x) + len(self.epoch_x)

    # ---- records -------------------------------------------------------------------------------
    def add_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Plot the trainer's log records (:mod:`cxrviewer.gui.finetune_log`)."""
        changed = False
        for rec in records:
            if isinstance(rec.get("epochs"), int):
                self.epochs = int(rec["epochs"])
            kind = rec.get("kind")
            if kind == "step":
                changed |= self._add_step(rec)
            elif kind == "epoch":
                changed |= self._add_epoch(rec)
            elif kind == "selection":
                self._mark_kept(rec)
        if changed:
            self._redraw()

    def _add_step(self, rec: Mapping[str, Any]) -> bool:
        epoch, step, loss = rec.get("epoch"), rec.get("step"), number(rec.get("loss"))
        if not isinstance(epoch, int) or not isinstance(step, int) or loss is None:
            return False
        self._steps_per_epoch[epoch] = max(self._steps_per_epoch.get(epoch, 0), step + 1)
        steps = number(rec.get("steps")) or self._steps_per_epoch.get(epoch - 1)
        self.epoch_label.setText(f"Epoch {epoch + 1}{self._of()} · step {step + 1} · loss {loss:.4f}")
        if not steps:
            return False  # its place in the epoch is unknown until an epoch has been seen
        self.step_x.append(epoch + min(1.0, (step + 1) / steps))
        self.step_y.append(loss)
        return True

    def _add_epoch(self, rec: Mapping[str, Any]) -> bool:
        epoch = rec.get("epoch")
        if not isinstance(epoch, int):
            return False
        values = {"loss": number(rec.get("loss")), "val_loss": number(rec.get("val_loss"))}
        metrics = rec.get("metrics")
        if isinstance(metrics, Mapping):
            values.update({str(k): number(v) for k, v in metrics.items() if number(v) is not None})
        n = len(self.epoch_x)
        self.epoch_x.append(float(epoch + 1))
        for key, v in values.items():
            ys = self.series.setdefault(key, [math.nan] * n)
            ys.append(math.nan if v is None else v)
        for ys in self.series.values():
            ys.extend([math.nan] * (len(self.epoch_x) - len(ys)))
        speed = number(rec.get("images_per_s"))
        self.speed_label.setText(f"{speed:.1f} images/s" if speed is not None else "")
        loss = values["loss"]
        self.epoch_label.setText(f"Epoch {epoch + 1}{self._of()} done" + (f" · loss {loss:.4f}" if loss is not None else ""))
        return True

    def _of(self) -> str:
        return f" of {self.epochs}" if self.epochs else ""

    def _curve(self, plot: pg.PlotWidget, key: str, colour: str, *, dots: bool = False, **kw: Any) -> Any:
        """The curve ``key`` of ``plot`` (made on first use, and named in the plot's title: a legend
        that never covers the curves)."""
        if (id(plot), key) not in self._curves:
            self._curves[(id(plot), key)] = plot.getPlotItem().plot(**kw)
            self._legends.setdefault(id(plot), []).append((metric_name(key), colour, dots))
            self._set_title(plot)
        return self._curves[(id(plot), key)]

    def _set_title(self, plot: pg.PlotWidget) -> None:
        fg = self.palette().color(QPalette.ColorRole.Text).name()
        entries = "&nbsp;&nbsp;".join(f'<span style="color:{c}">{"●" if dots else "━●"}</span>&nbsp;{name}'
                                      for name, c, dots in self._legends.get(id(plot), []))
        title = f"<b>{plot.property('plot_title')}</b>" + (f"&nbsp;&nbsp;&nbsp;{entries}" if entries else "")
        plot.getPlotItem().setTitle(title, color=fg, size="9pt")

    def _redraw(self) -> None:
        if self.step_x:
            self._curve(self.loss_plot, "step loss", "#7fb8d8", dots=True, pen=None, symbol="o", symbolSize=4,
                        symbolBrush=pg.mkBrush(0, 114, 178, 110), symbolPen=None).setData(self.step_x, self.step_y)
        for key in ("loss", "val_loss"):
            ys = self.series.get(key)
            if ys and any(not math.isnan(y) for y in ys):
                colour = COLOURS[0] if key == "loss" else COLOURS[1]
                name = "train loss (epoch)" if key == "loss" else key
                curve = self._curve(self.loss_plot, name, colour, pen=pg.mkPen(colour, width=2), symbol="o",
                                    symbolSize=6, symbolBrush=colour, symbolPen=None, connect="finite")
                curve.setData(self.epoch_x, ys)
        metrics = [k for k in self.series if k not in ("loss", "val_loss")]
        for i, key in enumerate(metrics):
            colour = COLOURS[(i + 2) % len(COLOURS)]
            curve = self._curve(self.metric_plot, key, colour, pen=pg.mkPen(colour, width=2), symbol="s", symbolSize=6,
                                symbolBrush=colour, symbolPen=None, connect="finite")
            curve.setData(self.epoch_x, self.series[key])
        values = [y for k in metrics for y in self.series[k] if not math.isnan(y)]
        if values and min(values) >= 0.0 and max(values) <= 1.0:
            self.metric_plot.getPlotItem().setYRange(-0.02, 1.02, padding=0.0)

    def _mark_kept(self, rec: Mapping[str, Any]) -> None:
        """A line at the epoch the bundle holds, labelled with why (best, last, stopped early)."""
        epoch = rec.get("epoch")
        if not isinstance(epoch, int):
            return
        if self._kept_line is not None:
            self.metric_plot.getPlotItem().removeItem(self._kept_line)
        reason = str(rec.get("reason") or "kept")
        self._kept_line = pg.InfiniteLine(pos=epoch + 1, angle=90, pen=pg.mkPen("#555555", style=Qt.PenStyle.DashLine),
                                          label=f"kept ({reason})", labelOpts={"position": 0.1, "color": "#333333"})
        self.metric_plot.getPlotItem().addItem(self._kept_line)

    # ---- before / after ------------------------------------------------------------------------
    def show_comparison(self, result: Mapping[str, Any], bundle: str | None = None) -> None:
        """Fill the table from ``cxr-train compare``'s JSON and offer the switch to ``bundle``."""
        self.comparison = dict(result)
        self.bundle = bundle or (result.get("new") or {}).get("path")
        rows = [("Before", result.get("old")), ("After", result.get("new")), ("Fixed-box prior", result.get("prior"))]
        rows = [(tag, r) for tag, r in rows if isinstance(r, Mapping)]
        iou = result.get("iou", 0.3)
        n_lab = max((r.get("n_labelled") or 0 for _, r in rows), default=0)
        n_box = max((r.get("n_boxed") or 0 for _, r in rows), default=0)
        self.table.setHorizontalHeaderLabels(["Model", "Mean AUROC", f"Loc. acc. IoU≥{iou}"])
        self.table.setRowCount(len(rows))
        self.table.setVisible(True)
        for row, (tag, r) in enumerate(rows):
            name = f"{tag}: {r.get('name', '')}" if tag != "Fixed-box prior" else tag
            cells = [name, _fmt(r.get("mean_auroc")), _fmt(r.get(f"loc_iou_{iou}"))]
            tips = [str(r.get("title") or r.get("path") or name), _per_class(r.get("auroc")), _per_class(r.get("loc"))]
            for col, (text, tip) in enumerate(zip(cells, tips)):
                item = QTableWidgetItem(text)
                item.setToolTip(tip or text)
                if col:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(row, col, item)
        self.table.resizeRowsToContents()
        self._fit_table()
        n = result.get("n_studies")
        self._note(f"{n} of your studies ({n_lab} labelled, {n_box} boxed); the new model trained on them",
                   f"{n} annotated studies: {n_lab} with labels, {n_box} with boxes. The new model was trained "
                   f"on them: its numbers are optimistic. {result.get('caveat', '')}")
        self.switch_btn.setVisible(bool(self.bundle))
        self.switch_btn.setEnabled(True)
        self.switch_btn.setText("Use the new model")

    def _note(self, text: str, tip: str) -> None:
        """The one line under the table (the whole story in its tooltip)."""
        self.compare_note.setText(text)
        self.compare_note.setToolTip(tip)

    def _fit_table(self) -> None:
        """As tall as its rows (no scroll bar for three rows)."""
        t = self.table
        rows = sum(t.rowHeight(r) for r in range(t.rowCount())) or 3 * t.verticalHeader().defaultSectionSize()
        t.setMinimumHeight(t.horizontalHeader().sizeHint().height() + rows + 2 * t.frameWidth() + 2)

    def show_comparison_error(self, message: str) -> None:
        """The comparison could not be made (the new bundle is still there)."""
        self.table.setRowCount(0)
        self._note(f"No before/after: {message.splitlines()[0] if message else ''}", message)

    def offer_switch(self, bundle: str) -> None:
        """Offer "Use the new model" for ``bundle`` (also without a comparison)."""
        self.bundle = bundle
        self.switch_btn.setVisible(True)
        self.switch_btn.setEnabled(True)

    def table_rows(self) -> list[list[str]]:
        """The before/after table's text, row by row (tests, the report)."""
        return [[self.table.item(r, c).text() if self.table.item(r, c) else "" for c in range(self.table.columnCount())]
                for r in range(self.table.rowCount())]

    def _on_switch(self) -> None:
        if self.bundle:
            self.switch_btn.setEnabled(False)
            self.switch_btn.setText("New model in use")
            self.switchRequested.emit(self.bundle)


def _wrapping(label: QLabel) -> QLabel:
    """``label`` with word wrap but no height-for-width: a longer text never makes the window grow."""
    label.setWordWrap(True)
    policy = label.sizePolicy()
    policy.setHeightForWidth(False)
    label.setSizePolicy(policy)
    return label


def _bold_label(text: str) -> QLabel:
    label = QLabel(text)
    font = QFont(label.font())
    font.setBold(True)
    label.setFont(font)
    return label


def _per_class(values: Any) -> str:
    """Per-class numbers as tooltip lines."""
    if not isinstance(values, Mapping) or not values:
        return ""
    return "\n".join(f"{k}: {_fmt(v)}" for k, v in values.items())
