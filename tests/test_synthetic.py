"""The built-in synthetic benchmark: determinism, validity, exact masks, the planted shortcut, the DICOM site."""

import hashlib
import json
import os
from collections import defaultdict

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from bundle.data import datalist as dl
from bundle.data import synthetic as S
from bundle.data.synthetic.write import to_png16


def _digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small(tiny_datalist, tiny_synth):
    """(folder, datalist path, params, seed) of the shared tiny benchmark (tests/conftest.py)."""
    root = os.path.dirname(tiny_datalist)
    with open(os.path.join(root, S.SUMMARY_NAME)) as f:
        seed = json.load(f)["seed"]
    return root, tiny_datalist, S.SyntheticParams.from_kwargs(**tiny_synth), seed


def test_same_seed_same_bytes_any_workers_other_seed_differs(small, tiny_synth, tmp_path):
    root, _, params, seed = small
    again = S.ensure_synthetic(str(tmp_path / "b"), seed=seed, workers=2, progress=False, **tiny_synth)
    ref = _digest(root)
    assert len(ref) > params.n_train + params.n_val + params.n_test + params.n_ood
    assert _digest(os.path.dirname(again)) == ref
    other = S.ensure_synthetic(str(tmp_path / "c"), seed=seed + 1, workers=1, progress=False, **tiny_synth)
    dig = _digest(os.path.dirname(other))
    common = set(dig) & set(ref)
    assert dig["datalist.json"] != ref["datalist.json"]
    assert sum(dig[k] == ref[k] for k in common if k.startswith("images/")) == 0


def test_datalist_validates_and_has_the_documented_shape(small):
    root, path, params, _ = small
    d = dl.load(path, check_images=True)
    assert [p for p in d.get("_problems", []) if p.severity == "error"] == []
    assert d["classes"] == list(S.CLASSES)
    assert set(dl.split_names(d)) == set(S.SPLITS)
    for split in S.SPLITS:
        h, w = params.size_a if split != "test_ood" else params.size_b
        for r in d[split]:
            assert r["image"].endswith(".png" if split != "test_ood" else ".dcm")
            assert len(r["label"]) == 3 and len(r["shortcut"]) == 3 and r["sex"] in ("M", "F")
            assert r["site"] == S.SITE_OF_SPLIT[split] and r["dataset"] == "synthetic" and r["view"] == "PA"
            for a in r["attention"]:
                assert a["type"] == "mask" and a["frame"] == [w, h]
                assert r["label"][S.CLASSES.index(a["class"])] == 1
                with Image.open(a["path"]) as im:
                    assert im.size == (w, h)
    # site A images: 16-bit PNG of the documented size
    with Image.open(d["training"][0]["image"]) as im:
        assert im.mode == "I;16" and im.size == params.size_a[::-1]


def test_patients_several_images_consistent_and_disjoint(small):
    _, path, _, _ = small
    d = dl.load(path)
    by_patient, split_of = defaultdict(list), {}
    for split in S.SPLITS:
        for r in d[split]:
            by_patient[r["patient_id"]].append(r)
            assert split_of.setdefault(r["patient_id"], split) == split  # no patient in two splits
    assert any(len(v) > 1 for v in by_patient.values())
    for recs in by_patient.values():
        assert len({r["sex"] for r in recs}) == 1
        assert max(r["age"] for r in recs) - min(r["age"] for r in recs) <= 2


def test_masks_are_exactly_the_drawn_findings_inside_the_lungs(small):
    _, path, params, seed = small
    d = dl.load(path)
    planned = S.plan(seed, params)
    checked = 0
    for split in ("training", "test_ood"):
        for i, r in enumerate(d[split]):
            if not r["attention"]:
                continue
            item = planned[split][i]
            sick, healthy = S.render(item, seed, params), S.render(item, seed, params, with_findings=False)
            for a in r["attention"]:
                with Image.open(a["path"]) as im:
                    mask = np.asarray(im) > 0
                assert mask.any()
                assert np.array_equal(mask, sick["masks"][a["class"]])
                assert not (mask & ~sick["lung"]).any(), "finding mask leaves the lung fields"
                diff = np.abs(sick["image"] - healthy["image"])
                assert (diff[mask] > 0).mean() > 0.97, "mask pixels must show the finding"
            if split == "training":  # no blur in site A: nothing changes outside the union of the masks
                union = np.zeros_like(sick["lung"])
                for m in sick["masks"].values():
                    union |= m
                assert np.array_equal(sick["image"][~union], healthy["image"][~union])
                with Image.open(r["image"]) as im:  # the file holds exactly the rendered image
                    assert np.array_equal(np.asarray(im), to_png16(sick["image"]))
            checked += 1
    assert checked >= 10


def test_shortcut_correlation_as_requested_and_absent_out_of_domain():
    params = S.SyntheticParams.from_kwargs(n_train=3000, n_val=0, n_test=0, n_ood=2000)
    planned = S.plan(0, params)  # no pixels: the summary needs labels, tags and demographics only
    summary = S.synthetic_summary({"classes": list(S.CLASSES), **planned}, 0, params)
    for c in S.CLASSES:
        tr = summary["splits"]["training"]["shortcut"][c]
        assert tr["strong_group"]["p_tag_pos"] == pytest.approx(0.95, abs=0.01)
        assert tr["strong_group"]["p_tag_neg"] == pytest.approx(0.05, abs=0.01)
        assert tr["weak_group"]["p_tag_pos"] == pytest.approx(0.65, abs=0.01)
        assert tr["weak_group"]["p_tag_neg"] == pytest.approx(0.35, abs=0.01)
        assert tr["sex=F"]["phi"] > tr["sex=M"]["phi"] + 0.2  # the correlation differs by subgroup
        assert tr["age=[60,80)"]["phi"] > tr["age=[20,40)"]["phi"] + 0.2
        ood = summary["splits"]["test_ood"]["shortcut"][c]
        for g, st in ood.items():
            if st["n"] >= 200:
                assert abs(st["phi"]) < 0.1, (c, g, st)
        assert ood["all"]["p_tag_pos"] == pytest.approx(0.5, abs=0.01)
        assert ood["all"]["p_tag_neg"] == pytest.approx(0.5, abs=0.01)
        prev = summary["splits"]["training"]["prevalence"][c]
        assert 0.25 <= prev <= 0.35


def test_summary_file_matches_the_datalist(small):
    root, path, params, seed = small
    summary = json.load(open(os.path.join(root, S.SUMMARY_NAME)))
    raw = json.load(open(path))
    assert summary["params_hash"] == S.params_hash(seed, params)
    assert summary == json.loads(json.dumps(S.synthetic_summary(raw, seed, params)))
    tr = summary["splits"]["training"]
    assert tr["n_images"] == len(raw["training"])
    for c in S.CLASSES:
        pos = tr["positives"][c]
        assert tr["positives_with_mask"][c] == round(0.8 * pos)
        assert summary["splits"]["test"]["annotated_share"][c] in (1.0, None)


def test_dicom_site_b_is_monochrome1_with_window_tags(small):
    _, path, params, seed = small
    d = dl.load(path)
    rec = d["test_ood"][0]
    ds = pydicom.dcmread(rec["image"])
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == params.size_b and ds.Rows != ds.Columns
    assert ds.Modality == "DX" and ds.ViewPosition == "PA"
    assert ds.PatientSex == rec["sex"] and ds.PatientAge == f"{rec['age']:03d}Y"
    assert float(ds.RescaleSlope) != 1.0 and "WindowCenter" in ds and "WindowWidth" in ds
    stored = ds.pixel_array
    assert stored.max() <= 4095
    # modality LUT + VOI window + MONOCHROME1 inversion reproduce the rendered image ...
    voi = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    lo, hi = float(ds.RescaleIntercept), 4095 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    shown = 1.0 - (voi - lo) / (hi - lo)
    item = S.plan(seed, params)["test_ood"][0]
    ref = S.render(item, seed, params)["image"]
    assert np.abs(shown - ref).max() < 2e-3
    # ... while naive min-max scaling of the stored values does not (inverted and washed out)
    naive = (stored - stored.min()) / (stored.max() - stored.min())
    assert np.abs(naive - ref).mean() > 0.2
    assert np.abs((1 - naive) - ref).mean() > 0.05
    # lungs dark, mediastinum bright in display convention
    lung = S.render(item, seed, params)["lung"]
    assert shown[lung].mean() < shown[~lung & (shown > 0)].mean()


def test_ensure_synthetic_reuses_or_regenerates(small, tiny_synth, tmp_path):
    root, path, _, seed = small
    mtime = os.path.getmtime(path)
    assert S.ensure_synthetic(root, seed=seed, progress=False, **tiny_synth) == path
    assert os.path.getmtime(path) == mtime  # up to date: untouched
    target = str(tmp_path / "r")
    S.ensure_synthetic(target, seed=0, workers=1, progress=False, n_train=8, n_val=0, n_test=0, n_ood=2)
    first = json.load(open(os.path.join(target, S.SUMMARY_NAME)))["params_hash"]
    S.ensure_synthetic(
        target, seed=0, workers=1, progress=False, n_train=8, n_val=0, n_test=0, n_ood=2, shortcut_weak=[0.5, 0.5]
    )
    summary = json.load(open(os.path.join(target, S.SUMMARY_NAME)))
    assert summary["params_hash"] != first and summary["params"]["shortcut_weak"] == [0.5, 0.5]
    assert sorted(os.listdir(tmp_path)) == ["r", "r.lock"]  # no temp or old folders left
    with pytest.raises(ValueError, match="unknown synthetic parameter.*'n_trian'"):
        S.ensure_synthetic(target, n_trian=5)


def test_script_and_sample_grid(small, tiny_synth, tmp_path, capsys):
    import importlib.util

    root, path, _, seed = small
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "make_synthetic.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "grid.png"
    args = ["--out", root, "--seed", str(seed), "--quiet", "--sample-grid", str(png)]
    for k, v in tiny_synth.items():  # the counts have their own flags, the other knobs go through --param
        args += [f"--{k.replace('_', '-')}", str(v)] if k.startswith("n_") else ["--param", f"{k}={json.dumps(v)}"]
    assert mod.main(args) == 0
    assert path in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 300
