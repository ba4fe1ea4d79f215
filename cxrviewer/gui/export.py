"""Export: the panel grid as a PNG with what it shows burned in, the findings as CSV.

The PNG is the grid as drawn on screen (``QWidget.grab``) under a caption band
(study, class, probability, models with their "untrained"/"research demo"
badges, device), painted with QPainter. The CSV has one row per class,
most probable first, written to a temporary file and renamed into place.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QColor, QFont, QImage, QPainter
from PySide6.QtWidgets import QWidget
from ..core.atomic import mkstemp_beside


def models_text(results: Any) -> str:
    """'classifier=msa-demo (untrained), segmentation=unet-jsrt (research demo)'."""
    parts = []
    for role, m in (results.models if results is not None else {}).items():
        badge = " (untrained)" if not m.get("trained", True) else (" (research demo)" if m.get("research_demo") else "")
        parts.append(f"{role}={m.get('name') or m.get('bundle') or '?'}{badge}")
    return ", ".join(parts)


def caption_lines(study_name: str, results: Any, class_index: int | None) -> list[str]:
    """The text burned into an exported PNG."""
    lines = [study_name]
    if results is not None and class_index is not None and class_index < len(results.classes):
        name = results.classes[class_index]
        p = results.probabilities
        prob = f"p = {float(p[class_index]):.3f}" if p is not None else "no probability"
        lines[0] = f"{study_name}  |  {name}  {prob}"
    if results is not None:
        lines.append(f"models: {models_text(results) or 'none'}  |  device: {results.device}")
    return lines


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def grab_with_caption(widget: QWidget, lines: list[str]) -> QImage:
    """``widget`` rendered as an image with ``lines`` of text in a band above it."""
    shot = widget.grab().toImage()
    font = QFont()
    font.setPointSize(11)
    line_h = 20
    band = 8 + line_h * len(lines)
    out = QImage(shot.width(), shot.height() + band, QImage.Format.Format_RGB32)
    out.fill(QColor(0, 0, 0))
    p = QPainter(out)
    p.setFont(font)
    p.setPen(QColor(255, 255, 170))
    for i, text in enumerate(lines):
        p.drawText(QRect(8, 4 + i * line_h, out.width() - 16, line_h),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, text)
    p.drawImage(0, band, shot)
    p.end()
    return out


def export_png(widget: QWidget, path: str | os.PathLike, lines: list[str]) -> Path:
    """Save the captioned grab of ``widget`` as PNG (atomically)."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice

    img = grab_with_caption(widget, lines)
    ba = QByteArray()
    buf = QBuffer(ba)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if not img.save(buf, "PNG"):
        raise OSError("could not encode the PNG")
    buf.close()
    return _atomic_write(Path(path), bytes(ba.data()))


def findings_csv_text(results: Any, study_name: str = "", labels: dict[str, int] | None = None) -> str:
    """CSV: study, rank, class, probability, ground-truth label, models, device."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["study", "rank", "class", "probability", "gt_label", "models", "device"])
    if results is not None and results.probabilities is not None:
        probs = np.asarray(results.probabilities, np.float64)
        models = models_text(results)
        for rank, c in enumerate(np.argsort(-probs, kind="stable"), start=1):
            name = results.classes[c]
            gt = "" if labels is None else int(bool(labels.get(name)))
            w.writerow([study_name or results.study_id, rank, name, f"{probs[c]:.6f}", gt, models, results.device])
    return out.getvalue()


def export_findings_csv(path: str | os.PathLike, results: Any, study_name: str = "",
                        labels: dict[str, int] | None = None) -> Path:
    """Write :func:`findings_csv_text` atomically (temporary file + rename)."""
    return _atomic_write(Path(path), findings_csv_text(results, study_name, labels).encode("utf-8"))
