"""Benchmark: load_cxr (+ resize) against a plain pydicom + PIL path on the same DICOM files, same run.

Baseline per file: dcmread -> pixel_array -> apply_modality_lut -> apply_voi_lut(prefer_lut=True) -> PIL resize
(float32 image, bilinear, to the letterbox content size). It does not even normalise or invert, so it is a lower
bound on what a correct naive loader costs.
Ours: ``load_cxr(path, target_size=S)`` (LUT-table windowing, JPEG 2000 reduced-resolution decoding, area
resize) and, separately, the transform chain ``LoadCXRd(target_size=S) -> Letterboxd(S)``.
Files: chest-like 12-bit MONOCHROME1 phantoms with rescale and window tags, written uncompressed and as JPEG 2000
lossless, JPEG-LS lossless and RLE lossless (the syntaxes of VinDr/PACS exports).
Also reported: how far the fast (target_size) result is from the full-resolution load followed by area resize.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

__all__ = ["run"]


def _phantom(h: int, w: int, seed: int) -> np.ndarray:
    """12-bit chest-like stored values (MONOCHROME1: low attenuation stored high): lungs, mediastinum, ribs, noise."""
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
    return (4095 - np.clip(att, 0, 1) * 4095).astype(np.uint16)


def _write_files(d: str, h: int, w: int, n: int) -> dict[str, list[str]]:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from bundle.utils.dicom import make_dataset, write

    syntaxes = {
        "uncompressed": None,
        "jpeg2000_lossless": JPEG2000Lossless,
        "jpegls_lossless": JPEGLSLossless,
        "rle_lossless": RLELossless,
    }
    files: dict[str, list[str]] = {k: [] for k in syntaxes}
    for i in range(n):
        ds = make_dataset(
            _phantom(h, w, i),
            photometric="MONOCHROME1",
            bits_stored=12,
            rescale=(1.0, 0.0),
            window=([2048.0, 1800.0], [4096.0, 2500.0]),
            sex="F",
            age="061Y",
            patient_id=None,
            pixel_spacing=None,
        )
        for name, ts in syntaxes.items():
            plugin = "" if ts is None else "pyjpegls" if ts == JPEGLSLossless else "pylibjpeg"
            files[name].append(write(ds, os.path.join(d, f"{name}_{i}.dcm"), ts, encoding_plugin=plugin))
    return files


def _baseline(path: str, size: int) -> np.ndarray:
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from bundle.transforms.io import content_size

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True)
    nh, nw = content_size(arr.shape[0], arr.shape[1], size)
    return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.BILINEAR))


def run(quick: bool = False) -> dict:
    import torch

    threads = torch.get_num_threads()
    # DataLoader workers run torch with one thread; on a busy machine multi-threaded tiny ops (pad) only spin
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> dict:
    from bundle.transforms import Letterboxd, LoadCXRd, load_cxr
    from bundle.transforms.io import _resize_area, content_size

    h, w, n, reps, size = (1024, 896, 2, 2, 224) if quick else (2048, 1792, 4, 3, 224)
    chain = [LoadCXRd(target_size=size), Letterboxd(size=size)]

    def run_chain(p):
        d = {"image": p}
        for t in chain:
            d = t(d)
        return d

    results: dict = {
        "image_size": [h, w],
        "target_size": size,
        "files_per_syntax": n,
        "repeats": reps,
        "torch_threads": 1,
        "baseline": "pydicom dcmread+pixel_array+apply_modality_lut+apply_voi_lut + PIL bilinear resize",
        "per_syntax": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = _write_files(tmp, h, w, n)
        results["write_s"] = round(time.perf_counter() - t0, 2)
        _baseline(files["uncompressed"][0], size)  # warm-up
        load_cxr(files["uncompressed"][0], target_size=size)
        tot_base = tot_ours = tot_chain = 0.0
        for name, paths in files.items():
            tb, to, tc = [], [], []
            for p in paths:
                times: dict[str, list[float]] = {"base": [], "ours": [], "chain": []}
                fns = [
                    ("base", lambda: _baseline(p, size)),
                    ("ours", lambda: load_cxr(p, target_size=size)),
                    ("chain", lambda: run_chain(p)),
                ]
                for r in range(reps):  # interleaved, order rotated each repeat: no method always runs first
                    for key, fn in fns[r % 3 :] + fns[: r % 3]:
                        t = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - t)
                pb, po, pc = times["base"], times["ours"], times["chain"]
                tb.append(statistics.median(pb))
                to.append(statistics.median(po))
                tc.append(statistics.median(pc))
            fast = load_cxr(paths[0], target_size=size)
            ref = _resize_area(load_cxr(paths[0]), content_size(h, w, size))
            err = np.abs(fast - ref)
            b, o, c = sum(tb), sum(to), sum(tc)
            tot_base, tot_ours, tot_chain = tot_base + b, tot_ours + o, tot_chain + c
            results["per_syntax"][name] = {
                "baseline_ms_per_image": round(1e3 * b / n, 1),
                "ours_ms_per_image": round(1e3 * o / n, 1),
                "chain_ms_per_image": round(1e3 * c / n, 1),
                "ratio": round(b / o, 2),
                "ratio_chain": round(b / c, 2),
                "fast_vs_full_mean_abs": float(round(err.mean(), 5)),
                "fast_vs_full_p99_abs": float(round(np.percentile(err, 99), 4)),
                "file_mb": round(os.path.getsize(paths[0]) / 2**20, 2),
            }
        results["ratio"] = round(tot_base / tot_ours, 2)
        results["ratio_chain"] = round(tot_base / tot_chain, 2)
        results["ratio_min_syntax"] = min(v["ratio"] for v in results["per_syntax"].values())
        results["goal"] = ">= 2x overall (ratio = baseline time / our time, same files, same run)"
    return results
