"""The datalist format: its keys, the normalisers of label / age values, and :func:`validate`.

``{"name": ..., "classes": [...], "<split>": [record, ...], ...}`` where a split is any top-level key
holding a list (except ``classes``) and a record is::

    {"image": "images/x.png", "label": [1, 0, -1], "attention": [...], "sex": "F", "age": 57,
     "patient_id": "p1", "dataset": "nih", "view": "PA", ...extra keys are kept}

:func:`validate` returns every :class:`Problem` at once (split, index, key, what is wrong, how to fix it) so
that a user fixes a converter in one round instead of one error per run. Sex and age semantics live in
:mod:`bundle.demographics`; this module adds the datalist's conventions on top of them (ages stored as ints
when whole, rounded to 0.01 year otherwise).
"""

from __future__ import annotations

import math
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from bundle.demographics import AGE_MAX, AGE_MIN, AGE_SCHEMES, age_groups, age_years, sex_label
from bundle.utils.atomic import file_sha256

__all__ = [
    "ATTENTION_TYPES",
    "AGE_BINS",
    "FRAME_FIX",
    "MAX_PIXELS",
    "METADATA_KEYS",
    "DatalistError",
    "Problem",
    "age_group",
    "age_scheme",
    "coco_rle_counts",
    "frame_missing",
    "frame_missing_message",
    "normalize_age",
    "normalize_label",
    "resolve_path",
    "split_names",
    "validate",
]

#: attention type -> whether it needs a "frame" ([width, height]) when its coords are in pixels
ATTENTION_TYPES = {
    "bbox_xywh": True,  # [x, y, w, h], (x, y) = top-left corner
    "bbox_xyxy": True,  # [x1, y1, x2, y2]
    "ellipse_bbox": True,  # [x1, y1, x2, y2]: the ellipse inscribed in this box (REFLACX style)
    "polygon": True,  # [[x, y], [x, y], ...] (>= 3 points)
    "point_radius": True,  # [x, y, r]
    "rle": False,  # {"size": [h, w], "counts": str | [int]} (COCO RLE); the frame is its size
    "mask": False,  # "path": an image file, non-zero = inside; the frame is the file's size
}
#: top-level keys that are metadata, never splits
METADATA_KEYS = {"name", "classes", "description", "reference", "licence", "license", "release", "version"}
#: left-closed age bins (fairness.md default, metrics "chexclusion" scheme): [0,20) [20,40) [40,60) [60,80) [80,inf)
AGE_BINS = tuple(AGE_SCHEMES["chexclusion"])
#: the fix for pixel-coordinate attention without a frame (shared by :func:`validate` and the rasteriser)
FRAME_FIX = (
    'add "frame": [width, height] of the image the coords were drawn on '
    '(or "normalized": true with coords in [0, 1])'
)
#: the default limit on declared image / mask / RLE sizes (rows x columns x frames), checked before any decoding:
#: 134 M pixels (e.g. 16384 x 8192); a chest radiograph has ~4-12 M. Override with ``max_pixels`` (config key).
MAX_PIXELS = 2**27
_TOL_PX = 1.0  # coordinates may overshoot the frame by one pixel (rounding in converters)
_TOL_NORM = 1e-3


@dataclass
class Problem:
    """One problem in a datalist. ``index`` is the record's position in its split (None: whole file)."""

    split: str | None
    index: int | None
    key: str | None
    message: str
    fix: str
    severity: str = "error"  # "error" | "warning"
    code: str = ""  # short machine-readable kind, e.g. "label_length"

    def __str__(self) -> str:
        where = []
        if self.split is not None:
            where.append(f"split {self.split!r}")
        if self.index is not None:
            where.append(f"index {self.index}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        loc = ", ".join(where) or "datalist"
        return f"[{self.severity}] {loc}: {self.message} -> fix: {self.fix}"


class DatalistError(ValueError):
    """A datalist failed validation; ``problems`` holds every :class:`Problem` found."""

    # str(error) must stay the message alone, so only the message goes to ValueError (hence noqa: B042)
    def __init__(self, message: str, problems: list[Problem] | None = None, path: str | None = None):  # noqa: B042
        super().__init__(message)
        self.problems = list(problems or [])
        self.path = path


# ----------------------------------------------------------------------------------------- normalisers
def normalize_age(value) -> float | int | None:
    """Age in years as stored in a datalist (int when whole, else rounded to 0.01), or None when missing,
    unparsable or impossible (< 0 or > 110): :func:`bundle.demographics.age_years` (numbers, "57", "57.5",
    DICOM age strings "045Y", "006M", "003W", "010D")."""
    age = age_years(value)
    if age is None:
        return None
    return int(age) if age.is_integer() else round(age, 2)


def normalize_label(value, n_classes: int | None = None) -> list[int]:
    """A label list with null -> -1 and 1.0/0.0/-1.0 -> ints. Raises ValueError on anything else."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"label must be a list, got {type(value).__name__}")
    if n_classes is not None and len(value) != n_classes:
        raise ValueError(f"label has {len(value)} values but there are {n_classes} classes")
    out = []
    for v in value:
        if v is None:
            out.append(-1)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v in (1, 0, -1):
            out.append(int(v))
        else:
            raise ValueError(f"label value {v!r} is not one of 1, 0, -1, null")
    return out


def age_scheme(bins):
    """A bins argument as `bundle.demographics.age_groups` takes it: a scheme name, or a list of lower edges."""
    return bins if isinstance(bins, str) else list(bins)


def age_group(age, bins=AGE_BINS) -> str:
    """The left-closed bin label of one age, e.g. "[40,60)", "[80,inf)", or "unknown".

    Scalar form of :func:`bundle.demographics.age_groups` (``bins``: lower edges or a scheme name);
    for many ages call ``age_groups`` once.
    """
    return str(age_groups([age], age_scheme(bins))[0])


def frame_missing(att: Mapping) -> bool:
    """True when an attention entry has pixel coordinates but no ``frame`` (it cannot be placed on the image).

    bbox_xywh, bbox_xyxy, ellipse_bbox, polygon and point_radius need a frame unless ``"normalized": true``;
    rle carries its size and a mask file its own size.
    """
    typ = att.get("type")
    needs_frame = isinstance(typ, str) and ATTENTION_TYPES.get(typ, False)
    return bool(needs_frame and att.get("frame") is None and att.get("normalized") is not True)


def frame_missing_message(typ) -> str:
    return f"missing for type {typ!r} with pixel coordinates"


def coco_rle_counts(counts: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString in Python), or None when the string is
    malformed (characters outside '0'..'o', a value cut short, a negative run). Lets the validator and the
    rasteriser check that the runs sum to h * w before pycocotools decodes anything."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n:
                return None  # the last value is cut short
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


def split_names(datalist: Mapping) -> list[str]:
    """Top-level keys that are splits: lists, except metadata keys and keys starting with "_"."""
    return [k for k, v in datalist.items() if isinstance(v, list) and k not in METADATA_KEYS and not k.startswith("_")]


# ----------------------------------------------------------------------------------------- validation
def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_path(path: str, base_dir: str | None) -> str:
    # Same rule as monai.data.load_decathlon_datalist: normpath(join(base, p)); absolute paths stay.
    if base_dir is None or os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base_dir, path))


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(st: os.stat_result) -> str:
    return next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")


def _outside_root(full: str, data_root: str | None) -> str | None:
    """The resolved path when ``full`` resolves (symlinks, "..") outside ``data_root``, else None."""
    if data_root is None:
        return None
    root = os.path.realpath(data_root)
    real = os.path.realpath(full)
    return None if os.path.commonpath([root, real]) == root else real


class _Checker:
    def __init__(self, base_dir, check_images, data_root=None, max_pixels=None):
        self.base_dir = base_dir
        self.check_images = check_images
        self.data_root = None if data_root is None else os.fspath(data_root)
        self.max_pixels = MAX_PIXELS if max_pixels is None else int(max_pixels)
        self.problems: list[Problem] = []
        self.image_sizes: dict[str, int] = {}  # resolved image path -> st_size (regular files, check_images)

    def file(self, split, i, key, full, what="image") -> os.stat_result | None:
        """Refuse paths outside the data root; with check_images: missing files and non-regular files (device,
        FIFO, directory: never opened). Returns the stat result of a regular file (check_images) else None."""
        real = _outside_root(full, self.data_root)
        if real is not None:
            self.add(
                split,
                i,
                key,
                f"{what} path {full} resolves to {real}, outside the data root {os.path.realpath(self.data_root)}",
                "keep files under the data root; write paths without '..' or links that lead out of it",
                code="outside_data_root",
            )
            return None
        if not self.check_images:
            return None
        try:
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            self.add(
                split,
                i,
                key,
                f"{what} file not found: {full}",
                "correct the path (relative paths start at the datalist's folder) or remove the record",
                code="missing_image",
            )
            return None
        except (OSError, ValueError) as e:
            self.add(
                split,
                i,
                key,
                f"{what} file {full} cannot be read ({e})",
                "check permissions and the storage mount",
                code="missing_image",
            )
            return None
        if not stat.S_ISREG(st.st_mode):
            self.add(
                split,
                i,
                key,
                f"{what} path {full} is {_file_kind(st)}, not a regular file (it would hang or fail in training)",
                f"point the record at a regular {what} file",
                code="not_regular_file",
            )
            return None
        return st

    def too_big(self, split, i, key, h, w, what) -> bool:
        if h * w <= self.max_pixels:
            return False
        self.add(
            split,
            i,
            key,
            f"{what} declares {h}x{w} = {h * w} pixels, over the limit max_pixels={self.max_pixels} "
            "(decoding it would need that many bytes)",
            "check the size (a damaged or hostile entry); if genuine, raise max_pixels (config key 'max_pixels')",
            code="too_large",
        )
        return True

    def add(self, split, index, key, message, fix, severity="error", code=""):
        self.problems.append(Problem(split, index, key, message, fix, severity, code))

    # --- attention -------------------------------------------------------------------------------
    def attention(self, split, i, j, att, classes, label):
        k = f"attention[{j}]"
        if not isinstance(att, Mapping):
            self.add(
                split,
                i,
                k,
                f"must be an object, got {type(att).__name__}",
                'write {"class": ..., "type": ..., "coords": ..., "frame": [width, height]}',
                code="attention_type",
            )
            return
        cls = att.get("class")
        if cls not in classes:
            self.add(
                split,
                i,
                f"{k}.class",
                f"unknown class name {cls!r}; known classes: {classes}",
                "use one of the names in 'classes' (or add the class there)",
                code="attention_class",
            )
        elif isinstance(label, list) and len(label) == len(classes) and label[classes.index(cls)] == 0:
            self.add(
                split,
                i,
                f"{k}.class",
                f"attention for {cls!r} but its label is 0 (negative)",
                "drop the attention or correct the label; attention of negatives is not used",
                "warning",
                code="attention_on_negative",
            )
        typ = att.get("type")
        if not isinstance(typ, str) or typ not in ATTENTION_TYPES:
            self.add(
                split,
                i,
                f"{k}.type",
                f"unknown attention type {typ!r}",
                f"use one of {sorted(ATTENTION_TYPES)}",
                code="attention_type",
            )
            return
        normalized = att.get("normalized", False)
        if not isinstance(normalized, bool):
            self.add(
                split,
                i,
                f"{k}.normalized",
                f"must be true or false, got {normalized!r}",
                "write true when coords are fractions of the frame, else leave it out",
                code="coords_malformed",
            )
            normalized = False
        frame = att.get("frame")
        fw = fh = None
        if frame is not None:
            if isinstance(frame, (list, tuple)) and len(frame) == 2 and all(_is_num(v) and v > 0 for v in frame):
                fw, fh = float(frame[0]), float(frame[1])
            else:
                self.add(
                    split,
                    i,
                    f"{k}.frame",
                    f"must be [width, height] with two positive numbers, got {frame!r}",
                    "give the size in pixels of the image the coords refer to, width first",
                    code="frame",
                )
                return
        elif frame_missing(att):
            self.add(split, i, f"{k}.frame", frame_missing_message(typ), FRAME_FIX, code="frame")
            return
        if typ == "mask":
            self.mask(split, i, k, att, fw, fh)
        elif typ == "rle":
            self.rle(split, i, k, att.get("coords"), fw, fh)
        else:
            self.geometry(split, i, k, typ, att.get("coords"), fw, fh, normalized)

    def geometry(self, split, i, k, typ, coords, fw, fh, normalized):
        key = f"{k}.coords"
        shape = {
            "bbox_xywh": "[x, y, w, h]",
            "bbox_xyxy": "[x1, y1, x2, y2]",
            "ellipse_bbox": "[x1, y1, x2, y2]",
            "point_radius": "[x, y, r]",
            "polygon": "[[x, y], [x, y], [x, y], ...]",
        }[typ]

        def bad(msg):
            self.add(
                split,
                i,
                key,
                f"{msg} for type {typ!r}",
                f"write coords as {shape} (numbers, x = column)",
                code="coords_malformed",
            )

        if typ == "polygon":
            if not (
                isinstance(coords, (list, tuple))
                and len(coords) >= 3
                and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_num(v) for v in p) for p in coords)
            ):
                return bad(f"malformed coords {_short(coords)}: need at least 3 [x, y] points")
            xs, ys = [p[0] for p in coords], [p[1] for p in coords]
        else:
            n = 3 if typ == "point_radius" else 4
            if not (isinstance(coords, (list, tuple)) and len(coords) == n and all(_is_num(v) for v in coords)):
                return bad(f"malformed coords {_short(coords)}: need {n} numbers")
            if typ == "bbox_xywh":
                x, y, w, h = coords
                if w <= 0 or h <= 0:
                    return bad(f"width and height must be > 0, got w={w}, h={h}")
                xs, ys = [x, x + w], [y, y + h]
            elif typ in ("bbox_xyxy", "ellipse_bbox"):
                x1, y1, x2, y2 = coords
                if x2 <= x1 or y2 <= y1:
                    return bad(f"need x2 > x1 and y2 > y1, got {list(coords)} (is it [x, y, w, h]? use bbox_xywh)")
                xs, ys = [x1, x2], [y1, y2]
            else:
                x, y, r = coords
                if r <= 0:
                    return bad(f"radius must be > 0, got {r}")
                xs, ys = [x], [y]
        if normalized:
            if min(xs + ys) < -_TOL_NORM or max(xs + ys) > 1 + _TOL_NORM:
                self.add(
                    split,
                    i,
                    key,
                    f"normalized coords {_short(coords)} lie outside [0, 1]",
                    'normalized coords are fractions of the frame; drop "normalized" if they are pixels',
                    code="coords_outside",
                )
        elif fw is not None:
            if min(xs) < -_TOL_PX or min(ys) < -_TOL_PX or max(xs) > fw + _TOL_PX or max(ys) > fh + _TOL_PX:
                self.add(
                    split,
                    i,
                    key,
                    f"coords {_short(coords)} lie outside the frame [width={fw:g}, height={fh:g}] "
                    f"(x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, {max(ys):g}])",
                    "check the frame (width first) and that x is the column; clip boxes to the image",
                    code="coords_outside",
                )

    def rle(self, split, i, k, coords, fw, fh):
        key = f"{k}.coords"
        fix = 'write the COCO RLE: {"size": [height, width], "counts": "<string>" or [run lengths]}'
        if not isinstance(coords, Mapping):
            return self.add(
                split, i, key, f"rle coords must be an object, got {_short(coords)}", fix, code="coords_malformed"
            )
        size, counts = coords.get("size"), coords.get("counts")
        if not (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            return self.add(
                split,
                i,
                f"{key}.size",
                f"must be [height, width] (positive integers), got {size!r}",
                fix,
                code="coords_malformed",
            )
        h, w = size
        if self.too_big(split, i, f"{key}.size", h, w, "the RLE size"):
            return
        if fw is not None and self.too_big(split, i, f"{k}.frame", int(fh), int(fw), "the frame"):
            return
        if isinstance(counts, list):
            if (
                not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                or sum(counts) != h * w
            ):
                return self.add(
                    split,
                    i,
                    f"{key}.counts",
                    f"uncompressed counts must be non-negative integers summing to h*w={h * w}",
                    fix,
                    code="coords_malformed",
                )
        elif not (isinstance(counts, str) and counts):
            return self.add(
                split,
                i,
                f"{key}.counts",
                f"must be a non-empty string or a list, got {_short(counts)}",
                fix,
                code="coords_malformed",
            )
        elif not all("0" <= ch <= "o" for ch in counts):
            # the full run check (sum == h * w) is the rasteriser's, just before pycocotools decodes
            return self.add(
                split,
                i,
                f"{key}.counts",
                f"compressed COCO RLE counts hold characters outside '0'..'o': {_short(counts)}",
                "write the counts with pycocotools.mask.encode(...)['counts'].decode('ascii')",
                code="coords_malformed",
            )
        if fw is not None and (fw, fh) != (w, h):
            self.add(
                split,
                i,
                f"{k}.frame",
                f"frame [{fw:g}, {fh:g}] differs from the RLE size [h={h}, w={w}]",
                "frame is [width, height]; the RLE size is [height, width]: make them agree or drop frame",
                code="coords_outside",
            )

    def mask(self, split, i, k, att, fw, fh):
        path = att.get("path")
        if not (isinstance(path, str) and path):
            return self.add(
                split,
                i,
                f"{k}.path",
                "missing mask file path for type 'mask'",
                'add "path": "masks/<file>.png" (relative to the datalist or absolute)',
                code="coords_malformed",
            )
        full = resolve_path(path, self.base_dir)
        if self.file(split, i, f"{k}.path", full, "mask") is None:
            return
        if fw is not None and self.too_big(split, i, f"{k}.frame", int(fh), int(fw), "the frame"):
            return
        size = None
        if full.lower().endswith(".npy"):
            try:
                import numpy as np  # noqa: PLC0415

                shape = tuple(np.load(full, mmap_mode="r", allow_pickle=False).shape)  # header only
                if len(shape) == 3:  # same rule as the rasteriser: (H, W, C<=4) or (1, H, W)
                    shape = shape[:2] if shape[-1] in (2, 3, 4) else shape[1:]
                if len(shape) == 2:
                    size = (int(shape[1]), int(shape[0]))
            except Exception as e:  # noqa: BLE001
                return self.add(
                    split,
                    i,
                    f"{k}.path",
                    f"mask file {full} is not a readable NPY array ({type(e).__name__}: {e})",
                    "store masks as PNG or NPY (non-zero = inside)",
                    code="missing_image",
                )
        else:
            try:
                import warnings  # noqa: PLC0415

                from PIL import Image  # noqa: PLC0415  (header only: lazy open)

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(full) as im:
                        size = im.size
            except Exception as e:  # noqa: BLE001  (PIL's DecompressionBombError included)
                return self.add(
                    split,
                    i,
                    f"{k}.path",
                    f"mask file {full} is not a readable image ({type(e).__name__}: {e})",
                    "store masks as PNG (non-zero = inside)",
                    code="missing_image",
                )
        if size is not None and self.too_big(split, i, f"{k}.path", int(size[1]), int(size[0]), "the mask file"):
            return
        if fw is not None and size is not None:
            if (fw, fh) != (float(size[0]), float(size[1])):
                self.add(
                    split,
                    i,
                    f"{k}.frame",
                    f"frame [{fw:g}, {fh:g}] differs from the mask size {list(size)}",
                    "frame is [width, height] of the mask file; correct it or drop it",
                    code="coords_outside",
                )

    # --- records ---------------------------------------------------------------------------------
    def record(self, split, i, rec, classes):
        if not isinstance(rec, Mapping):
            self.add(
                split,
                i,
                None,
                f"record must be an object, got {type(rec).__name__}",
                'write {"image": ..., "label": [...], ...}',
                code="record",
            )
            return
        img = rec.get("image")
        if not (isinstance(img, str) and img):
            self.add(
                split,
                i,
                "image",
                f"missing or not a path: {img!r}",
                "give the image path, relative to the datalist's folder or absolute",
                code="image",
            )
        else:
            full = resolve_path(img, self.base_dir)
            st = self.file(split, i, "image", full)
            if st is not None:
                self.image_sizes[full] = st.st_size
        label = rec.get("label")
        if label is None and "label" not in rec:
            self.add(
                split,
                i,
                "label",
                "missing",
                f"add one value per class {classes}: 1, 0, -1 or null",
                code="label_missing",
            )
        elif not isinstance(label, list):
            self.add(
                split,
                i,
                "label",
                f"must be a list, got {_short(label)}",
                f"write one value per class {classes}: 1, 0, -1 or null",
                code="label_value",
            )
        else:
            if classes and len(label) != len(classes):
                self.add(
                    split,
                    i,
                    "label",
                    f"has {len(label)} values but there are {len(classes)} classes {classes}",
                    "give one value per class, in the order of 'classes'",
                    code="label_length",
                )
            for c, v in enumerate(label):
                if not (v is None or (_is_num(v) and v in (1, 0, -1))):
                    self.add(
                        split,
                        i,
                        f"label[{c}]",
                        f"value {v!r} is not one of 1, 0, -1, null",
                        "use 1 positive, 0 negative, -1 or null unknown/uncertain",
                        code="label_value",
                    )
        atts = rec.get("attention")
        if atts is not None:
            if not isinstance(atts, list):
                self.add(
                    split,
                    i,
                    "attention",
                    f"must be a list, got {type(atts).__name__}",
                    "wrap the attention objects in a list",
                    code="attention_type",
                )
            else:
                for j, att in enumerate(atts):
                    self.attention(split, i, j, att, classes, label)
        if "sex" not in rec or rec.get("sex") is None:
            self.add(
                split,
                i,
                "sex",
                "missing; counted as 'unknown'",
                'add "sex": "M" or "F" if known',
                "warning",
                code="sex_unknown",
            )
        elif sex_label(rec["sex"]) == "unknown":
            self.add(
                split,
                i,
                "sex",
                f"value {rec['sex']!r} is not M/F/Male/Female; counted as 'unknown'",
                'use "M" or "F" (left out of sex gaps otherwise)',
                "warning",
                code="sex_unknown",
            )
        if "age" not in rec or rec.get("age") is None:
            self.add(
                split,
                i,
                "age",
                "missing; counted as unknown",
                'add "age" in years if known',
                "warning",
                code="age_unknown",
            )
        elif normalize_age(rec["age"]) is None:
            self.add(
                split,
                i,
                "age",
                f"value {rec['age']!r} is unparsable or outside [{AGE_MIN:g}, {AGE_MAX:g}]; counted as unknown",
                'use a number of years or a DICOM age string like "045Y"',
                "warning",
                code="age_unknown",
            )


def _short(x, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _sha256(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def validate(
    datalist: Mapping,
    base_dir: str | None = None,
    check_images: bool = False,
    data_root: str | os.PathLike | None = None,
    required_splits=(),
    max_pixels: int | None = None,
) -> list[Problem]:
    """Every problem of a datalist (raw or loaded), errors and warnings; an empty list means all is well.

    ``base_dir`` resolves relative image/mask paths (needed with ``check_images=True``).
    ``check_images``: image and mask files must exist and be regular files (device files, FIFOs and directories
    are refused without being opened); mask headers are checked against ``max_pixels``; images with the same
    size in two splits are compared by sha256 (leakage warning).
    ``data_root``: refuse image/mask paths that resolve (symlinks, "..") outside this folder.
    ``required_splits``: splits that must exist and be non-empty (e.g. ["training", "validation"] for training).
    ``max_pixels``: limit on declared RLE / mask / frame sizes (default :data:`MAX_PIXELS`).
    """
    ck = _Checker(base_dir, check_images, data_root, max_pixels)
    if not isinstance(datalist, Mapping):
        ck.add(
            None,
            None,
            None,
            f"the datalist must be a JSON object, got {type(datalist).__name__}",
            'write {"name": ..., "classes": [...], "training": [...], ...}',
            code="top",
        )
        return ck.problems
    classes = datalist.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        ck.add(
            None,
            None,
            "classes",
            f"missing or not a non-empty list of names: {_short(classes)}",
            'add "classes": ["nodule_mass", "pleural_effusion", "edema"] (label order)',
            code="classes",
        )
        classes = []
    else:
        dup = sorted(c for c, n in Counter(classes).items() if n > 1)
        if dup:
            ck.add(None, None, "classes", f"duplicated class names {dup}", "list each class once", code="classes")
    if "name" not in datalist:
        ck.add(
            None,
            None,
            "name",
            "missing",
            'add "name": "<dataset name>" (used in reports and MLflow)',
            "warning",
            code="name",
        )
    splits = split_names(datalist)
    if not splits:
        ck.add(
            None, None, None, "no split found", 'add at least one list of records, e.g. "training": [...]', code="top"
        )
    for req in [required_splits] if isinstance(required_splits, str) else list(required_splits or ()):
        if req not in splits or not datalist[req]:
            ck.add(
                req,
                None,
                None,
                f"required split {req!r} is {'empty' if req in splits else 'missing'} (present: {splits})",
                f"add records to {req!r} (e.g. bundle.data.splits.patient_split), or do not require it",
                code="required_split",
            )
    seen_patient: dict[str, dict[str, int]] = defaultdict(dict)
    seen_image: dict[str, dict[str, int]] = defaultdict(dict)  # resolved image path -> {split: first index}
    for split in splits:
        images: dict[str, int] = {}
        for i, rec in enumerate(datalist[split]):
            ck.record(split, i, rec, classes)
            if not isinstance(rec, Mapping):
                continue
            img = rec.get("image")
            if isinstance(img, str) and img:
                full = resolve_path(img, base_dir)
                if full in images:
                    ck.add(
                        split,
                        i,
                        "image",
                        f"same image as index {images[full]} of this split",
                        "remove the duplicate (it weighs the image twice)",
                        "warning",
                        code="duplicate_image",
                    )
                else:
                    images[full] = i
                seen_image[full].setdefault(split, i)
            pid = rec.get("patient_id")
            if pid is not None and str(pid) != "":
                seen_patient[str(pid)].setdefault(split, i)
    for pid, where in seen_patient.items():
        if len(where) > 1:
            first, *others = list(where.items())
            for split, i in others:
                ck.add(
                    split,
                    i,
                    "patient_id",
                    f"patient {pid!r} is also in split {first[0]!r} (index {first[1]}): leakage between splits",
                    "keep all images of a patient in one split (bundle.data.splits.patient_split)",
                    code="patient_leakage",
                )
    _image_leakage(ck, seen_image)
    return ck.problems


def _image_leakage(ck: _Checker, seen_image: dict[str, dict[str, int]]) -> None:
    """Warn about the same image (resolved path; with check_images also the same bytes) in two splits."""
    for full, where in seen_image.items():
        if len(where) > 1:
            (s0, i0), *others = list(where.items())
            for split, i in others:
                ck.add(
                    split,
                    i,
                    "image",
                    f"same image {full} as split {s0!r} index {i0}: leakage between splits",
                    "keep each image in one split (bundle.data.splits.patient_split); check the patient ids",
                    "warning",
                    code="image_leakage",
                )
    if not ck.check_images:
        return
    # same bytes under different paths: only files whose size collides with a file of another split are hashed
    by_size: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for full, where in seen_image.items():
        if full in ck.image_sizes:
            split, i = next(iter(where.items()))
            by_size[ck.image_sizes[full]].append((full, split, i))
    for group in by_size.values():
        if len(group) < 2 or len({s for _, s, _ in group}) < 2:
            continue
        first: dict[str, tuple[str, str, int]] = {}
        for full, split, i in group:
            digest = _sha256(full)
            if digest is None:
                continue
            if digest in first and first[digest][1] != split:
                f0, s0, i0 = first[digest]
                ck.add(
                    split,
                    i,
                    "image",
                    f"same file content (sha256) as {f0} in split {s0!r} index {i0}: leakage between splits",
                    "keep each image in one split; a copy under another name or patient id is still the same image",
                    "warning",
                    code="image_leakage",
                )
            else:
                first.setdefault(digest, (full, split, i))
