"""Writing: site A 16-bit PNGs (own zlib encoder), site B DICOMs (bundle.utils.dicom), masks, the datalist and
its summary, in parallel; :func:`generate` replaces the output folder atomically and :func:`ensure_synthetic`
generates on first use only (file lock: concurrent DDP ranks generate once)."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from bundle.data import datalist as dl
from bundle.data.synthetic.params import (
    CLASSES,
    DATALIST_NAME,
    SPLITS,
    SUMMARY_NAME,
    SyntheticParams,
    params_hash,
)
from bundle.data.synthetic.plan import plan
from bundle.data.synthetic.render import (
    DCM_BITS,
    DCM_CENTER,
    DCM_INTERCEPT,
    DCM_SLOPE,
    DCM_WIDTH,
    encode_dicom_pixels,
    render,
)
from bundle.data.synthetic.stats import synthetic_summary
from bundle.utils.atomic import read_json, write_json_atomic
from bundle.utils.lock import file_lock

__all__ = ["ensure_synthetic", "generate", "is_up_to_date", "to_png16"]

logger = logging.getLogger(__name__)

_UID_ROOT = "cxr_aligner_fairness/synthetic"
PNG_BITS = 12  # significant bits of the site A 16-bit PNGs


def _uid(seed, *parts) -> str:
    from pydicom.uid import generate_uid  # noqa: PLC0415

    return generate_uid(entropy_srcs=[_UID_ROOT, str(seed), *map(str, parts)])


def _write_dicom(path: str, stored: np.ndarray, item: Mapping, seed: int):
    """Site B file: MONOCHROME1, 12 of 16 bits, rescale + linear VOI window, UIDs derived from the seed (same
    bytes on every run); no dates or times (type 2 elements left empty)."""
    from bundle.utils.dicom import make_dataset, write  # noqa: PLC0415

    ds = make_dataset(
        stored,
        photometric="MONOCHROME1",
        bits_stored=DCM_BITS,
        window=(f"{DCM_CENTER:g}", f"{DCM_WIDTH:g}"),
        rescale=(f"{DCM_SLOPE:g}", f"{DCM_INTERCEPT:g}"),
        modality="DX",
        sex=item["sex"],
        age=f"{int(item['age']):03d}Y",
        view="PA",
        patient_id=item["patient_id"],
        pixel_spacing=None,
        sop_instance_uid=_uid(seed, item["split"], item["index"], "sop"),
        file_meta_extra={
            "ImplementationClassUID": _uid(0, "implementation"),
            "ImplementationVersionName": "CXRAF_SYNTH_1",
        },
        extra={
            "StudyInstanceUID": _uid(seed, item["split"], item["index"], "study"),
            "SeriesInstanceUID": _uid(seed, item["split"], item["index"], "series"),
            "PatientName": f"SYNTH^{item['patient_id']}",
            "BodyPartExamined": "CHEST",
            "PresentationIntentType": "FOR PRESENTATION",
            "ImageType": ["ORIGINAL", "PRIMARY"],
            "Manufacturer": "SYNTHETIC",
            "InstitutionName": "SITE B",
            **dict.fromkeys(("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"), ""),
            "StudyID": "1",
            "SeriesNumber": 1,
            "InstanceNumber": item["image_no"] + 1,
            "PatientOrientation": ["L", "F"],  # PA: image right = patient left
            "VOILUTFunction": "LINEAR",
            "ImagerPixelSpacing": ["0.5", "0.5"],
        },
    )
    write(ds, path)


def _png_bytes(arr: np.ndarray, level: int, significant_bits: int | None = None) -> bytes:
    """A greyscale PNG (8- or 16-bit) of ``arr``; ``significant_bits`` adds an sBIT chunk.

    Written with zlib directly (filter type 0) instead of PIL: PIL's 16-bit PNG path costs about twice
    as much per image, which alone would break the 100 images/s per core goal. Output is standard
    PNG (PIL, pydicom-free readers and MONAI's PILReader read it back bit-exactly).
    """
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    h, w = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 0  # filter byte per scanline
    raw[:, 1:] = rows

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    sbit = chunk(b"sBIT", bytes([significant_bits])) if significant_bits else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + sbit
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def _save_png(path: str, arr: np.ndarray, level: int, significant_bits: int | None = None):
    with open(path, "wb") as f:
        f.write(_png_bytes(arr, level, significant_bits))


def to_png16(img: np.ndarray) -> np.ndarray:
    """Display [0, 1] -> 16-bit container with 12 significant bits (value << 4), like most 16-bit CXR
    PNGs; the zero low nibble makes the noisy images ~30% smaller and faster to compress."""
    return (img * 4095.0 + 0.5).astype(np.uint16) << 4


def _render_and_write(job) -> dict:
    """Worker: draw one image, write it and its masks, return its datalist record (relative paths)."""
    root, seed, params, item = job
    out = render(item, seed, params)
    split, stem = item["split"], f"{item['patient_id']}_{item['image_no']}"
    h, w = out["size"]
    if item["site"] == "A":
        rel = f"images/{split}/{stem}.png"
        _save_png(os.path.join(root, rel), to_png16(out["image"]), params.png_compress_level, PNG_BITS)
    else:
        rel = f"images/{split}/{stem}.dcm"
        _write_dicom(os.path.join(root, rel), encode_dicom_pixels(out["image"]), item, seed)
    attention = []
    for c, name in enumerate(CLASSES):
        if item["annotated"][c] and name in out["masks"]:
            mrel = f"masks/{split}/{stem}_{name}.png"
            _save_png(os.path.join(root, mrel), out["masks"][name].astype(np.uint8) * 255, 6)
            attention.append({"class": name, "type": "mask", "path": mrel, "frame": [w, h]})
    return {
        "image": rel,
        "label": list(item["label"]),
        "attention": attention,
        "sex": item["sex"],
        "age": item["age"],
        "patient_id": item["patient_id"],
        "dataset": "synthetic",
        "view": "PA",
        "site": item["site"],
        "shortcut": list(item["shortcut"]),
    }


def _write_all(root: str, seed: int, params: SyntheticParams, planned: dict, workers: int, progress: bool) -> dict:
    from tqdm.auto import tqdm  # noqa: PLC0415

    for split in SPLITS:
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "masks", split), exist_ok=True)
    jobs = [(root, seed, params, it) for split in SPLITS for it in planned[split]]
    bar = tqdm(total=len(jobs), desc="synthetic CXR", unit="img", disable=not progress)
    records = []
    try:
        if workers <= 1:
            for job in jobs:
                records.append(_render_and_write(job))
                bar.update()
        else:
            import multiprocessing as mp  # noqa: PLC0415

            # fork where available: spawn would re-run the caller's __main__ (fails for stdin/notebooks);
            # the workers use only numpy/zlib/pydicom, no OpenMP, so a threaded parent is not a problem
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for rec in pool.imap(_render_and_write, jobs, chunksize=16):
                    records.append(rec)
                    bar.update()
    finally:
        bar.close()
    out, k = {}, 0
    for split in SPLITS:
        out[split] = records[k : k + len(planned[split])]
        k += len(planned[split])
    return out


def generate(
    out_dir: str, seed: int = 0, params: SyntheticParams | None = None, workers: int | None = 1, progress: bool = True
) -> str:
    """Generate the benchmark into ``out_dir`` (replaced atomically) and return the datalist path."""
    params = params or SyntheticParams()
    params.check()
    out_dir = os.path.abspath(out_dir)
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        planned = plan(seed, params)
        records = _write_all(tmp, seed, params, planned, workers, progress)
        datalist = {
            "name": "synthetic-cxr",
            "description": "Built-in synthetic chest X-ray benchmark (bundle.data.synthetic); site A PNG, site B DICOM",
            "classes": list(CLASSES),
            **records,
        }
        errors = [p for p in dl.validate(datalist, base_dir=tmp, check_images=True) if p.severity == "error"]
        if errors:  # a generator bug, never the user's fault
            raise RuntimeError("synthetic datalist failed validation:\n" + "\n".join(map(str, errors[:20])))
        dl.save(datalist, os.path.join(tmp, DATALIST_NAME))
        summary = synthetic_summary(datalist, seed, params)
        write_json_atomic(os.path.join(tmp, SUMMARY_NAME), summary, indent=1)
        if os.path.exists(out_dir):  # swap: old -> aside, new -> place, then delete the old
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, DATALIST_NAME)


def is_up_to_date(out_dir: str, seed: int, params: SyntheticParams) -> bool:
    """Whether ``out_dir`` holds a complete benchmark generated with this seed and these parameters."""
    summary = read_json(os.path.join(out_dir, SUMMARY_NAME))
    if not isinstance(summary, dict):
        return False
    return summary.get("params_hash") == params_hash(seed, params) and os.path.isfile(
        os.path.join(out_dir, DATALIST_NAME)
    )


def ensure_synthetic(
    out_dir: str = "data/synthetic",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    **params,
) -> str:
    """The datalist path of the synthetic benchmark in ``out_dir``, generating it on first use only.

    Regenerates when the seed or any parameter differs from the recorded ``params_hash`` (or with
    ``force``). Safe against concurrent callers (file lock) and interruption (atomic swap).
    """
    p = SyntheticParams.from_kwargs(**params)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if not force and is_up_to_date(out_dir, seed, p):
        return os.path.join(out_dir, DATALIST_NAME)
    # an exclusive lock beside the dataset, so that concurrent callers (DDP ranks) generate once
    with file_lock(out_dir.rstrip(os.sep) + ".lock"):
        if not force and is_up_to_date(out_dir, seed, p):  # another process finished meanwhile
            return os.path.join(out_dir, DATALIST_NAME)
        for stale in glob.glob(os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (we hold the lock: nobody else writes)
        logger.info("generating the synthetic benchmark in %s (seed %d)", out_dir, seed)
        return generate(out_dir, seed, p, workers=workers, progress=progress)
