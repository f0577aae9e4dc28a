"""Letterbox geometry, intensity scaling and joint augmentation."""

import pickle

import numpy as np
import pytest
import torch
from monai.transforms import Resize, SpatialPad
from PIL import Image

from bundle.transforms import (
    CXRIntensityd,
    JointAugmentd,
    Letterboxd,
    LoadCXRd,
    letterbox_params,
    letterbox_points,
    unletterbox_points,
)


def test_letterbox_params_even_split_extra_pixel_at_end():
    lb = letterbox_params(300, 200, 64)
    np.testing.assert_allclose(lb, [64 / 300, 0, 10, 300, 200], rtol=1e-6)  # content 64 x 43, pad 21 = 10 + 11
    lb = letterbox_params(100, 51, 64)  # content 64 x 33, pad 31 = 15 + 16
    assert lb[2] == 15 and lb[1] == 0
    lb = letterbox_params(51, 100, 64)
    assert lb[1] == 15 and lb[2] == 0
    assert letterbox_params(64, 64, 64).tolist() == [1, 0, 0, 64, 64]
    assert lb.dtype == np.float32


def test_letterbox_points_roundtrip():
    lb = letterbox_params(300, 200, 64)
    pts = np.array([[0, 0], [200, 300], [50.5, 120.25]])
    out = letterbox_points(pts, lb)
    np.testing.assert_allclose(out[0], [10, 0])
    np.testing.assert_allclose(out[1], [200 * 64 / 300 + 10, 64])
    np.testing.assert_allclose(unletterbox_points(out, lb), pts)


@pytest.mark.parametrize("hw", [(300, 200), (200, 300), (101, 77), (64, 64)])
def test_letterboxd_matches_monai_resize_longest_plus_symmetric_pad(hw):
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((1, *hw), dtype=np.float32))
    ours = Letterboxd(size=64)({"image": img})
    ref = SpatialPad((64, 64), method="symmetric")(Resize(64, size_mode="longest", mode="area")(img))
    assert tuple(ours["image"].shape) == (1, 64, 64)
    np.testing.assert_allclose(np.asarray(ours["image"]), np.asarray(ref), atol=1e-6)
    np.testing.assert_allclose(ours["letterbox"], letterbox_params(*hw, 64))


def test_letterbox_puts_content_where_points_say(tmp_path):
    """A bright pixel block at native (x, y) lands at letterbox_points((x, y)) within a pixel."""
    h, w, side = 300, 200, 60
    img = np.zeros((1, h, w), np.float32)
    img[0, 150:160, 40:50] = 1  # centre (45, 155)
    d = Letterboxd(size=side)({"image": torch.from_numpy(img)})
    out = np.asarray(d["image"])[0]
    cy, cx = np.argwhere(out > 0.2).mean(axis=0) + 0.5
    ex, ey = letterbox_points([45, 155], d["letterbox"])
    assert abs(cx - ex) < 1 and abs(cy - ey) < 1
    assert np.all(out[:, : int(d["letterbox"][2])] == 0)  # left padding is black


def test_letterboxd_uses_native_orig_size_for_prereduced_images(tmp_path):
    h, w, side = 400, 240, 64
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray((rng.random((20, 12)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    Image.fromarray(smooth).save(tmp_path / "a.png")
    full = Letterboxd(size=side)(LoadCXRd()({"image": str(tmp_path / "a.png")}))
    fast = Letterboxd(size=side)(LoadCXRd(target_size=side)({"image": str(tmp_path / "a.png")}))
    np.testing.assert_array_equal(full["letterbox"], fast["letterbox"])
    # PIL's exact area (loader) vs torch adaptive pooling (MONAI "area") differ slightly at non-integer factors
    err = np.abs(np.asarray(full["image"]) - np.asarray(fast["image"]))
    assert err.mean() < 0.005 and err.max() < 0.06
    with pytest.raises(ValueError, match="orig_size"):
        Letterboxd(size=side)({"image": torch.zeros(1, 40, 40), "orig_size": [400, 240]})


def test_cxr_intensity_ignores_padding_and_standardises():
    rng = np.random.default_rng(0)
    img = torch.from_numpy((0.4 + 0.2 * rng.random((1, 300, 150))).astype(np.float32))
    d = Letterboxd(size=64)({"image": img})
    out = CXRIntensityd(lower=1, upper=99)(d)["image"]
    lb = d["letterbox"]
    content = np.asarray(out)[0, :, int(lb[2]) : int(lb[2]) + 32]
    assert content.min() == 0 and content.max() == 1  # stretched by the content's own percentiles
    assert np.asarray(out)[0, :, 0].max() == 0  # padding stays black
    assert np.percentile(content, 50) == pytest.approx(0.5, abs=0.1)
    std = CXRIntensityd(lower=1, upper=99, mean=0.5, std=0.25)(d)["image"]
    np.testing.assert_allclose(np.asarray(std), (np.asarray(out) - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError):
        CXRIntensityd(mean=0.5)


# ------------------------------------------------------------------------------------------ augmentation
def _square_sample(side=64):
    img = np.full((1, side, side), 0.2, np.float32)
    img[0, 20:36, 12:28] = 1.0
    mask = np.zeros((2, side, side), np.float32)
    mask[1, 20:36, 12:28] = 1.0
    return {"image": torch.from_numpy(img), "attn_mask": mask}


def test_joint_augment_moves_image_and_mask_together():
    aug = JointAugmentd(prob=1.0, rotate_deg=25, scale=0.15, translate=0.15, intensity=0.0)
    for seed in range(5):
        aug.set_random_state(seed)
        d = aug(_square_sample())
        img, m = np.asarray(d["image"])[0], np.asarray(d["attn_mask"])
        assert set(np.unique(m)) <= {0.0, 1.0}  # nearest keeps the mask binary
        assert m[0].sum() == 0
        bright = img > 0.6
        inter, union = (bright & (m[1] > 0)).sum(), (bright | (m[1] > 0)).sum()
        assert inter / union > 0.85, (seed, inter / union)
        assert not np.array_equal(m[1], _square_sample()["attn_mask"][1])  # it really moved


def test_joint_augment_deterministic_and_picklable():
    aug = JointAugmentd(prob=1.0, intensity=0.2)
    a = aug.set_random_state(7)(_square_sample())
    b = pickle.loads(pickle.dumps(JointAugmentd(prob=1.0, intensity=0.2))).set_random_state(7)(_square_sample())
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    c = aug.set_random_state(8)(_square_sample())
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


def test_joint_augment_flip_off_by_default_and_together_when_on():
    assert JointAugmentd().flip_prob == 0.0
    d = JointAugmentd(prob=0.0, flip_prob=1.0, intensity=0.0)(_square_sample())
    img, m = np.asarray(d["image"])[0], np.asarray(d["attn_mask"])[1]
    assert img[20:36, 64 - 28 : 64 - 12].min() == 1.0 and m[20:36, 64 - 28 : 64 - 12].min() == 1.0
    # no mask in the record (inference): fine
    assert "attn_mask" not in JointAugmentd(prob=1.0)({"image": _square_sample()["image"]})
