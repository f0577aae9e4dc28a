"""JPEG 2000 reduced-resolution decoding (bundle/transforms/io.py) for any image size, odd sizes included.

The fast path (``load_cxr(path, target_size=S)`` on a JPEG 2000 DICOM) decodes only resolution level 2^-r. These tests
hold it to the reference: the full-resolution decode followed by the area resize to the letterbox content size, with
the same output shape, the same sub-pixel geometry (blob centroids) and close intensities, and check that the fast
path is really taken (an odd size used to fall back to the full decode silently).
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless

from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd
from bundle.transforms import io as cxr_io
from bundle.transforms import load_cxr
from bundle.transforms.io import content_size
from bundle.utils.dicom import make_dataset, write

# (rows, cols): 16-bit radiograph aspect like the real 1841 x 1955 file; Pillow's own rounding disagrees with
# OpenJPEG's ceil for 331 at r = 3 (41 vs 42 rows), agrees for 277 (35 columns): both branches of the decode
ODD = (331, 277)
BLOBS = ((0.12, 0.15), (0.12, 0.85), (0.5, 0.5), (0.88, 0.15), (0.88, 0.85))  # (y, x) fractions of the size


def _blobs(h: int, w: int, bits: int, seed: int = 0) -> np.ndarray:
    """Stored values: a smooth dark background with bright Gaussian blobs (sigma 6 native px) and mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.15 + 0.1 * yy / h
    for fy, fx in BLOBS:
        img += 0.7 * np.exp(-(((yy - fy * (h - 1)) ** 2 + (xx - fx * (w - 1)) ** 2) / (2 * 6.0**2)))
    img += rng.normal(0, 0.003, (h, w))
    return np.round(img.clip(0, 1) * (2**bits - 1)).astype(np.uint16)


def _write(tmp_path, h, w, bits, name="j.dcm", window=True, lossy=False):
    top = 2**bits
    ds = make_dataset(
        _blobs(h, w, bits), bits_stored=bits, window=(top / 2, float(top)) if window else None, pixel_spacing=None
    )
    if lossy:  # the factory writes lossless syntaxes; a lossy one needs the encoder's quality option
        ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_psnr=[60])
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return str(tmp_path / name)
    return write(ds, tmp_path / name, transfer_syntax=JPEG2000Lossless, encoding_plugin="pylibjpeg")


def _reference(path, size):
    """The full-resolution decode, then the loader's own area resize to the content size."""
    full, meta = load_cxr(path, return_meta=True)
    h, w = meta["orig_size"]
    return cxr_io._resize_area(full, content_size(h, w, size))


def _centroids(img: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (output pixel units) of each blob, in a window around its expected place."""
    h, w = img.shape
    out = []
    for fy, fx in BLOBS:
        cy, cx = fy * h, fx * w
        y0, y1 = max(0, int(cy - 0.1 * h)), min(h, int(cy + 0.1 * h) + 1)
        x0, x1 = max(0, int(cx - 0.1 * w)), min(w, int(cx + 0.1 * w) + 1)
        patch = img[y0:y1, x0:x1].astype(np.float64)
        wgt = np.clip(patch - np.percentile(patch, 50), 0, None)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out.append(((wgt * yy).sum() / wgt.sum(), (wgt * xx).sum() / wgt.sum()))
    return np.asarray(out)


@pytest.mark.parametrize("bits", [16, 12])
@pytest.mark.parametrize("hw", [ODD, (333, 335), (320, 256)])
def test_reduced_decode_matches_full_decode_and_resize(tmp_path, bits, hw):
    h, w = hw
    size = 40
    p = _write(tmp_path, h, w, bits)
    reduced = cxr_io._decode_j2k_reduced(pydicom.dcmread(p), size)
    assert reduced is not None, "the reduced-resolution path was declined"
    arr, box = reduced
    r = 3  # longest side >> 3 >= 40 > longest side >> 4
    assert arr.shape == (-(-h // 2**r), -(-w // 2**r))  # OpenJPEG's ceil division, not Pillow's rounding
    assert box[2] - box[0] == pytest.approx(w / 2**r) and box[3] - box[1] == pytest.approx(h / 2**r)

    fast, meta = load_cxr(p, return_meta=True, target_size=size)
    ref = _reference(p, size)
    assert fast.shape == ref.shape == content_size(h, w, size) and meta["orig_size"] == (h, w)
    err = np.abs(fast - ref)
    assert err.mean() < 0.01 and np.percentile(err, 99) < 0.06, (err.mean(), np.percentile(err, 99))
    # geometry: every blob (corners included, where a wrong scale or offset shows most) lands on the same
    # sub-pixel place; the uncorrected low-pass grid would be off by about 0.4 px, ceil extents by up to 0.8 px
    d = np.abs(_centroids(fast) - _centroids(ref))
    assert d.max() < 0.1, d


def test_odd_sized_16bit_through_the_transform_chain(tmp_path):
    """LoadCXRd(target_size) -> Letterboxd -> CXRIntensityd equals the chain on the full-resolution load, also
    for a file without a window (min-max scaling: the reduced image's extremes differ, the percentile stretch of
    CXRIntensityd removes that affine difference)."""
    size = 48
    for window in (True, False):
        p = _write(tmp_path, *ODD, 16, name=f"w{window}.dcm", window=window)
        outs = []
        for target in (size, None):
            d = {"image": p}
            for t in (LoadCXRd(keys="image", target_size=target), Letterboxd(keys="image", size=size), CXRIntensityd()):
                d = t(d)
            outs.append((np.asarray(d["image"])[0], list(np.asarray(d["letterbox"], dtype=float))))
        (fast, lb_fast), (full, lb_full) = outs
        assert fast.shape == full.shape == (size, size) and lb_fast == lb_full
        err = np.abs(fast - full)
        assert err.mean() < 0.01 and np.percentile(err, 99) < 0.08, (window, err.mean(), np.percentile(err, 99))


def test_lossy_jpeg2000_odd_size(tmp_path):
    """Irreversible (9/7) codestreams have the same level sizes and low-pass sample positions."""
    p = _write(tmp_path, *ODD, 12, lossy=True)
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == JPEG2000
    assert cxr_io._decode_j2k_reduced(pydicom.dcmread(p), 40) is not None
    fast = load_cxr(p, target_size=40)
    ref = _reference(p, 40)
    assert np.abs(fast - ref).mean() < 0.01
    assert np.abs(_centroids(fast) - _centroids(ref)).max() < 0.1


def test_decoder_trouble_falls_back_to_full_decode(tmp_path, monkeypatch):
    """If Pillow's reduced decode fails (e.g. a Pillow whose internals changed), the full decoder decides."""
    p = _write(tmp_path, *ODD, 16)
    ref = _reference(p, 40)

    def broken(*a, **k):
        raise OSError("broken data stream when reading image file")

    monkeypatch.setattr(cxr_io, "_pillow_j2k_level", broken)
    np.testing.assert_array_equal(load_cxr(p, target_size=40), ref)


def test_small_target_or_small_image_is_not_reduced(tmp_path):
    p = _write(tmp_path, 45, 41, 16)
    ds = pydicom.dcmread(p)
    assert cxr_io._decode_j2k_reduced(ds, 40) is None  # 45 >> 1 < 40: nothing to skip
    assert cxr_io._decode_j2k_reduced(ds, None) is None
    assert cxr_io._decode_j2k_reduced(ds, 20)[0].shape == (23, 21)  # r = 1, ceil(45 / 2) x ceil(41 / 2)
