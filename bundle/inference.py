"""Inference on a hospital folder: which files are chest radiographs (by content and header), which are skipped and
why, a Dataset that survives a file failing to decode, and the attention maps in the original image's geometry.

The skip decision is made before batching by :func:`scan_inputs`, from headers only (``pydicom.dcmread(...,
stop_before_pixels=True)``, ``PIL.Image.open``); only colour PNG/JPEG/DICOM images are decoded there, to compare their
channels. A file that passes the scan but fails to decode is caught per item by :class:`SkipFailedDataset` and
listed by the writer (``bundle.handlers.InferenceWriter``); it never aborts the run. docs/inference.md has the rules.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset

from bundle.transforms.geometry import letterbox_params
from bundle.transforms.io import CXRLoadError
from bundle.utils.atomic import rows_to_csv, write_text_atomic

logger = logging.getLogger("bundle")

__all__ = [
    "ACCEPTED_MODALITIES",
    "CHEST_BODY_PARTS",
    "FRONTAL_VIEWS",
    "SKIPPED_COLUMNS",
    "InputScan",
    "sniff_format",
    "check_file",
    "scan_inputs",
    "write_skipped",
    "privacy_rows",
    "SkipFailedDataset",
    "load_error_message",
    "maps_to_original",
    "attention_peaks",
    "attention_affine",
    "save_attention_nifti",
]

ACCEPTED_MODALITIES = ("CR", "DX")  # projection radiography; configs/inference.yaml: accept_modalities
CHEST_BODY_PARTS = ("CHEST", "THORAX")  # CHEST is the DICOM defined term; THORAX is written by some vendors
FRONTAL_VIEWS = ("PA", "AP")
COLOUR_TOLERANCE = 2  # grey levels (of 255): lossy JPEG may leave tiny channel differences in a grey image
SKIPPED_COLUMNS = ("file", "stage", "field", "reason")

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG = b"\xff\xd8\xff"
# A DICOM dataset written without the 128-byte preamble + "DICM" starts with its first element's tag: group 0002
# (file meta) or 0008 (the identifying module, the lowest group of every image IOD), little or big endian.
_RAW_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")
_DICOM_SUFFIXES = (".dcm", ".dicom", "")


@dataclass
class InputScan:
    """What :func:`scan_inputs` found: the records to score (each keeps its ``index``) and the skipped files."""

    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _skip(path, field_: str, reason: str, stage: str = "scan") -> dict:
    return {"file": os.fspath(path), "stage": stage, "field": field_, "reason": reason}


def sniff_format(path) -> str | None:
    """The file's format by its first 132 bytes: dicom (preamble + DICM), raw_dicom (may be a dataset without
    preamble; the header parse decides), png, jpeg, or None. Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIG):
        return "png"
    if head.startswith(_JPEG_SIG):
        return "jpeg"
    if head[:2] in _RAW_DICOM_GROUPS or os.path.splitext(os.fspath(path))[1].lower() in _DICOM_SUFFIXES:
        return "raw_dicom"  # confirmed (or not) by parsing the header
    return None


def _channels_differ(rgb: np.ndarray) -> int:
    """Largest difference between the R, G and B channels of an (H, W, >=3) array (0 for a grey image)."""
    rgb = rgb[..., :3].astype(np.int32)
    return int(max(np.abs(rgb[..., 0] - rgb[..., 1]).max(), np.abs(rgb[..., 1] - rgb[..., 2]).max()))


def _check_pil(path, kind: str) -> tuple[str, str] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # lazy: reads the header (mode, size) only
            mode, size = im.mode, im.size
            if mode in ("L", "LA", "La", "1", "I", "F") or mode.startswith("I;"):
                return None
            # colour mode: decode once to compare the channels (the only pixel read of the scan)
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError variants for damaged files
        return "file", f"unreadable {kind.upper()} ({type(e).__name__}: {e}); re-export or re-download it"
    diff = _channels_differ(rgb)
    if diff > COLOUR_TOLERANCE:
        return "channels", (
            f"colour image (mode {mode}, {size[0]}x{size[1]}): its R, G, B channels differ by up to {diff} of 255, "
            "so it is not a greyscale radiograph (a figure, photo or annotated screenshot); export the radiograph "
            "itself in greyscale"
        )
    return None


def _check_view(view) -> tuple[str, str] | None:
    v = str(view or "").strip().upper()
    if v in ("", "UNKNOWN", "NONE", "NAN") or v.split()[0] in FRONTAL_VIEWS or v == "FRONTAL":
        return None
    return "ViewPosition", (
        f"ViewPosition is {v!r}, not a frontal view ({' or '.join(FRONTAL_VIEWS)}): lateral, oblique and decubitus "
        "views are not what the model was trained on; score the frontal image of the study"
    )


def _check_dicom_header(path, raw: bool, modalities: Sequence[str]) -> tuple[str, str] | None:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd headers; the checks below decide
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=raw)
    except Exception as e:
        if raw:
            return "file", "not a DICOM, PNG or JPEG file by its content; only images are scored"
        return "file", (
            f"DICOM header could not be parsed ({type(e).__name__}: {e}); the file is truncated or damaged, "
            "re-export it from the PACS"
        )
    if raw and not ("Rows" in ds and "Columns" in ds):
        return "file", "not a DICOM, PNG or JPEG file by its content; only images are scored"
    if not ds.get("Rows") or not ds.get("Columns"):
        sop = str(ds.get("SOPClassUID", "") or "")
        name = getattr(getattr(ds, "SOPClassUID", None), "name", "") or sop or "unknown SOP class"
        return "Rows", f"DICOM without an image (no Rows/Columns; SOP class {name}): a report, DICOMDIR or similar"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    accepted = [m.upper() for m in modalities]
    if modality not in accepted:
        return "Modality", (
            f"Modality is {modality or 'missing'!r}, expected {' or '.join(m or repr('') for m in accepted)} "
            "(a projection radiograph); CT/MR/US/MG series are not chest radiographs (if this is one, e.g. a "
            "scanned film with Modality OT, add it to accept_modalities)"
        )
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and part not in CHEST_BODY_PARTS:
        return "BodyPartExamined", f"BodyPartExamined is {part!r}, not CHEST: the model scores chest radiographs only"
    view = _check_view(ds.get("ViewPosition"))
    if view:
        return view
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return "NumberOfFrames", (
            f"multi-frame DICOM ({frames} frames); extract the frame to score into its own file "
            "(pydicom: ds.pixel_array[i])"
        )
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp > 1:  # colour DICOM (secondary capture): decode to compare the channels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pydicom.dcmread(path, force=raw).pixel_array  # YBR is converted to RGB by pydicom
        except Exception:
            return None  # the loader reports the decoding problem with its own message
        if arr.ndim == 3 and arr.shape[-1] >= 3:
            scale = 255.0 / max(1.0, float(2 ** int(ds.get("BitsStored", 8) or 8) - 1))
            diff = int(round(_channels_differ(arr) * scale))
            if diff > COLOUR_TOLERANCE:
                pi = str(ds.get("PhotometricInterpretation", "") or "")
                return "PhotometricInterpretation", (
                    f"colour DICOM ({pi}, SamplesPerPixel={spp}) whose channels differ by up to {diff} of 255: "
                    "not a greyscale radiograph; score the original radiograph, not a screenshot"
                )
    return None


def check_file(path, record: Mapping | None = None, modalities: Sequence[str] = ACCEPTED_MODALITIES):
    """Why ``path`` is not scored, as ``(field, reason)``, or None when it is to be scored.

    Headers only, except for colour images (their channels are compared). ``record`` (a datalist entry) may add
    a ``view`` to check."""
    try:
        kind = sniff_format(path)
    except FileNotFoundError:
        return "file", "file does not exist; check the path (datalists: its base directory)"
    except IsADirectoryError:
        return "file", "is a directory, not an image"
    except OSError as e:
        return "file", f"cannot be read ({e}); check permissions and the storage mount"
    if os.path.getsize(path) == 0:
        return "file", "file is empty; re-export or re-download it"
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if kind is None or (kind == "raw_dicom" and ext in (".png", ".jpg", ".jpeg")):
        named = f"named {ext} but " if ext in (".png", ".jpg", ".jpeg", ".dcm", ".dicom") else ""
        return "file", f"{named}not a DICOM, PNG or JPEG file by its content; only images are scored"
    if kind in ("png", "jpeg"):
        problem = _check_pil(path, kind)
    else:
        problem = _check_dicom_header(path, raw=kind == "raw_dicom", modalities=modalities)
    if problem is None and record is not None and "view" in record:
        problem = _check_view(record.get("view"))
        if problem:
            problem = ("view", problem[1].replace("ViewPosition", "the datalist's view", 1))
    return problem


def privacy_rows(skipped: Sequence[Mapping], privacy=None) -> list[dict]:
    """The skipped entries as written: ``file`` and the paths inside ``reason`` through ``privacy``
    (:class:`bundle.privacy.Privacy`; None = as they are)."""
    if privacy is None or not privacy.active:
        return [dict(r) for r in skipped]
    return [
        {**r, "file": privacy.path(r.get("file", "")), "reason": privacy.text(r.get("reason", ""), [r.get("file")])}
        for r in skipped
    ]


def write_skipped(path, skipped: Sequence[Mapping], privacy=None) -> str:
    """``skipped.csv`` (columns :data:`SKIPPED_COLUMNS`, header even when empty), atomically; identifiers through
    ``privacy`` (:func:`privacy_rows`)."""
    text = rows_to_csv([{k: r.get(k, "") for k in SKIPPED_COLUMNS} for r in privacy_rows(skipped, privacy)])
    return write_text_atomic(path, text or ",".join(SKIPPED_COLUMNS) + "\r\n")


def scan_inputs(
    records: Sequence[Mapping],
    output_dir: str | None = None,
    modalities: Sequence[str] = ACCEPTED_MODALITIES,
    privacy=None,
) -> InputScan:
    """Split the records (``bundle.workflow.image_records``) into those to score and the skipped files.

    Writes ``<output_dir>/skipped.csv`` at once (the writer rewrites it at the end with the decoding failures), so
    the reasons are on disk even if the run stops later; its paths go through ``privacy`` (a
    :class:`bundle.privacy.Privacy`, docs/privacy.md). Raises when nothing is left to score.
    """
    scan = InputScan()
    for r in records:
        problem = check_file(r["image"], r, modalities)
        if problem:
            scan.skipped.append(_skip(r["image"], *problem))
        else:
            scan.records.append(dict(r))
    for s in scan.skipped:
        logger.warning(f"inference: skipped {s['file']}: {s['reason']}")
    where = ""
    if output_dir:
        where = write_skipped(os.path.join(output_dir, "skipped.csv"), scan.skipped, privacy)
    logger.info(f"inference: {len(scan.records)} images to score, {len(scan.skipped)} files skipped {where}")
    if not scan.records:
        raise ValueError(
            f"inference: none of the {len(records)} input files is a frontal chest radiograph that can be read; "
            f"the reasons are in {where or 'the log'}"
        )
    return scan


class SkipFailedDataset(Dataset):
    """MONAI Dataset whose items never raise: an item whose transform fails (a file that passed the header scan
    but cannot be decoded) becomes a blank placeholder with ``error`` set, which the writer lists as skipped.

    Why a placeholder and not None + a collate that drops it: a batch whose items all failed would then be empty,
    and the engine and the network need at least one image per iteration; a few blank images cost nothing.
    Every item gets ``error`` ("" when it loaded) and, in the placeholder, ``image`` (1, S, S) zeros, ``index``
    and a ``letterbox`` of the same type as Letterboxd's, so the batch collates as usual.

    For other preprocessing chains (the evaluation's, with labels and masks): ``template`` is one item the
    transform produced; the placeholder is then a copy of it with every tensor / array zeroed (same keys, shapes
    and dtypes, so it collates with loaded items). ``failed_key`` (e.g. ``"failed"``) adds a per-sample flag,
    False when loaded and True for a placeholder, that travels with the batch so metrics can drop the placeholders.
    """

    def __init__(
        self,
        data: Sequence,
        transform=None,
        image_size: int = 96,
        template: Mapping | None = None,
        failed_key: str | None = None,
    ) -> None:
        super().__init__(data=data, transform=transform)
        self.image_size = int(image_size)
        self.template = dict(template) if template is not None else None
        self.failed_key = failed_key

    def _transform(self, index: int):
        try:
            item = dict(super()._transform(index))
            item["error"] = ""
            if self.failed_key:
                item[self.failed_key] = False
            return item
        except Exception as e:
            rec = self.data[index]
            item = self._placeholder(rec, index)
            item["error"] = load_error_message(e, rec.get("image"))
            if self.failed_key:
                item[self.failed_key] = True
            return item

    def _placeholder(self, rec: Mapping, index: int) -> dict:
        if self.template is None:
            s = self.image_size
            return {
                "image": torch.zeros((1, s, s), dtype=torch.float32),
                "index": rec.get("index", index),
                "letterbox": letterbox_params(1, 1, s),
            }
        item = {k: _blank_like(v) for k, v in self.template.items() if k not in ("error", self.failed_key)}
        item["index"] = rec.get("index", index)
        return item


def _blank_like(v):
    """A zero value of ``v``'s type and shape (tensors, arrays, numbers); "" for strings; other values as they are."""
    if isinstance(v, torch.Tensor):
        return torch.zeros_like(v.as_tensor() if hasattr(v, "as_tensor") else v)
    if isinstance(v, np.ndarray):
        return np.zeros_like(v)
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, float, np.number)):
        return type(v)(0)
    if isinstance(v, str):
        return ""
    return v


def load_error_message(e: BaseException, path=None) -> str:
    """The reason an item failed to load: the loader's own message (``CXRLoadError``, which names the problem and
    the fix; MONAI wraps a transform's error, so the chain of causes is searched), else ``path: Type: message``."""
    err = e
    while not isinstance(err, CXRLoadError) and err.__cause__ is not None:
        err = err.__cause__
    return str(err) if isinstance(err, CXRLoadError) else f"{path}: {type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------------ original geometry
def maps_to_original(attn, letterbox) -> torch.Tensor:
    """(C, h, w) attention maps over the letterboxed S x S input -> (C, H, W) over the original H x W image.

    Each original pixel centre (x + 0.5, y + 0.5) goes to the letterbox point (x + 0.5) * scale + pad_left (the
    convention of bundle.transforms.geometry), where the map is sampled bilinearly (align_corners=False, as the
    training-time upsampling ``F.interpolate``): one ``grid_sample``, no intermediate S x S map.
    """
    scale, top, left, oh, ow = (float(v) for v in np.asarray(letterbox, dtype=np.float64))
    size = float(round(max(oh, ow) * scale))  # S: scale = S / max(H, W)
    a = torch.as_tensor(attn, dtype=torch.float32)
    xs = ((torch.arange(int(ow), dtype=torch.float64) + 0.5) * scale + left) / size * 2 - 1
    ys = ((torch.arange(int(oh), dtype=torch.float64) + 0.5) * scale + top) / size * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1).float()[None]  # (1, H, W, (x, y))
    return F.grid_sample(a[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def attention_peaks(maps: torch.Tensor) -> list[tuple[int, int]]:
    """(row, col) of each (H, W) map's maximum (the first one in row-major order on ties)."""
    c, _, w = maps.shape
    flat = torch.argmax(maps.reshape(c, -1), dim=1).tolist()
    return [divmod(int(i), w) for i in flat]


def attention_affine(letterbox, map_hw) -> np.ndarray:
    """4x4 affine of a raw (w, h, C) map: voxel (i = map column, j = map row, k = finding) -> (x, y, k) where x, y
    are the original image's pixel indices (x = column, y = row; pixel centres at integers), k unchanged.

    Map cell (j, i) covers the letterbox square [i, i + 1) * S / w; its centre maps back to the original through
    the inverse letterbox (x_orig = (u - pad_left) / scale), minus 0.5 for pixel-index coordinates.
    """
    scale, top, left, oh, ow = (float(v) for v in np.asarray(letterbox, dtype=np.float64))
    size = float(round(max(oh, ow) * scale))
    mh, mw = (int(v) for v in map_hw)
    sx, sy = size / mw / scale, size / mh / scale
    aff = np.eye(4)
    aff[0, 0], aff[0, 3] = sx, (0.5 * size / mw - left) / scale - 0.5
    aff[1, 1], aff[1, 3] = sy, (0.5 * size / mh - top) / scale - 0.5
    return aff


def save_attention_nifti(path, attn, letterbox, classes: Sequence[str] | None = None) -> str:
    """The raw (C, h, w) maps as NIfTI (nibabel), array (w, h, C) float32, affine :func:`attention_affine`.

    Axis order x, y (column, row) as MONAI and ITK load 2D images, so the map and the original image share one
    world frame (the original pixel grid): ``monai.transforms.ResampleToMatch`` puts one on the other.
    """
    import nibabel as nib

    from bundle.utils.atomic import atomic_path

    a = np.asarray(attn, dtype=np.float32)
    data = np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # (C, h, w) -> (w, h, C)
    img = nib.Nifti1Image(data, attention_affine(letterbox, a.shape[-2:]))
    img.header.set_xyzt_units(xyz="unknown")  # pixels of the original image, not mm
    img.header["descrip"] = ("attention x=col y=row k=" + ",".join(classes or []))[:79]
    ext = ".nii.gz" if os.fspath(path).endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=ext) as tmp:
        nib.save(img, tmp)
    return os.fspath(path)
