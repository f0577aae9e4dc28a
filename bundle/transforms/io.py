"""Chest X-ray loading: PNG/JPEG/DICOM (incl. compressed) -> float32 (H, W) in [0, 1], display convention.

Display convention: bone and effusion bright, aerated lung dark (what a radiologist sees on screen).

DICOM rules (docs/image_pipeline.md explains the why):
  stored values -> Modality LUT (Modality LUT Sequence, else Rescale Slope/Intercept; pydicom.apply_modality_lut)
  -> VOI LUT (VOI LUT Sequence preferred, else the FIRST Window Center/Width pair; pydicom.apply_voi_lut)
  -> scaled to [0, 1] by the VOI output range (window: pydicom's y_min..y_max; LUT: the LUT data's min..max)
     or, without any VOI, min-max over the image
  -> inverted once when PhotometricInterpretation is MONOCHROME1 or PresentationLUTShape is INVERSE.
All of these are point operations of the stored value, so they are evaluated with pydicom's own functions on a
ramp of every possible stored value and applied as one float32 lookup table (np.take): identical results to the
per-pixel float64 path, several times faster, and no float64 copies of the image.

Hostile and broken inputs (docs/image_pipeline.md, "Limits and refusals") end in a :class:`CXRLoadError` that names
the file, the field/tag and the fix, never in a foreign exception, a hang or a NaN image:
  * only regular files are opened (device files such as /dev/zero, FIFOs, sockets are refused after os.stat),
    and with ``data_root`` a path resolving outside that folder is refused (path traversal);
  * the declared size (PNG IHDR, JPEG SOF, DICOM Rows x Columns x frames x samples) is checked against
    ``max_pixels`` (default :data:`MAX_PIXELS`) before any pixel is decoded (decompression bombs);
  * non-finite pixels (Float Pixel Data) and non-finite LUT/rescale/window values are refused.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from bundle.data.datalist.schema import MAX_PIXELS
from bundle.demographics import UNKNOWN, age_from_dates, age_years, sex_label

__all__ = [
    "CXRLoadError",
    "MAX_PIXELS",
    "check_regular_file",
    "load_cxr",
    "parse_dicom_age",
    "dicom_age",
    "read_dicom_demographics",
    "DEMOGRAPHIC_TAGS",
    "LoadCXRd",
    "RADIOGRAPH_MODALITIES",
    "content_size",
]

# Projection radiography modalities. "DR" and "RG" are retired / non-standard but found in the wild; OT is what
# secondary captures and many converted datasets carry; an empty Modality is tolerated.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT", ""})

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG = b"\xff\xd8\xff"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JPEG_BASELINE_UID = "1.2.840.10008.1.2.4.50"
_JPEGLS_UIDS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K_UIDS = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}


class CXRLoadError(ValueError):
    """An image could not be loaded as a chest radiograph; the message names the file, the problem and a fix."""


def _err(path, problem: str, fix: str) -> CXRLoadError:
    return CXRLoadError(f"{path}: {problem}. {fix}")


def _is_decoder_panic(e: BaseException) -> bool:
    """Rust decoder plugins (pylibjpeg-rle, ...) raise pyo3's PanicException, a BaseException, on damaged data."""
    return type(e).__name__ == "PanicException"


_SIZE_FIX = (
    "The header is damaged or the file is a decompression bomb: drop it from the datalist; if the image is genuine, "
    "raise the limit (load_cxr/LoadCXRd max_pixels, config key 'max_pixels')"
)


def _check_size(path, field: str, h, w, max_pixels: int | None, frames: int = 1, samples: int = 1) -> None:
    """Refuse a declared size before decoding: non-positive sides, or more than ``max_pixels`` pixels in all."""
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise _err(path, f"{field} declares an empty image ({h}x{w})", "The header is damaged; re-export the image")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    n = h * w * max(int(frames), 1) * max(int(samples), 1)
    if n > limit:
        extra = (f" x {frames} frames" if frames > 1 else "") + (f" x {samples} samples" if samples > 1 else "")
        raise _err(path, f"{field} declares {h}x{w}{extra} = {n} pixels, over the limit max_pixels={limit}", _SIZE_FIX)


_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path, data_root=None, what: str = "image") -> os.stat_result:
    """os.stat ``path`` and refuse anything but a regular file (device, FIFO, socket, directory) without opening it,
    and, with ``data_root``, a path that resolves (symlinks, "..") outside that folder. Returns the stat result.

    Raises:
        CXRLoadError: naming the file, what it is and the fix.
    """
    if data_root is not None:
        root = os.path.realpath(os.fspath(data_root))
        real = os.path.realpath(os.fspath(path))
        if os.path.commonpath([root, real]) != root:
            raise _err(
                path,
                f"resolves to {real}, outside the data root {root} (data_root); refused (path traversal?)",
                "Keep images under the data root and write their paths without '..' or links leading out of it",
            )
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise _err(path, "file does not exist", "Check the datalist path and its base directory") from e
    except NotADirectoryError as e:
        raise _err(path, "file does not exist (a parent is not a directory)", "Check the datalist path") from e
    except (OSError, ValueError) as e:
        raise _err(path, f"cannot be read ({e})", "Check permissions and the storage mount") from e
    if stat.S_ISDIR(st.st_mode):
        raise _err(path, f"is a directory, not an {what}", f"Point the datalist at an {what} file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise _err(
            path,
            f"is {kind}, not a regular {what} file; refused (it could hang or never end)",
            f"Point the datalist at a regular {what} file",
        )
    return st


# ----------------------------------------------------------------------------------------------- metadata
def parse_dicom_age(value: Any) -> float | None:
    """DICOM AS string ("045Y", "006M", "010W", "003D"; also "45", "45Y") -> age in years; None if missing,
    unparsable or outside [0, 110] (:func:`bundle.demographics.age_years`, the bundle's one age parser)."""
    return age_years(value)


#: the header elements :func:`read_dicom_demographics` reads (``specific_tags``: nothing else is parsed)
DEMOGRAPHIC_TAGS = ("PatientSex", "PatientAge", "PatientBirthDate", "StudyDate", "AcquisitionDate")


def dicom_age(ds) -> tuple[float | None, str | None]:
    """``(age in years, where from)`` of a DICOM dataset: PatientAge (0010,1010) when it parses ("063Y", "006M"),
    else PatientBirthDate (0010,0030) with StudyDate (0008,0020), or AcquisitionDate (0008,0022) when the study date
    gives nothing (:func:`bundle.demographics.age_from_dates`: completed years); ``(None, None)`` when neither does."""
    age = parse_dicom_age(ds.get("PatientAge"))
    if age is not None:
        return age, "PatientAge"
    birth = ds.get("PatientBirthDate")
    for keyword in ("StudyDate", "AcquisitionDate"):
        age = age_from_dates(birth, ds.get(keyword))
        if age is not None:
            return age, "PatientBirthDate"
    return None, None


def read_dicom_demographics(path) -> dict:
    """Sex and age from a DICOM file's header alone: ``{"sex": "M"/"F"/None, "age": years or None, "age_from":
    "PatientAge"/"PatientBirthDate"/None}``; ``{}`` for a PNG/JPEG or a file whose header does not parse.

    Reads only :data:`DEMOGRAPHIC_TAGS` (``pydicom.dcmread(stop_before_pixels=True, specific_tags=...)``): no pixel
    is read or decoded, so the evaluation can join demographics to images the loader already decoded. Never raises.
    """
    import pydicom

    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if head.startswith(_PNG_SIG) or head.startswith(_JPEG_SIG):
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd headers: what parses is used, the rest stays unknown
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=list(DEMOGRAPHIC_TAGS), force=head[128:132] != b"DICM"
            )
        age, age_from = dicom_age(ds)
        return {"sex": _parse_sex(ds.get("PatientSex")), "age": age, "age_from": age_from}
    except Exception:  # noqa: BLE001  (unreadable header: the demographics stay unknown, and are counted as such)
        return {}


def _parse_sex(value: Any) -> str | None:
    """DICOM PatientSex -> "M"/"F" (:func:`bundle.demographics.sex_label`), None when unknown ("O", empty) so
    that LoadCXRd only fills a record's sex from a header that knows it."""
    s = sex_label(value)
    return None if s == UNKNOWN else s


def _dicom_meta(ds, path) -> dict:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    return {
        "format": "dicom",
        "sex": _parse_sex(ds.get("PatientSex")),
        "age": dicom_age(ds)[0],
        "modality": str(ds.get("Modality", "") or "").strip().upper() or None,
        "view": view,
        "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None,
        "orig_size": (int(ds.Rows), int(ds.Columns)),
        "pixel_spacing": [float(v) for v in spacing] if spacing else None,
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "") or None,
        "path": os.fspath(path),
    }


def content_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') of an h x w image resized so its longer side is ``size`` (MONAI Resize size_mode="longest" rounding)."""
    scale = size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


# ----------------------------------------------------------------------------------------------- resizing
def _resize_area(
    img: np.ndarray, hw: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Area (box) downsampling of a float32 (H, W) image with PIL: integer reduce() first, then an exact BOX resize.

    PIL's BOX filter weights partially covered source pixels, i.e. it is true area averaging; reduce() by the integer
    part of the factor first is the same average computed faster. ``box`` (x0, y0, x1, y1, in source pixels, PIL's
    convention: pixel i covers [i, i + 1)) is the source region that maps onto the output: used to place JPEG 2000
    reduced-resolution images on the native field of view (see _decode_j2k_reduced).
    """
    h, w = hw
    if img.shape == (h, w) and box is None:
        return img
    src = np.ascontiguousarray(img, dtype=np.float32)
    if box is not None:
        # PIL refuses boxes outside the image: pad one edge pixel, then sample the box shifted by that pixel
        pim = Image.fromarray(np.pad(src, 1, mode="edge"), mode="F")
        padded = tuple(1.0 + float(v) for v in box)
        # bilinear (PIL widens its support when shrinking, so it still anti-aliases the remaining factor < 2);
        # PIL's BOX ignores sub-pixel box offsets at scales near 1 (measured), which would undo the shift
        return np.asarray(pim.resize((w, h), Image.Resampling.BILINEAR, box=padded), dtype=np.float32)
    pim = Image.fromarray(src, mode="F")
    fy, fx = img.shape[0] // h, img.shape[1] // w
    f = min(fx, fy)
    if f >= 2 and img.shape[0] % f == 0 and img.shape[1] % f == 0:
        pim = pim.reduce(f)
    return np.asarray(pim.resize((w, h), Image.Resampling.BOX), dtype=np.float32)


# ----------------------------------------------------------------------------------------------- PNG / JPEG
def _load_pil(path, kind: str, target_size: int | None, max_pixels: int | None = None):
    try:
        with Image.open(path) as im:
            full_size = (im.size[1], im.size[0])
            # lazy open: only the header (PNG IHDR, JPEG SOF) has been read; check the size before decoding
            _check_size(path, f"{kind.upper()} header", full_size[0], full_size[1], max_pixels)
            if kind == "jpeg" and target_size:
                # DCT-domain downscaling (1/2, 1/4, 1/8) to the smallest scale still >= the target size.
                im.draft("L", (target_size, target_size))
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
            elif mode == "I":
                # 16-bit greyscale PNGs open as "I" in some Pillow builds; their range is still 16 bits.
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / (65535.0 if arr.max(initial=0) <= 65535 else float(arr.max()))
            elif mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise _err(path, "float image holds NaN/inf pixels", "Re-export it with finite values")
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
            else:
                if mode in ("LA", "La"):
                    im = im.getchannel(0)
                elif mode != "L":
                    im = im.convert("L")  # RGB/RGBA/P/1/CMYK -> ITU-R 601 luma, alpha ignored
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except CXRLoadError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit (Image.MAX_IMAGE_PIXELS) when ours is raised above it
        raise _err(path, f"{kind.upper()} header declares a size over PIL's limit ({e})", _SIZE_FIX) from e
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError variants for damaged files
        raise _err(
            path,
            f"unreadable {kind.upper()} ({type(e).__name__}: {e})",
            "The file is damaged or truncated; re-export or re-download it, or drop it from the datalist",
        ) from e
    meta = {
        "format": kind,
        "sex": None,
        "age": None,
        "modality": None,
        "view": None,
        "photometric": "MONOCHROME2",
        "orig_size": full_size,
        "pixel_spacing": None,
        "transfer_syntax": None,
        "path": os.fspath(path),
    }
    return arr, meta


# ----------------------------------------------------------------------------------------------- DICOM
def _read_dicom(path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no 128-byte preamble + "DICM": may still be a raw dataset, try below
    except Exception as e:
        raise _err(
            path,
            f"DICOM header could not be parsed ({type(e).__name__}: {e})",
            "The file is truncated or damaged; re-export it from the PACS or drop it from the datalist",
        ) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and "Rows" in ds
    except Exception:
        ok = False
    if not ok:
        raise _err(
            path,
            "not a DICOM file (no 'DICM' marker and not a readable raw DICOM dataset)",
            "Check that the path points to the image and not to a report/text file; rename PNG/JPEG files "
            "with their real extension",
        )
    return ds


def _is_image_sop(ds) -> bool:
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    try:
        return "Image Storage" in UID(str(uid or "")).name
    except Exception:  # noqa: BLE001  (a damaged UID is just "unknown")
        return False


def _header_int(ds, keyword: str, tag: str, path, default: int = 1) -> int:
    v = ds.get(keyword, default)
    try:
        return int(v or default)  # as before: 0 / empty / missing mean the default
    except (TypeError, ValueError) as e:
        raise _err(path, f"{keyword} {tag} is not an integer ({v!r})", "The header is damaged; re-export it") from e


def _check_dicom(ds, path, max_pixels: int | None = None, file_size: int | None = None):
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise _err(
            path,
            f"Modality {modality!r} is not a projection radiograph (expected one of CR, DX, DR, RG, OT)",
            "Remove this series from the datalist; CT/MR/US/NM/PT/MG images are not chest radiographs",
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        size = f" ({file_size} bytes)" if file_size is not None else ""
        if "Rows" in ds or "Columns" in ds or "BitsAllocated" in ds or _is_image_sop(ds):
            raise _err(
                path,
                f"DICOM has no Pixel Data (7FE0,0010) although its header declares an image{size}: "
                "the file is truncated (too short to hold pixel data) or its pixels were stripped",
                "Re-export or re-download the image",
            )
        raise _err(
            path,
            f"DICOM has no Pixel Data (7FE0,0010){size}: a non-image object (report, presentation state, ...) "
            "or a truncated file",
            "Point the datalist at the image, or re-export / re-download a truncated file",
        )
    if not ds.get("Rows") or not ds.get("Columns"):
        raise _err(path, "DICOM lacks Rows/Columns", "The header is damaged; re-export the image")
    nframes = _header_int(ds, "NumberOfFrames", "(0028,0008)", path)
    _check_size(
        path,
        "Rows (0028,0010) x Columns (0028,0011)",
        _header_int(ds, "Rows", "(0028,0010)", path),
        _header_int(ds, "Columns", "(0028,0011)", path),
        max_pixels,
        frames=nframes,
        samples=_header_int(ds, "SamplesPerPixel", "(0028,0002)", path),
    )
    if nframes > 1:
        raise _err(
            path,
            f"multi-frame DICOM ({nframes} frames); a chest radiograph has one frame",
            "Extract the frame you want (e.g. with pydicom: ds.pixel_array[i]) into its own file",
        )
    spp = _header_int(ds, "SamplesPerPixel", "(0028,0002)", path)
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if spp != 1 and pi in ("MONOCHROME1", "MONOCHROME2"):
        raise _err(
            path,
            f"SamplesPerPixel={spp} contradicts PhotometricInterpretation {pi}",
            "Fix the header or re-export the image",
        )


def _j2k_codestream_info(cs: bytes) -> dict | None:
    """Precision, signedness, components and decomposition levels from a raw J2K codestream's SIZ/COD markers."""
    if not cs.startswith(_J2K_SOC_SIZ):
        return None
    try:
        lsiz = struct.unpack(">H", cs[4:6])[0]
        siz = cs[6 : 4 + lsiz]
        csiz = struct.unpack(">H", siz[34:36])[0]
        ssiz = siz[36]
        xo, yo = struct.unpack(">II", siz[10:18])  # XOsiz, YOsiz (after Rsiz, Xsiz, Ysiz)
        info = {
            "components": csiz,
            "signed": bool(ssiz & 0x80),
            "precision": (ssiz & 0x7F) + 1,
            "levels": None,
            "offset": (xo, yo),
        }
        pos = 4 + lsiz
        while pos + 4 <= len(cs):
            marker, length = struct.unpack(">HH", cs[pos : pos + 4])
            if marker == 0xFF52:  # COD: Scod(1) SGcod(4) SPcod: levels first
                info["levels"] = cs[pos + 9]
            elif marker == 0xFF53:  # COC may lower levels for one component; be safe and decline reduction
                info["levels"] = 0
            if marker == 0xFF90:  # SOT: main header over
                break
            pos += 2 + length
        return info
    except (struct.error, IndexError):
        return None


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG SOFn and JPEG-LS SOF55


def _first_fragment_head(pixel_data, n: int = 65536) -> bytes:
    """The first bytes of the first fragment of encapsulated Pixel Data (no copy of the whole frame)."""
    if not isinstance(pixel_data, (bytes, bytearray)) or pixel_data[:4] != _ITEM or len(pixel_data) < 16:
        return b""
    pos = 8 + struct.unpack("<I", pixel_data[4:8])[0]  # skip the Basic Offset Table item
    if pixel_data[pos : pos + 4] != _ITEM:
        return b""
    return bytes(pixel_data[pos + 8 : pos + 8 + n])


def _codestream_size(head: bytes) -> tuple[str, int, int, int] | None:
    """(kind, rows, columns, components) a JPEG / JPEG-LS / JPEG 2000 codestream declares in its header, else None."""
    try:
        if head.startswith(_J2K_SOC_SIZ):  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz
            xs, ys, xo, yo = struct.unpack(">IIII", head[8:24])
            return "JPEG 2000 SIZ", ys - yo, xs - xo, struct.unpack(">H", head[40:42])[0]
        if head.startswith(b"\xff\xd8"):
            pos = 2
            while pos + 4 <= len(head):
                if head[pos] != 0xFF:
                    return None
                marker = head[pos + 1]
                if marker == 0xFF:  # fill byte
                    pos += 1
                    continue
                if marker in _SOF_MARKERS:  # length(2) P(1) Y(2) X(2) Nf(1)
                    y, x = struct.unpack(">HH", head[pos + 5 : pos + 9])
                    return ("JPEG-LS SOF55" if marker == 0xF7 else "JPEG SOF"), y, x, head[pos + 9]
                pos += 2 + struct.unpack(">H", head[pos + 2 : pos + 4])[0]
    except (struct.error, IndexError):
        return None
    return None


def _check_codestream(ds, path, max_pixels: int | None) -> None:
    """A compressed frame's own header may declare a larger image than Rows/Columns: check it before decoding."""
    info = _codestream_size(_first_fragment_head(ds.get("PixelData")))
    if info is not None and info[1] > 0 and info[2] > 0:  # Y = 0 (size in a later DNL marker): decoder decides
        kind, h, w, comps = info
        _check_size(path, f"{kind} header in Pixel Data (7FE0,0010)", h, w, max_pixels, samples=max(comps, 1))


def _has_pyjpegls() -> bool:
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    return "pyjpegls" in JPEGLSLosslessDecoder.available_plugins


def _dicom_frame_bytes(ds) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _pillow_j2k_level(cs: bytes, r: int, rows: int, cols: int) -> np.ndarray:
    """Resolution level r of a one-component J2K codestream, decoded by Pillow's OpenJPEG codec.

    OpenJPEG returns ceil(n / 2^r) samples per axis (image offset 0). Pillow (13.0) sizes its reduced image as
    round(n / 2^r) instead, so for sizes where the two differ (1841 at r = 2 or 3, ...) its public ``reduce``
    fails with "broken data stream". There the image size and the tile are set to OpenJPEG's size before loading,
    which is what Pillow's own ``load()`` does with its rounded size (private ``_size``/``tile``; the shape check
    below and tests/test_jpeg2000.py catch a Pillow that changes them, and the caller then decodes in full).
    pylibjpeg-openjpeg (2.6) has no reduce option, hence Pillow.
    """
    from PIL import ImageFile

    power = 1 << r
    size = (-(-cols // power), -(-rows // power))  # (width, height), ceil division like OpenJPEG
    im = Image.open(io.BytesIO(cs))
    if im.size != (cols, rows):
        raise ValueError(f"codestream is {im.size[0]} x {im.size[1]}, header says {cols} x {rows}")
    if tuple(int((n + (power >> 1)) / power) for n in im.size) == size:
        im.reduce = r  # Pillow's size agrees with OpenJPEG's: the public path
    else:
        t = im.tile[0]
        im._size = size
        im.tile = [ImageFile._Tile(t[0], (0, 0, *size), t[2], (t[3][0], r, *t[3][2:]))]
    im.load()
    arr = np.asarray(im)
    if arr.shape != (size[1], size[0]):
        raise ValueError(f"reduced decode gave {arr.shape}, expected {(size[1], size[0])}")
    return arr


def _decode_j2k_reduced(ds, target_size: int | None):
    """Decode a JPEG 2000 frame at a reduced resolution (2^-r) with Pillow/OpenJPEG when the target size allows.

    Returns (stored values at reduced size (integers, same scale as pixel_array), source box for the resize),
    or None to use the full decoder. Any image size works: level r has ceil(Rows / 2^r) x ceil(Columns / 2^r)
    samples; r never takes the longer side below the target size and never exceeds the codestream's levels.
    Geometry: the wavelet low-pass sample n of level r is centred on native pixel 2^r * n (image offset 0), so
    in the reduced image's pixel coordinates (PIL: sample n covers [n, n + 1)) the native field of view
    [0, Columns) x [0, Rows) is the box [s, s + Columns / 2^r) x [s, s + Rows / 2^r), s = (2^r - 1) / 2^(r + 1)
    (0.44 px for r = 3). Resizing that box gives the same output grid as the full decode + area resize, for even
    and odd sizes alike.
    """
    if not target_size:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    r = 0
    while max(rows, cols) >> (r + 1) >= target_size:
        r += 1
    if r == 0:
        return None
    cs = _dicom_frame_bytes(ds)
    info = _j2k_codestream_info(cs)
    if not info or info["components"] != 1 or info["signed"] or info["precision"] > 16 or not info["levels"]:
        return None
    if info["offset"] != (0, 0):  # sample positions depend on the offset's parity; rare: the full decoder decides
        return None
    r = min(r, info["levels"])
    arr = _pillow_j2k_level(cs, r, rows, cols)
    if arr.dtype == np.uint16 and info["precision"] < 16:
        # Pillow left-aligns n-bit samples in 16 bits; bring them back to stored values (rounded)
        shift = 16 - info["precision"]
        arr = ((arr.astype(np.uint32) + (1 << (shift - 1))) >> shift).astype(np.uint16)
    power = 1 << r
    s = (power - 1) / (2 * power)
    return arr, (s, s, s + cols / power, s + rows / power)


def _decode_jpeg_draft(ds, target_size: int | None):
    """8-bit JPEG baseline frame decoded with DCT scaling (Pillow draft) when the target size allows."""
    if not target_size or int(ds.get("BitsStored", 8)) > 8:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    k = 0
    while (
        k < 3
        and max(rows, cols) // 2 ** (k + 1) >= target_size
        and rows % 2 ** (k + 1) == 0
        and cols % 2 ** (k + 1) == 0
    ):
        k += 1
    if k == 0:
        return None
    im = Image.open(io.BytesIO(_dicom_frame_bytes(ds)))
    im.draft("L", (cols >> k, rows >> k))
    im = im.convert("L") if im.mode != "L" else im
    arr = np.asarray(im)
    return arr if arr.shape == (rows >> k, cols >> k) else None


def _stored_lut(ds, arr: np.ndarray, path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(index array, float32 LUT) so that ``lut[index]`` is every pixel's display value in [0, 1].

    The LUT is built by running pydicom's modality/VOI functions on a ramp of stored values, so it is exactly the
    per-pixel result; applying it is one np.take over the uint8/uint16 pixels (no float64 image copies).
    """
    if arr.dtype in (np.uint8, np.uint16):
        index = arr
        ramp = np.arange(int(arr.max()) + 1, dtype=arr.dtype)
    elif arr.dtype in (np.int8, np.int16):
        # signed: index by the unsigned view; the ramp lists every signed value in that order
        udt = np.uint8 if arr.dtype == np.int8 else np.uint16
        index = arr.view(udt)
        ramp = np.arange(np.iinfo(udt).max + 1, dtype=udt).view(arr.dtype)
    else:
        return None, None
    present = None
    if _voi_kind(ds) is None:  # min-max over the values that occur in this image
        if ds.get("ModalityLUTSequence"):  # arbitrary (maybe non-monotone) table: look at every value present
            present = np.bincount(index.ravel(), minlength=ramp.size)[: ramp.size] > 0
        else:  # rescale is monotone: the extremes come from the stored extremes
            present = (ramp >= arr.min()) & (ramp <= arr.max())
    return index, _display_lut(ds, ramp, path, present)


def _voi_kind(ds) -> str | None:
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


_FINITE_TAGS = (
    ("RescaleSlope", "(0028,1053)"),
    ("RescaleIntercept", "(0028,1052)"),
    ("WindowCenter", "(0028,1050)"),
    ("WindowWidth", "(0028,1051)"),
)


def _check_finite_header(ds, path) -> None:
    """Rescale and window values must be finite numbers (a NaN slope would make every pixel NaN)."""
    for keyword, tag in _FINITE_TAGS:
        v = ds.get(keyword)
        if v is None or v == "":
            continue
        values = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
        try:
            ok = all(math.isfinite(float(x)) for x in values)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _err(
                path,
                f"{keyword} {tag} is {v!r}, not a finite number: every pixel would be NaN/inf",
                f"Fix {keyword} in the header (e.g. with pydicom) or re-export the image",
            )


def _display_lut(ds, values: np.ndarray, path, present: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT (first) -> [0, 1] -> inversion, with pydicom's pixel functions.

    ``present`` (bool over ``values``) restricts the min-max used when the file has no VOI; None = all values.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        mod = apply_modality_lut(values, ds)
        kind = _voi_kind(ds)
        if kind == "lut":
            if mod.dtype.kind == "f":  # VOI LUT input must be integral (rescaled values): round, don't truncate
                mod = np.rint(mod).astype(np.int64)
            out = np.asarray(apply_voi_lut(mod, ds, index=0, prefer_lut=True), dtype=np.float64)
            # scale by the LUT's own output extremes (robust to descriptors declaring 16 bits for 12-bit data)
            first = int(ds.VOILUTSequence[0].LUTDescriptor[1])
            table = apply_voi_lut(np.arange(2**16, dtype=np.int64) + first, ds, index=0, prefer_lut=True)
            lo, hi = float(table.min()), float(table.max())
        elif kind == "window":
            out = np.asarray(apply_voi_lut(mod, ds, index=0, prefer_lut=True), dtype=np.float64)
            with np.errstate(over="ignore"):  # probe far outside the window: pydicom's y_min / y_max
                lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e30, 1e30]), ds, index=0, prefer_lut=True))
        else:
            out = np.asarray(mod, dtype=np.float64)
            sel = out if present is None else out[present]
            lo, hi = float(sel.min()), float(sel.max())
    except CXRLoadError:
        raise
    except Exception as e:
        raise _err(
            path,
            f"DICOM LUT/window attributes could not be applied ({type(e).__name__}: {e})",
            "Check RescaleSlope/Intercept, Modality/VOI LUT Sequence and WindowCenter/Width in the header",
        ) from e
    if not (math.isfinite(lo) and math.isfinite(hi)) or not np.isfinite(out).all():
        tags = (
            "Modality LUT Sequence (0028,3000) / RescaleSlope (0028,1053) / RescaleIntercept (0028,1052)"
            if not np.isfinite(np.asarray(mod, dtype=np.float64)).all()
            else "VOI LUT Sequence (0028,3010) / WindowCenter (0028,1050) / WindowWidth (0028,1051)"
        )
        raise _err(
            path,
            f"the LUT/window attributes {tags} give non-finite (NaN/inf) display values",
            "Fix those attributes in the header or re-export the image",
        )
    if hi == lo:
        res = np.zeros(out.shape, np.float32)
    else:  # lo > hi happens with a negative slope: the division handles the orientation
        with np.errstate(over="ignore", invalid="ignore"):
            res = ((out - lo) / (hi - lo)).clip(0.0, 1.0).astype(np.float32)
        if not np.isfinite(res).all():  # hi - lo overflowed (e.g. a slope near the float64 maximum)
            raise _err(
                path,
                "RescaleSlope (0028,1053) / RescaleIntercept (0028,1052) give a value range too wide to scale",
                "Fix the rescale attributes in the header or re-export the image",
            )
    if _inverted(ds):
        res = 1.0 - res
    return res


def _inverted(ds) -> bool:
    # DX/CR: MONOCHROME1 *requires* PresentationLUTShape INVERSE, both describing the same single inversion,
    # so invert once if either says so (never twice).
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return pi == "MONOCHROME1" or shape == "INVERSE"


def _load_dicom(path, target_size: int | None, max_pixels: int | None = None, file_size: int | None = None):
    ds = _read_dicom(path)
    _check_dicom(ds, path, max_pixels, file_size)  # header only: the size limit is enforced before any decoding
    _check_finite_header(ds, path)
    meta = _dicom_meta(ds, path)
    ts = meta["transfer_syntax"] or ""
    if ts in _J2K_UIDS or ts in _JPEGLS_UIDS or ts.startswith("1.2.840.10008.1.2.4."):
        _check_codestream(ds, path, max_pixels)
    arr, box = None, None
    try:
        if ts in _J2K_UIDS:
            arr, box = _decode_j2k_reduced(ds, target_size) or (None, None)
        elif ts == _JPEG_BASELINE_UID and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
            arr = _decode_jpeg_draft(ds, target_size)
    except BaseException as e:  # noqa: B036  (any trouble with the fast paths: the reference decoder decides)
        if not (isinstance(e, Exception) or _is_decoder_panic(e)):
            raise
        arr = None
    if arr is None:
        try:
            if ts in _JPEGLS_UIDS and _has_pyjpegls():
                # pydicom's default JPEG-LS plugin (pylibjpeg/libjpeg) decodes ~4x slower than CharLS (pyjpegls)
                ds.pixel_array_options(decoding_plugin="pyjpegls")
            arr = ds.pixel_array
        except BaseException as e:  # noqa: B036  (Exception, or a decoder plugin's PanicException)
            if not (isinstance(e, Exception) or _is_decoder_panic(e)):
                raise
            raise _err(
                path,
                f"pixel data could not be decoded ({type(e).__name__}: {e})",
                "The file is truncated/damaged, or its transfer syntax needs a decoder plugin "
                "(pylibjpeg-openjpeg, pylibjpeg-libjpeg, pylibjpeg-rle, pyjpegls)",
            ) from e
    if arr.dtype.kind == "f":  # Float / Double Float Pixel Data: NaN or inf pixels are refused, never propagated
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            tag = (
                "Double Float Pixel Data (7FE0,0009)"
                if "DoubleFloatPixelData" in ds
                else "Float Pixel Data (7FE0,0008)"
            )
            raise _err(
                path,
                f"{tag} holds {bad} non-finite (NaN/inf) pixel(s)",
                "Re-export the image with finite values (e.g. NaN replaced by the background value)",
            )
    if arr.ndim not in (2, 3):
        raise _err(path, f"unexpected pixel array shape {arr.shape}", "Expected a single-frame 2D image")
    if arr.ndim == 3:  # colour secondary capture: luma
        if arr.shape[-1] not in (3, 4):
            raise _err(path, f"unexpected pixel array shape {arr.shape}", "Expected a single-frame 2D image")
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)), meta, 0.0
    index, lut = _stored_lut(ds, arr, path)
    if lut is not None:
        img = np.take(lut, index)
    else:  # float or 32-bit pixel data: apply the same functions per pixel
        img = _display_lut(ds, arr, path)
    return img, meta, box


# ----------------------------------------------------------------------------------------------- public API
def _sniff(path, max_pixels: int | None = None) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except FileNotFoundError as e:
        raise _err(path, "file does not exist", "Check the datalist path and its base directory") from e
    except IsADirectoryError as e:
        raise _err(path, "is a directory, not an image", "Point the datalist at an image file") from e
    except OSError as e:
        raise _err(path, f"cannot be read ({e})", "Check permissions and the storage mount") from e
    if not head:
        raise _err(path, "file is empty", "Re-export or re-download the image")
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIG):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise _err(path, "PNG has no IHDR chunk first (truncated or damaged)", "Re-export the image")
        w, h = struct.unpack(">II", head[16:24])
        _check_size(path, "PNG IHDR", h, w, max_pixels)  # before PIL (whose own limit is a warning below 2x)
        return "png"
    if head.startswith(_JPEG_SIG):
        return "jpeg"
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in (".png",):
        raise _err(path, "is named .png but is not a PNG file", "Re-export the image or fix its extension")
    if ext in (".jpg", ".jpeg"):
        raise _err(path, "is named .jpg but is not a JPEG file", "Re-export the image or fix its extension")
    return "dicom"  # .dcm / .dicom / no extension: may be a raw DICOM dataset without preamble


def load_cxr(
    path,
    return_meta: bool = False,
    target_size: int | None = None,
    max_pixels: int | None = None,
    data_root: str | os.PathLike | None = None,
):
    """Load a chest radiograph as float32 (H, W) in [0, 1], bone bright and lung dark.

    Args:
        path: PNG (8/16-bit, grey/RGB/RGBA), JPEG, or DICOM (uncompressed, JPEG 2000, JPEG-LS, RLE, JPEG).
        return_meta: also return a dict with sex ("M"/"F"/None), age (years or None), modality, view,
            photometric, orig_size (native (H, W)), pixel_spacing, format, transfer_syntax, path.
        target_size: optional hint: the caller will resize so the longer side is ``target_size``. The result is
            then already resized (area) to that size, and decoders that can skip detail (JPEG 2000 resolution
            levels, JPEG DCT scaling) decode only what is needed. Never upsamples. ``meta["orig_size"]`` stays native.
        max_pixels: refuse images whose header declares more pixels (rows x columns x frames x samples) than this,
            before decoding; None = :data:`MAX_PIXELS` (2**27, e.g. 16384 x 8192).
        data_root: when given, refuse paths that resolve (symlinks, "..") outside this folder.

    Raises:
        CXRLoadError: missing/truncated/unreadable file, not a regular file (device, FIFO), path outside
            ``data_root``, declared size over ``max_pixels``, non-finite pixels or LUT/rescale/window values,
            non-radiograph modality, multi-frame DICOM, no pixel data. The message names the file and the fix.
    """
    if target_size is not None:
        target_size = int(target_size)
        if target_size < 1:
            raise ValueError(f"target_size must be a positive int, got {target_size}")
    if not isinstance(path, (str, bytes, os.PathLike)):  # an int would be taken as an open file descriptor
        raise TypeError(f"load_cxr: path must be a file path, got {type(path).__name__}")
    st = check_regular_file(path, data_root)
    kind = _sniff(path, max_pixels)
    box = None  # the source box of a JPEG 2000 reduced-resolution decode (see _decode_j2k_reduced)
    try:
        if kind == "dicom":
            img, meta, box = _load_dicom(path, target_size, max_pixels, st.st_size)
        else:
            img, meta = _load_pil(path, kind, target_size, max_pixels)
    except CXRLoadError:
        raise
    except BaseException as e:  # noqa: B036  (a damaged header met code that trusted it; MemoryError included)
        if not (isinstance(e, Exception) or _is_decoder_panic(e)):
            raise
        what = "DICOM header or pixel data is damaged" if kind == "dicom" else "could not be loaded"
        raise _err(
            path,
            f"{what} ({type(e).__name__}: {e})",
            "The file is damaged or not a supported chest radiograph; re-export it or drop it from the datalist",
        ) from e
    if target_size:
        h, w = meta["orig_size"]
        if max(h, w) > target_size:
            img = _resize_area(img, content_size(h, w, target_size), box)
    img = np.ascontiguousarray(img, dtype=np.float32)
    if not img.flags.writeable:  # arrays viewed from PIL images are read-only; torch wants writable memory
        img = img.copy()
    return (img, meta) if return_meta else img


def _missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in ("", "unknown", "none", "nan")


class LoadCXRd(MapTransform):
    """Replace image paths by MetaTensor float32 (1, H, W) in [0, 1] (``load_cxr``), display convention.

    Sets ``d["orig_size"] = [H, W]`` (native size, before any resize; from the first key) and fills ``sex``,
    ``age`` and ``view`` from DICOM metadata where the record lacks them (absent, None or "unknown").
    The MetaTensor's meta carries ``filename_or_obj`` (the path) so later transforms can name the file in errors.
    With ``target_size`` the image is already resized so its longer side is ``target_size`` (see load_cxr); the
    letterbox geometry is still computed from the native ``orig_size``. ``max_pixels`` and ``data_root`` are
    passed to load_cxr (size limit checked on the header before decoding; paths outside the data root refused).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        target_size: int | None = None,
        allow_missing_keys: bool = False,
        max_pixels: int | None = None,
        data_root: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target_size = target_size
        self.max_pixels = max_pixels
        self.data_root = data_root

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for i, key in enumerate(self.key_iterator(d)):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"LoadCXRd: d[{key!r}] must be a file path, got {type(path).__name__}")
            img, meta = load_cxr(
                path,
                return_meta=True,
                target_size=self.target_size,
                max_pixels=self.max_pixels,
                data_root=self.data_root,
            )
            d[key] = MetaTensor(
                torch.from_numpy(img[None]),
                meta={
                    "filename_or_obj": os.fspath(path),
                    "spatial_shape": np.asarray(meta["orig_size"]),
                    "original_channel_dim": "no_channel",
                },
            )
            if i == 0:
                d["orig_size"] = [int(meta["orig_size"][0]), int(meta["orig_size"][1])]
                for field in ("sex", "age", "view"):
                    if _missing(d.get(field)) and meta.get(field) is not None:
                        d[field] = meta[field]
        return d
