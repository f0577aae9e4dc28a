"""configs/inference.yaml on a hospital-like folder: files found by content, non-chest and broken files skipped with
their reason, results in CSV and JSON, overlays and NIfTI maps at the original geometry, peaks in original pixels."""

import csv
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.inference import attention_affine, attention_peaks, maps_to_original, scan_inputs
from bundle.transforms import letterbox_params, unletterbox_points
from bundle.utils.dicom import make_dataset, phantom, write
from bundle.workflow import image_records
from tests.conftest import CONFIGS, ROOT, run_bundle_command

INFERENCE = os.path.join(CONFIGS, "inference.yaml")
TINY_NET = {"image_size": 64, "network_def#vit_layers": 2}
CLASSES = ["nodule_mass", "pleural_effusion", "edema"]

# file -> original (H, W) of the images to be scored
GOOD = {"good.png": (70, 100), "grey_rgb.png": (70, 100), "chest.dcm": (90, 60), "IM0001": (90, 60), "IM0002": (90, 60)}
# file -> (stage, field) of the inputs to be skipped
BAD = {
    "figure.png": ("scan", "channels"),
    "notes.png": ("scan", "file"),
    "foot.dcm": ("scan", "BodyPartExamined"),
    "lateral.dcm": ("scan", "ViewPosition"),
    "ct.dcm": ("scan", "Modality"),
    "truncated.dcm": ("load", "PixelData"),
}


def _write_folder(d) -> str:
    """A hospital-like folder: chest images (PNG, grey RGB PNG, DICOM with and without extension and preamble)
    mixed with a colour figure, a text file named .png, a foot, a lateral, a CT and a truncated DICOM."""
    os.makedirs(d / "sub", exist_ok=True)
    g = (phantom(70, 100) * 255).astype(np.uint8)
    Image.fromarray(g).save(d / "good.png")
    Image.fromarray(np.stack([g] * 3, -1)).save(d / "grey_rgb.png")  # RGB whose channels are equal: accepted
    Image.fromarray(np.stack([g, 255 - g, g // 2, np.full_like(g, 255)], -1), "RGBA").save(d / "figure.png")
    (d / "notes.png").write_text("not an image\n")
    p16 = (phantom(90, 60) * 4095).astype(np.uint16)
    chest = {"BodyPartExamined": "CHEST"}
    write(make_dataset(p16, bits_stored=12, extra=chest), d / "chest.dcm")
    write(make_dataset(p16, bits_stored=12), d / "sub" / "IM0001")  # no extension, with preamble
    write(make_dataset(p16, bits_stored=12), d / "sub" / "IM0002", preamble=False)  # raw dataset, no extension
    write(make_dataset(p16, bits_stored=12, extra={"BodyPartExamined": "EXTREMITY"}), d / "foot.dcm")
    write(make_dataset(p16, bits_stored=12, view="LL", extra=chest), d / "lateral.dcm")
    write(make_dataset(p16, bits_stored=12, modality="CT"), d / "ct.dcm")
    data = write(make_dataset(p16, bits_stored=12, extra=chest), d / "truncated.dcm")
    with open(data, "rb") as f:
        raw = f.read()
    with open(data, "wb") as f:
        f.write(raw[:-3000])  # pixel data cut short: passes the header scan, fails to decode
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not read
    return str(d)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("hospital"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """state_dict of an untrained network_def with the test sizes (image_size 64, 2 ViT layers)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(INFERENCE)
    folder = tmp_path_factory.mktemp("model")
    # no checkpoint at ckpt_path: network_def is built from the config's sizes, whatever models/ of the repo holds
    parser.update({"bundle_root": ROOT, "ckpt_path": str(folder / "absent.pt"), **TINY_NET})
    torch.manual_seed(0)
    path = str(folder / "model.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(out, folder, overlays=True, maps=True):
    preds = _read_csv(out / "predictions.csv")
    assert sorted(os.path.basename(r["image"]) for r in preds) == sorted(GOOD)
    assert list(preds[0])[:3] == ["index", "image", "prob_nodule_mass"]
    skipped = {os.path.basename(r["file"]): r for r in _read_csv(out / "skipped.csv")}
    assert {k: (v["stage"], v["field"]) for k, v in skipped.items()} == BAD
    for name, (_, field) in BAD.items():
        assert skipped[name]["reason"], name
        if field not in ("file", "PixelData"):
            assert field in skipped[name]["reason"], (name, skipped[name]["reason"])
    assert "truncated" in skipped["truncated.dcm"]["reason"]
    js = json.loads((out / "predictions.json").read_text())
    assert js["classes"] == CLASSES and js["n_images"] == len(GOOD) and js["n_skipped"] == len(BAD)
    assert "original" in js["coordinates"]
    for rec, row in zip(js["images"], preds, strict=True):
        name = os.path.basename(rec["image"])
        h, w = GOOD[name]
        assert (rec["orig_height"], rec["orig_width"]) == (h, w) == (int(row["orig_height"]), int(row["orig_width"]))
        for c in CLASSES:
            f = rec["findings"][c]
            assert 0 <= f["prob"] <= 1 and abs(f["prob"] - float(row[f"prob_{c}"])) < 1e-6
            assert 0 <= f["attn_peak_row"] < h and 0 <= f["attn_peak_col"] < w
            assert (f["attn_peak_row"], f["attn_peak_col"]) == (
                int(row[f"attn_peak_row_{c}"]),
                int(row[f"attn_peak_col_{c}"]),
            )
        if overlays:
            with Image.open(out / rec["overlay"]) as im:  # one panel per finding, each the original H x W
                assert im.size == (w * len(CLASSES), h)
                assert "Peaks" in im.text
        else:
            assert rec["overlay"] is None
        if maps:
            img = nib.load(out / rec["attention_map"])
            assert img.shape == (4, 4, len(CLASSES))  # (w, h, C) of the 64 / 16 token grid
            # the affine takes the map's cells to the original pixel grid: the first and last cells' centres
            # lie inside the letterbox content, whose letterbox-space width 64 covers max(H, W) original pixels
            corners = nib.affines.apply_affine(img.affine, [[0, 0, 0], [3, 3, 2]])
            span = max(h, w) / 4
            assert np.allclose(np.diag(img.affine)[:2], span) and corners[1, 2] == 2
        else:
            assert rec["attention_map"] is None
    return preds, skipped, js


# ------------------------------------------------------------------------------------------ fast
def test_scan_finds_images_by_content_and_lists_the_rest(folder, tmp_path):
    records = image_records(folder)
    names = [os.path.basename(r["image"]) for r in records]
    assert ".DS_Store" not in names and sorted(names) == sorted([*GOOD, *BAD])
    scan = scan_inputs(records, str(tmp_path))
    kept = sorted(os.path.basename(r["image"]) for r in scan.records)
    assert kept == sorted([*GOOD, "truncated.dcm"])  # the truncated file is caught when it is decoded
    assert {os.path.basename(s["file"]): s["field"] for s in scan.skipped} == {
        k: f for k, (stage, f) in BAD.items() if stage == "scan"
    }
    assert all(r["index"] == names.index(os.path.basename(r["image"])) for r in scan.records)  # indices kept
    assert len(_read_csv(tmp_path / "skipped.csv")) == len(scan.skipped)  # on disk before any image is loaded


def test_output_folder_inside_the_input_is_not_read_and_datalist_views_are_checked(folder, tmp_path):
    out = os.path.join(folder, "results")
    os.makedirs(os.path.join(out, "overlays"), exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(out, "overlays", "00000_good.png"))
    try:
        names = [os.path.basename(r["image"]) for r in image_records(folder, exclude=out)]
        assert sorted(names) == sorted([*GOOD, *BAD])
    finally:
        import shutil

        shutil.rmtree(out)
    good = os.path.join(folder, "good.png")
    scan = scan_inputs([{"image": good, "index": 0, "view": "LATERAL"}, {"image": good, "index": 1, "view": "AP"}])
    assert [r["index"] for r in scan.records] == [1]
    assert scan.skipped[0]["field"] == "view" and "LATERAL" in scan.skipped[0]["reason"]


def test_scan_raises_when_nothing_is_left(folder, tmp_path):
    bad = [r for r in image_records(folder) if os.path.basename(r["image"]) in ("ct.dcm", "notes.png")]
    with pytest.raises(ValueError, match="skipped.csv"):
        scan_inputs(bad, str(tmp_path))
    assert len(_read_csv(tmp_path / "skipped.csv")) == 2


@pytest.mark.parametrize("hw", [(70, 100), (90, 60), (64, 64), (1001, 333)])
def test_peak_coordinates_are_original_pixels(hw):
    """A synthetic map with one hot cell: its peak in original pixels is the cell centre mapped back with
    letterbox_params / unletterbox_points, and the NIfTI affine agrees."""
    h, w = hw
    size, grid = 64, 8
    lb = letterbox_params(h, w, size)
    # a cell whose centre lies inside the content
    u, v = lb[2] + 0.6 * (size - 2 * lb[2]), lb[1] + 0.3 * (size - 2 * lb[1])  # letterbox (x, y)
    i, j = int(u * grid / size), int(v * grid / size)
    attn = torch.zeros(2, grid, grid)
    attn[0, j, i] = 1.0
    attn[1, 0, 0] = 1.0  # the corner cell: in the padding for non-square images, the peak is clamped to the image
    maps = maps_to_original(attn, lb)
    assert maps.shape == (2, h, w)
    (r, c), (r1, c1) = attention_peaks(maps)
    centre = ((i + 0.5) * size / grid, (j + 0.5) * size / grid)
    x, y = unletterbox_points(centre, lb)  # continuous original coordinates of the cell centre
    tol = 1 + 0.5 / float(lb[0])  # the bilinear field peaks at the centre; pixel centres are 1 / scale apart
    assert abs(c + 0.5 - x) <= tol and abs(r + 0.5 - y) <= tol
    assert 0 <= r1 < h and 0 <= c1 < w
    xa, ya, _ = nib.affines.apply_affine(attention_affine(lb, (grid, grid)), [i, j, 0])
    assert np.allclose([xa, ya], [x - 0.5, y - 0.5], atol=1e-4)


def test_inference_in_process(folder, tiny_model, tmp_path):
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "out"
    wf = ConfigWorkflow(
        config_file=INFERENCE,
        workflow_type="inference",
        bundle_root=ROOT,
        input_path=folder,
        ckpt_path=tiny_model,
        output_dir=str(out),
        batch_size=2,
        **TINY_NET,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    _check_outputs(out, folder)


def test_inference_without_overlays_and_maps(folder, tiny_model, tmp_path):
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "out"
    wf = ConfigWorkflow(
        config_file=INFERENCE,
        workflow_type="inference",
        bundle_root=ROOT,
        input_path=folder,
        ckpt_path=tiny_model,
        output_dir=str(out),
        save_overlays="false",
        save_maps=False,
        **TINY_NET,
    )
    wf.initialize()
    wf.run()
    _check_outputs(out, folder, overlays=False, maps=False)
    assert not (out / "overlays").exists() and not (out / "maps").exists()


# ------------------------------------------------------------------------------------------ subprocess, slow
@pytest.mark.slow
def test_monai_bundle_run_from_another_directory(folder, tiny_model, tmp_path):
    """The documented command from another working directory, with --bundle_root and without PYTHONPATH:
    `import bundle` must resolve to this bundle (MONAI adds the bundle root to sys.path in run())."""
    out = tmp_path / "out"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE, "--bundle_root", ROOT,
        "--input_path", folder, "--ckpt_path", tiny_model, "--output_dir", str(out),
        *[a for k, v in TINY_NET.items() for a in (f"--{k}", str(v))],
    ]  # fmt: skip
    run_bundle_command(args, cwd=str(cwd), env={"PYTHONPATH": ""})  # no bundle root on the path
    _check_outputs(out, folder)
