"""Synthetic frontal chest radiograph phantoms written as an NIH ChestX-ray14 folder.

The phantoms give the localisation benchmark exact ground truth: every finding has its
box (and mask), every image its random affine (for the alignment module, disease-masks
Eq. 6-9 / CIA-Net's ``A = [[s cos t, -s sin t, t_x], [s sin t, s cos t, t_y]]``) and its
anatomy boxes and masks (lungs, heart: lung-heart-feature-weighting Eq. 3).

How an image is made
--------------------
Anatomy is drawn in an upright *canonical* frame (x, y in [0, 1], the image's left is the
patient's right as in a PA radiograph) as a projected density ``D`` (soft tissue adds,
lung air subtracts, bone adds); film response ``I = 1 - exp(-k D)`` turns it into a
brightness. The canonical image is then warped by the random affine into the written
image (one bilinear resampling), detector noise and vignetting are added, and the image
is windowed to 8 bits. Masks are warped with the same map (nearest neighbour), so every
box is the axis-aligned bound of the transformed lesion.

Orientation conventions (recorded in ``phantom_truth.json`` too):

* ``left_lung`` / ``right_lung`` are the *patient's* lungs: the right lung lies on the
  image's left, the heart apex and the stomach bubble on the image's right.
* ``affine.matrix`` maps pixel coordinates (pixel edges at integers) of the upright chest
  rendered at the written size to pixel coordinates of the written image:
  ``[x', y'] = M[:, :2] @ [x, y] + M[:, 2]``; ``rotation_deg > 0`` turns the chest
  counter-clockwise on screen, ``shift_x/shift_y`` are fractions of the width/height.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cxrviewer.core.classes import BOXED_CLASSES, CLASSES, NO_FINDING, canonical
from cxrviewer.core.errors import CxrError
from cxrviewer.core.geometry import Box

log = logging.getLogger(__name__)

#: Header of NIH's ``Data_Entry_2017_v2020.csv`` (copied field by field).
DATA_ENTRY_HEADER: tuple[str, ...] = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]",
)
#: Header of NIH's ``BBox_List_2017.csv`` (three empty trailing fields, as released).
BBOX_HEADER: tuple[str, ...] = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", "")
#: Spellings the NIH box list uses where they differ from :data:`CLASSES`.
NIH_BOX_LABEL: dict[str, str] = {"Infiltration": "Infiltrate"}
#: Field of view of a phantom in millimetres (sets the pixel spacing column).
FIELD_OF_VIEW_MM = 350.0
TRUTH_FILE = "phantom_truth.json"
#: One integer: the pixel frame of the boxes (read by ``cxrviewer.core.io.nih``).
BOX_FRAME_FILE = "box_frame.txt"
ANATOMY_MASKS: tuple[str, ...] = ("left_lung", "right_lung", "heart")

_DEFAULT_WEIGHTS = {c: (1.5 if c in BOXED_CLASSES else 1.0) for c in CLASSES}


@dataclass(frozen=True)
class PhantomConfig:
    """Knobs of the generator (all dimensionless).

    ``contrast`` multiplies every lesion's density (0.3 makes nodules barely visible);
    ``lesion_scale`` multiplies lesion sizes; ``affine_*`` bound the random pose
    (rotation in degrees, scale as ``1 +- affine_scale``, shift as a fraction of the size).
    """

    contrast: float = 1.0
    lesion_scale: float = 1.0
    normal_fraction: float = 0.3
    max_findings: int = 3
    affine_rotation: float = 8.0
    affine_scale: float = 0.08
    affine_shift: float = 0.05
    noise: float = 1.0
    box_fraction: float = 1.0
    max_render: int = 512
    class_weights: tuple[tuple[str, float], ...] = tuple(_DEFAULT_WEIGHTS.items())

    def validate(self) -> "PhantomConfig":
        """Return self, or raise :class:`CxrError` naming the bad knob."""
        checks = [
            (self.contrast >= 0, "contrast must be >= 0"),
            (self.lesion_scale > 0, "lesion-scale must be > 0"),
            (0 <= self.normal_fraction <= 1, "normal-fraction must be in [0, 1]"),
            (self.max_findings >= 1, "max-findings must be >= 1"),
            (0 <= self.affine_rotation <= 45, "affine-rotation must be in [0, 45] degrees"),
            (0 <= self.affine_scale < 0.5, "affine-scale must be in [0, 0.5)"),
            (0 <= self.affine_shift <= 0.25, "affine-shift must be in [0, 0.25]"),
            (self.noise >= 0, "noise must be >= 0"),
            (0 <= self.box_fraction <= 1, "box-fraction must be in [0, 1]"),
            (self.max_render >= 64, "max-render must be >= 64"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CxrError(f"invalid phantom setting: {msg}")
        for name, w in self.class_weights:
            canonical(name)
            if w < 0:
                raise CxrError(f"invalid phantom setting: weight of {name} is negative")
        return self


@dataclass(frozen=True)
class Affine:
    """Pose of the chest in the written image (conventions in the module docstring).

    About the image centre, ``rotation_deg > 0`` turns the chest counter-clockwise on
    screen and ``scale`` multiplies its size; ``shift_x``/``shift_y`` then move it by
    fractions of the width/height. :meth:`matrix` is the resulting pixel map.
    """

    rotation_deg: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    def matrix(self, size: int) -> np.ndarray:
        """2x3 forward map, upright-chest pixels -> written-image pixels, at ``size``."""
        t = math.radians(self.rotation_deg)
        c, s = math.cos(t), math.sin(t)
        lin = self.scale * np.array([[c, s], [-s, c]])
        ctr = np.array([size / 2.0, size / 2.0])
        off = ctr - lin @ ctr + size * np.array([self.shift_x, self.shift_y])
        return np.concatenate([lin, off[:, None]], axis=1)

    def to_dict(self, size: int) -> dict:
        d = {k: round(float(v), 6) for k, v in asdict(self).items()}
        d["matrix"] = [[round(float(v), 6) for v in row] for row in self.matrix(size)]
        return d


@dataclass(frozen=True)
class Anatomy:
    """One patient's body shape (normalised canonical units; see module docstring)."""

    apex_y: float = 0.09
    base_y: float = 0.855
    lung_lat: float = 0.405
    lung_med: float = 0.03
    dome_r: float = 0.685
    dome_l: float = 0.71
    dome_dd: float = 0.19
    dome_k: float = 2.5
    heart_dx: float = 0.045
    heart_y: float = 0.64
    heart_a: float = 0.17
    heart_b: float = 0.12
    heart_angle: float = 28.0
    med_w: float = 0.055
    body_w: float = 0.48
    rib_y0: float = 0.06
    rib_sp: float = 0.068
    clav_y: float = 0.16
    air: float = 0.81
    tissue: float = 1.25
    female: bool = False
    age: int = 50
    vessel_seed: int = 0

    @staticmethod
    def sample(rng: np.random.Generator) -> "Anatomy":
        """A random plausible patient."""
        u = rng.uniform
        dome_r = u(0.66, 0.71)
        apex = u(0.07, 0.11)
        return Anatomy(
            apex_y=apex, base_y=u(0.83, 0.88), lung_lat=u(0.39, 0.42),
            lung_med=u(0.02, 0.04), dome_r=dome_r, dome_l=dome_r + u(0.015, 0.04),
            dome_dd=u(0.17, 0.22), dome_k=u(2.0, 3.0), heart_dx=u(0.035, 0.055),
            heart_y=u(0.62, 0.66), heart_a=u(0.16, 0.185), heart_b=u(0.115, 0.13),
            heart_angle=u(22, 34), med_w=u(0.05, 0.062), body_w=u(0.46, 0.5),
            rib_y0=apex - u(0.02, 0.04), rib_sp=u(0.064, 0.072), clav_y=u(0.14, 0.18),
            air=u(0.76, 0.86), tissue=u(1.15, 1.35), female=bool(rng.random() < 0.45),
            age=int(rng.integers(18, 86)), vessel_seed=int(rng.integers(0, 2**31 - 1)),
        )


@dataclass
class Finding:
    """One synthetic finding: label, output-space box (``None`` if empty) and mask."""

    label: str
    box: Box | None
    mask: np.ndarray | None
    nih_box: bool
    params: dict = field(default_factory=dict)


@dataclass
class PhantomSample:
    """A generated phantom. ``boxes`` holds the NIH-style boxes (boxed classes only);
    ``findings`` every finding with its region; ``anatomy`` maps heart/left_lung/right_lung
    to boxes plus ``ctr`` (cardiothoracic ratio); ``masks`` are boolean output-size arrays."""

    image: np.ndarray
    labels: tuple[str, ...]
    boxes: list[Box]
    affine: Affine
    anatomy: dict
    masks: dict[str, np.ndarray]
    findings: list[Finding] = field(default_factory=list)
    patient: Anatomy | None = None


# ---------------------------------------------------------------------------
# small numerical helpers
# ---------------------------------------------------------------------------
def _ss(z: np.ndarray | float) -> np.ndarray:
    """Smoothstep of ``z`` clipped to [0, 1]."""
    t = np.maximum(z, 0.0)
    np.minimum(t, 1.0, out=t)
    r = t * t
    t *= -2.0
    t += 3.0
    r *= t
    return r


def _inside(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``signed > 0`` with a transition ``width`` wide."""
    return _ss(signed * (1.0 / width) + 0.5)


class _Grid:
    """Canonical sampling grid: ``res`` pixels per unit, ``margin`` units around [0, 1]."""

    def __init__(self, res: int, margin: float) -> None:
        self.res = res
        self.m = margin
        self.n = int(math.ceil(res * (1 + 2 * margin)))
        c = (-margin + (np.arange(self.n, dtype=np.float32) + 0.5) / res).astype(np.float32)
        self.c = c
        self.x = c[None, :]
        self.y = c[:, None]

    def idx(self, v: float) -> int:
        return int(np.clip(math.floor((v + self.m) * self.res), 0, self.n))

    def win(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        return slice(self.idx(y0), self.idx(y1) + 1), slice(self.idx(x0), self.idx(x1) + 1)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a ``cells``-grid of normals resized bicubically."""
    h, w = shape
    small = rng.standard_normal((max(2, cells), max(2, cells))).astype(np.float32)
    im = Image.fromarray(small, mode="F").resize((max(1, w), max(1, h)), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)


# ---------------------------------------------------------------------------
# anatomy
# ---------------------------------------------------------------------------
@dataclass
class _Mods:
    """How the findings change the anatomy before it is drawn."""

    heart_scale: tuple[float, float] = (1.0, 1.0)
    dome_shift: dict = field(default_factory=lambda: {-1: 0.0, 1: 0.0})
    dome_flat: float = 1.0
    lung_shrink: dict = field(default_factory=lambda: {-1: 0.0, 1: 0.0})
    air: float = 1.0
    vessels: float = 1.0


def _dome_y(an: Anatomy, side: int, dd: np.ndarray, mods: _Mods) -> np.ndarray:
    """Diaphragm dome height at distance ``dd`` from the midline (right dome higher)."""
    peak = (an.dome_r if side < 0 else an.dome_l) + mods.dome_shift[side]
    k = an.dome_k * mods.dome_flat
    return peak + k * (dd - an.dome_dd) ** 2 + 3.0 * k * np.maximum(dd - an.lung_lat + 0.1, 0) ** 2


def _lung_field(g: _Grid, an: Anatomy, side: int, mods: _Mods, shrink: float = 0.0,
                heart: np.ndarray | None = None) -> np.ndarray:
    """Soft mask of one lung (``side`` -1 = patient's right, image left).

    ``shrink`` pulls the apex down and the lateral border in (pneumothorax, thickening).
    """
    out = np.zeros((g.n, g.n), dtype=np.float32)
    x0, x1 = (0.5, 0.5 + an.lung_lat + 0.04) if side > 0 else (0.5 - an.lung_lat - 0.04, 0.5)
    rs, cs = g.win(x0, x1, an.apex_y - 0.03, an.base_y + 0.15)
    dd = side * (g.x[:, cs] - 0.5)                             # (1, w)
    y = g.y[rs]                                                # (h, 1)
    top = an.apex_y + shrink
    t = np.clip((y - an.apex_y) / (an.base_y - an.apex_y), 0, 1)
    lat = an.lung_lat * (0.86 + 0.14 * np.sqrt(t)) - shrink * (1 - 0.6 * t)
    med = an.lung_med
    cx = (lat + med) / 2
    a = (lat - med) / 2
    b = (an.base_y + 0.05 - top) / 2
    yc = top + b
    u = (dd - cx) / a
    v = (y - yc) / b
    u2 = u * u
    tt = np.clip((v + 1) * 0.5, 0, 1)
    f = (1 - tt) * u2 + tt * u2 * u2 + v * v
    lung = _inside(1.0 - f, 0.12)
    # medial border: superior mediastinum (aortic knob on the patient's left)
    mw = an.med_w + 0.035 * _ss((y - 0.25) / 0.25)
    if side > 0:
        mw = mw + 0.03 * np.exp(-((y - 0.30) / 0.035) ** 2)
    lung = lung * _inside(dd - mw, 0.012)
    lung = lung * _inside(_dome_y(an, side, dd, mods) - y, 0.008)
    if heart is not None:
        lung = lung * (1.0 - heart[rs, cs])
    out[rs, cs] = lung
    return out


def _heart_field(g: _Grid, an: Anatomy, mods: _Mods) -> np.ndarray:
    """Soft heart silhouette: a tilted ellipse, apex down and to the image's right."""
    sa, sb = mods.heart_scale
    cx = 0.5 + an.heart_dx * (1 + 1.6 * (sa - 1))
    cy = an.heart_y + 0.03 * (sb - 1)
    t = math.radians(an.heart_angle)
    c, s = math.cos(t), math.sin(t)
    dx = g.x - cx
    dy = g.y - cy
    u = (dx * c + dy * s) / (an.heart_a * sa)
    v = (-dx * s + dy * c) / (an.heart_b * sb)
    h = _inside(1.0 - (u * u + v * v), 0.2)
    # the heart rests on the diaphragm: nothing of it below the domes
    floor = np.where(g.x < 0.5, an.dome_r, an.dome_l) + 0.02
    h = h * _inside(floor + mods.dome_shift[1] - g.y, 0.01)
    return h.astype(np.float32)


def _body(g: _Grid, an: Anatomy) -> np.ndarray:
    """Soft-tissue density: neck, shoulders, chest wall, arms, with rounded thickness profiles."""
    ky = np.array([-0.5, -0.08, -0.03, 0.0, 0.03, 0.07, 0.12, 0.25, 0.70, 1.5], dtype=np.float32)
    kw = np.array([0.09, 0.10, 0.15, 0.22, 0.33, 0.45, an.body_w + 0.05, an.body_w + 0.01,
                   an.body_w - 0.01, an.body_w - 0.02], dtype=np.float32)
    bw = np.interp(g.c, ky, kw).astype(np.float32)[:, None]
    ax = np.abs(g.x - 0.5)
    r = np.clip(ax / bw, 0, 1)
    thick = np.sqrt(1.0 - r * r)
    torso = an.tissue * (0.3 + 0.7 * thick) * _inside(bw - ax, 0.01)
    return torso.astype(np.float32)


def _ribs(g: _Grid, an: Anatomy, out: np.ndarray, below: np.ndarray, lung: np.ndarray,
          rng: np.random.Generator) -> None:
    """Posterior ribs (curved, bright cortex) and faint anterior ribs, both sides at once;
    fainter where they overlie the abdomen."""
    wall = an.lung_lat + 0.035
    rs, cs = g.win(0.5 - wall - 0.05, 0.5 + wall + 0.05, an.rib_y0 - 0.08, an.base_y + 0.15)
    ax = np.abs(g.x[:, cs] - 0.5)
    y = g.y[rs]
    # posterior ribs: rise a little from the spine then curve down along the lateral wall
    f = 1.5 * (ax - 0.14) ** 2 + 4.0 * np.maximum(ax - 0.30, 0) ** 2
    k = (y - f - an.rib_y0) * (1.0 / an.rib_sp)
    k = k / (1.0 + 0.03 * np.maximum(k, 0))  # spacing grows slowly downward
    frac = k - np.floor(k)
    w = 0.46
    band = _ss(frac * (1 / 0.07)) * _ss((w - frac) * (1 / 0.07))
    e = (frac - w / 2) * (2 / w)
    e *= e
    e *= 0.45
    e += 0.55
    band *= e
    band *= _inside(k + 0.3, 0.3) * _inside(11.0 - k, 0.5)
    # each rib a little different in density
    per_rib = (0.8 + 0.4 * rng.random(16)).astype(np.float32)
    band *= per_rib[np.clip(np.floor(k), 0, 15).astype(np.int8)]
    band *= 0.17 * (_inside(wall - ax, 0.03) * _inside(ax - 0.045, 0.02))
    # anterior ribs: from the lateral wall down and medially, fading to cartilage
    ka = (y - 0.45 * (wall - ax) - an.rib_y0 - 0.06) * (1.0 / (an.rib_sp * 1.15))
    fa = ka - np.floor(ka)
    banda = _ss(fa * (1 / 0.08)) * _ss((0.32 - fa) * (1 / 0.08))
    banda *= _inside(ka + 0.2, 0.2) * _inside(6.5 - ka, 0.5)
    banda *= 0.05 * (_ss((ax - 0.13) * (1 / 0.08)) * _inside(wall - ax, 0.02))
    band += banda
    band *= (1.0 - 0.6 * below[rs, cs]) * (0.45 + 0.55 * lung[rs, cs])
    out[rs, cs] += band


def _clavicles(g: _Grid, an: Anatomy, out: np.ndarray) -> None:
    rs, _ = g.win(0, 1, -0.1, 0.34)
    y = g.y[rs]
    ax = np.abs(g.x - 0.5)
    yc = an.clav_y - 0.28 * (ax - 0.05) + 0.45 * (ax - 0.2) ** 2 + 2.5 * np.maximum(ax - 0.3, 0) ** 2
    half = 0.02 - 0.005 * np.clip((ax - 0.05) / 0.3, 0, 1)
    e = (y - yc) / half
    band = _ss(1.2 - np.abs(e) * 1.2 + 0.1)
    prof = band * (0.6 + 0.4 * np.clip(e * e, 0, 1))
    ext = _inside(ax - 0.05, 0.015) * _inside(0.39 - ax, 0.05)
    out[rs] += 0.45 * prof * ext


def _spine(g: _Grid, an: Anatomy, out: np.ndarray) -> None:
    """Vertebral column with bodies, disc spaces, pedicles and spinous processes."""
    rs, cs = g.win(0.43, 0.57, -1, 2)
    x = g.x[:, cs] - 0.5
    y = g.y[rs]
    sw = 0.026 + 0.012 * np.clip(y, 0, 1)
    col = _inside(sw - np.abs(x), 0.006)
    r = np.clip(np.abs(x) / sw, 0, 1)
    pv = 0.042 + 0.012 * np.clip(y, 0, 1)
    ph = (y + 0.02) / pv
    fr = ph - np.floor(ph)
    disc = _ss((fr - 0.0) / 0.08) * _ss((1.0 - fr) / 0.08)
    body = col * (0.75 + 0.25 * np.sqrt(1 - r * r)) * (0.6 + 0.4 * disc)
    # pedicles: small oval rings at both sides of each body
    py = (fr - 0.38) / 0.17
    px = (np.abs(x) - 0.72 * sw) / (0.2 * sw)
    pr = px * px + py * py
    ped = _ss((1.2 - pr) / 0.6)
    spin = _ss((1.0 - ((x / (0.12 * sw)) ** 2 + ((fr - 0.7) / 0.2) ** 2)) / 0.5)
    fade = 1.0 - 0.5 * _ss((y - an.dome_r - 0.03) / 0.08)
    out[rs, cs] += (0.16 * body + 0.07 * ped * col + 0.06 * spin * col) * fade


def _draw_canvas(g: _Grid, lines: list, blur: float) -> np.ndarray:
    """Draw polylines ``(points, width, value)`` (normalised units) on an 8-bit canvas."""
    im = Image.new("L", (g.n, g.n), 0)
    dr = ImageDraw.Draw(im)
    for pts, width, val in lines:
        xy = [((px + g.m) * g.res, (py + g.m) * g.res) for px, py in pts]
        dr.line(xy, fill=int(min(255, max(1, val * 255))), width=max(1, int(round(width * g.res))))
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur * g.res))
    return np.asarray(im, dtype=np.float32) * (1.0 / 255.0)


def _hila(an: Anatomy) -> dict[int, tuple[float, float]]:
    return {-1: (0.5 - 0.105, an.apex_y + 0.31), 1: (0.5 + 0.095, an.apex_y + 0.29)}


class _Stream:
    """Pre-drawn uniforms consumed one by one (cheap scalar randoms for the vessel trees)."""

    def __init__(self, rng: np.random.Generator, n: int = 8192) -> None:
        self.u = rng.random(n).tolist()
        self.z = rng.standard_normal(n).tolist()
        self.i = 0

    def random(self) -> float:
        self.i += 1
        return self.u[self.i % len(self.u)]

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def normal(self, mu: float, sd: float) -> float:
        self.i += 1
        return mu + sd * self.z[self.i % len(self.z)]


def _vessel_lines(an: Anatomy, rng: np.random.Generator, scale: float, res: int) -> list:
    """Pulmonary vessel trees from each hilum (upper, middle, lower trunks); each
    generation is thinner and fainter, so markings fade toward the periphery."""
    lines: list = []
    rng = _Stream(rng)
    # stop branching once vessels would be thinner than about a pixel
    max_depth = int(np.clip(math.log(1.0 / (0.011 * scale * res)) / math.log(0.72), 2, 5))
    for side, (hx, hy) in _hila(an).items():
        for phi, ln in ((-75, 0.09), (-35, 0.07), (5, 0.07), (40, 0.08), (75, 0.1)):
            x0 = hx + rng.normal(0, 0.008)
            y0 = hy + rng.normal(0, 0.015) + 0.02 * (phi / 75)
            _branch(lines, rng, side, x0, y0, math.radians(phi + rng.normal(0, 8)),
                    ln * rng.uniform(0.85, 1.15), 0.011 * scale, 0, max_depth)
    return lines


def _branch(lines: list, rng: "_Stream", side: int, x: float, y: float, phi: float,
            length: float, width: float, depth: int, max_depth: int) -> None:
    steps = 3
    pts = [(x, y)]
    for _ in range(steps):
        phi += rng.normal(0, 0.09)
        x += side * math.cos(phi) * length / steps
        y += math.sin(phi) * length / steps
        pts.append((x, y))
    lines.append((pts, width, min(1.0, 0.25 + 50 * width)))
    if depth < max_depth:
        n_child = 2 if depth < 2 or rng.random() < 0.75 else 1
        for j in range(n_child):
            sgn = (-1) ** j if n_child == 2 else (1 if rng.random() < 0.5 else -1)
            _branch(lines, rng, side, x, y, phi + sgn * rng.uniform(0.25, 0.6),
                    length * rng.uniform(0.62, 0.8), width * 0.72, depth + 1, max_depth)


# ---------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------
@dataclass
class _Lesion:
    label: str
    rs: slice
    cs: slice
    mask: np.ndarray  # bool, canonical, shape of the window
    params: dict


class _Ctx:
    """Everything a finding painter needs (canonical frame)."""

    def __init__(self, g: _Grid, an: Anatomy, mods: _Mods, rng: np.random.Generator,
                 cfg: PhantomConfig, lungs: dict[int, np.ndarray], heart: np.ndarray,
                 dens: np.ndarray, vessels: np.ndarray) -> None:
        self.g, self.an, self.mods, self.rng, self.cfg = g, an, mods, rng, cfg
        self.lungs, self.heart, self.dens, self.vessels = lungs, heart, dens, vessels
        self.k = cfg.contrast
        self.s = cfg.lesion_scale

    def lung_at(self, side: int, x: float, y: float) -> float:
        g = self.g
        return float(self.lungs[side][min(g.idx(y), g.n - 1), min(g.idx(x), g.n - 1)])

    def point_in_lung(self, side: int, r: float,
                      zone: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
        """A random point at least about ``r`` inside the lung, in a vertical zone (0 = apex)."""
        an, rng = self.an, self.rng
        best = (0.5 + side * 0.22, 0.5 * (an.apex_y + an.dome_r))
        for _ in range(60):
            t = rng.uniform(*zone)
            y = an.apex_y + t * (an.base_y - an.apex_y)
            x = 0.5 + side * rng.uniform(0.06, an.lung_lat)
            pts = [(x, y), (x + r, y), (x - r, y), (x, y + r), (x, y - r)]
            if all(self.lung_at(side, px, py) > 0.6 for px, py in pts):
                return x, y
        return best

    def window(self, cx: float, cy: float, rx: float, ry: float | None = None):
        ry = rx if ry is None else ry
        rs, cs = self.g.win(cx - rx, cx + rx, cy - ry, cy + ry)
        return rs, cs, self.g.x[:, cs], self.g.y[rs]


def _blob(ctx: _Ctx, label: str, side: int, r: float, dens: float, lobes: float,
          zone: tuple[float, float], sphere: bool) -> _Lesion:
    rng = ctx.rng
    cx, cy = ctx.point_in_lung(side, r * 0.8, zone)
    rs, cs, x, y = ctx.window(cx, cy, r * 1.5)
    dx, dy = x - cx, y - cy
    rr = np.sqrt(dx * dx + dy * dy)
    th = np.arctan2(dy, dx)
    rad = r * (1 + lobes * (np.sin(3 * th + rng.uniform(0, 6.3)) * 0.6
                            + np.sin(5 * th + rng.uniform(0, 6.3)) * 0.4))
    q = np.clip(rr / rad, 0, 1.5)
    inside = _inside(1.0 - q, 0.12 if sphere else 0.25)
    prof = np.sqrt(np.clip(1 - np.minimum(q, 1) ** 2, 0, 1)) if sphere else 1.0
    ctx.dens[rs, cs] += ctx.k * dens * inside * (0.35 + 0.65 * prof)
    return _Lesion(label, rs, cs, inside > 0.5, {"side": _side_name(side), "center": [cx, cy],
                                                 "radius": r})


def _side_name(side: int) -> str:
    return "right" if side < 0 else "left"


def _nodule(ctx: _Ctx, side: int) -> _Lesion:
    r = ctx.rng.uniform(0.011, 0.02) * ctx.s
    return _blob(ctx, "Nodule", side, r, 0.42, 0.03, (0.1, 0.85), True)


def _mass(ctx: _Ctx, side: int) -> _Lesion:
    r = ctx.rng.uniform(0.035, 0.06) * ctx.s
    return _blob(ctx, "Mass", side, r, 0.42, 0.12, (0.15, 0.75), True)


def _patch(ctx: _Ctx, label: str, side: int, r: float, dens: float, zone: tuple[float, float],
           thresh: float, cells: int, bronchograms: bool, rough: float = 0.5) -> _Lesion:
    """Ill-defined opacity: smooth noise thresholded inside a soft envelope, clipped to lung."""
    rng = ctx.rng
    cx, cy = ctx.point_in_lung(side, r * 0.6, zone)
    rs, cs, x, y = ctx.window(cx, cy, r * 1.6)
    h, w = rs.stop - rs.start, cs.stop - cs.start
    dx, dy = (x - cx) / r, (y - cy) / (r * 0.85)
    env = np.exp(-(dx * dx + dy * dy) * 1.2)
    nz = _smooth_noise(rng, (h, w), cells)
    rr = np.sqrt(dx * dx + dy * dy)
    op = _ss((env + rough * nz - thresh) / 0.5 + 0.5) * _ss((1.5 - rr) / 0.4) * ctx.lungs[side][rs, cs]
    add = ctx.k * dens * op
    if bronchograms:
        gl = ctx.g
        lines = []
        hx, hy = _hila(ctx.an)[side]
        for _ in range(3):
            ang = math.atan2(cy - hy, side * (cx - hx)) + rng.normal(0, 0.35)
            l0 = rng.uniform(0.3, 0.6) * r
            pts = [(cx - side * math.cos(ang) * l0, cy - math.sin(ang) * l0),
                   (cx + side * math.cos(ang) * l0, cy + math.sin(ang) * l0)]
            lines.append((pts, 0.006, 1.0))
        can = _draw_canvas(gl, lines, 0.004)[rs, cs]
        add = add - ctx.k * 0.35 * dens * can * op
    ctx.dens[rs, cs] += add
    return _Lesion(label, rs, cs, op > 0.5, {"side": _side_name(side), "center": [cx, cy],
                                            "radius": r})


def _infiltration(ctx: _Ctx, side: int) -> _Lesion:
    r = ctx.rng.uniform(0.06, 0.1) * ctx.s
    return _patch(ctx, "Infiltration", side, r, 0.30, (0.25, 0.85), 0.5, 7, False, 0.6)


def _pneumonia(ctx: _Ctx, side: int) -> _Lesion:
    r = ctx.rng.uniform(0.07, 0.11) * ctx.s
    return _patch(ctx, "Pneumonia", side, r, 0.45, (0.35, 0.85), 0.4, 5, ctx.rng.random() < 0.6, 0.75)


def _consolidation(ctx: _Ctx, side: int) -> _Lesion:
    r = ctx.rng.uniform(0.05, 0.08) * ctx.s
    return _patch(ctx, "Consolidation", side, r, 0.45, (0.3, 0.9), 0.3, 3, False)


def _effusion(ctx: _Ctx, side: int) -> _Lesion:
    """Fluid in the dependent pleural space: meniscus rising laterally, angle blunted."""
    an, g, rng = ctx.an, ctx.g, ctx.rng
    peak = (an.dome_r if side < 0 else an.dome_l) + ctx.mods.dome_shift[side]
    hgt = rng.uniform(0.0, 0.09) * ctx.s
    rise = rng.uniform(0.04, 0.08) * ctx.s
    rs, cs = g.win(0.5 - 0.5 * (side < 0), 0.5 + 0.5 * (side > 0), peak - hgt - rise - 0.03, 1.0)
    x, y = g.x[:, cs], g.y[rs]
    dd = side * (x - 0.5)
    top = peak - hgt - rise * np.clip((dd - 0.1) / (an.lung_lat - 0.1), 0, 1) ** 1.5
    fl = _inside(y - top, 0.02) * ctx.lungs[side][rs, cs]
    ctx.dens[rs, cs] += ctx.k * 0.55 * fl * (0.6 + 0.4 * _ss((y - top) / 0.06))
    return _Lesion("Effusion", rs, cs, fl > 0.5, {"side": _side_name(side), "height": hgt})


def _atelectasis(ctx: _Ctx, side: int) -> _Lesion:
    """Plate-like (discoid) band or wedge toward the hilum; volume loss lifts the dome."""
    rng, an = ctx.rng, ctx.an
    if rng.random() < 0.6:
        a = rng.uniform(0.05, 0.09) * ctx.s
        b = rng.uniform(0.008, 0.016) * ctx.s
        cx, cy = ctx.point_in_lung(side, b * 2, (0.55, 0.85))
        ang = math.radians(rng.uniform(-18, 18))
        rs, cs, x, y = ctx.window(cx, cy, a * 1.2, a * 0.6 + b * 2)
        c, s = math.cos(ang), math.sin(ang)
        u = ((x - cx) * c + (y - cy) * s) / a
        v = (-(x - cx) * s + (y - cy) * c) / b
        op = _inside(1 - (u * u + v * v), 0.3) * ctx.lungs[side][rs, cs]
        form = "plate"
    else:
        hx, hy = _hila(an)[side]
        cx, cy = ctx.point_in_lung(side, 0.03, (0.6, 0.85))
        ang0 = math.atan2(cy - hy, cx - hx)
        half = math.radians(rng.uniform(9, 15))
        r0 = 0.4 * math.hypot(cx - hx, cy - hy)
        ext = 0.2
        rs, cs, x, y = ctx.window(cx, cy, ext, ext)
        dx, dy = x - hx, y - hy
        ang = np.arctan2(dy, dx) - ang0
        ang = (ang + np.pi) % (2 * np.pi) - np.pi
        op = _inside(half - np.abs(ang), 0.05) * _inside(np.sqrt(dx * dx + dy * dy) - r0, 0.02) \
            * ctx.lungs[side][rs, cs]
        form = "wedge"
    ctx.dens[rs, cs] += ctx.k * 0.5 * op
    return _Lesion("Atelectasis", rs, cs, op > 0.5, {"side": _side_name(side), "form": form,
                                                    "center": [cx, cy]})


def _pneumothorax(ctx: _Ctx, side: int) -> _Lesion:
    """Apical/lateral lucent rim without vessels and a thin visible pleural line."""
    g = ctx.g
    shrink = ctx.mods.lung_shrink[side]
    coll = _lung_field(g, ctx.an, side, ctx.mods, shrink=shrink, heart=ctx.heart)
    full = ctx.lungs[side]
    rim = np.clip(full - coll, 0, 1)
    edge = 4.0 * coll * (1.0 - coll) * full
    ctx.dens -= ctx.k * (0.12 * rim - 0.28 * edge)
    # no vessel markings beyond the pleural line
    ctx.dens -= ctx.vessels * rim
    ys, xs = np.nonzero(rim > 0.5)
    rs = slice(int(ys.min()), int(ys.max()) + 1) if ys.size else slice(0, 1)
    cs = slice(int(xs.min()), int(xs.max()) + 1) if xs.size else slice(0, 1)
    return _Lesion("Pneumothorax", rs, cs, rim[rs, cs] > 0.5, {"side": _side_name(side),
                                                              "gap": shrink})


def _pleural_thickening(ctx: _Ctx, side: int) -> _Lesion:
    g = ctx.g
    thick = ctx.rng.uniform(0.01, 0.02) * ctx.s
    coll = _lung_field(g, ctx.an, side, ctx.mods, shrink=thick, heart=ctx.heart)
    rim = np.clip(ctx.lungs[side] - coll, 0, 1)
    upper = _inside(ctx.an.apex_y + 0.35 - g.y, 0.08)
    rim = rim * upper
    ctx.dens += ctx.k * 0.55 * rim
    ys, xs = np.nonzero(rim > 0.5)
    rs = slice(int(ys.min()), int(ys.max()) + 1) if ys.size else slice(0, 1)
    cs = slice(int(xs.min()), int(xs.max()) + 1) if xs.size else slice(0, 1)
    return _Lesion("Pleural_Thickening", rs, cs, rim[rs, cs] > 0.5, {"side": _side_name(side)})


def _edema(ctx: _Ctx, side: int) -> _Lesion:
    """Bilateral perihilar ('bat-wing') haze."""
    g, an = ctx.g, ctx.an
    rs, cs = g.win(0.05, 0.95, an.apex_y, an.base_y)
    x, y = g.x[:, cs], g.y[rs]
    haze = np.zeros((rs.stop - rs.start, cs.stop - cs.start), np.float32)
    for sd, (hx, hy) in _hila(an).items():
        h = np.exp(-(((x - hx) / 0.13) ** 2 + ((y - hy - 0.03) / 0.17) ** 2))
        haze += h * ctx.lungs[sd][rs, cs]
    haze = haze * (0.85 + 0.3 * _smooth_noise(ctx.rng, haze.shape, 10) * 0.3)
    ctx.dens[rs, cs] += ctx.k * 0.32 * haze
    return _Lesion("Edema", rs, cs, haze > 0.5, {"side": "both"})


def _emphysema(ctx: _Ctx, side: int) -> _Lesion:
    lungs = np.maximum(ctx.lungs[-1], ctx.lungs[1])
    ys, xs = np.nonzero(lungs > 0.5)
    rs, cs = slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)
    return _Lesion("Emphysema", rs, cs, lungs[rs, cs] > 0.5, {"side": "both"})


def _fibrosis(ctx: _Ctx, side: int) -> _Lesion:
    """Reticular lines, peripheral and basal."""
    g, an = ctx.g, ctx.an
    rs, cs = g.win(0.05, 0.95, an.apex_y, an.base_y + 0.05)
    x, y = g.x[:, cs], g.y[rs]
    h, w = rs.stop - rs.start, cs.stop - cs.start
    nz = _smooth_noise(ctx.rng, (h, w), max(8, int(w / max(2.0, g.res * 0.012))))
    ridge = np.exp(-(nz / 0.25) ** 2)
    lung = np.maximum(ctx.lungs[-1][rs, cs], ctx.lungs[1][rs, cs])
    per = _ss((np.abs(x - 0.5) - 0.17) / 0.15) * _ss((y - an.apex_y - 0.15) / 0.3)
    op = ridge * per * lung
    ctx.dens[rs, cs] += ctx.k * 0.22 * op
    region = (per * lung) > 0.5
    return _Lesion("Fibrosis", rs, cs, region, {"side": "both"})


def _hernia(ctx: _Ctx, side: int) -> _Lesion:
    """Retrocardiac hiatal hernia: a rounded soft-tissue mass with an air bubble and level."""
    rng, an = ctx.rng, ctx.an
    cx = 0.5 + rng.uniform(0.01, 0.06)
    cy = an.dome_l + ctx.mods.dome_shift[1] - rng.uniform(0.04, 0.07)
    a = rng.uniform(0.045, 0.065) * ctx.s
    b = rng.uniform(0.035, 0.05) * ctx.s
    rs, cs, x, y = ctx.window(cx, cy, a * 1.4, b * 1.4)
    q = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    wall = _inside(1 - q, 0.15)
    air = _inside(0.7 - q, 0.15) * _inside(cy + 0.3 * b - y, 0.004)
    ctx.dens[rs, cs] += ctx.k * (0.15 * wall - 0.45 * air)
    return _Lesion("Hernia", rs, cs, wall > 0.5, {"center": [cx, cy]})


def _cardiomegaly(ctx: _Ctx, side: int) -> _Lesion:
    h = ctx.heart
    ys, xs = np.nonzero(h > 0.5)
    rs, cs = slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)
    return _Lesion("Cardiomegaly", rs, cs, h[rs, cs] > 0.5, {"heart_scale": list(ctx.mods.heart_scale)})


_PAINTERS = {
    "Atelectasis": _atelectasis, "Cardiomegaly": _cardiomegaly, "Effusion": _effusion,
    "Infiltration": _infiltration, "Mass": _mass, "Nodule": _nodule, "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax, "Consolidation": _consolidation, "Edema": _edema,
    "Emphysema": _emphysema, "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}
# painters run in this order: diffuse changes first, focal lesions over them
_ORDER = ("Emphysema", "Cardiomegaly", "Edema", "Fibrosis", "Pleural_Thickening", "Pneumothorax",
          "Effusion", "Atelectasis", "Infiltration", "Consolidation", "Pneumonia", "Mass",
          "Nodule", "Hernia")


def _modifiers(labels: list[str], sides: dict[str, int], rng: np.random.Generator,
               cfg: PhantomConfig) -> _Mods:
    m = _Mods()
    if "Cardiomegaly" in labels:
        m.heart_scale = (rng.uniform(1.3, 1.5), rng.uniform(1.08, 1.2))
    if "Emphysema" in labels:
        m.dome_shift = {-1: 0.06, 1: 0.05}
        m.dome_flat = 0.35
        m.air = 1.15
        m.vessels = 0.55
        if "Cardiomegaly" not in labels:
            m.heart_scale = (0.88, 0.95)
    if "Atelectasis" in labels:
        m.dome_shift[sides["Atelectasis"]] -= rng.uniform(0.015, 0.03)
    if "Fibrosis" in labels:
        m.dome_shift = {k: v - 0.015 for k, v in m.dome_shift.items()}
    if "Pneumothorax" in labels:
        m.lung_shrink[sides["Pneumothorax"]] = rng.uniform(0.025, 0.06) * cfg.lesion_scale
    return m


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------
def sample_labels(rng: np.random.Generator, config: PhantomConfig) -> list[str]:
    """Random finding labels for one image ([] = "No Finding")."""
    if rng.random() < config.normal_fraction:
        return []
    names = [canonical(n) for n, _ in config.class_weights]
    w = np.array([max(0.0, float(v)) for _, v in config.class_weights])
    if w.sum() <= 0:
        return []
    k = 1
    while k < min(config.max_findings, len(names)) and rng.random() < 0.35:
        k += 1
    k = min(k, int((w > 0).sum()))
    pick = rng.choice(len(names), size=k, replace=False, p=w / w.sum())
    return sorted({names[i] for i in pick})


def sample_affine(rng: np.random.Generator, config: PhantomConfig) -> Affine:
    """A random pose within the configured bounds."""
    return Affine(
        rotation_deg=float(rng.uniform(-1, 1) * config.affine_rotation),
        scale=float(1.0 + rng.uniform(-1, 1) * config.affine_scale),
        shift_x=float(rng.uniform(-1, 1) * config.affine_shift),
        shift_y=float(rng.uniform(-1, 1) * config.affine_shift),
    )


def _inverse_coeffs(aff: Affine, size: int, g: _Grid) -> tuple[float, ...]:
    """PIL affine coefficients: output pixel coords -> canonical-grid pixel coords."""
    mat = aff.matrix(size)
    lin, off = mat[:, :2], mat[:, 2]
    inv = np.linalg.inv(lin)
    # canonical px at written size q_s = inv (o - off); grid px = (q_s / size + m) * res
    k = g.res / size
    a = inv * k
    b = -(inv @ off) * k + g.m * g.res
    return (a[0, 0], a[0, 1], b[0], a[1, 0], a[1, 1], b[1])


def _margin(aff: Affine, size: int) -> float:
    """How far beyond [0, 1] the written image reaches into the canonical frame."""
    mat = aff.matrix(size)
    inv = np.linalg.inv(mat[:, :2])
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=float)
    q = (inv @ (corners - mat[:, 2]).T).T / size
    over = max(0.0, float(np.max(-q)), float(np.max(q - 1)))
    return min(0.35, over + 0.01)


def _warp_mask(mask: np.ndarray, rs: slice, cs: slice, coeffs: tuple[float, ...],
               size: int) -> np.ndarray:
    """Nearest-neighbour warp of a canonical window mask into a full output-size mask."""
    out = np.zeros((size, size), dtype=bool)
    if not mask.any():
        return out
    a, b, c, d, e, f = coeffs
    fwd = np.linalg.inv(np.array([[a, b], [d, e]]))
    off = np.array([c, f])
    ys, xs = rs.start, cs.start
    h, w = mask.shape
    corners = np.array([[xs, ys], [xs + w, ys], [xs, ys + h], [xs + w, ys + h]], dtype=float)
    o = (fwd @ (corners - off).T).T
    x0 = max(0, int(math.floor(o[:, 0].min())) - 1)
    x1 = min(size, int(math.ceil(o[:, 0].max())) + 1)
    y0 = max(0, int(math.floor(o[:, 1].min())) - 1)
    y1 = min(size, int(math.ceil(o[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return out
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    data = (a, b, a * x0 + b * y0 + c - xs, d, e, d * x0 + e * y0 + f - ys)
    win = im.transform((x1 - x0, y1 - y0), Image.AFFINE, data, resample=Image.NEAREST, fillcolor=0)
    out[y0:y1, x0:x1] = np.asarray(win, dtype=np.uint8) > 0
    return out


def _mask_box(label: str, mask: np.ndarray) -> Box | None:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return Box(label, float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1))


def _finalise(intensity: np.ndarray, rng: np.random.Generator, cfg: PhantomConfig,
              size: int) -> np.ndarray:
    """Detector noise, vignetting and an 8-bit window with gamma (after the warp)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    v = rng.uniform(0.24, 0.5)
    img = intensity * (1.0 - v * c * c)[:, None]
    img *= (1.0 - v * c * c)[None, :]
    if cfg.noise > 0:
        grain = rng.standard_normal((size, size), dtype=np.float32)
        amp = cfg.noise * (256.0 / max(size, 256)) ** 0.5
        sigma = img * (0.014 * amp)
        sigma += 0.006 * amp
        grain *= sigma
        img += grain
    lo = rng.uniform(0.0, 0.04)
    hi = rng.uniform(0.92, 1.0)
    gamma = rng.uniform(0.9, 1.1)
    lut = (np.clip(np.linspace(0, 1, 2048) ** gamma, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    img -= lo
    img *= 2047.0 / (hi - lo)
    np.clip(img, 0, 2047, out=img)
    return lut[img.astype(np.int16)]


def _organs(g: _Grid, an: Anatomy, mods: _Mods, labs: list[str]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Heart and lung fields; with Cardiomegaly the heart grows until the canonical CTR is above 0.53."""
    heart = _heart_field(g, an, mods)
    lungs = {s: _lung_field(g, an, s, mods, heart=heart) for s in (-1, 1)}
    for _ in range(4):  # cardiomegaly means a cardiothoracic ratio above 0.5: make sure of it
        ctr = _canonical_ctr(heart, lungs)
        if "Cardiomegaly" not in labs or ctr >= 0.53:
            break
        mods.heart_scale = (mods.heart_scale[0] * 0.55 / max(ctr, 0.1), mods.heart_scale[1] * 1.03)
        heart = _heart_field(g, an, mods)
        lungs = {s: _lung_field(g, an, s, mods, heart=heart) for s in (-1, 1)}
    return heart, lungs


def _soft_tissue(g: _Grid, an: Anatomy, mods: _Mods, heart: np.ndarray,
                 lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density of soft tissue, mediastinum, abdomen, aerated lungs and breasts; also the sub-diaphragm weight."""
    dens = _body(g, an)
    ax = np.abs(g.x - 0.5)
    dome = np.where(g.x < 0.5, _dome_y(an, -1, 0.5 - g.x, mods), _dome_y(an, 1, g.x - 0.5, mods))
    below = _inside(g.y - np.minimum(dome, an.base_y + 0.1) - 0.01, 0.03) \
        * _inside(an.lung_lat + 0.03 - ax, 0.06)
    central = _inside(0.16 - ax, 0.08)
    dens += 0.12 * heart + 0.2 * central * _inside(g.y - 0.05, 0.1)
    dens += 0.3 * below * _inside(an.body_w - ax, 0.05)
    t = np.clip((g.y - an.apex_y) / (an.base_y - an.apex_y), 0, 1)
    # aerated thickness: thin at the lung borders, thickest mid-lung
    lim = Image.fromarray((np.clip(lung, 0, 1) * 255).astype(np.uint8), mode="L")
    depth = np.asarray(lim.filter(ImageFilter.GaussianBlur(0.035 * g.res)), dtype=np.float32) / 255.0
    dens -= an.air * mods.air * lung * (0.35 + 0.65 * depth) * (1.0 - 0.3 * t ** 3)
    if an.female:
        for s in (-1, 1):
            bx, by = 0.5 + s * 0.26, 0.64
            rs, cs = g.win(bx - 0.25, bx + 0.25, by - 0.2, by + 0.25)
            x, y = g.x[:, cs], g.y[rs]
            q = ((x - bx) / 0.22) ** 2 + ((y - by) / 0.17) ** 2
            dens[rs, cs] += 0.16 * _inside(1 - q, 0.3) * _inside(y - by + 0.05, 0.1)
    return dens, below


def _stomach_bubble(g: _Grid, an: Anatomy, mods: _Mods, dens: np.ndarray) -> None:
    """Gas under the left dome (image right), subtracted from ``dens`` in place."""
    sx, sy = 0.5 + 0.16, an.dome_l + mods.dome_shift[1] + 0.06
    rs, cs = g.win(sx - 0.08, sx + 0.08, sy - 0.06, sy + 0.06)
    x, y = g.x[:, cs], g.y[rs]
    q = ((x - sx) / 0.055) ** 2 + ((y - sy) / 0.035) ** 2
    dens[rs, cs] -= 0.35 * _inside(1 - q, 0.3) * _inside(sy + 0.012 - y, 0.006)


def _vessels(g: _Grid, an: Anatomy, lung: np.ndarray, dens: np.ndarray) -> np.ndarray:
    """Vessel tree (seeded by ``an.vessel_seed`` only) plus hila, faded outside the lungs."""
    vrng = np.random.default_rng(an.vessel_seed)
    vess = _draw_canvas(g, _vessel_lines(an, vrng, 1.0, g.res), 0.003)
    hila = np.zeros_like(dens)
    for hx, hy in _hila(an).values():
        rs, cs = g.win(hx - 0.1, hx + 0.1, hy - 0.12, hy + 0.12)
        x, y = g.x[:, cs], g.y[rs]
        hila[rs, cs] += np.exp(-(((x - hx) / 0.04) ** 2 + ((y - hy) / 0.07) ** 2))
    return (vess + 1.1 * hila) * (0.25 + 0.75 * lung)


def _density(g: _Grid, an: Anatomy, mods: _Mods, heart: np.ndarray, lung: np.ndarray,
             rng: np.random.Generator, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Projected density of the normal chest and the vessel term added to it (for the painters)."""
    dens, below = _soft_tissue(g, an, mods, heart, lung)
    _ribs(g, an, dens, below, np.minimum(lung, 1.0), rng)
    _clavicles(g, an, dens)
    _spine(g, an, dens)
    _stomach_bubble(g, an, mods, dens)
    vessels = mods.vessels * 0.26 * _vessels(g, an, lung, dens)
    parench = (_smooth_noise(rng, dens.shape, max(8, g.n // 12)) * 0.03
               + _smooth_noise(rng, dens.shape, max(8, g.n // 5)) * 0.025) * lung
    parench += _smooth_noise(rng, dens.shape, 24) * (0.012 * cfg.noise)
    dens += vessels + parench
    airway = [([(0.5, -0.2), (0.5, 0.3)], 0.028, 1.0)]
    for s, (hx, hy) in _hila(an).items():
        airway.append(([(0.5, 0.3), (0.5 + s * 0.035, 0.34), (hx + s * 0.01, hy - 0.02)], 0.014, 0.8))
    dens -= 0.38 * _draw_canvas(g, airway, 0.005)
    return dens, vessels


def _written_truth(g: _Grid, aff: Affine, coeffs: tuple[float, ...], size: int, heart: np.ndarray,
                   lungs: dict[int, np.ndarray], lesions: list[_Lesion],
                   masks: bool) -> tuple[dict[str, np.ndarray], dict, list[Finding]]:
    """Anatomy masks, anatomy boxes (+ CTR) and findings in written-image pixels."""
    full = slice(0, g.n)
    out_masks = {
        "right_lung": _warp_mask(lungs[-1] > 0.5, full, full, coeffs, size),
        "left_lung": _warp_mask(lungs[1] > 0.5, full, full, coeffs, size),
        "heart": _warp_mask(heart > 0.5, full, full, coeffs, size),
    }
    anat = {k: _mask_box(k, v) for k, v in out_masks.items()}
    hb, rl, ll = anat["heart"], anat["right_lung"], anat["left_lung"]
    ctr = _ctr(out_masks, aff) if hb and rl and ll else None
    findings = []
    for les in lesions:
        m = _warp_mask(les.mask, les.rs, les.cs, coeffs, size)
        box = _mask_box(les.label, m)
        findings.append(Finding(les.label, box, m if masks else None, les.label in BOXED_CLASSES,
                                _round_params(les.params)))
    return out_masks, {"heart": hb, "right_lung": rl, "left_lung": ll, "ctr": ctr}, findings


def generate_phantom(rng: np.random.Generator, size: int = 256, config: PhantomConfig | None = None,
                     *, anatomy: Anatomy | None = None, labels: list[str] | None = None,
                     affine: Affine | None = None, masks: bool = True) -> PhantomSample:
    """Draw one phantom chest radiograph of ``size`` x ``size`` pixels.

    ``anatomy`` (the patient), ``labels`` (canonical class names) and ``affine`` are drawn
    from ``rng`` when not given. ``masks=False`` returns no mask arrays (boxes, anatomy
    boxes and the cardiothoracic ratio are still measured on them). Deterministic for a given
    ``rng`` state; the patient's vessel tree depends only on ``anatomy.vessel_seed``.
    """
    cfg = (config or PhantomConfig()).validate()
    if size < 32:
        raise CxrError(f"phantom size {size} is too small (minimum 32 pixels)")
    an = anatomy if anatomy is not None else Anatomy.sample(rng)
    labs = sorted({canonical(x) for x in labels}) if labels is not None else sample_labels(rng, cfg)
    aff = affine if affine is not None else sample_affine(rng, cfg)
    sides = {lab: (-1 if rng.random() < 0.5 else 1) for lab in labs}
    mods = _modifiers(labs, sides, rng, cfg)

    g = _Grid(min(size, cfg.max_render), _margin(aff, size))
    heart, lungs = _organs(g, an, mods, labs)
    dens, vessels = _density(g, an, mods, heart, lungs[-1] + lungs[1], rng, cfg)
    ctx = _Ctx(g, an, mods, rng, cfg, lungs, heart, dens, vessels)
    lesions = [_PAINTERS[lab](ctx, sides[lab]) for lab in _ORDER if lab in labs]

    inten = 1.0 - np.exp(-1.25 * np.clip(dens, 0, None))
    coeffs = _inverse_coeffs(aff, size, g)
    im = Image.fromarray(inten.astype(np.float32), mode="F")
    warped = np.asarray(im.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                     fillcolor=0.0), dtype=np.float32)
    image = _finalise(warped, rng, cfg, size)
    out_masks, anatomy_out, findings = _written_truth(g, aff, coeffs, size, heart, lungs, lesions, masks)
    boxes = [f.box for f in findings if f.nih_box and f.box is not None]
    return PhantomSample(image=image, labels=tuple(labs), boxes=boxes, affine=aff,
                         anatomy=anatomy_out, masks=out_masks if masks else {}, findings=findings,
                         patient=an)


def _canonical_ctr(heart: np.ndarray, lungs: dict[int, np.ndarray]) -> float:
    cols_h = np.flatnonzero((heart > 0.5).any(axis=0))
    cols_l = np.flatnonzero(((lungs[-1] > 0.5) | (lungs[1] > 0.5)).any(axis=0))
    if cols_h.size == 0 or cols_l.size == 0:
        return 0.0
    return float(cols_h[-1] - cols_h[0] + 1) / float(cols_l[-1] - cols_l[0] + 1)


def _ctr(masks: dict[str, np.ndarray], aff: Affine) -> float:
    """Cardiothoracic ratio measured along the chest's own horizontal axis."""
    t = math.radians(aff.rotation_deg)
    cx, cy = math.cos(t), -math.sin(t)  # the chest's x-axis in the written image

    def extent(m: np.ndarray) -> float:
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return 0.0
        sub = m[rows]
        first = sub.argmax(axis=1)
        last = sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
        p0 = first * cx + rows * cy
        p1 = last * cx + rows * cy
        return float(max(p0.max(), p1.max()) - min(p0.min(), p1.min()) + 1)

    th = extent(masks["left_lung"] | masks["right_lung"])
    return round(extent(masks["heart"]) / th, 4) if th > 0 else 0.0


def _round_params(p: dict) -> dict:
    def r(v):
        if isinstance(v, float):
            return round(v, 5)
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        return v
    return {k: r(v) for k, v in p.items()}


# ---------------------------------------------------------------------------
# NIH-format folder
# ---------------------------------------------------------------------------
def _box_list(b: Box | None) -> list[float] | None:
    return None if b is None else [b.x, b.y, b.w, b.h]


def _prepare_folder(out: Path, masks: bool, overwrite: bool) -> None:
    """Refuse an existing dataset unless ``overwrite``; make ``images/`` (and ``masks/...``)."""
    if (out / "Data_Entry_2017.csv").exists() and not overwrite:
        raise CxrError("a dataset is already there; choose an empty folder or allow overwriting",
                       path=str(out))
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        for sub in (*ANATOMY_MASKS, "findings"):
            (out / "masks" / sub).mkdir(parents=True, exist_ok=True)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    """A boolean mask as a 0/255 PNG."""
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, compress_level=3)


def _write_image(out: Path, iid: str, ph: PhantomSample, masks: bool, with_boxes: bool) -> list[dict]:
    """Save one phantom's PNG (and masks); return its findings as recorded in the truth file."""
    Image.fromarray(ph.image, mode="L").save(out / "images" / iid, compress_level=3)
    fl = []
    for k, f in enumerate(ph.findings):
        mpath = None
        if masks and f.mask is not None:
            mpath = f"masks/findings/{iid[:-4]}_{k}.png"
            _save_mask(f.mask, out / mpath)
        fl.append({"label": f.label, "box": _box_list(f.box), "nih_box": f.nih_box,
                   "in_bbox_csv": bool(f.nih_box and with_boxes and f.box is not None),
                   "mask": mpath, "params": f.params})
    if masks:
        for name in ANATOMY_MASKS:
            _save_mask(ph.masks[name], out / "masks" / name / iid)
    return fl


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list]) -> None:
    """``header`` then ``rows``, ``\\n`` line ends (as the NIH release)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _truth_document(cfg: PhantomConfig, size: int, seed: int, n: int, truth: dict) -> dict:
    """Content of :data:`TRUTH_FILE`: settings, conventions and the per-image truth."""
    return {
        "format": "cxrviewer-phantoms/1", "size": size, "seed": seed, "n": n,
        "config": {k: v for k, v in asdict(cfg).items() if k != "class_weights"},
        "class_weights": dict(cfg.class_weights),
        "conventions": {
            "box": "[x, y, w, h] in written-image pixels, top-left origin",
            "left_lung": "patient's left lung (image right)",
            "findings.params": "centres/radii in the upright chest frame, fractions of the size",
            "ctr": "cardiothoracic ratio: heart width / widest lung-to-lung width",
            "affine.matrix": "upright-chest pixels -> written-image pixels; rotation_deg > 0 = "
                             "counter-clockwise on screen; shifts are fractions of the size",
        },
        "images": truth,
    }


def write_phantom_dataset(out: str | Path, n: int, size: int = 256, seed: int = 0,
                          config: PhantomConfig | None = None, *, masks: bool = False,
                          overwrite: bool = False) -> Path:
    """Write ``n`` phantoms as an NIH ChestX-ray14 folder under ``out`` and return it.

    Layout: ``images/<id>.png``, ``Data_Entry_2017.csv``, ``BBox_List_2017.csv``,
    ``phantom_truth.json``, ``box_frame.txt`` (the boxes' pixel frame = ``size``) and, with
    ``masks``, ``masks/{left_lung,right_lung,heart}/<id>.png`` plus ``masks/findings/<id>_<k>.png``
    (k = index in the truth's finding list).
    Same ``seed`` -> identical bytes.
    """
    cfg = (config or PhantomConfig()).validate()
    if n < 1:
        raise CxrError(f"number of phantoms must be >= 1 (got {n})")
    out = Path(out)
    _prepare_folder(out, masks, overwrite)
    master = np.random.default_rng(seed)
    spacing = FIELD_OF_VIEW_MM / size
    entries: list[list] = []
    bbox_rows: list[list] = []
    truth: dict = {}
    pid = 0
    while len(entries) < n:
        pid += 1
        n_img = int(min(n - len(entries), master.geometric(0.55)))
        an = Anatomy.sample(np.random.default_rng([seed, pid, 0]))
        for fu in range(n_img):
            irng = np.random.default_rng([seed, pid, fu + 1])
            ph = generate_phantom(irng, size, cfg, anatomy=an, masks=masks)
            iid = f"{pid:08d}_{fu:03d}.png"
            entries.append([iid, "|".join(ph.labels) if ph.labels else NO_FINDING, fu, pid,
                            min(99, an.age + fu // 2), "F" if an.female else "M", "PA", size, size,
                            spacing, spacing])
            with_boxes = bool(irng.random() < cfg.box_fraction) if cfg.box_fraction < 1 else True
            if with_boxes:
                bbox_rows.extend([iid, NIH_BOX_LABEL.get(b.label, b.label), b.x, b.y, b.w, b.h] for b in ph.boxes)
            truth[iid] = {
                "patient_id": pid, "follow_up": fu, "labels": list(ph.labels),
                "affine": ph.affine.to_dict(size),
                "anatomy": {k: (_box_list(v) if isinstance(v, Box) or v is None else v)
                            for k, v in ph.anatomy.items()},
                "findings": _write_image(out, iid, ph, masks, with_boxes),
            }
    _write_csv(out / "Data_Entry_2017.csv", DATA_ENTRY_HEADER, entries)
    _write_csv(out / "BBox_List_2017.csv", BBOX_HEADER, bbox_rows)
    (out / TRUTH_FILE).write_text(json.dumps(_truth_document(cfg, size, seed, n, truth), indent=1, sort_keys=True),
                                  encoding="utf-8")
    # boxes are in written-image pixels, not NIH's 1024 frame: say so to the NIH reader
    (out / BOX_FRAME_FILE).write_text(f"{size}\n", encoding="ascii")
    log.info("wrote %d phantoms (%d patients, %d boxes) to %s", n, pid, len(bbox_rows), out)
    return out


# ---------------------------------------------------------------------------
# contact sheet
# ---------------------------------------------------------------------------
_COLOURS = {
    "Atelectasis": (255, 200, 0), "Cardiomegaly": (255, 80, 80), "Effusion": (80, 160, 255),
    "Infiltration": (0, 230, 120), "Infiltrate": (0, 230, 120), "Mass": (255, 120, 255),
    "Nodule": (255, 255, 80), "Pneumonia": (255, 150, 60), "Pneumothorax": (80, 255, 255),
}


def contact_sheet(dataset_dir: str | Path, out_png: str | Path, n: int = 16, tile: int = 256) -> Path:
    """A grid of the first ``n`` images of an NIH-format folder with their boxes drawn."""
    d = Path(dataset_dir)
    with open(d / "Data_Entry_2017.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    boxes: dict[str, list] = {}
    bpath = d / "BBox_List_2017.csv"
    if bpath.exists():
        with open(bpath, newline="", encoding="utf-8") as fh:
            for r in list(csv.reader(fh))[1:]:
                boxes.setdefault(r[0], []).append((r[1], *map(float, r[2:6])))
    rows = rows[:n]
    cols = int(math.ceil(math.sqrt(len(rows)))) if rows else 1
    nrow = int(math.ceil(len(rows) / cols)) if rows else 1
    sheet = Image.new("RGB", (cols * tile, nrow * tile), (0, 0, 0))
    font = ImageFont.load_default()
    for i, r in enumerate(rows):
        iid, labels = r[0], r[1]
        im = Image.open(d / "images" / iid).convert("L")
        sx = tile / im.width
        sy = tile / im.height
        t = im.resize((tile, tile), Image.BILINEAR).convert("RGB")
        dr = ImageDraw.Draw(t)
        for lab, x, y, w, h in boxes.get(iid, []):
            col = _COLOURS.get(lab, (255, 255, 255))
            dr.rectangle([x * sx, y * sy, (x + w) * sx, (y + h) * sy], outline=col, width=2)
            dr.text((x * sx + 2, max(0, y * sy - 11)), lab, fill=col, font=font)
        dr.rectangle([0, tile - 13, tile, tile], fill=(0, 0, 0))
        dr.text((2, tile - 12), f"{iid[:-4]}: {labels}"[:48], fill=(255, 255, 255), font=font)
        sheet.paste(t, ((i % cols) * tile, (i // cols) * tile))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, optimize=True)
    return out_png


__all__ = [
    "Affine", "Anatomy", "Finding", "PhantomConfig", "PhantomSample", "contact_sheet",
    "generate_phantom", "sample_affine", "sample_labels", "write_phantom_dataset",
    "DATA_ENTRY_HEADER", "BBOX_HEADER", "NIH_BOX_LABEL", "TRUTH_FILE", "BOX_FRAME_FILE",
]

