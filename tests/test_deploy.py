"""The MONAI Deploy App SDK application (bundle/deploy): a generated study folder end to end, run as a user would.

A tiny network (configs/inference.yaml with image_size=64 and two ViT layers) is saved as a state_dict, and the app
runs in a subprocess on a study holding a frontal chest DX series (two images and a truncated file), a CT series, a
lateral view, a hand radiograph and a non-DICOM file.
"""

import os
import resource
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from tests.conftest import ROOT

pytest.importorskip("monai.deploy", reason="needs requirements-deploy.txt (monai-deploy-app-sdk)")
pytest.importorskip("highdicom")

OVERRIDES = ["image_size=64", "network_def#vit_layers=2"]
CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


def _bigger_stack():
    """Holoscan warns below a 32 MiB stack (``ulimit -s 32768``); raise the soft limit in the child if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 32 * 1024 * 1024
    if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def run_app(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "bundle.deploy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_bigger_stack,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.yaml"))
    folder = tmp_path_factory.mktemp("model")
    parser["bundle_root"] = ROOT
    parser["ckpt_path"] = str(folder / "absent.pt")  # build from the config's sizes, whatever the repo's models/ holds
    parser["image_size"] = 64
    parser["network_def#vit_layers"] = 2
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    path = str(folder / "model.pt")
    torch.save(net.state_dict(), path)
    return path


def _study(root) -> dict:
    """Write the study; return {name: dataset} of the images written."""
    from pydicom.uid import generate_uid

    from bundle.utils.dicom import make_dataset, phantom, write

    study = generate_uid()
    cxr_series, ct_series, lat_series, hand_series = (generate_uid() for _ in range(4))

    def common(series, number, **extra):
        return {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series,
            "InstanceNumber": number,
            "StudyDate": "20260101",
            "PatientName": "Test^Deploy",
            "AccessionNumber": "A1",
            **extra,
        }

    def pixels(h, w, seed):
        return (phantom(h, w, seed=seed) * 4000).astype(np.uint16)

    chest = {"BodyPartExamined": "CHEST"}
    made = {
        "pa": make_dataset(
            pixels(96, 80, 1), bits_stored=12, window=(2000, 4000), extra=common(cxr_series, 1, **chest)
        ),
        "mono1": make_dataset(
            4095 - pixels(80, 72, 2),
            photometric="MONOCHROME1",
            bits_stored=12,
            view="AP",
            extra=common(cxr_series, 2, **chest),
        ),
        "truncated": make_dataset(pixels(96, 80, 3), bits_stored=12, extra=common(cxr_series, 3, **chest)),
        "ct": make_dataset(pixels(64, 64, 4), modality="CT", view=None, extra=common(ct_series, 1, **chest)),
        "lateral": make_dataset(pixels(96, 80, 5), view="LL", extra=common(lat_series, 1, **chest)),
        "hand": make_dataset(pixels(64, 48, 6), extra=common(hand_series, 1, BodyPartExamined="HAND")),
    }
    os.makedirs(os.path.join(root, "sub"))
    for name, ds in made.items():
        write(ds, os.path.join(root, "sub" if name == "ct" else "", f"{name}.dcm"))
    with open(os.path.join(root, "truncated.dcm"), "r+b") as f:  # cut the pixel data short
        f.truncate(os.path.getsize(f.name) - 3000)
    with open(os.path.join(root, "notes.dcm"), "wb") as f:
        f.write(b"this is not a DICOM file\n" * 20)
    return made


@pytest.mark.slow
def test_deploy_app_end_to_end(tmp_path, tiny_model):
    study_dir, out = tmp_path / "study", tmp_path / "out"
    study_dir.mkdir()
    made = _study(str(study_dir))
    overrides = [a for o in OVERRIDES for a in ("--override", o)]
    p = run_app(["-i", str(study_dir), "-o", str(out), "-m", tiny_model, *overrides], cwd=str(tmp_path))
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]

    # reasons for what was left out, each naming its file
    for name, words in {
        "ct": "Modality is 'CT'",
        "lateral": "ViewPosition is 'LL'",
        "hand": "BodyPartExamined is 'HAND'",
        "truncated": "Skipped",
        "notes": "not a readable DICOM file",
    }.items():
        lines = [line for line in log.splitlines() if f"{name}.dcm" in line and "Skipped" in line]
        assert lines and any(words in line for line in lines), f"no reason for {name}.dcm:\n{log[-6000:]}"

    accepted = {str(made[k].SOPInstanceUID): made[k] for k in ("pa", "mono1")}
    srs = [pydicom.dcmread(os.path.join(out, "sr", f)) for f in sorted(os.listdir(out / "sr"))]
    assert len(srs) == len(accepted)
    seen = set()
    for sr in srs:
        assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        src = accepted[ref]
        seen.add(ref)
        assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
        items = list(_walk(sr.ContentSequence))
        probs = {
            i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM"
        }
        assert sorted(probs) == sorted(CLASSES) and all(0 <= v <= 1 for v in probs.values())
        images = [i for i in items if i.ValueType == "IMAGE"]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images][:1] == [ref]
        texts = {i.ConceptNameCodeSequence[0].CodeMeaning: getattr(i, "TextValue", None) for i in items}
        uids = {i.ConceptNameCodeSequence[0].CodeMeaning: getattr(i, "UID", None) for i in items}
        assert texts["Algorithm Name"] == "CXR Aligner Fairness" and texts["Algorithm Version"] == "0.1.0"
        assert texts["Device Observer Name"] == "CXR Aligner Fairness" and uids["Device Observer UID"]
        algorithms = [
            e for e in sr.ContributingEquipmentSequence if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        equipment = algorithms[0]  # IHE AI Results: the algorithm (highdicom lists itself too)
        assert equipment.DeviceUID == uids["Device Observer UID"]
        assert equipment.ManufacturerModelName == "CXR Aligner Fairness" and equipment.SoftwareVersions == "0.1.0"
    assert seen == set(accepted)

    scs = [pydicom.dcmread(os.path.join(out, "sc", f)) for f in sorted(os.listdir(out / "sc"))]
    assert len(scs) == len(accepted)
    for sc in scs:
        src = accepted[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns) and sc.SamplesPerPixel == 3
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in src.PixelSpacing]
        assert sc.StudyInstanceUID == src.StudyInstanceUID
        assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        assert sc.pixel_array.shape == (src.Rows, src.Columns, 3)


@pytest.mark.slow
def test_deploy_app_without_matching_series(tmp_path, tiny_model):
    """Only a CT series and a lateral view: exit 0, reasons logged, no output."""
    from pydicom.uid import generate_uid

    from bundle.utils.dicom import make_dataset, phantom, write

    study_dir, out, study = tmp_path / "study", tmp_path / "out", generate_uid()
    study_dir.mkdir()
    pixels = (phantom(64, 64) * 4000).astype(np.uint16)
    for name, modality, view in (("ct", "CT", None), ("lateral", "DX", "LAT")):
        extra = {"StudyInstanceUID": study, "SeriesInstanceUID": generate_uid(), "BodyPartExamined": "CHEST"}
        write(make_dataset(pixels, modality=modality, view=view, extra=extra), str(study_dir / f"{name}.dcm"))
    overrides = [a for o in OVERRIDES for a in ("--override", o)]
    p = run_app(["-i", str(study_dir), "-o", str(out), "-m", tiny_model, *overrides], cwd=str(tmp_path))
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "No frontal chest CR/DX series" in log and "lateral.dcm): ViewPosition is 'LAT'" in log
    assert not any(f.endswith(".dcm") for _, _, files in os.walk(out) for f in files)


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_missing_model_says_what_to_get(tmp_path):
    p = run_app(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "nope.pt")], cwd=str(tmp_path))
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "nope.pt" in last and "configs/train.yaml" in last and "models/model.pt" in last


def test_rules_explain_rejections():
    from pydicom.dataset import Dataset

    from bundle.deploy.rules import rejection_reasons, selector_rules

    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    assert rejection_reasons(ds) == []
    ds.Modality, ds.ViewPosition = "CT", "LL"
    assert [r.split(" is ")[0] for r in rejection_reasons(ds)] == ["Modality", "ViewPosition"]
    assert '"(?i)^(CR|DX)$"' in selector_rules()
