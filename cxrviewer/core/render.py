"""Headless rendering: colour look-up tables and the ``panels.png`` figure (numpy + Pillow).

No matplotlib: the colormaps are 256-entry RGB LUTs (:data:`COLORMAPS`),
``jet`` computed analytically, the perceptual ones interpolated from anchor
colours of the published maps (close to, not bit-identical with, matplotlib's).
The GUI uses the same LUTs (e.g. ``pyqtgraph.ColorMap(np.linspace(0, 1, 256), lut)``).
Normalising a map to [0, 1] is a display choice made here, never in the data.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)


def _interp_lut(anchors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    a = np.asarray(anchors, np.float64)
    xs = np.linspace(0.0, 1.0, len(a))
    t = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(t, xs, a[:, k]) for k in range(3)], 1).round().astype(np.uint8)


def _jet() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * t - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * t - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * t - 1), 0, 1)
    return (np.stack([r, g, b], 1) * 255).round().astype(np.uint8)


#: name -> ``[256, 3]`` uint8 RGB look-up table.
COLORMAPS: dict[str, np.ndarray] = {
    "gray": np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1),
    "jet": _jet(),
    "viridis": _interp_lut([(68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142),
                            (33, 145, 140), (34, 168, 132), (68, 191, 112), (122, 209, 81),
                            (189, 223, 38), (253, 231, 37)]),
    "inferno": _interp_lut([(0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103),
                            (188, 55, 84), (221, 81, 58), (243, 120, 25), (252, 165, 10),
                            (246, 215, 70), (252, 255, 164)]),
    "hot": _interp_lut([(0, 0, 0), (230, 0, 0), (255, 210, 0), (255, 255, 255)]),
}

#: the heat maps' colour map in the viewer and in ``panels.png`` (perceptually uniform; jet stays selectable)
DEFAULT_COLORMAP = "viridis"
#: the lowest 30 % of a map's colour range fades in from transparent (the radiograph stays visible)
FADE = 0.3
#: the viewer's default heat-map opacity, also used by ``panels.png``
OPACITY = 0.45

#: RGB of the segmentation classes (left lung, right lung, heart).
SEGMENTATION_COLOURS: tuple[tuple[int, int, int], ...] = ((230, 60, 60), (60, 200, 90), (70, 120, 255))


def colormap(name: str) -> np.ndarray:
    """The ``[256, 3]`` uint8 LUT called ``name`` (KeyError lists the known ones)."""
    try:
        return COLORMAPS[name]
    except KeyError:
        raise KeyError(f"unknown colormap {name!r}; known: {', '.join(COLORMAPS)}") from None


def format_value(v: float) -> str:
    """A colour bar's end value: 3 significant digits, integers when large."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def overlay_lut(name: str, fade: float = FADE) -> np.ndarray:
    """``[256, 4]`` RGBA LUT: colour map ``name`` with an alpha ramp over its lowest ``fade``
    fraction, so low values leave the radiograph visible (the viewer and ``panels.png`` share it)."""
    rgb = colormap(name)
    ramp = np.clip(np.linspace(0.0, 1.0, 256) / max(fade, 1e-6), 0.0, 1.0) if fade > 0 else np.ones(256)
    return np.concatenate([rgb, (ramp * 255).round().astype(np.uint8)[:, None]], axis=1)


def heat_over(base01: np.ndarray, heat: np.ndarray, levels: tuple[float, float], name: str = DEFAULT_COLORMAP,
              opacity: float = OPACITY, valid: np.ndarray | None = None) -> np.ndarray:
    """``heat`` (resized to the base) drawn through :func:`overlay_lut` at ``levels`` over the grey
    base -> RGB uint8; outside ``valid`` and where the map is NaN only the base shows."""
    base = gray_rgb(base01).astype(np.float32)
    h = _fit(np.asarray(heat, np.float32), base01.shape)
    idx = np.clip(np.nan_to_num(normalise01(h, *levels)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba = overlay_lut(name)[idx].astype(np.float32)
    alpha = rgba[..., 3:] / 255.0 * opacity
    alpha[~np.isfinite(h)] = 0.0
    if valid is not None:
        alpha[~(_fit(np.asarray(valid, np.float32), base01.shape, nearest=True) > 0.5)] = 0.0
    return np.clip(base * (1 - alpha) + rgba[..., :3] * alpha + 0.5, 0, 255).astype(np.uint8)


def normalise01(a: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Min-max (or ``vmin``/``vmax``) scale to [0, 1]; a constant map gives zeros."""
    a = np.asarray(a, np.float32)
    lo = float(np.nanmin(a)) if vmin is None else float(vmin)
    hi = float(np.nanmax(a)) if vmax is None else float(vmax)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def gray_rgb(img01: np.ndarray) -> np.ndarray:
    """Grayscale [0, 1] -> ``[H, W, 3]`` uint8."""
    g = np.clip(np.asarray(img01, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, 2)


def _fit(arr: np.ndarray, shape: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize a 2-D float array (or ``[H, W, 3]`` uint8) to ``shape`` with Pillow."""
    h, w = shape
    if arr.shape[:2] == (h, w):
        return arr
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if arr.ndim == 3:
        return np.asarray(Image.fromarray(arr).resize((w, h), resample))
    return np.asarray(Image.fromarray(np.asarray(arr, np.float32), mode="F").resize((w, h), resample))


def mask_overlay(base01: np.ndarray, masks: np.ndarray,
                 colours: Sequence[tuple[int, int, int]] = SEGMENTATION_COLOURS, alpha: float = 0.4) -> np.ndarray:
    """Binary masks ``[K, h, w]`` painted in ``colours`` over a grayscale image."""
    out = gray_rgb(base01).astype(np.float32)
    for k, m in enumerate(masks):
        mk = _fit(np.asarray(m, np.float32), base01.shape, nearest=True) > 0.5
        out[mk] = out[mk] * (1 - alpha) + np.asarray(colours[k % len(colours)], np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (mask minus its 4-neighbour erosion)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2 or not m.any():
        return np.zeros(m.shape, bool)
    e = m.copy()
    e[1:, :] &= m[:-1, :]
    e[:-1, :] &= m[1:, :]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return m & ~e


def outline_rgba(mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 255)) -> np.ndarray:
    """The outline of a binary mask as an opaque RGBA overlay (transparent elsewhere)."""
    edge = outline(mask)
    out = np.zeros((*edge.shape, 4), np.uint8)
    out[edge] = (*colour, 255)
    return out


def segmentation_rgba(masks: np.ndarray) -> np.ndarray:
    """Translucent fill + opaque outline of each mask (left lung, right lung, heart colours)."""
    masks = np.asarray(masks)
    out = np.zeros((*masks.shape[1:], 4), np.uint8)
    for k in range(masks.shape[0]):
        m = masks[k].astype(bool)
        col = SEGMENTATION_COLOURS[k % len(SEGMENTATION_COLOURS)]
        out[m] = (*col, 80)
        out[outline(m)] = (*col, 255)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


#: caption colours of ``panels.png``: plain text, and a line that says the maps are below the prior
CAPTION_RGB = (235, 235, 235)
WARNING_RGB = (255, 190, 80)


#: characters Pillow's default font lacks, spelled out in ``panels.png``
_PLAIN = str.maketrans({"ψ": "psi", "≥": ">=", "≤": "<="})


def _plain(text: str) -> str:
    return text.translate(_PLAIN)


def _text_width(font: Any, text: str) -> float:
    return float(font.getlength(text)) if hasattr(font, "getlength") else 6.0 * len(text)


#: a tile's colour bar: (quantity, low, high, colour map)
Scale = tuple[str, float, float, str]
BAR_H = 14


def _draw_bar(d: ImageDraw.ImageDraw, scale: Scale, box: tuple[int, int, int, int], font: Any) -> None:
    """``quantity  low [gradient] high`` inside ``box`` (x0, y0, x1, y1)."""
    label, lo, hi, name = scale
    label = _plain(label)
    x0, y0, x1, y1 = box
    t_lo, t_hi = format_value(lo), format_value(hi)
    w_lo, w_hi = _text_width(font, t_lo) + 4, _text_width(font, t_hi) + 4
    room = x1 - x0 - w_lo - w_hi
    w_bar = int(max(16, min(room * 0.45, 120)))
    lab = label
    while lab and _text_width(font, lab) > room - w_bar - 6:
        lab = lab[:-2] + "…" if len(lab) > 2 else ""
    x = x0
    if lab:
        d.text((x, y0), lab, fill=CAPTION_RGB, font=font)
        x = int(x1 - w_hi - w_bar - w_lo)
    d.text((x, y0), t_lo, fill=CAPTION_RGB, font=font)
    x = int(x + w_lo)
    lut = colormap(name)
    for i in range(w_bar):
        d.line([(x + i, y0 + 2), (x + i, y1 - 2)], fill=tuple(int(v) for v in lut[int(i * 255 / max(w_bar - 1, 1))]))
    d.rectangle([x, y0 + 2, x + w_bar, y1 - 2], outline=(120, 120, 120))
    d.text((x + w_bar + 3, y0), t_hi, fill=CAPTION_RGB, font=font)


def _tile(rgb: np.ndarray, caption: Sequence[str], tile: int, font: Any, scale: Scale | None = None) -> Image.Image:
    """The picture scaled into a ``tile`` square, its colour bar (``scale``) under it, then its
    caption wrapped to the tile's width (a ``below the location prior`` mark in amber)."""
    from .panels import split_below_prior, wrap_caption

    h, w = rgb.shape[:2]
    s = tile / max(h, w)
    im = Image.fromarray(rgb).resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR)
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 13

    def fits(t: str) -> bool:
        return _text_width(font, t) <= tile - 8

    lines: list[tuple[str, tuple[int, int, int]]] = []
    for text in caption:
        main, mark = split_below_prior(_plain(text))
        lines += [(t, CAPTION_RGB) for t in wrap_caption(main, fits) if t]
        lines += [(t, WARNING_RGB) for t in wrap_caption(mark, fits) if mark]
    bar_h = max(BAR_H, line_h) if scale is not None else 0
    out = Image.new("RGB", (tile, tile + bar_h + line_h * len(lines) + 6), (20, 20, 20))
    out.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    d = ImageDraw.Draw(out)
    if scale is not None:
        _draw_bar(d, scale, (4, tile + 2, tile - 4, tile + bar_h), font)
    for i, (text, colour) in enumerate(lines):
        d.text((4, tile + bar_h + 3 + i * line_h), text, fill=colour, font=font)
    return out


def _tile_rgb(d: Any, ref: Any, base_small: np.ndarray, cmap: str,
              valid: np.ndarray | None) -> tuple[np.ndarray | None, Scale | None]:
    """The RGB picture of one panel's data and its colour bar (None, None: nothing to draw); a
    heat map is drawn as in the viewer (same LUT, fade and opacity), transparent outside ``valid``."""
    from .panels import scale_label

    if d.image is not None:
        lo, hi = d.image_levels
        return gray_rgb((np.asarray(d.image, np.float32) - lo) / max(hi - lo, 1e-12)), None
    if d.masks is not None:
        return mask_overlay(base_small, d.masks), None
    if d.heat is None:
        return None, None
    heat = np.asarray(d.heat, np.float32)
    fixed = ref.spec.fixed_range
    use = valid if fixed is None and valid is not None and valid.shape == heat.shape else None
    vals = heat[use] if use is not None and use.any() else heat
    finite = vals[np.isfinite(vals)]
    levels = tuple(fixed) if fixed else ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    return heat_over(base_small, heat, levels, cmap, valid=use), (scale_label(ref.key), *levels, cmap)


Tile = tuple[np.ndarray, list[str], "Scale | None"]


def panel_tiles(study: Any, results: Any, *, class_index: int | None = None,
                below: Any = None) -> list[tuple[np.ndarray, list[str]]]:
    """The (RGB image, caption lines) of every panel the results allow (see :func:`scaled_tiles`)."""
    return [(rgb, cap) for rgb, cap, _scale in scaled_tiles(study, results, class_index=class_index, below=below)]


def scaled_tiles(study: Any, results: Any, *, class_index: int | None = None, below: Any = None,
                 colormap_name: str = DEFAULT_COLORMAP, title: str | None = None) -> list[Tile]:
    """The (RGB image, caption lines, colour bar) of every panel the results allow, in the viewer's
    order (``below``: role -> classes below the location prior, see
    :func:`cxrviewer.core.panels.below_prior_by_role`; default: the results' model summaries)."""
    from .panels import panel_data, panel_list, panel_model

    base = np.asarray(study.display_image(), np.float32)
    base_small = _fit(base, results.map_shape)
    r = results
    valid = r.get("alignment", "valid")
    valid = np.asarray(valid, bool) if valid is not None else None
    tiles: list[Tile] = [(gray_rgb(base_small), ["Original", (title or study_title(study, r))[:60]], None)]
    c = class_index if class_index is not None else (r.top_classes(1) or [None])[0]
    if c is None and r.classes:
        c = 0
    for ref in panel_list():
        d = panel_data(ref.key, r, c, below)
        rgb, scale = _tile_rgb(d, ref, base_small, colormap_name, valid) if d.filled else (None, None)
        if rgb is not None:
            tiles.append((rgb, [d.caption, panel_model(ref.key, r)], scale))
    return tiles


def study_title(study: Any, results: Any) -> str:
    """The file name of the study's source (the results' study id when it has none)."""
    src = getattr(getattr(study, "meta", None), "source_path", "") or ""
    return Path(src).name or str(results.study_id)


def render_panels(study: Any, results: Any, *, class_index: int | None = None, tile: int = 256,
                  columns: int = 4, below: Any = None, colormap_name: str = DEFAULT_COLORMAP,
                  title: str | None = None) -> Image.Image:
    """Side-by-side figure of every available panel, each map with its colour bar (quantity and
    raw range), class, probability and model burned in; the header names ``title`` (default: the
    study's file name); a rejected alignment is said in the header, in red (``below``: see
    :func:`panel_tiles`)."""
    from .panels import alignment_note, wrap_caption

    title = title or study_title(study, results)
    font = _font(max(10, tile // 20))
    tiles = [_tile(rgb, cap, tile, font, scale) for rgb, cap, scale in
             scaled_tiles(study, results, class_index=class_index, below=below, colormap_name=colormap_name,
                          title=title)]
    cols = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    th = max(t.height for t in tiles)
    line = int(getattr(font, "size", 11) * 1.3) + 2
    models = ", ".join(f"{role}={m.get('name', '?')}" + ("" if m.get("trained", True) else " (untrained)")
                       for role, m in results.models.items())
    width = cols * (tile + 4) + 4
    text = f"{title} | {results.device} | {models}"

    def fits(t: str) -> bool:
        return _text_width(font, t) <= width - 12

    lines = [(t, (255, 255, 160)) for t in wrap_caption(text, fits)[:4]]  # between words, never mid-word
    note = alignment_note(results)
    if note is not None and note[1]:
        lines += [(t, (255, 110, 90)) for t in wrap_caption(note[0], fits)]
    header = line * len(lines) + 6
    fig = Image.new("RGB", (width, header + rows * (th + 4) + 4), (0, 0, 0))
    d = ImageDraw.Draw(fig)
    for i, (t, colour) in enumerate(lines):
        d.text((6, 3 + i * line), t, fill=colour, font=font)
    for i, t in enumerate(tiles):
        fig.paste(t, (4 + (i % cols) * (tile + 4), header + (i // cols) * (th + 4)))
    return fig


def save_panels(study: Any, results: Any, path: str | Path, *, compress_level: int = 1, **kw: Any) -> Path:
    """Render :func:`render_panels` to a PNG file. ``compress_level`` 1 (zlib's fastest)
    encodes about 3-4x faster than PIL's default 6 for a file about 20 % larger."""
    p = Path(path)
    render_panels(study, results, **kw).save(p, format="PNG", compress_level=compress_level)
    return p
