"""Human attention (boxes, ellipses, polygons, COCO RLE, point+radius, mask files) -> (C, S, S) masks.

Every entry is rasterised directly in the image's final letterboxed geometry:
    frame pixels --(x * W_img / frame_w, y * H_img / frame_h)--> image pixels --letterbox--> final pixels.
Coordinates are continuous (pixel i covers [i, i+1), so a box [x0, x1) covers columns x0..x1-1 as in
``mask[y0:y1, x0:x1]``); a final pixel is inside a shape when its centre is. Shapes smaller than one final pixel
still mark the pixel holding their centre, so tiny nodules do not vanish at low resolution.
Raster inputs (rle, mask) are decoded at native size and area-resized with the image's own content size, then
thresholded at 0.5.
Hostile entries are refused before any allocation: an RLE's declared size, its frame and a mask file's header size
must not exceed ``max_pixels`` (default :data:`bundle.data.datalist.MAX_PIXELS`), and mask paths must be regular
files (no device files or FIFOs).
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Transform

from bundle.data import datalist as _dl

from .geometry import letterbox_params
from .io import MAX_PIXELS, content_size

__all__ = ["AttentionError", "ATTENTION_TYPES", "rasterize_attention", "RasterizeAttentiond"]

# The datalist format (bundle.data.datalist) defines the types and which of them need a "frame".
ATTENTION_TYPES = tuple(_dl.ATTENTION_TYPES)


class AttentionError(ValueError):
    """A malformed attention entry; the message names the image, the entry index, the problem and the fix."""


class _Geom:
    """Frame -> final pixel mapping for one entry."""

    def __init__(self, fw: float, fh: float, image_hw, lb: np.ndarray, size: int):
        if not (fw > 0 and fh > 0):
            raise ValueError(f"frame must be [width, height] > 0, got {[fw, fh]}")
        h, w = image_hw
        scale, self.top, self.left = float(lb[0]), float(lb[1]), float(lb[2])
        self.fw, self.fh, self.size = fw, fh, size
        self.sx, self.sy = w / fw * scale, h / fh * scale

    def x(self, v):
        return np.asarray(v, np.float64) * self.sx + self.left

    def y(self, v):
        return np.asarray(v, np.float64) * self.sy + self.top


def _frame(entry, image_hw) -> tuple[float, float]:
    fr = entry.get("frame")
    if fr is None:  # normalized coords without a frame (pixel coords without one are rejected earlier)
        return float(image_hw[1]), float(image_hw[0])
    if len(fr) != 2:
        raise ValueError(f"frame must be [width, height], got {fr!r}")
    return float(fr[0]), float(fr[1])


def _centre_pixel(out: np.ndarray, cx: float, cy: float) -> None:
    c, r = int(math.floor(cx)), int(math.floor(cy))
    if 0 <= r < out.shape[0] and 0 <= c < out.shape[1]:
        out[r, c] = True


def _draw_box(out, x0, y0, x1, y1) -> None:
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    # pixels whose centre (i + 0.5) lies in [v0, v1)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    side = out.shape[0]
    if c1 <= c0 or r1 <= r0:
        _centre_pixel(out, (x0 + x1) / 2, (y0 + y1) / 2)
        return
    out[max(r0, 0) : max(min(r1, side), 0), max(c0, 0) : max(min(c1, out.shape[1]), 0)] = True


def _draw_ellipse(out, cx, cy, rx, ry) -> None:
    from skimage.draw import ellipse

    if rx > 0 and ry > 0:
        rr, cc = ellipse(cy - 0.5, cx - 0.5, ry, rx, shape=out.shape)  # skimage: pixel centres at integers
        if rr.size:
            out[rr, cc] = True
            return
    _centre_pixel(out, cx, cy)


def _draw_polygon(out, xs, ys) -> None:
    from skimage.draw import polygon

    rr, cc = polygon(ys - 0.5, xs - 0.5, shape=out.shape)
    if rr.size:
        out[rr, cc] = True
    else:
        _centre_pixel(out, float(xs.mean()), float(ys.mean()))


def _place_raster(out, m: np.ndarray, image_hw, lb, size) -> None:
    """Native-frame binary mask -> the image's content size (area + threshold 0.5) -> pasted at the letterbox pads."""
    h, w = image_hw
    nh, nw = content_size(h, w, size)
    top, left = int(lb[1]), int(lb[2])
    src = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    cov = torch.nn.functional.interpolate(src, size=(nh, nw), mode="area")[0, 0].numpy()  # = MONAI Resize "area"
    res = cov >= 0.5
    if not res.any() and cov.max() > 0:  # a lesion smaller than half a final pixel keeps its best-covered pixel
        res.flat[int(np.argmax(cov))] = True
    out[top : top + nh, left : left + nw] |= res


def _check_pixels(h: int, w: int, max_pixels: int | None, what: str) -> None:
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if h < 1 or w < 1:
        raise ValueError(f"{what} declares an empty size {h}x{w}")
    if h * w > limit:
        raise ValueError(
            f"{what} declares {h}x{w} = {h * w} pixels, over the limit max_pixels={limit} (refused before decoding; "
            "a damaged or hostile entry? if genuine, raise max_pixels)"
        )


def _load_mask_file(path: str, base_dir, max_pixels: int | None = None) -> np.ndarray:
    full = path if os.path.isabs(path) or base_dir is None else os.path.join(os.fspath(base_dir), path)
    try:
        st = os.stat(full)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"mask file {full!r} does not exist (set base_dir or use an absolute path)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"mask path {full!r} is not a regular file (device, FIFO or directory); refused")
    if full.lower().endswith(".npy"):
        m = np.load(full, mmap_mode="r", allow_pickle=False)  # header first: the size is checked before reading
        hw = m.shape[:2] if m.ndim == 3 and m.shape[-1] in (2, 3, 4) else m.shape[-2:]
        if m.ndim in (2, 3):
            _check_pixels(int(hw[0]), int(hw[1]), max_pixels, f"mask file {full!r}")
        m = np.asarray(m)
    else:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(full) as im:  # lazy: only the header is read here
                _check_pixels(int(im.size[1]), int(im.size[0]), max_pixels, f"mask file {full!r}")
                m = np.asarray(im)
    m = np.asarray(m)
    if m.ndim == 3:
        m = m.any(axis=-1) if m.shape[-1] in (2, 3, 4) else m.squeeze(0)
    if m.ndim != 2:
        raise ValueError(f"mask file {full!r} must hold a 2D mask, got shape {m.shape}")
    return m != 0


def _decode_rle(coords, max_pixels: int | None = None) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not isinstance(coords, Mapping):
        raise ValueError(f"rle coords must be {{'size': [h, w], 'counts': ...}}, got {type(coords).__name__}")
    size = coords["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise ValueError(f"rle size must be [height, width], got {size!r}")
    h, w = (int(v) for v in size)
    _check_pixels(h, w, max_pixels, "the RLE size")  # before pycocotools allocates h * w bytes
    counts = coords["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"uncompressed rle counts must be non-negative integers summing to h*w={h * w}")
    elif not isinstance(counts, (str, bytes)) or not counts:
        raise ValueError(f"rle counts must be a non-empty string or a list, got {type(counts).__name__}")
    else:
        runs = _dl.coco_rle_counts(counts.decode("latin-1") if isinstance(counts, bytes) else counts)
        if runs is None or sum(runs) != h * w:  # checked here: pycocotools would read past a malformed string
            raise ValueError(f"compressed rle counts are malformed or do not sum to h*w={h * w}")
    if isinstance(counts, list):  # uncompressed COCO RLE
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def _rasterize_one(entry, typ, image_hw, lb, size, base_dir, max_pixels=None) -> np.ndarray:
    out = np.zeros((size, size), bool)
    coords = entry.get("coords")
    if typ in ("rle", "mask") and entry.get("frame") is not None:
        fw, fh = _frame(entry, image_hw)
        if not (math.isfinite(fw) and math.isfinite(fh)):
            raise ValueError(f"frame must be finite, got {entry.get('frame')!r}")
        _check_pixels(int(fh), int(fw), max_pixels, "the frame")
    if typ == "rle":
        m = _decode_rle(coords, max_pixels)
        _place_raster(out, m, image_hw, lb, size)
        return out
    if typ == "mask":
        p = entry.get("path") or (coords if isinstance(coords, str) else None)
        if not p:
            raise ValueError("type 'mask' needs 'path' (a PNG or NPY file)")
        _place_raster(out, _load_mask_file(p, base_dir, max_pixels), image_hw, lb, size)
        return out
    fw, fh = _frame(entry, image_hw)
    norm = bool(entry.get("normalized", False))
    g = _Geom(fw, fh, image_hw, lb, size)
    if typ == "polygon":
        pts = np.asarray(coords, np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
            raise ValueError("polygon coords must be [[x, y], ...] with at least 3 points (one contour)")
        if norm:
            pts = pts * [fw, fh]
        _check_finite(pts)
        _draw_polygon(out, g.x(pts[:, 0]), g.y(pts[:, 1]))
        return out
    c = np.asarray(coords, np.float64).ravel()
    n_expected = 3 if typ == "point_radius" else 4
    if c.size != n_expected:
        raise ValueError(f"{typ} coords must have {n_expected} numbers, got {c.size}")
    _check_finite(c)
    if typ == "point_radius":
        x, y, r = c
        if norm:
            x, y, r = x * fw, y * fh, r * max(fw, fh)
        if r < 0:
            raise ValueError("point_radius radius must be >= 0")
        _draw_ellipse(out, float(g.x(x)), float(g.y(y)), r * g.sx, r * g.sy)
        return out
    if norm:
        c = c * [fw, fh, fw, fh]
    if typ == "bbox_xywh":
        if c[2] < 0 or c[3] < 0:
            raise ValueError("bbox_xywh width and height must be >= 0")
        c = np.array([c[0], c[1], c[0] + c[2], c[1] + c[3]])
    x0, y0, x1, y1 = float(g.x(c[0])), float(g.y(c[1])), float(g.x(c[2])), float(g.y(c[3]))
    if typ == "ellipse_bbox":
        _draw_ellipse(out, (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2)
    else:
        _draw_box(out, x0, y0, x1, y1)
    return out


def _check_finite(a) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError("coordinates must be finite numbers")


def rasterize_attention(
    entries,
    classes: Sequence[str],
    image_hw,
    letterbox=None,
    size: int | None = None,
    base_dir=None,
    source: str | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise attention entries into float32 masks (C, size, size) in {0, 1} and availability (C,).

    Args:
        entries: list of {"class", "type", "coords", "frame": [w, h], "normalized", "path"} (docs/image_pipeline.md).
        classes: class names, in output channel order.
        image_hw: (H, W) of the loaded image the frames map onto (``d["orig_size"]``).
        letterbox: [scale, pad_top, pad_left, orig_h, orig_w] (``d["letterbox"]``); computed from image_hw if None.
        size: final side S (inferred from the letterbox when None).
        base_dir: directory for relative mask file paths.
        source: name used in error messages (the record's image path).
        max_pixels: limit on an RLE's declared size, its frame and a mask file's header size, checked before
            decoding (default :data:`MAX_PIXELS`).
    """
    classes = list(classes)
    h, w = (int(v) for v in image_hw)
    where = source or "record"
    if letterbox is None:
        if size is None:
            raise ValueError("rasterize_attention: give letterbox or size")
        letterbox = letterbox_params(h, w, size)
    lb = np.asarray(letterbox, dtype=np.float64)
    if size is None:
        size = int(round(lb[0] * max(lb[3], lb[4])))
    if (int(lb[3]), int(lb[4])) != (h, w) or abs(lb[0] * max(h, w) - size) > 1e-3 * size:
        raise AttentionError(
            f"{where}: letterbox {lb.tolist()} does not describe a {h}x{w} image letterboxed to "
            f"{size}; use the same size in Letterboxd and RasterizeAttentiond"
        )
    mask = np.zeros((len(classes), size, size), np.float32)
    avail = np.zeros(len(classes), np.float32)
    for i, e in enumerate(entries or []):
        if not isinstance(e, Mapping):
            raise AttentionError(f"{where}: attention[{i}] must be a dict, got {type(e).__name__}")
        cls, typ = e.get("class"), e.get("type")
        if cls not in classes:
            raise AttentionError(
                f"{where}: attention[{i}] has unknown class {cls!r}; known classes: {classes}. "
                "Rename it in the datalist or drop the entry"
            )
        if not isinstance(typ, str) or typ not in ATTENTION_TYPES:
            raise AttentionError(
                f"{where}: attention[{i}] ({cls}) has unknown type {typ!r}; " f"supported: {list(ATTENTION_TYPES)}"
            )
        if _dl.frame_missing(e):  # same rule and fix as bundle.data.datalist.validate
            raise AttentionError(
                f"{where}: attention[{i}].frame ({cls}, {typ}): {_dl.frame_missing_message(typ)} "
                f"-> fix: {_dl.FRAME_FIX}"
            )
        try:
            m = _rasterize_one(e, typ, (h, w), lb, size, base_dir, max_pixels)
        except (ValueError, TypeError, KeyError, IndexError, OSError, OverflowError, MemoryError) as ex:
            raise AttentionError(
                f"{where}: attention[{i}] ({cls}, {typ}) could not be rasterised: {ex}. "
                "Fix the entry's coords/frame/path in the datalist"
            ) from ex
        c = classes.index(cls)
        mask[c][m] = 1.0
        avail[c] = 1.0
    return mask, avail


def _source_name(d: Mapping, image_key: str) -> str | None:
    img = d.get(image_key)
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return None


class RasterizeAttentiond(Transform):
    """Add ``d[out_key]`` (C, S, S) in {0, 1} and ``d[avail_key]`` float32 (C,) from ``d[attention_key]``.

    Needs ``d["letterbox"]`` (put it after Letterboxd) and ``d["orig_size"]``. Records without attention get zeros.
    Masks are numpy arrays (the collate turns them into tensors). ``max_pixels`` limits RLE / frame / mask file
    sizes before decoding (default :data:`MAX_PIXELS`; a config sets it with the ``max_pixels`` key).
    ``dtype``: the masks' dtype, float32 by default. The masks are hard (exactly 0 or 1: every shape is drawn as a
    set of pixels, and raster inputs are thresholded), so ``uint8`` (or ``bool``) holds them exactly in a quarter
    of the memory: configs/train.yaml caches them as uint8 and its ``final`` transforms (EnsureTyped) turn them into
    float32 per batch, giving bit-identical batches (docs/performance.md).
    """

    def __init__(
        self,
        classes: Sequence[str],
        size: int,
        attention_key: str = "attention",
        out_key: str = "attn_mask",
        avail_key: str = "attn_available",
        base_dir=None,
        image_key: str = "image",
        max_pixels: int | None = None,
        dtype="float32",
    ) -> None:
        self.classes = list(classes)
        if not self.classes:
            raise ValueError("RasterizeAttentiond: classes must not be empty")
        self.size = int(size)
        self.attention_key, self.out_key, self.avail_key = attention_key, out_key, avail_key
        self.base_dir = None if base_dir is None else os.fspath(base_dir)
        self.image_key = image_key
        self.max_pixels = max_pixels
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as e:
            raise ValueError(
                f"RasterizeAttentiond: dtype={dtype!r} is not a numpy dtype (use float32, uint8, bool)"
            ) from e

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        entries = d.get(self.attention_key) or []
        source = _source_name(d, self.image_key)
        lb = d.get("letterbox")
        if lb is None:
            if entries:
                raise AttentionError(
                    f"{source or 'record'}: no d['letterbox']; put Letterboxd (same size) before RasterizeAttentiond"
                )
            d[self.out_key] = np.zeros((len(self.classes), self.size, self.size), self.dtype)
            d[self.avail_key] = np.zeros(len(self.classes), np.float32)
            return d
        lb = np.asarray(lb, dtype=np.float64)
        orig = d.get("orig_size")
        image_hw = (int(lb[3]), int(lb[4])) if orig is None else tuple(int(v) for v in orig)
        mask, d[self.avail_key] = rasterize_attention(
            entries,
            self.classes,
            image_hw,
            lb,
            self.size,
            base_dir=self.base_dir,
            source=source,
            max_pixels=self.max_pixels,
        )
        d[self.out_key] = mask if mask.dtype == self.dtype else mask.astype(self.dtype)  # 0/1: exact in any dtype
        return d
