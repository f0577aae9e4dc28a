"""load_cxr / LoadCXRd: DICOM LUTs, photometric conventions, compressed syntaxes, PNG/JPEG variants, bad inputs."""

import io
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from bundle.transforms import CXRLoadError, LoadCXRd, content_size
from bundle.transforms import io as cxr_io
from bundle.transforms import load_cxr, parse_dicom_age
from bundle.utils.dicom import lung_masks, make_dataset, phantom, write

H, W = 64, 48


def _stored(bits=12, mono1=False, seed=0, h=H, w=W):
    att = phantom(h, w, seed=seed)
    top = 2**bits - 1
    s = np.round(att * top).astype(np.uint8 if bits <= 8 else np.uint16)
    return (top - s).astype(s.dtype) if mono1 else s


def _reference(ds):
    """Plain per-pixel pydicom path, scaled to [0, 1] the same way (the definition load_cxr must reproduce)."""
    arr = ds.pixel_array
    out = apply_voi_lut(apply_modality_lut(arr, ds), ds, prefer_lut=True).astype(np.float64)
    if "WindowCenter" in ds and "VOILUTSequence" not in ds:
        lo, hi = apply_voi_lut(np.array([-1e30, 1e30]), ds)
    elif "VOILUTSequence" in ds:
        data = np.asarray(ds.VOILUTSequence[0].LUTData, np.float64)
        lo, hi = data.min(), data.max()
    else:
        lo, hi = out.min(), out.max()
    res = np.clip((out - lo) / (hi - lo), 0, 1)
    return 1 - res if ds.PhotometricInterpretation == "MONOCHROME1" else res


# ---------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    "s,years",
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("010W", 70 / 365.25),
        ("003D", 3 / 365.25),
        ("45", 45.0),
        (" 045y ", 45.0),
        (57, 57.0),
    ],
)
def test_parse_dicom_age(s, years):
    assert parse_dicom_age(s) == pytest.approx(years)


@pytest.mark.parametrize("s", [None, "", "abcY", "-5Y", "Y", float("nan"), "120Y", True])
def test_parse_dicom_age_unparsable_or_impossible_is_none(s):
    assert parse_dicom_age(s) is None  # same rule as the datalist and the fairness metrics (> 110 is impossible)


@pytest.mark.parametrize("raw,sex", [("M", "M"), ("F", "F"), (" m ", "M"), ("O", None), ("", None), (None, None)])
def test_dicom_sex_unknown_is_none(raw, sex):
    assert cxr_io._parse_sex(raw) == sex  # None, not "unknown": LoadCXRd fills only from headers that know it


def test_meta_from_dicom(tmp_path):
    p = write(make_dataset(_stored(), bits_stored=12, sex="M", age="006M", view="AP"), tmp_path / "a.dcm")
    img, meta = load_cxr(p, return_meta=True)
    assert img.dtype == np.float32 and img.shape == (H, W)
    assert meta["sex"] == "M" and meta["age"] == pytest.approx(0.5) and meta["view"] == "AP"
    assert meta["modality"] == "DX" and meta["photometric"] == "MONOCHROME2"
    assert meta["orig_size"] == (H, W) and meta["pixel_spacing"] == [0.2, 0.2]
    _, meta = load_cxr(
        write(make_dataset(_stored(), sex="O", age=None, view=None), tmp_path / "b.dcm"), return_meta=True
    )
    assert meta["sex"] is None and meta["age"] is None and meta["view"] is None


# ---------------------------------------------------------------------------------------------- photometric / LUTs
def test_monochrome1_lungs_dark(tmp_path):
    """Low-attenuation lung is stored BRIGHT in MONOCHROME1; after loading it must be dark (and match MONO2)."""
    s1 = _stored(mono1=True)
    lung, med = lung_masks(H, W)
    assert s1[lung].mean() > s1[med].mean()  # the phantom really stores lungs bright
    m1 = load_cxr(write(make_dataset(s1, photometric="MONOCHROME1", bits_stored=12), tmp_path / "m1.dcm"))
    m2 = load_cxr(write(make_dataset(_stored(), photometric="MONOCHROME2", bits_stored=12), tmp_path / "m2.dcm"))
    assert m1[lung].mean() < 0.35 < 0.6 < m1[med].mean()
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    assert m1.min() >= 0 and m1.max() <= 1


def test_monochrome1_with_window_lungs_dark(tmp_path):
    s1 = _stored(mono1=True)
    lung, med = lung_masks(H, W)
    img = load_cxr(
        write(make_dataset(s1, photometric="MONOCHROME1", bits_stored=12, window=(2048, 4096)), tmp_path / "m1w.dcm")
    )
    assert img[lung].mean() < img[med].mean() - 0.3


def test_window_center_width_linear(tmp_path):
    s = _stored()
    c, w = 1500.0, 1000.0
    img = load_cxr(write(make_dataset(s, bits_stored=12, window=(c, w)), tmp_path / "w.dcm"))
    expected = np.clip((s - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_several_windows_first_is_used(tmp_path):
    s = _stored()
    both = load_cxr(write(make_dataset(s, bits_stored=12, window=([2000, 800], [3000, 100])), tmp_path / "2.dcm"))
    first = load_cxr(write(make_dataset(s, bits_stored=12, window=(2000, 3000)), tmp_path / "1.dcm"))
    second = load_cxr(write(make_dataset(s, bits_stored=12, window=(800, 100)), tmp_path / "b.dcm"))
    np.testing.assert_array_equal(both, first)
    assert np.abs(both - second).max() > 0.2


def test_voi_lut_sequence_preferred_over_window(tmp_path):
    s = _stored(bits=10)
    lut = (np.sqrt(np.arange(1024) / 1023.0) * 4095).astype(int)  # gamma-like, unlike any linear window
    ds = make_dataset(s, bits_stored=10, voi_lut=(0, 12, lut), window=(500, 200))
    img = load_cxr(write(ds, tmp_path / "lut.dcm"))
    np.testing.assert_allclose(img, lut[s] / 4095.0, atol=1e-6)
    np.testing.assert_allclose(img, _reference(pydicom.dcmread(tmp_path / "lut.dcm")), atol=1e-6)


def test_rescale_slope_intercept(tmp_path):
    s = _stored()
    plain = load_cxr(write(make_dataset(s, bits_stored=12, window=(1500, 1000)), tmp_path / "p.dcm"))
    # same window expressed in rescaled units
    resc = load_cxr(
        write(make_dataset(s, bits_stored=12, rescale=(2.0, -1000.0), window=(2000, 2000)), tmp_path / "r.dcm")
    )
    np.testing.assert_allclose(resc, plain, atol=1e-5)
    # negative slope (inverted data) without a window: min-max keeps the orientation of the rescaled values
    neg = load_cxr(write(make_dataset(s, bits_stored=12, rescale=(-1.0, 4095.0)), tmp_path / "n.dcm"))
    lung, med = lung_masks(H, W)
    assert neg[lung].mean() > neg[med].mean()
    np.testing.assert_allclose(neg, _reference(pydicom.dcmread(tmp_path / "n.dcm")), atol=1e-6)


def test_modality_lut_sequence(tmp_path):
    s = _stored(bits=8)
    mlut = (255 - np.arange(256)) * 16  # inverting table, 12-bit output
    ds = make_dataset(s, bits_stored=8, modality_lut=(0, 16, mlut))
    img = load_cxr(write(ds, tmp_path / "m.dcm"))
    np.testing.assert_allclose(img, _reference(pydicom.dcmread(tmp_path / "m.dcm")), atol=1e-6)
    lung, med = lung_masks(H, W)
    assert img[lung].mean() > img[med].mean()  # the table inverted the stored values


def test_presentation_lut_shape_inverse(tmp_path):
    s = _stored()
    plain = load_cxr(write(make_dataset(s, bits_stored=12), tmp_path / "a.dcm"))
    inv = load_cxr(write(make_dataset(s, bits_stored=12, presentation_shape="INVERSE"), tmp_path / "b.dcm"))
    np.testing.assert_allclose(inv, 1 - plain, atol=1e-6)
    # DX: MONOCHROME1 comes with INVERSE; both describe ONE inversion
    m1 = load_cxr(
        write(
            make_dataset(_stored(mono1=True), photometric="MONOCHROME1", bits_stored=12, presentation_shape="INVERSE"),
            tmp_path / "c.dcm",
        )
    )
    np.testing.assert_allclose(m1, plain, atol=1e-6)


@pytest.mark.parametrize(
    "bits,dtype,signed", [(8, np.uint8, False), (12, np.uint16, False), (16, np.uint16, False), (16, np.int16, True)]
)
def test_bit_depths_match_per_pixel_pydicom(tmp_path, bits, dtype, signed):
    att = phantom(H, W)
    if signed:
        s = np.round(att * 60000 - 30000).astype(np.int16)
        ds = make_dataset(s, bits_stored=16, rescale=(1.0, 30000.0), window=(30000, 50000))
    else:
        s = np.round(att * (2**bits - 1)).astype(dtype)
        ds = make_dataset(s, bits_stored=bits, window=(2 ** (bits - 1), 2**bits * 0.8))
    p = write(ds, tmp_path / "x.dcm")
    img = load_cxr(p)
    np.testing.assert_allclose(img, _reference(pydicom.dcmread(p)), atol=1e-6)
    lung, med = lung_masks(H, W)
    assert img[lung].mean() < img[med].mean()


def test_no_voi_min_max(tmp_path):
    s = _stored()
    img = load_cxr(write(make_dataset(s, bits_stored=12), tmp_path / "a.dcm"))
    np.testing.assert_allclose(img, (s - s.min()) / float(s.max() - s.min()), atol=1e-6)


# ---------------------------------------------------------------------------------------------- compressed syntaxes
@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
@pytest.mark.parametrize("bits,mono1", [(8, False), (12, True), (16, False)])
def test_compressed_equals_uncompressed(tmp_path, syntax, bits, mono1):
    ds = make_dataset(
        _stored(bits=bits, mono1=mono1),
        bits_stored=bits,
        photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
        window=None if bits == 8 else (2 ** (bits - 1), 2**bits * 0.7),
    )
    raw = load_cxr(write(ds, tmp_path / "raw.dcm"))
    p = write(ds, tmp_path / "c.dcm", transfer_syntax=syntax)
    assert pydicom.dcmread(p).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_cxr(p), raw)


def test_rle_signed_equals_uncompressed(tmp_path):
    s = np.round(phantom(H, W) * 4000 - 2000).astype(np.int16)
    ds = make_dataset(s, bits_stored=16, rescale=(1.0, 0.0))
    raw = load_cxr(write(ds, tmp_path / "raw.dcm"))
    np.testing.assert_array_equal(load_cxr(write(ds, tmp_path / "c.dcm", transfer_syntax=RLELossless)), raw)


def test_j2k_reduced_resolution_decode_matches_full(tmp_path):
    h, w, side = 512, 384, 64
    s = _stored(bits=12, mono1=True, h=h, w=w)
    ds = make_dataset(s, photometric="MONOCHROME1", bits_stored=12, window=(2048, 4000))
    p = write(ds, tmp_path / "j.dcm", transfer_syntax=JPEG2000Lossless)
    reduced = cxr_io._decode_j2k_reduced(pydicom.dcmread(p), side)
    assert reduced is not None and reduced[0].shape == (h // 8, w // 8)  # the fast path is really taken
    fast, meta = load_cxr(p, return_meta=True, target_size=side)
    assert fast.shape == content_size(h, w, side) == (64, 48) and meta["orig_size"] == (h, w)
    full = cxr_io._resize_area(load_cxr(p), (64, 48))
    # sharp phantom edges differ by the filter shape (wavelet low-pass vs box); the rest agrees closely
    err = np.abs(fast - full)
    assert err.mean() < 0.01 and np.percentile(err, 90) < 0.03 and err.max() < 0.2
    lung, med = lung_masks(64, 48)
    assert fast[lung].mean() < fast[med].mean() - 0.3


def test_target_size_uncompressed_is_area_resize(tmp_path):
    s = _stored(h=200, w=100)
    p = write(make_dataset(s, bits_stored=12), tmp_path / "a.dcm")
    img = load_cxr(p, target_size=50)
    assert img.shape == (50, 25)
    full = load_cxr(p)
    np.testing.assert_allclose(img, full.reshape(50, 4, 25, 4).mean(axis=(1, 3)), atol=1e-5)
    assert load_cxr(p, target_size=500).shape == (200, 100)  # never upsamples


def test_jpeg_baseline_dicom(tmp_path):
    g = np.round(phantom(H, W) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="JPEG", quality=95)
    ds = make_dataset(g, bits_stored=8, with_pixels=False)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j.dcm", enforce_file_format=True)
    img = load_cxr(tmp_path / "j.dcm")
    assert np.abs(img - (g - g.min()) / float(g.max() - g.min())).mean() < 0.02


# ---------------------------------------------------------------------------------------------- PNG / JPEG
def test_png_8bit_and_16bit(tmp_path):
    g8 = np.round(phantom(H, W) * 255).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_cxr(tmp_path / "a.png"), g8 / 255.0, atol=1e-6)
    g16 = np.round(phantom(H, W) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "b.png")
    img, meta = load_cxr(tmp_path / "b.png", return_meta=True)
    np.testing.assert_allclose(img, g16 / 65535.0, atol=1e-6)
    assert meta["orig_size"] == (H, W) and meta["sex"] is None and meta["format"] == "png"


def test_png_rgb_and_rgba_to_grey(tmp_path):
    g8 = np.round(phantom(H, W) * 255).astype(np.uint8)
    rgb = np.stack([g8] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], -1)  # alpha must be ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        img = load_cxr(tmp_path / name)
        assert img.shape == (H, W)
        np.testing.assert_allclose(img, g8 / 255.0, atol=1 / 255 + 1e-6)


def test_jpeg_and_draft_target(tmp_path):
    g8 = np.round(phantom(256, 192) * 255).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "a.jpg", quality=95)
    img = load_cxr(tmp_path / "a.jpg")
    assert np.abs(img - g8 / 255.0).mean() < 0.01
    small, meta = load_cxr(tmp_path / "a.jpg", return_meta=True, target_size=64)
    assert small.shape == (64, 48) and meta["orig_size"] == (256, 192)
    assert np.abs(small - cxr_io._resize_area(img, (64, 48))).mean() < 0.02


# ---------------------------------------------------------------------------------------------- bad inputs
def _assert_clear(exc, path, *words):
    msg = str(exc.value)
    assert str(path) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert isinstance(exc.value, ValueError)


def test_truncated_dicom(tmp_path):
    p = write(make_dataset(_stored(), bits_stored=12), tmp_path / "t.dcm")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 2000])
    with pytest.raises(CXRLoadError) as e:
        load_cxr(p)
    _assert_clear(e, p, "truncated")


def test_text_file_named_dcm(tmp_path):
    p = tmp_path / "report.dcm"
    p.write_text("FINDINGS: no acute cardiopulmonary process.\n" * 20)
    with pytest.raises(CXRLoadError) as e:
        load_cxr(p)
    _assert_clear(e, p, "not a DICOM")


def test_dicom_without_pixel_data(tmp_path):
    p = write(make_dataset(_stored(), with_pixels=False), tmp_path / "np.dcm")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(p)
    _assert_clear(e, p, "Pixel Data")


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "MG"])
def test_non_radiograph_refused(tmp_path, modality):
    p = write(make_dataset(_stored(), modality=modality), tmp_path / "ct.dcm")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(p)
    _assert_clear(e, p, repr(modality), "radiograph")


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", "OT", None])
def test_radiograph_modalities_accepted(tmp_path, modality):
    assert load_cxr(write(make_dataset(_stored(), modality=modality), tmp_path / "ok.dcm")).shape == (H, W)


def test_multiframe_refused(tmp_path):
    s = np.stack([_stored(), _stored(seed=1)])
    p = write(make_dataset(s, bits_stored=12, frames=2), tmp_path / "mf.dcm")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(p)
    _assert_clear(e, p, "multi-frame")


def test_raw_dicom_without_preamble_loads(tmp_path):
    ds = make_dataset(_stored(), bits_stored=12)
    ref = load_cxr(write(ds, tmp_path / "a.dcm"))
    p = tmp_path / "raw.dcm"
    ds.save_as(p, implicit_vr=False, little_endian=True)  # no preamble / file meta
    np.testing.assert_array_equal(load_cxr(p), ref)


def test_unreadable_png_missing_and_empty(tmp_path):
    g = np.round(phantom(H, W) * 255).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CXRLoadError) as e:
        load_cxr(tmp_path / "a.png")
    _assert_clear(e, tmp_path / "a.png", "PNG")
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(tmp_path / "b.png")
    _assert_clear(e, tmp_path / "b.png", "not a PNG")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(tmp_path / "missing.png")
    _assert_clear(e, tmp_path / "missing.png", "does not exist")
    (tmp_path / "e.dcm").write_bytes(b"")
    with pytest.raises(CXRLoadError) as e:
        load_cxr(tmp_path / "e.dcm")
    _assert_clear(e, tmp_path / "e.dcm", "empty")


# ---------------------------------------------------------------------------------------------- LoadCXRd
def test_loadcxrd_fills_missing_metadata_only(tmp_path):
    p = write(make_dataset(_stored(), bits_stored=12, sex="F", age="070Y", view="AP"), tmp_path / "a.dcm")
    d = LoadCXRd()({"image": p, "sex": "unknown", "age": 50, "label": [1, 0]})
    assert tuple(d["image"].shape) == (1, H, W) and d["image"].dtype.is_floating_point
    assert d["image"].meta["filename_or_obj"] == p
    assert d["orig_size"] == [H, W]
    assert d["sex"] == "F" and d["age"] == 50 and d["view"] == "AP" and d["label"] == [1, 0]
    d = LoadCXRd(target_size=16)({"image": p, "sex": "M", "age": None})
    assert tuple(d["image"].shape) == (1, 16, 12) and d["orig_size"] == [H, W]
    assert d["sex"] == "M" and d["age"] == pytest.approx(70.0)


def test_loadcxrd_is_picklable(tmp_path):
    import pickle

    t = pickle.loads(pickle.dumps(LoadCXRd(keys=("image",), target_size=32)))
    p = write(make_dataset(_stored(), bits_stored=12), tmp_path / "a.dcm")
    assert tuple(t({"image": p})["image"].shape) == (1, 32, 24)
    assert os.path.exists(p)
