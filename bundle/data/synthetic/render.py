"""Rendering: the pixels of one planned image (anatomy, findings with exact masks, shortcut tags, site style).

Each image draws from its own ``SeedSequence([seed, split, index])`` streams (vectorised numpy on cached grids),
so the bytes do not depend on the number of worker processes. Site B's display image is quantised exactly as
its DICOM stores it (:func:`encode_dicom_pixels`, :func:`windowed_dicom`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from bundle.data.synthetic.params import CLASSES, SPLIT_CODE, SyntheticParams

__all__ = ["MARKER_POS", "encode_dicom_pixels", "render", "windowed_dicom"]

# Site B DICOM encoding: modality value v = 0.5 * stored - 200; the VOI window maps [0, 1199] to the
# full display range. The collimation border is stored at 4095 (far outside the window), so naive
# min-max scaling of the stored values gives an inverted, washed-out picture while correct
# modality LUT + VOI window + MONOCHROME1 inversion reproduces the rendered image.
DCM_SLOPE, DCM_INTERCEPT, DCM_CENTER, DCM_WIDTH, DCM_BITS = 0.5, -200.0, 600.0, 1200.0, 12


@lru_cache(maxsize=8)
def _grid(h: int, w: int):
    u = (np.arange(w, dtype=np.float32) + 0.5) / w
    v = (np.arange(h, dtype=np.float32) + 0.5) / h
    return np.broadcast_to(u[None, :], (h, w)), np.broadcast_to(v[:, None], (h, w))


_GLYPHS = (  # 5x5 tag glyphs, one per class: ring, plus, cross
    np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]),
    np.array([[0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]),
    np.array([[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1]]),
)
MARKER_POS = ((0.18, 0.06), (0.5, 0.06), (0.82, 0.06))  # (u, v) centres on the top edge, outside the lungs


@lru_cache(maxsize=16)
def _stamp(c: int, h: int, w: int, size: float, intensity: float):
    """The tag of class c as (y0, x0, patch): a dark square with a bright glyph, 7x7 cells."""
    cell = max(1, int(round(size * w / 7)))
    g = np.zeros((7, 7), np.float32)
    g[1:6, 1:6] = _GLYPHS[c] * intensity
    patch = np.kron(g, np.ones((cell, cell), np.float32))
    u, v = MARKER_POS[c]
    y0 = int(round(v * h - patch.shape[0] / 2))
    x0 = int(round(u * w - patch.shape[1] / 2))
    return max(y0, 0), max(x0, 0), patch


def _ramp(x, width):
    """Soft inside-ness: 0 below -width/2, 1 above width/2 (cheap stand-in for a smoothstep)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _segment_d2(u, v, a, b):
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((u - ax) * dx + (v - ay) * dy) * (1.0 / (dx * dx + dy * dy)), 0.0, 1.0)
    return (u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Bilinear x2 upsampling with pixel-centre alignment and edge replication (what
    scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest") computes), written with slices because
    it is several times faster and runs on every image."""
    r = np.empty((2 * a.shape[0], a.shape[1]), a.dtype)
    q, t = 0.25 * a, 0.75 * a
    r[2::2] = t[1:] + q[:-1]
    r[1:-1:2] = t[:-1] + q[1:]
    r[0], r[-1] = a[0], a[-1]
    out = np.empty((r.shape[0], 2 * a.shape[1]), a.dtype)
    q, t = 0.25 * r, 0.75 * r
    out[:, 2::2] = t[:, 1:] + q[:, :-1]
    out[:, 1:-1:2] = t[:, :-1] + q[:, 1:]
    out[:, 0], out[:, -1] = r[:, 0], r[:, -1]
    return out


@lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise fields, (4, 2h, 2w), from a fixed seed. Each image adds a window at a random
    offset: drawing 65k fresh normals per image costs more than all the anatomy."""
    return np.random.default_rng(np.random.SeedSequence([20250501, h, w])).standard_normal(
        (4, 2 * h, 2 * w), dtype=np.float32
    )


def _noise(rng, h: int, w: int) -> np.ndarray:
    bank = _noise_bank(h, w)
    k, oy, ox = int(rng.integers(4)), int(rng.integers(h)), int(rng.integers(w))
    return bank[k, oy : oy + h, ox : ox + w]


def _pose(rng) -> tuple[float, float, float, float]:
    """Small per-image pose change: shift, rotation, scale (as an inverse map of the grid)."""
    dx, dy = (float(x) for x in rng.normal(0, 0.012, 2))
    rot = float(np.deg2rad(rng.normal(0, 1.5)))
    sc = 1.0 + float(rng.normal(0, 0.025))
    return dx, dy, math.cos(rot) / sc, math.sin(rot) / sc


_ALL = slice(None)


class _Grid:
    """Posed normalised coordinates (u = x / W, v = y / H of the patient) of an (h, w) image.

    Local structures are evaluated only in the pixel box that can contain them (``box``), which is
    what keeps the generator above 100 images/s per core.
    """

    def __init__(self, h: int, w: int, pose):
        self.h, self.w, self.pose = h, w, pose

    def coords(self, ys=_ALL, xs=_ALL):
        dx, dy, c, s = self.pose
        u0, v0 = _grid(self.h, self.w)
        x, y = u0[ys, xs] - (0.5 + dx), v0[ys, xs] - (0.5 + dy)
        return c * x - s * y + 0.5, s * x + c * y + 0.5

    def at(self, row: int, col: int) -> tuple[float, float]:
        dx, dy, c, s = self.pose
        x, y = (col + 0.5) / self.w - 0.5 - dx, (row + 0.5) / self.h - 0.5 - dy
        return c * x - s * y + 0.5, s * x + c * y + 0.5

    def box(self, u0: float, u1: float, v0: float, v1: float):
        """Pixel slices covering the posed region [u0, u1] x [v0, v1] (+1 px), or None if off-image."""
        dx, dy, c, s = self.pose
        det = c * c + s * s
        cols, rows = [], []
        for uu in (u0, u1):
            for vv in (v0, v1):
                a, b = uu - 0.5, vv - 0.5
                cols.append(((c * a + s * b) / det + 0.5 + dx) * self.w - 0.5)
                rows.append(((-s * a + c * b) / det + 0.5 + dy) * self.h - 0.5)
        y0, y1 = max(0, math.floor(min(rows)) - 1), min(self.h, math.ceil(max(rows)) + 2)
        x0, x1 = max(0, math.floor(min(cols)) - 1), min(self.w, math.ceil(max(cols)) + 2)
        return (slice(y0, y1), slice(x0, x1)) if y1 > y0 and x1 > x0 else None


def _add_local(img, grid, region, fn):
    """img[box] += fn(u, v) over the pixel box of ``region`` = (u0, u1, v0, v1)."""
    box = grid.box(*region)
    if box is not None:
        img[box] += fn(*grid.coords(*box))


def _anatomy(grid: _Grid, an: dict) -> tuple[np.ndarray, np.ndarray]:
    """Healthy chest in display convention (lung dark, bone bright) and the soft lung map in [0, 1].

    Smooth structures only: it is evaluated at half resolution and upsampled (4x fewer pixel ops).
    """
    u, v = grid.coords()
    ax = np.abs(u - 0.5)
    # body: thorax sides and shoulders; air (dark) outside
    top = 0.02 + 0.28 * np.clip((ax - 0.07) * (1.0 / 0.38), 0, 1) ** 2
    body = _ramp(an["body_w"] - ax, 0.03) * _ramp(v - top, 0.03)
    img = 0.05 + body * (an["tissue"] + 0.12 * v)
    # lungs: superellipses, narrow at the apex and widening downwards, cut by the diaphragm domes
    lung = np.zeros_like(img)
    apex = an["lung_cy"] - an["lung_ry"]
    t = np.clip((v - apex) * (1.0 / (0.9 * an["lung_ry"])), 0, 1)
    taper = 1.0 / (an["lung_rx"] * (0.55 + 0.45 * t * (2.0 - t)))
    py = (v - an["lung_cy"]) * (1.0 / an["lung_ry"])
    py2 = py * py
    py4 = py2 * py2
    for s in (-1.0, 1.0):
        cx = 0.5 + s * an["lung_dx"]
        px = (u - cx - s * 0.03 * t) * taper
        px2 = px * px
        e = 0.5 * (px2 + py2) + 0.5 * (px2 * px2 + py4)
        base = an["dome_base"] + (0.02 if s > 0 else 0.0)  # the left (image right) dome sits lower
        dome = base - an["dome_h"] * (1 - np.clip(((u - cx) * (1.0 / (1.15 * an["lung_rx"]))) ** 2, 0, 1))
        np.maximum(lung, _ramp(1.0 - e, 0.08) * _ramp(dome - v, 0.012), out=lung)
    # heart (shifted to the patient's left = image right), mediastinum and aortic knob cover the medial lungs
    hr = an["heart_r"]
    hx = (u - 0.535) * (1.0 / hr)
    hy = (v - 0.655) * (1.0 / (0.72 * hr))
    heart = _ramp(1.0 - (hx * hx + hy * hy), 0.15)
    med = _ramp(0.06 + 0.03 * v - ax, 0.02) * _ramp(v - 0.08, 0.04) * _ramp(0.75 - v, 0.04)
    cover = np.maximum(heart, med)
    box = grid.box(0.5, 0.59, 0.26, 0.34)
    if box is not None:
        ku, kv = grid.coords(*box)
        knob = _ramp(1.0 - ((ku - 0.545) ** 2 + (kv - 0.30) ** 2) * (1.0 / 0.035**2), 0.2)
        np.maximum(cover[box], knob, out=cover[box])
    lung_vis = lung * (1.0 - cover)
    img += 0.05 * cover + an["heart_int"] * heart - an["lung_dark"] * lung_vis
    # vascular markings: brighter near the hila, a faint texture (the perihilar look of normal lungs)
    tex = np.cos(2 * np.pi * (an["tex"][0][0] * u + an["tex"][0][3] * an["tex"][0][1] * v + an["tex"][0][2]))
    for fu, fv, ph, sgn in an["tex"][1:]:
        tex += np.cos(2 * np.pi * (fu * u + sgn * fv * v + ph))
    img += 0.012 * lung_vis * tex
    for s in (-1.0, 1.0):
        hu = 0.5 + s * 0.1
        box = grid.box(hu - 0.19, hu + 0.19, 0.46 - 0.245, 0.46 + 0.245)
        if box is not None:
            bu, bv = grid.coords(*box)
            d = np.clip(1.0 - ((bu - hu) ** 2 + 0.6 * (bv - 0.46) ** 2) * (1.0 / 0.035), 0, 1)
            img[box] += 0.07 * lung_vis[box] * d * d
    # posterior ribs: periodic bands in a warped coordinate (arcs rise from the spine, then fall laterally)
    rib_v = v + an["rib_arc"] * ax - 1.5 * ax * ax
    ribs = np.clip((np.cos(2 * np.pi * (rib_v * (1.0 / an["rib_period"]) + an["rib_phase"])) - 0.45) * 3.0, 0, 1)
    cage = _ramp(an["body_w"] - 0.03 - ax, 0.03) * _ramp(ax - 0.04, 0.02) * _ramp(v - 0.1, 0.04) * _ramp(0.82 - v, 0.06)
    img += an["rib_int"] * ribs * cage
    # spine (faint through the mediastinum) with vertebral bodies
    _add_local(
        img,
        grid,
        (0.45, 0.55, 0.0, 1.0),
        lambda bu, bv: 0.05
        * _ramp(0.032 - np.abs(bu - 0.5), 0.01)
        * (0.8 + 0.2 * np.cos(2 * np.pi * bv * 14.0))
        * _ramp(bv - 0.05, 0.05),
    )
    # clavicles
    for s in (-1.0, 1.0):
        a, b = (0.5 + s * 0.05, 0.17), (0.5 + s * 0.33, 0.11)
        _add_local(
            img,
            grid,
            (min(a[0], b[0]) - 0.02, max(a[0], b[0]) + 0.02, 0.09, 0.19),
            lambda bu, bv: 0.12 * np.clip((0.014**2 - _segment_d2(bu, bv, a, b)) * (1.0 / (0.5 * 0.014**2)), 0, 1),
        )
    # breast shadows (women): soft domes over the lower lateral lung fields with a sharp lower fold
    if an["breast"] > 0:
        bs = an["breast"]
        for s in (-1.0, 1.0):
            cu = 0.5 + s * 0.24

            def breast(bu, bv, cu=cu):
                bx = (bu - cu) * (1.0 / (0.17 * bs))
                by = (bv - 0.70) * (1.0 / (0.14 * bs))
                return 0.16 * np.clip(1.0 - (bx * bx + by * by), 0, 1) * _ramp(0.70 + 0.12 * bs - bv, 0.01)

            _add_local(img, grid, (cu - 0.17 * bs, cu + 0.17 * bs, 0.70 - 0.14 * bs, 0.70 + 0.14 * bs), breast)
    # age: calcified aortic knob (a bright arc on the knob's upper-left rim)
    if an["calc"] > 0:

        def calc(bu, bv):
            r2 = (bu - 0.545) ** 2 + (bv - 0.30) ** 2
            ring = np.clip(1.0 - np.abs(r2 - 0.033**2) * (1.0 / (0.006**2)), 0, 1)
            return 0.16 * an["calc"] * ring * ((bv < 0.30) & (bu < 0.56))

        _add_local(img, grid, (0.5, 0.59, 0.26, 0.34), calc)
    return img.astype(np.float32, copy=False), lung


def _nodules(grid: _Grid, an, lung, rng):
    """1-3 round nodules or one lobulated mass inside the lungs: [(box, layer)]."""
    ys, xs = np.nonzero(lung)
    if len(ys) == 0:
        return []
    blobs = (
        [(rng.uniform(0.03, 0.045), 1)] * int(rng.integers(1, 4))
        if rng.random() < 0.7
        else [(rng.uniform(0.055, 0.08), 3)]
    )
    h, w = grid.h, grid.w
    out = []
    for r, lobes in blobs:
        for _ in range(50):  # a centre whose disc lies inside the lung
            k = int(rng.integers(len(ys)))
            ry, rx = int(r * h), int(r * w)
            if all(
                lung[min(h - 1, max(0, ys[k] + dy)), min(w - 1, max(0, xs[k] + dx))]
                for dy, dx in ((ry, 0), (-ry, 0), (0, rx), (0, -rx))
            ):
                break
        cu, cv = grid.at(int(ys[k]), int(xs[k]))
        for j in range(lobes):  # a mass = overlapping discs (lobulated contour)
            if j:
                ang = rng.uniform(0, 2 * np.pi)
                cu2, cv2, rr = cu + 0.5 * r * math.cos(ang), cv + 0.5 * r * math.sin(ang), r * rng.uniform(0.55, 0.8)
            else:
                cu2, cv2, rr = cu, cv, r
            box = grid.box(cu2 - rr, cu2 + rr, cv2 - rr, cv2 + rr)
            if box is None:
                continue
            bu, bv = grid.coords(*box)
            d2 = ((bu - cu2) ** 2 + (bv - cv2) ** 2) * (1.0 / rr**2)
            out.append((box, np.clip((1.0 - d2) * 3.0, 0, 1)))
    return out


def _effusion(grid: _Grid, an, lung, rng):
    """Costophrenic-angle opacity with a meniscus (higher laterally), uni- or bilateral."""
    out = []
    sides = [-1.0, 1.0] if rng.random() < 0.4 else [float(rng.choice([-1.0, 1.0]))]
    for s in sides:
        cx = 0.5 + s * an["lung_dx"]
        height = rng.uniform(0.07, 0.17)
        rise = rng.uniform(0.04, 0.08)
        level = an["dome_base"] + (0.02 if s > 0 else 0.0) - height
        lo, hi = (0.5, 1.0) if s > 0 else (0.0, 0.5)
        box = grid.box(lo, hi, level - rise - 0.02, 1.0)
        if box is None:
            continue
        bu, bv = grid.coords(*box)
        q = np.clip(s * (bu - cx) * (1.0 / an["lung_rx"]) + 1.0, 0, 2.2) * 0.5  # 0 medial .. 1 lateral
        surface = level - rise * q * q  # meniscus: the fluid climbs the lateral chest wall
        depth = bv - surface
        layer = _ramp(depth - 0.01, 0.02) * (0.75 + 0.25 * np.clip(depth * 8, 0, 1)) * ((bu - 0.5) * s > 0)
        out.append((box, layer))
    return out


def _edema(grid: _Grid, an, lung, rng):
    """Bilateral perihilar ("bat wing") haze with compact support."""
    out = []
    rx, ry = rng.uniform(0.12, 0.16), rng.uniform(0.17, 0.22)
    for s in (-1.0, 1.0):
        cx = 0.5 + s * an["lung_dx"] * rng.uniform(0.5, 0.65)
        cy = 0.47 + rng.uniform(-0.02, 0.02)
        box = grid.box(cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            continue
        bu, bv = grid.coords(*box)
        ex, ey = (bu - cx) * (1.0 / rx), (bv - cy) * (1.0 / ry)
        out.append((box, np.sqrt(np.clip(1.0 - (ex * ex + ey * ey), 0, 1))))
    return out


_FINDINGS = (_nodules, _effusion, _edema)


def render(item: Mapping, seed: int, params: SyntheticParams, with_findings: bool = True) -> dict:
    """Pixels of one planned image: ``image`` (display convention, float32 in [0, 1]), ``masks``
    ({class: bool (H, W)} for every positive class), ``lung`` (bool) and ``size`` (H, W).

    Independent seeded streams for anatomy/pose, findings and noise, so ``with_findings=False`` gives
    the same healthy image the findings were drawn on.
    """
    site = item["site"]
    h, w = params.size_a if site == "A" else params.size_b
    an = item["anatomy"]
    ss = np.random.SeedSequence([seed, SPLIT_CODE[item["split"]], item["index"]])
    anat_rng, find_rng, noise_rng = (np.random.default_rng(s) for s in ss.spawn(3))
    pose = _pose(anat_rng)
    exposure = np.float32(1.0 + anat_rng.normal(0, 0.03))
    img_half, lung_half = _anatomy(_Grid(h // 2, w // 2, pose), an)
    img = _upsample2(img_half)
    lung = (lung_half >= 0.5).repeat(2, axis=0).repeat(2, axis=1)
    grid = _Grid(h, w, pose)
    masks = {}
    for c, name in enumerate(CLASSES):
        if item["label"][c] != 1:
            continue
        drawn = np.zeros((h, w), np.float32)
        for box, layer in _FINDINGS[c](grid, an, lung, find_rng):
            np.maximum(drawn[box], layer, out=drawn[box])
        # the mask is exactly the support of what is drawn: nothing is added outside it
        mask = lung & (drawn > 0.05)
        masks[name] = mask
        if with_findings:
            drawn *= mask
            drawn *= np.float32(params.finding_contrast[c])
            img += drawn
    img *= exposure
    for c in range(len(CLASSES)):
        if item["shortcut"][c]:
            y0, x0, patch = _stamp(c, h, w, params.marker_size, params.marker_intensity)
            img[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch[: h - y0, : w - x0]
    if site == "A":
        img += np.float32(params.noise_a) * _noise(noise_rng, h, w)
    else:  # site B: other contrast curve, blur, more noise, collimation border
        from scipy.ndimage import gaussian_filter  # noqa: PLC0415

        img = np.clip(img, 0, 1) ** np.float32(params.gamma_b)
        img = gaussian_filter(img, params.blur_b, mode="nearest")
        img += np.float32(params.noise_b) * _noise(noise_rng, h, w)
        b = max(2, int(round(0.02 * w)))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
    img = np.clip(img, 0.0, 1.0, out=img)
    if site == "B":  # the display image exactly as the DICOM encodes it (quantised like the stored values)
        img = windowed_dicom(encode_dicom_pixels(img))
    return {"image": img, "masks": masks, "lung": lung, "size": (h, w)}


# ================================================================================================ DICOM
def encode_dicom_pixels(display: np.ndarray) -> np.ndarray:
    """Display [0, 1] -> stored 12-bit MONOCHROME1 values through the inverse VOI window and rescale.

    The collimation border (display exactly 0) is stored at 4095, far outside the window.
    """
    # MONOCHROME1: high stored value = dark. Inverse of the DICOM linear VOI function, then of the rescale.
    mod = (DCM_CENTER - 0.5) + (0.5 - display) * (DCM_WIDTH - 1)
    stored = (mod - DCM_INTERCEPT) * (1.0 / DCM_SLOPE) + 0.5
    stored[display <= 0] = 2**DCM_BITS - 1
    return np.clip(stored, 0, 2**DCM_BITS - 1).astype(np.uint16)


def windowed_dicom(stored: np.ndarray) -> np.ndarray:
    """Reference decoding of the site B stored values: rescale, DICOM linear window, MONOCHROME1 inversion."""
    mod = stored.astype(np.float32) * DCM_SLOPE + DCM_INTERCEPT
    y = np.clip((mod - (DCM_CENTER - 0.5)) * (1.0 / (DCM_WIDTH - 1)) + 0.5, 0.0, 1.0)
    return (1.0 - y).astype(np.float32)
