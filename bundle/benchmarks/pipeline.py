"""Preprocessing speed and memory: the bundle's deterministic chain against plain pydicom + PIL, same files, same run.

Candidate per file: ``LoadCXRd(target_size=S) -> Letterboxd(S) -> CXRIntensityd`` (configs/train.yaml's
deterministic transforms up to the masks): LUT-table windowing, JPEG 2000 reduced-resolution decoding (any image
size), area resize, letterbox, percentile scaling. Baseline per file, the same steps written plainly: ``dcmread ->
pixel_array -> apply_modality_lut -> apply_voi_lut(prefer_lut=True)`` (float64), MONOCHROME1 inversion, PIL bilinear
resize of the float32 image to the letterbox content size, zero padding to S x S, 0.5/99.5 percentile scaling.
Files: 12-bit MONOCHROME1 chest phantoms with rescale and two windows (2048 x 1792) written uncompressed, JPEG 2000
lossless, JPEG-LS lossless and RLE lossless (the syntaxes of VinDr/PACS exports; ``--quick``: uncompressed and
JPEG 2000 only), and an odd-sized 16-bit
MONOCHROME2 phantom (1841 x 1955, the size of a real radiograph that used to miss the JPEG 2000 fast path)
uncompressed and JPEG 2000. Torch runs one thread here, as in DataLoader workers. Also reported (details): how far
``load_cxr(path, target_size=S)`` is from the full-resolution load followed by the area resize.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from bundle.benchmarks._common import Sizes, interleave, memory_row, time_row

__all__ = ["run"]


def _phantom(h: int, w: int, seed: int, bits: int = 12) -> np.ndarray:
    """Chest-like stored values (MONOCHROME1: low attenuation stored high): lungs, mediastinum, ribs, heart, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    att = np.full((h, w), 0.8, np.float32)
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.48) / 0.33) ** 2 < 1
        att[lung] = 0.25 + 0.1 * yy[lung]
    ribs = (np.sin((yy + 0.15 * np.abs(xx - 0.5)) * 60) > 0.7) & (np.abs(xx - 0.5) > 0.08)
    att += 0.12 * ribs
    att += 0.25 * np.exp(-(((xx - 0.55) / 0.12) ** 2 + ((yy - 0.62) / 0.12) ** 2))  # heart
    att += rng.normal(0, 0.01, (h, w)).astype(np.float32)
    top = 2**bits - 1
    return (top - np.clip(att, 0, 1) * top).astype(np.uint16)


def _write_files(d: str, sizes: dict, n: int, only: tuple | None = None) -> dict[str, list[str]]:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from bundle.utils.dicom import make_dataset, write

    groups = {
        "uncompressed": (sizes["even"], 12, None),
        "jpeg2000_lossless": (sizes["even"], 12, JPEG2000Lossless),
        "jpegls_lossless": (sizes["even"], 12, JPEGLSLossless),
        "rle_lossless": (sizes["even"], 12, RLELossless),
        "odd16_uncompressed": (sizes["odd"], 16, None),
        "odd16_jpeg2000_lossless": (sizes["odd"], 16, JPEG2000Lossless),
    }
    if only:
        groups = {k: v for k, v in groups.items() if k in only}
    files: dict[str, list[str]] = {k: [] for k in groups}
    cache: dict = {}
    for name, ((h, w), bits, ts) in groups.items():
        for i in range(n):
            key = (h, w, bits, i)
            if key not in cache:
                if bits == 12:
                    cache[key] = make_dataset(
                        _phantom(h, w, i),
                        photometric="MONOCHROME1",
                        bits_stored=12,
                        rescale=(1.0, 0.0),
                        window=([2048.0, 1800.0], [4096.0, 2500.0]),
                        patient_id=None,
                        pixel_spacing=None,
                    )
                else:  # 16-bit, display convention stored (MONOCHROME2), one window over the used range
                    px = (65535 - _phantom(h, w, i, bits=16)).astype(np.uint16)
                    cache[key] = make_dataset(
                        px, photometric="MONOCHROME2", bits_stored=16, window=(32768.0, 65536.0), patient_id=None
                    )
            plugin = "" if ts is None else "pyjpegls" if ts == JPEGLSLossless else "pylibjpeg"
            files[name].append(write(cache[key], os.path.join(d, f"{name}_{i}.dcm"), ts, encoding_plugin=plugin))
    return files


def baseline(path: str, size: int) -> np.ndarray:
    """Plain pydicom + PIL + numpy: the same output as the bundle's chain (S x S, [0, 1], bone bright)."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from bundle.transforms.io import content_size

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True).astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = arr.max() - arr
    nh, nw = content_size(arr.shape[0], arr.shape[1], size)
    small = np.asarray(Image.fromarray(arr, mode="F").resize((nw, nh), Image.Resampling.BILINEAR))
    lo, hi = np.percentile(small, [0.5, 99.5])
    small = np.clip((small - lo) / max(hi - lo, 1e-8), 0, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((size, size), np.float32)
    out[top : top + nh, left : left + nw] = small
    return out


def run(quick: bool = False, tiny: bool = False, repeats: int | None = None) -> dict:
    import torch

    threads = torch.get_num_threads()
    # DataLoader workers run torch with one thread; on a busy machine multi-threaded tiny ops (pad) only spin
    torch.set_num_threads(1)
    try:
        return _run(Sizes(quick, tiny, repeats))
    finally:
        torch.set_num_threads(threads)


def _run(sz: Sizes) -> dict:
    from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd, load_cxr
    from bundle.transforms.io import _resize_area, content_size

    sizes = sz.pick({"even": (2048, 1792), "odd": (1841, 1955)}, {"even": (2048, 1792), "odd": (1841, 1955)}, None)
    sizes = sizes or {"even": (160, 128), "odd": (91, 97)}
    n = sz.pick(3, 1, 1)
    reps = sz.reps(5, 3, 1)
    size = sz.pick(224, 224, 32)
    chain = [LoadCXRd(target_size=size), Letterboxd(size=size), CXRIntensityd()]

    def run_chain(p):
        d = {"image": p}
        for t in chain:
            d = t(d)
        return d

    rows: list[dict] = []
    details: dict = {"target_size": size, "files_per_group": n, "repeats": reps, "torch_threads": 1, "groups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        quick_set = ("uncompressed", "jpeg2000_lossless", "odd16_uncompressed", "odd16_jpeg2000_lossless")
        files = _write_files(tmp, sizes, n, sz.pick(None, quick_set, ("uncompressed", "odd16_jpeg2000_lossless")))
        details["write_s"] = round(time.perf_counter() - t0, 2)
        # warm-up once, on small files of every syntax: decoder plugins imported, first-call costs paid
        os.makedirs(os.path.join(tmp, "warm"))
        warm = _write_files(os.path.join(tmp, "warm"), {"even": (64, 56), "odd": (63, 57)}, 1, tuple(files))
        for paths in warm.values():
            run_chain(paths[0])
            baseline(paths[0], size)
        for name, paths in files.items():
            mem: dict[str, list[float]] = {}
            variants = {
                "chain": lambda paths=paths: [run_chain(p) for p in paths],
                "baseline": lambda paths=paths: [baseline(p, size) for p in paths],
            }
            t = interleave(variants, reps, warmup=0, memory=mem)
            mem = {k: [v[0] / len(paths)] for k, v in mem.items()}
            h, w = sizes["odd" if name.startswith("odd") else "even"]
            label = f"{name} {h} x {w} -> {size}"
            rows.append(
                time_row(
                    f"preprocessing, {label}",
                    "LoadCXRd + Letterboxd + CXRIntensityd",
                    "pydicom + PIL + numpy",
                    t["chain"],
                    t["baseline"],
                    per=len(paths),
                    unit="ms/image",
                    scale=1e3,
                )
            )
            if name in ("jpeg2000_lossless", "odd16_jpeg2000_lossless", "uncompressed"):
                rows.append(
                    memory_row(
                        f"preprocessing, {label}: peak memory per image",
                        "bundle chain",
                        "pydicom + PIL + numpy",
                        mem["chain"],
                        mem["baseline"],
                    )
                )
            fast = load_cxr(paths[0], target_size=size)
            ref = _resize_area(load_cxr(paths[0]), content_size(h, w, size))
            err = np.abs(fast - ref)
            details["groups"][name] = {
                "image_size": [h, w],
                "chain_ms_per_image": sorted(round(1e3 * x / len(paths), 1) for x in t["chain"]),
                "baseline_ms_per_image": sorted(round(1e3 * x / len(paths), 1) for x in t["baseline"]),
                "fast_vs_full_mean_abs": float(round(err.mean(), 5)),
                "fast_vs_full_p99_abs": float(round(np.percentile(err, 99), 4)),
                "file_mb": round(os.path.getsize(paths[0]) / 2**20, 2),
            }
    return {
        "description": "LoadCXRd + Letterboxd + CXRIntensityd vs pydicom + PIL + numpy doing the same steps, on "
        "chest phantoms per transfer syntax (12-bit MONOCHROME1 2048 x 1792, and an odd-sized 16-bit 1841 x 1955 "
        "uncompressed and JPEG 2000); torch 1 thread (as in DataLoader workers); peak memory = resident-memory "
        "growth while preprocessing one image.",
        "rows": rows,
        "details": details,
    }
