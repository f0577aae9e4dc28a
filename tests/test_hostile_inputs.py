"""Hostile and broken inputs (reliability/security issue): each ends in a precise error naming the file, the
field/tag and the fix, or a documented warning; never a NaN image, a hang, a huge allocation or a foreign exception."""

import codecs
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from bundle.data import datalist as dl
from bundle.transforms import AttentionError, CXRLoadError, LoadCXRd, RasterizeAttentiond
from bundle.transforms import io as cxr_io
from bundle.transforms import load_cxr
from bundle.transforms.attention import rasterize_attention
from bundle.utils.dicom import make_dataset, phantom, write

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


def _stored(h=32, w=32):
    return (phantom(h, w) * 4095).astype(np.uint16)


def _raises(exc_type, fn, *words):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert str(w).lower() in msg.lower(), msg
    return msg


def _png(path, h=16, w=16):
    Image.fromarray((phantom(h, w) * 255).astype(np.uint8), mode="L").save(path)
    return str(path)


def _datalist(**splits):
    rec = {"image": "a.png", "label": [1, 0, 0], "sex": "F", "age": 50, "patient_id": "p1"}
    out = {
        "name": "t",
        "classes": CLASSES,
        "training": [dict(rec)],
        "validation": [dict(rec, image="b.png", patient_id="p2")],
    }
    out.update(splits)
    return out


# ------------------------------------------------------------------------------------------- non-finite DICOM
def test_nan_rescale_slope_names_file_and_tag(tmp_path):
    p = write(make_dataset(_stored(), bits_stored=12, rescale=(float("nan"), 0.0)), tmp_path / "s.dcm")
    _raises(CXRLoadError, lambda: load_cxr(p), p, "RescaleSlope", "(0028,1053)", "finite")


@pytest.mark.parametrize("kw,tag", [("rescale", "RescaleIntercept"), ("window", "WindowWidth")])
def test_inf_rescale_or_window(tmp_path, kw, tag):
    val = (1.0, float("inf")) if kw == "rescale" else (2048.0, float("-inf"))
    p = write(make_dataset(_stored(), bits_stored=12, **{kw: val}), tmp_path / "w.dcm")
    _raises(CXRLoadError, lambda: load_cxr(p), p, tag)


def test_nan_float_pixels_name_file_and_tag(tmp_path):
    ds = make_dataset(_stored(), with_pixels=False)
    a = _stored().astype(np.float32)
    a.ravel()[:20] = np.nan
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = a.tobytes()
    p = write(ds, tmp_path / "f.dcm")
    _raises(CXRLoadError, lambda: load_cxr(p), p, "Float Pixel Data", "(7FE0,0008)", "20 non-finite")


def test_finite_float_pixels_still_load(tmp_path):
    ds = make_dataset(_stored(), with_pixels=False)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = _stored().astype(np.float32).tobytes()
    img = load_cxr(write(ds, tmp_path / "f.dcm"))
    assert np.isfinite(img).all() and img.min() == 0.0 and img.max() == 1.0


def test_huge_slope_overflow_is_refused(tmp_path):
    p = write(make_dataset(_stored(), bits_stored=12, rescale=(1e308, -1e308)), tmp_path / "o.dcm")
    _raises(CXRLoadError, lambda: load_cxr(p), p, "Rescale")


# ------------------------------------------------------------------------------------------- size limits
def test_rle_dicom_bomb_refused_before_decoding(tmp_path):
    import pydicom

    p = write(make_dataset(_stored()), tmp_path / "bomb.dcm", transfer_syntax=RLELossless)
    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 40000
    ds.save_as(p, enforce_file_format=True)
    assert os.path.getsize(p) < 4000
    msg = _raises(CXRLoadError, lambda: load_cxr(p), p, "Rows (0028,0010)", "40000x40000", "max_pixels")
    assert "decompression bomb" in msg


def test_dicom_multiframe_counts_in_the_limit(tmp_path):
    p = write(make_dataset(np.stack([_stored()] * 3), frames=3), tmp_path / "mf.dcm")
    _raises(CXRLoadError, lambda: load_cxr(p, max_pixels=32 * 32 * 2), p, "3 frames", "max_pixels=2048")
    _raises(CXRLoadError, lambda: load_cxr(p), p, "multi-frame")  # under the limit: the existing message


def test_max_pixels_keyword_and_loadcxrd(tmp_path):
    p = write(make_dataset(_stored(32, 32)), tmp_path / "ok.dcm")
    assert load_cxr(p, max_pixels=32 * 32).shape == (32, 32)
    _raises(CXRLoadError, lambda: load_cxr(p, max_pixels=32 * 32 - 1), p, "max_pixels=1023")
    _raises(CXRLoadError, lambda: LoadCXRd(max_pixels=100)({"image": p}), p, "max_pixels=100")
    assert LoadCXRd(max_pixels=2048)({"image": p})["image"].shape == (1, 32, 32)
    assert cxr_io.MAX_PIXELS == dl.MAX_PIXELS == 2**27


def _png_with_ihdr(path, w, h):
    src = str(path) + ".src.png"
    data = open(_png(src), "rb").read()
    os.remove(src)
    body = bytearray(data[16:29])
    body[0:8] = struct.pack(">II", w, h)
    chunk = struct.pack(">I", 13) + b"IHDR" + bytes(body) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
    with open(path, "wb") as f:
        f.write(data[:8] + chunk + data[33:])
    return str(path)


def test_png_bomb_refused_from_ihdr(tmp_path):
    p = _png_with_ihdr(tmp_path / "bomb.png", 60000, 60000)
    _raises(CXRLoadError, lambda: load_cxr(p), p, "PNG IHDR", "60000x60000", "max_pixels")


def test_png_and_jpeg_limit(tmp_path):
    p = _png(tmp_path / "a.png", 40, 30)
    _raises(CXRLoadError, lambda: load_cxr(p, max_pixels=1000), p, "PNG IHDR", "40x30")
    j = tmp_path / "a.jpg"
    Image.fromarray((phantom(40, 30) * 255).astype(np.uint8)).save(j, quality=90)
    _raises(CXRLoadError, lambda: load_cxr(j, max_pixels=1000), j, "JPEG header", "40x30")
    assert load_cxr(j, max_pixels=1200).shape == (40, 30)


def test_pil_bomb_error_is_mapped(tmp_path, monkeypatch):
    p = _png(tmp_path / "a.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own limit below ours
    _raises(CXRLoadError, lambda: load_cxr(p), p, "PIL's limit")


# ------------------------------------------------------------------------------------------- file kinds / root
def test_dev_zero_refused_by_loader():
    _raises(CXRLoadError, lambda: load_cxr("/dev/zero"), "/dev/zero", "character device", "regular")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_refused_without_opening(tmp_path):
    f = tmp_path / "pipe.png"
    os.mkfifo(f)
    _raises(CXRLoadError, lambda: load_cxr(f), f, "FIFO")  # opening it would block forever
    problems = dl.validate({"classes": CLASSES, "training": [{"image": str(f), "label": [0, 0, 0]}]}, None, True)
    assert any(p.code == "not_regular_file" and "FIFO" in p.message for p in problems)


def test_loader_data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    inside = _png(root / "a.png")
    outside = _png(tmp_path / "b.png")
    assert load_cxr(inside, data_root=root).shape == (16, 16)
    trav = os.path.join(str(root), "..", "b.png")
    _raises(CXRLoadError, lambda: load_cxr(trav, data_root=root), trav, "outside the data root")
    _raises(CXRLoadError, lambda: LoadCXRd(data_root=root)({"image": outside}), outside, "data_root")
    link = root / "link.png"
    os.symlink(outside, link)
    _raises(CXRLoadError, lambda: load_cxr(link, data_root=root), "outside the data root")


def test_validator_dev_zero_is_not_called_missing(tmp_path):
    d = _datalist()
    d["training"][0]["image"] = "/dev/zero"
    _png(tmp_path / "b.png")
    problems = dl.validate(d, base_dir=str(tmp_path), check_images=True)
    [p] = [p for p in problems if p.severity == "error"]
    assert p.code == "not_regular_file" and "character device" in p.message and "not found" not in p.message
    assert "/dev/zero" in p.message


def test_validator_data_root_traversal(tmp_path):
    d = _datalist()
    d["training"][0]["image"] = "../../../../../../../etc/passwd"
    problems = dl.validate(d, base_dir=str(tmp_path), data_root=str(tmp_path))
    [p] = [p for p in problems if p.code == "outside_data_root"]
    assert p.severity == "error" and "/etc/passwd" in p.message and p.split == "training" and p.index == 0
    assert not dl.validate(_datalist(), base_dir=str(tmp_path), data_root=str(tmp_path))


# ------------------------------------------------------------------------------------------- attention
def _rle_entry(h, w, **kw):
    return dict({"class": "edema", "type": "rle", "coords": {"size": [h, w], "counts": "0"}}, **kw)


def test_rle_attention_bomb_refused_by_validator_and_rasteriser():
    d = _datalist()
    d["training"][0]["label"] = [0, 0, 1]
    d["training"][0]["attention"] = [_rle_entry(60000, 60000)]
    [p] = [p for p in dl.validate(d) if p.severity == "error"]
    assert p.code == "too_large" and p.key == "attention[0].coords.size" and "60000x60000" in p.message
    _raises(
        AttentionError,
        lambda: rasterize_attention([_rle_entry(60000, 60000)], CLASSES, (64, 64), size=32, source="x.png"),
        "x.png",
        "attention[0]",
        "60000x60000",
        "max_pixels",
    )
    t = RasterizeAttentiond(CLASSES, 32, max_pixels=100)
    rec = {"image": "x.png", "attention": [_rle_entry(20, 20)], "letterbox": [0.5, 0, 0, 64, 64], "orig_size": [64, 64]}
    _raises(AttentionError, lambda: t(rec), "x.png", "20x20", "max_pixels=100")


def test_rle_frame_bomb_refused():
    e = _rle_entry(4, 4, frame=[70000, 70000])
    _raises(AttentionError, lambda: rasterize_attention([e], CLASSES, (64, 64), size=32), "frame", "70000x70000")


def test_mask_file_header_checked_first(tmp_path):
    _png(tmp_path / "m.png", 40, 40)
    e = {"class": "edema", "type": "mask", "path": "m.png"}
    _raises(
        AttentionError,
        lambda: rasterize_attention([e], CLASSES, (64, 64), size=32, base_dir=tmp_path, max_pixels=1000),
        "mask file",
        "40x40",
    )
    np.save(tmp_path / "m.npy", np.ones((50, 50), np.uint8))
    e = {"class": "edema", "type": "mask", "path": "m.npy"}
    _raises(
        AttentionError,
        lambda: rasterize_attention([e], CLASSES, (64, 64), size=32, base_dir=tmp_path, max_pixels=1000),
        "50x50",
    )
    m, a = rasterize_attention([e], CLASSES, (64, 64), size=32, base_dir=tmp_path)
    assert a[2] == 1 and m[2].any()
    dev = {"class": "edema", "type": "mask", "path": "/dev/zero"}
    _raises(AttentionError, lambda: rasterize_attention([dev], CLASSES, (64, 64), size=32), "not a regular file")


def test_validator_mask_header_limit(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _png(tmp_path / "m.png", 40, 40)
    d = _datalist()
    d["training"][0]["attention"] = [{"class": "nodule_mass", "type": "mask", "path": "m.png"}]
    assert not [p for p in dl.validate(d, str(tmp_path), True) if p.severity == "error"]
    [p] = [p for p in dl.validate(d, str(tmp_path), True, max_pixels=1000) if p.severity == "error"]
    assert p.code == "too_large" and p.key == "attention[0].path" and "40x40" in p.message


# ------------------------------------------------------------------------------------------- datalist files
def test_latin1_datalist(tmp_path):
    p = tmp_path / "dl.json"
    p.write_bytes(json.dumps(_datalist(name="Hôpital"), ensure_ascii=False).encode("latin-1"))
    msg = _raises(dl.DatalistError, lambda: dl.load(p), str(p), "UTF-8", "byte offset", "save it as UTF-8")
    offset = p.read_bytes().index(bytes([0xF4]))
    assert f"offset {offset}" in msg


@pytest.mark.parametrize("enc", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_datalist(tmp_path, enc):
    p = tmp_path / "dl.json"
    p.write_bytes(json.dumps(_datalist()).encode(enc))
    _raises(dl.DatalistError, lambda: dl.load(p), str(p), "UTF-16", "save it as UTF-8")


def test_utf8_bom_accepted(tmp_path):
    p = tmp_path / "dl.json"
    p.write_bytes(codecs.BOM_UTF8 + json.dumps(_datalist()).encode("utf-8"))
    assert dl.load(p)["name"] == "t"


def test_deep_nesting_refused_before_parsing(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"classes": ["a"], "training": ' + "[" * 100000 + "]" * 100000 + "}")
    _raises(dl.DatalistError, lambda: dl.load(p), str(p), "nested deeper than 64")
    ok = _datalist()
    ok["training"][0]["image"] = "x[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[.png"
    assert dl.loads_bytes(json.dumps(ok).encode(), "x") == ok  # brackets inside strings do not count
    assert dl.MAX_DEPTH == 64


def test_datalist_path_is_a_device_or_dir(tmp_path):
    _raises(dl.DatalistError, lambda: dl.load("/dev/zero"), "/dev/zero", "not a regular file")
    _raises(dl.DatalistError, lambda: dl.load(tmp_path), str(tmp_path), "not a regular file")


# ------------------------------------------------------------------------------------------- leakage / splits
def test_same_image_in_two_splits_warns(tmp_path):
    d = _datalist(test=[{"image": "./sub/../a.png", "label": [0, 0, 0], "patient_id": "other"}])
    [p] = [p for p in dl.validate(d, base_dir=str(tmp_path)) if p.code == "image_leakage"]
    assert p.severity == "warning" and p.split == "test" and p.index == 0
    assert "'training' index 0" in p.message


def test_same_bytes_in_two_splits_warns_with_check_images(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        _png(tmp_path / n)  # identical bytes
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "d.png")
    d = _datalist(test=[{"image": "c.png", "label": [0, 0, 0], "patient_id": "p9"}])
    d["test"].append({"image": "d.png", "label": [0, 0, 0], "patient_id": "p8"})
    probs = [p for p in dl.validate(d, base_dir=str(tmp_path), check_images=True) if p.code == "image_leakage"]
    assert {(p.split, p.index) for p in probs} == {("validation", 0), ("test", 0)}
    assert all("sha256" in p.message and p.severity == "warning" for p in probs)
    assert not [p for p in dl.validate(d, base_dir=str(tmp_path)) if p.code == "image_leakage"]


def test_required_splits(tmp_path):
    d = _datalist(training=[])
    assert not [p for p in dl.validate(d) if p.code == "required_split"]
    probs = [p for p in dl.validate(d, required_splits=["training", "validation", "test"]) if p.severity == "error"]
    by = {p.split: p.message for p in probs if p.code == "required_split"}
    assert set(by) == {"training", "test"} and "empty" in by["training"] and "missing" in by["test"]
    p = tmp_path / "dl.json"
    dl.save(d, p)
    _raises(dl.DatalistError, lambda: dl.load(p, required_splits=["training"]), str(p), "required split 'training'")


def test_unhashable_attention_type_is_a_problem():
    d = _datalist()
    d["training"][0]["attention"] = [{"class": "edema", "type": ["rle"], "coords": []}]
    assert any(p.code == "attention_type" for p in dl.validate(d))
    _raises(
        AttentionError,
        lambda: rasterize_attention(d["training"][0]["attention"], CLASSES, (8, 8), size=8),
        "unknown type",
    )


# ------------------------------------------------------------------------------------------- messages
def test_300_byte_dicom_is_called_truncated(tmp_path):
    p = write(make_dataset(_stored()), tmp_path / "full.dcm")
    short = tmp_path / "short.dcm"
    short.write_bytes(open(p, "rb").read()[:300])
    msg = _raises(CXRLoadError, lambda: load_cxr(short), short, "truncated", "300 bytes")
    assert "report" not in msg.split(".")[0]


def test_valid_inputs_unchanged(tmp_path):
    p = write(make_dataset(_stored()), tmp_path / "ok.dcm")
    img, meta = load_cxr(p, return_meta=True)
    assert img.dtype == np.float32 and np.isfinite(img).all() and meta["orig_size"] == (32, 32)
    assert load_cxr(_png(tmp_path / "a.png")).shape == (16, 16)


@pytest.mark.parametrize("syntax", ["j2k", "jpegls", "jpeg"])
def test_codestream_bomb_inside_a_small_dicom(tmp_path, syntax):
    """Rows/Columns say 32 x 32 but the compressed frame's own header declares 40000 x 40000."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

    if syntax == "jpeg":  # no JPEG encoder in pydicom: PIL's codestream, encapsulated
        ds = make_dataset((phantom(32, 32) * 255).astype(np.uint8))
        buf = io.BytesIO()
        Image.fromarray((phantom(32, 32) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        p = str(tmp_path / "c.dcm")
        ds.save_as(p, enforce_file_format=True)
    else:
        ts = JPEG2000Lossless if syntax == "j2k" else JPEGLSLossless
        p = write(make_dataset(_stored(), bits_stored=12), tmp_path / "c.dcm", transfer_syntax=ts)
    ds = pydicom.dcmread(p)
    frame = bytearray(cxr_io._dicom_frame_bytes(ds))
    kind, h, w, _ = cxr_io._codestream_size(bytes(frame))
    assert (h, w) == (32, 32)
    if syntax == "j2k":
        frame[8:16] = struct.pack(">II", 40000, 40000)
    else:
        i = next(i for i in range(2, len(frame)) if frame[i - 1] == 0xFF and frame[i] in cxr_io._SOF_MARKERS)
        frame[i + 4 : i + 8] = struct.pack(">HH", 40000, 40000)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(p, enforce_file_format=True)
    _raises(CXRLoadError, lambda: load_cxr(p), p, "header in Pixel Data (7FE0,0010)", "40000x40000", "max_pixels")
