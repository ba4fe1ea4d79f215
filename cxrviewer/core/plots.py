"""Small line charts drawn with Pillow (no matplotlib): axes, ticks, grid, labels, legend, a
dashed reference line, and a grid of charts in one PNG.

Used by ``cxr-train evaluate`` for its ROC, precision-recall and reliability diagrams
(training/evaluate.py); core code, so no Qt and no training imports. Charts are drawn at
:data:`SUPERSAMPLE` times their size and reduced, which anti-aliases lines and text.

    img = line_chart([Series("model", fpr, tpr)], title="Atelectasis", xlabel="False positive rate",
                     ylabel="True positive rate", reference=((0, 0), (1, 1)))
    save_png(img, "roc.png")
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "Series", "chart_grid", "line_chart", "save_png", "ticks"]

#: drawing scale (the chart is drawn this many times larger, then reduced)
SUPERSAMPLE = 2
#: series colours (the tab10/tab20 family), used in order when a series has none
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213))
GRID, AXIS, TEXT, REFERENCE = (228, 228, 228), (40, 40, 40), (20, 20, 20), (150, 150, 150)
Point = tuple[float, float]


@dataclass(frozen=True)
class Series:
    """One line: ``xs``/``ys`` (None breaks the line), its legend ``name`` (empty: not in the
    legend), colour (default: the next of :data:`PALETTE`), dashed or not, markers at the points;
    ``steps``: drawn as a step function that rises (or falls) first, then runs flat to the next
    point (a precision-recall curve whose area is the average precision)."""

    name: str
    xs: Sequence[float | None]
    ys: Sequence[float | None]
    color: tuple[int, int, int] | None = None
    dashed: bool = False
    markers: bool = False
    width: float = 2.0
    steps: bool = False


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font at ``size`` pixels (Pillow >= 10.1 with FreeType); else its
    fixed bitmap font (smaller, still legible)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: no size argument
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return int(r - l), int(b - t)


def ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 10) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _tick_text(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{v:.{decimals}f}"


def _segments(s: Series, to_px) -> list[list[Point]]:
    """The series as pixel polylines, broken at None / non-finite values."""
    out: list[list[Point]] = [[]]
    for x, y in zip(s.xs, s.ys):
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            out.append([])
        else:
            if s.steps and out[-1]:
                out[-1].append((out[-1][-1][0], to_px(x, y)[1]))
            out[-1].append(to_px(x, y))
    return [seg for seg in out if seg]


def _dashed(draw: ImageDraw.ImageDraw, pts: Sequence[Point], color, width: int, dash: float) -> None:
    """A polyline drawn as dashes of ``dash`` pixels (gaps as long)."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg:
            step = min(left, seg - pos)
            if on:
                a, b = pos / seg, (pos + step) / seg
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=color, width=width)
            pos += step
            left -= step
            if left <= 1e-9:
                on, left = not on, dash


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` (split at spaces; a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_size(draw, f"{lines[-1]} {word}", font)[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels and the data ranges it shows."""

    left: int
    top: int
    right: int
    bottom: int
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def __call__(self, x: float, y: float) -> Point:
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        fx = min(max((x - x0) / (x1 - x0), 0.0), 1.0)
        fy = min(max((y - y0) / (y1 - y0), 0.0), 1.0)
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _axes(img: Image.Image, draw: ImageDraw.ImageDraw, fr: _Frame, xlabel: str, ylabel: str, font, k: int) -> None:
    """Grid lines, frame, ticks with labels, and the axis titles (the y title rotated)."""
    xt, yt = ticks(*fr.xlim), ticks(*fr.ylim)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in xt:
        px = fr(v, fr.ylim[0])[0]
        draw.line([(px, fr.top), (px, fr.bottom)], fill=GRID, width=k)
        draw.line([(px, fr.bottom), (px, fr.bottom + 4 * k)], fill=AXIS, width=k)
        text = _tick_text(v, xstep)
        w, _ = _text_size(draw, text, font)
        draw.text((px - w / 2, fr.bottom + 6 * k), text, fill=TEXT, font=font)
    for v in yt:
        py = fr(fr.xlim[0], v)[1]
        draw.line([(fr.left, py), (fr.right, py)], fill=GRID, width=k)
        draw.line([(fr.left - 4 * k, py), (fr.left, py)], fill=AXIS, width=k)
        text = _tick_text(v, ystep)
        w, h = _text_size(draw, text, font)
        draw.text((fr.left - 7 * k - w, py - h / 2 - draw.textbbox((0, 0), text, font=font)[1]), text,
                  fill=TEXT, font=font)
    draw.rectangle([fr.left, fr.top, fr.right, fr.bottom], outline=AXIS, width=k)
    tick_h = _text_size(draw, "0.8", font)[1]
    if xlabel:
        w, _ = _text_size(draw, xlabel, font)
        draw.text(((fr.left + fr.right - w) / 2, fr.bottom + 10 * k + tick_h), xlabel, fill=TEXT, font=font)
    if ylabel:
        w, h = _text_size(draw, ylabel, font)
        label = Image.new("RGB", (w + 4 * k, h + 6 * k), "white")
        ImageDraw.Draw(label).text((2 * k, 0), ylabel, fill=TEXT, font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (3 * k, int((fr.top + fr.bottom - label.height) / 2)))


def _legend(draw: ImageDraw.ImageDraw, series: Sequence[tuple[Series, tuple]], fr: _Frame, where: str,
            font, k: int) -> None:
    """A boxed legend in a corner of the plot area ("lower right", "upper left", ...)."""
    named = [(s, c) for s, c in series if s.name]
    if not named or not where:
        return
    sizes = [_text_size(draw, s.name, font) for s, _ in named]
    line_h = max(h for _, h in sizes) + 6 * k
    sample = 22 * k
    w = sample + 6 * k + max(w for w, _ in sizes) + 12 * k
    h = line_h * len(named) + 6 * k
    x0 = fr.right - w - 6 * k if "right" in where else fr.left + 6 * k
    y0 = fr.bottom - h - 6 * k if "lower" in where else fr.top + 6 * k
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill="white", outline=(170, 170, 170), width=k)
    for i, (s, colour) in enumerate(named):
        cy = y0 + 3 * k + line_h * i + line_h / 2
        pts = [(x0 + 6 * k, cy), (x0 + 6 * k + sample, cy)]
        if s.dashed:
            _dashed(draw, pts, colour, max(1, int(s.width * k)), 4 * k)
        else:
            draw.line(pts, fill=colour, width=max(1, int(s.width * k)))
        top = draw.textbbox((0, 0), s.name, font=font)[1]
        draw.text((x0 + 12 * k + sample, cy - sizes[i][1] / 2 - top), s.name, fill=TEXT, font=font)


def line_chart(series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
               xlim: tuple[float, float] = (0.0, 1.0), ylim: tuple[float, float] = (0.0, 1.0),
               reference: tuple[Point, Point] | None = None, reference_name: str = "",
               size: tuple[int, int] = (480, 400), legend: str = "lower right", font_size: int = 13,
               min_left: int = 0) -> Image.Image:
    """A line chart of ``series`` (RGB, ``size`` pixels): title (wrapped), axis titles, round
    ticks with a light grid, an optional dashed grey ``reference`` line from one data point to
    another (e.g. the ROC diagonal ``((0, 0), (1, 1))``, named ``reference_name`` in the legend),
    and a legend in the ``legend`` corner of the plot ("" for none). ``min_left``: the least
    left margin in pixels (charts stacked with one x axis line up their plot areas)."""
    k = SUPERSAMPLE
    W, H = size[0] * k, size[1] * k
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font, title_font = _font(font_size * k), _font((font_size + 1) * k)
    title_lines = _wrap(draw, title, title_font, W - 16 * k) if title else []
    title_h = sum(_text_size(draw, t, title_font)[1] + 5 * k for t in title_lines)
    text_h = _text_size(draw, "0.8", font)[1]
    tick_w = max(_text_size(draw, _tick_text(v, 0.1), font)[0] for v in ticks(*ylim))
    left = max(3 * k + (text_h + 8 * k if ylabel else 0) + tick_w + 8 * k, min_left * k)
    bottom = H - (8 * k + text_h + (text_h + 8 * k if xlabel else 0) + 6 * k)
    fr = _Frame(int(left), int(8 * k + title_h), int(W - 14 * k), int(bottom), xlim, ylim)
    y = 6 * k
    for t in title_lines:
        w, h = _text_size(draw, t, title_font)
        draw.text(((W - w) / 2, y - draw.textbbox((0, 0), t, font=title_font)[1]), t, fill=TEXT, font=title_font)
        y += h + 5 * k
    _axes(img, draw, fr, xlabel, ylabel, font, k)
    drawn: list[tuple[Series, tuple]] = []
    if reference is not None:
        ref = Series(reference_name, [reference[0][0], reference[1][0]], [reference[0][1], reference[1][1]],
                     REFERENCE, dashed=True, width=1.5)
        _dashed(draw, [fr(*reference[0]), fr(*reference[1])], REFERENCE, max(1, int(1.5 * k)), 5 * k)
        drawn.append((ref, REFERENCE))
    for i, s in enumerate(series):
        colour = s.color or PALETTE[i % len(PALETTE)]
        width = max(1, int(s.width * k))
        for seg in _segments(s, fr):
            if s.dashed:
                _dashed(draw, seg, colour, width, 5 * k)
            elif len(seg) > 1:
                draw.line(seg, fill=colour, width=width, joint="curve")
            if s.markers or len(seg) == 1:
                r = 3 * k
                for px, py in seg:
                    draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        drawn.append((s, colour))
    _legend(draw, drawn[1:] + drawn[:1] if reference is not None else drawn, fr, legend, font, k)
    return img.resize(size, Image.Resampling.LANCZOS)


def chart_grid(charts: Sequence[Image.Image], cols: int, *, title: str = "", font_size: int = 16) -> Image.Image:
    """The ``charts`` in a grid of ``cols`` columns (cells as wide as the widest chart, each row as
    high as its highest) under an optional title line."""
    if not charts:
        raise ValueError("no charts to arrange")
    cols = max(1, min(cols, len(charts)))
    w = max(c.width for c in charts)
    heights = [max(c.height for c in charts[i:i + cols]) for i in range(0, len(charts), cols)]
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, title, font, cols * w - 20) if title else []
    head = sum(_text_size(probe, t, font)[1] + 8 for t in lines) + (10 if lines else 0)
    out = Image.new("RGB", (cols * w, sum(heights) + head), "white")
    draw = ImageDraw.Draw(out)
    y = 8
    for t in lines:
        tw, th = _text_size(draw, t, font)
        draw.text(((cols * w - tw) / 2, y - draw.textbbox((0, 0), t, font=font)[1]), t, fill=TEXT, font=font)
        y += th + 8
    for i, c in enumerate(charts):
        out.paste(c.convert("RGB"), ((i % cols) * w, head + sum(heights[:i // cols])))
    return out


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG at ``path`` (a temporary file beside it, then renamed into place)."""
    from .atomic import mkstemp_beside

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
