"""Attention rasterising lands where the image content is, for every entry type, after resize and pad."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_dilation
from skimage.draw import ellipse as sk_ellipse
from skimage.draw import polygon as sk_polygon

from bundle.transforms import (
    AttentionError,
    CXRIntensityd,
    Letterboxd,
    LoadCXRd,
    RasterizeAttentiond,
    letterbox_params,
    rasterize_attention,
)
from bundle.utils.dicom import make_dataset, write

H, W, S = 300, 200, 64  # non-square native image, letterboxed to 64 x 64 (scale 0.2133, pad_left 10)
CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


def _native_shape(typ):
    """(native boolean shape drawn into the image, attention entry describing it in a frame)."""
    m = np.zeros((H, W), bool)
    if typ == "bbox_xyxy":
        m[100:170, 40:110] = True
        return m, {"type": typ, "coords": [40, 100, 110, 170], "frame": [W, H]}
    if typ == "bbox_xywh":  # frame at twice the resolution of the loaded image (like full-res annotations)
        m[60:140, 120:180] = True
        return m, {"type": typ, "coords": [240, 120, 120, 160], "frame": [2 * W, 2 * H]}
    if typ == "bbox_normalized":
        m[30:90, 50:150] = True
        return m, {
            "type": "bbox_xyxy",
            "coords": [50 / W, 30 / H, 150 / W, 90 / H],
            "frame": [W, H],
            "normalized": True,
        }
    if typ == "ellipse_bbox":
        rr, cc = sk_ellipse((120 + 220) / 2 - 0.5, (30 + 150) / 2 - 0.5, 50, 60, shape=(H, W))
        m[rr, cc] = True
        return m, {"type": typ, "coords": [30, 120, 150, 220], "frame": [W, H]}
    if typ == "polygon":
        pts = np.array([[30, 40], [170, 60], [150, 250], [60, 200]], float)
        rr, cc = sk_polygon(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape=(H, W))
        m[rr, cc] = True
        return m, {"type": typ, "coords": pts.tolist(), "frame": [W, H]}
    if typ == "point_radius":
        rr, cc = sk_ellipse(150 - 0.5, 100 - 0.5, 35, 35, shape=(H, W))
        m[rr, cc] = True
        return m, {"type": typ, "coords": [100, 150, 35], "frame": [W, H]}
    if typ == "rle":
        rr, cc = sk_polygon(np.array([50, 80, 260, 230]) - 0.5, np.array([20, 180, 160, 40]) - 0.5, shape=(H, W))
        m[rr, cc] = True
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return m, {"type": typ, "coords": {"size": [H, W], "counts": rle["counts"].decode()}}
    raise KeyError(typ)


def _pipeline(d, size=S, target_size=None):
    for t in (
        LoadCXRd(target_size=target_size),
        Letterboxd(size=size),
        CXRIntensityd(lower=0, upper=100),
        RasterizeAttentiond(CLASSES, size),
    ):
        d = t(d)
    return d


def _assert_within_one_pixel(mask, image_bright):
    assert mask.any() and image_bright.any()
    one = np.ones((3, 3), bool)
    assert not (mask & ~binary_dilation(image_bright, one)).any(), "mask pixel more than 1 px from the image shape"
    assert not (image_bright & ~binary_dilation(mask, one)).any(), "image shape pixel more than 1 px from the mask"
    iou = (mask & image_bright).sum() / (mask | image_bright).sum()
    assert iou > 0.8, iou


@pytest.mark.parametrize(
    "typ", ["bbox_xyxy", "bbox_xywh", "bbox_normalized", "ellipse_bbox", "polygon", "point_radius", "rle"]
)
@pytest.mark.parametrize("target_size", [None, S])
def test_shape_lands_on_image_content(tmp_path, typ, target_size):
    shape, entry = _native_shape(typ)
    img = np.where(shape, 255, 60).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "cxr.png")
    entry["class"] = "pleural_effusion"
    d = _pipeline({"image": str(tmp_path / "cxr.png"), "attention": [entry]}, target_size=target_size)
    mask, avail = d["attn_mask"], d["attn_available"]
    assert mask.shape == (3, S, S) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(avail, [0, 1, 0])
    assert mask[0].sum() == 0 and mask[2].sum() == 0
    _assert_within_one_pixel(mask[1] > 0, np.asarray(d["image"])[0] > 0.5)


def test_mask_file_png_and_npy(tmp_path):
    shape, _ = _native_shape("polygon")
    Image.fromarray(np.where(shape, 255, 60).astype(np.uint8)).save(tmp_path / "cxr.png")
    Image.fromarray((shape * 255).astype(np.uint8)).save(tmp_path / "m.png")
    # a mask stored at half resolution (own frame) must still align
    np.save(tmp_path / "m.npy", shape[::2, ::2].astype(np.uint8))
    for name in ("m.png", "m.npy"):
        d = {"image": str(tmp_path / "cxr.png"), "attention": [{"class": "edema", "type": "mask", "path": name}]}
        d = RasterizeAttentiond(CLASSES, S, base_dir=tmp_path)(
            CXRIntensityd(lower=0, upper=100)(Letterboxd(size=S)(LoadCXRd()(d)))
        )
        _assert_within_one_pixel(d["attn_mask"][2] > 0, np.asarray(d["image"])[0] > 0.5)


def test_dicom_frame_in_native_pixels(tmp_path):
    """VinDr style: boxes in DICOM pixels, image loaded from the DICOM (MONOCHROME1, windowed)."""
    shape, entry = _native_shape("bbox_xyxy")
    stored = np.where(shape, 200, 3800).astype(np.uint16)  # MONOCHROME1: the bright-on-display box is stored low
    p = write(make_dataset(stored, photometric="MONOCHROME1", bits_stored=12, window=(2000, 4000)), tmp_path / "a.dcm")
    entry["class"] = "nodule_mass"
    d = _pipeline({"image": p, "attention": [entry]})
    _assert_within_one_pixel(d["attn_mask"][0] > 0, np.asarray(d["image"])[0] > 0.5)


def test_union_per_class_and_no_attention():
    entries = [
        {"class": "edema", "type": "bbox_xyxy", "coords": [0, 0, 50, 50], "frame": [200, 300]},
        {"class": "edema", "type": "bbox_xyxy", "coords": [100, 200, 150, 250], "frame": [200, 300]},
    ]
    mask, avail = rasterize_attention(entries, CLASSES, (300, 200), letterbox_params(300, 200, 64), 64)
    one, _ = rasterize_attention(entries[:1], CLASSES, (300, 200), None, 64)
    assert mask[2].sum() > one[2].sum() > 0 and (mask[2] >= one[2]).all()
    np.testing.assert_array_equal(avail, [0, 0, 1])
    d = RasterizeAttentiond(CLASSES, 64)({"image": "x.png", "attention": None, "letterbox": letterbox_params(9, 9, 64)})
    assert d["attn_mask"].shape == (3, 64, 64) and d["attn_mask"].sum() == 0 and d["attn_available"].sum() == 0
    d = RasterizeAttentiond(CLASSES, 64)({"image": "x.png"})
    assert d["attn_mask"].sum() == 0


def test_tiny_shapes_keep_a_pixel():
    lb = letterbox_params(2048, 2048, 64)
    for e in (
        {"type": "bbox_xywh", "coords": [1000, 1000, 4, 4]},
        {"type": "point_radius", "coords": [1000, 1000, 2]},
        {"type": "ellipse_bbox", "coords": [1000, 1000, 1003, 1003]},
        {"type": "polygon", "coords": [[1000, 1000], [1003, 1000], [1001, 1003]]},
    ):
        e.update({"class": "nodule_mass", "frame": [2048, 2048]})
        mask, _ = rasterize_attention([e], CLASSES, (2048, 2048), lb, 64)
        assert mask[0].sum() == 1 and mask[0, 31, 31] == 1, e["type"]


@pytest.mark.parametrize(
    "entry,words",
    [
        ({"class": "cardiomegaly", "type": "bbox_xyxy", "coords": [0, 0, 1, 1]}, ["unknown class", "cardiomegaly"]),
        ({"class": "edema", "type": "circle", "coords": [0, 0, 1]}, ["unknown type", "circle"]),
        ({"class": "edema", "type": "bbox_xyxy", "coords": [0, 0, 1], "frame": [200, 300]}, ["4 numbers"]),
        ({"class": "edema", "type": "polygon", "coords": [[0, 0], [1, 1]], "frame": [200, 300]}, ["3 points"]),
        ({"class": "edema", "type": "bbox_xywh", "coords": [0, 0, 5, 5]}, ["attention[0].frame", "missing", '"frame"']),
        ({"class": "edema", "type": "mask", "path": "nope.png"}, ["does not exist"]),
        ({"class": "edema", "type": "bbox_xyxy", "coords": [0, 0, 1, 1], "frame": [0, 10]}, ["frame"]),
    ],
)
def test_bad_entries_name_the_image(entry, words):
    d = {
        "image": "/data/cxr_0007.png",
        "attention": [entry],
        "orig_size": [300, 200],
        "letterbox": letterbox_params(300, 200, 64),
    }
    with pytest.raises(AttentionError) as e:
        RasterizeAttentiond(CLASSES, 64)(d)
    msg = str(e.value)
    assert "/data/cxr_0007.png" in msg and "attention[0]" in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "typ,coords",
    [
        ("bbox_xywh", [1, 2, 30, 40]),
        ("bbox_xyxy", [1, 2, 30, 40]),
        ("ellipse_bbox", [1, 2, 30, 40]),
        ("polygon", [[1, 2], [30, 2], [15, 40]]),
        ("point_radius", [50, 40, 12]),
    ],
)
def test_pixel_coords_without_frame_are_rejected_like_the_validator(typ, coords):
    """The rasteriser never guesses a frame: same rule, message and fix as bundle.data.datalist.validate."""
    from bundle.data import datalist as dl

    entry = {"class": "edema", "type": typ, "coords": coords}
    d = {
        "image": "/data/cxr_0007.png",
        "attention": [entry],
        "orig_size": [H, W],
        "letterbox": letterbox_params(H, W, S),
    }
    with pytest.raises(AttentionError) as e:
        RasterizeAttentiond(CLASSES, S)(d)
    rec = {"image": "a.png", "label": [0, 0, 1], "sex": "F", "age": 50, "attention": [entry]}
    (problem,) = [p for p in dl.validate({"name": "t", "classes": CLASSES, "training": [rec]}) if p.severity == "error"]
    assert problem.key == "attention[0].frame"
    assert "/data/cxr_0007.png: attention[0].frame" in str(e.value)
    assert problem.message in str(e.value) and problem.fix in str(e.value)
    # normalized coords need no frame: fractions of the image
    entry.update(normalized=True, coords=[0.25, 0.25, 0.5, 0.5] if typ != "point_radius" else [0.5, 0.5, 0.1])
    if typ == "polygon":
        entry["coords"] = [[0.25, 0.25], [0.75, 0.25], [0.5, 0.75]]
    assert RasterizeAttentiond(CLASSES, S)(d)["attn_available"].tolist() == [0, 0, 1]


def test_rle_and_mask_need_no_frame(tmp_path):
    m = np.zeros((H, W), bool)
    m[100:200, 50:150] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    entries = [
        {"class": "edema", "type": "rle", "coords": {"size": [H, W], "counts": rle["counts"].decode()}},
        {"class": "nodule_mass", "type": "mask", "path": "m.png"},
    ]
    mask, avail = rasterize_attention(entries, CLASSES, (H, W), letterbox_params(H, W, S), S, base_dir=tmp_path)
    assert avail.tolist() == [1, 0, 1] and np.array_equal(mask[0], mask[2]) and mask[2].sum() > 0


def test_size_mismatch_and_missing_letterbox_are_errors():
    e = [{"class": "edema", "type": "bbox_xyxy", "coords": [0, 0, 10, 10]}]
    with pytest.raises(AttentionError, match="Letterboxd"):
        RasterizeAttentiond(CLASSES, 64)({"image": "a.png", "attention": e, "orig_size": [30, 20]})
    with pytest.raises(AttentionError, match="same size"):
        RasterizeAttentiond(CLASSES, 64)(
            {"image": "a.png", "attention": e, "orig_size": [30, 20], "letterbox": letterbox_params(30, 20, 128)}
        )
