"""privacy (docs/privacy.md): with pseudonymise_ids and relative_paths on, no raw patient id and no absolute path is
in any file the evaluation and the inference write (nor in the MLflow run's params and artifacts), and the keyed
pseudonyms are one per patient / image across every file and both jobs; with both off the outputs are unchanged."""

import csv
import gzip
import hashlib
import json
import os

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.data.datalist import load
from bundle.evaluation import evaluate
from bundle.handlers import SafeMLFlowHandler
from bundle.inference import scan_inputs
from bundle.networks import AlignerVLM
from bundle.privacy import KEY_ENV, Privacy, load_key
from bundle.utils.dicom import make_dataset, phantom, write
from tests.conftest import CONFIGS, ROOT
from tests.test_evaluation import _preprocessing, _truncated_dicom
from tests.test_networks import TINY

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]
KEY = "k3y-0f-the-data-0wner-0123456789"
ON = {"pseudonymise_ids": True, "relative_paths": True}
INFERENCE_NET = {"image_size": 64, "network_def#vit_layers": 2}


# ------------------------------------------------------------------------------------------------- unit
def test_keyed_pseudonyms():
    a = Privacy(pseudonymise_ids=True, key=KEY, root="/data/cxr")
    b = Privacy(pseudonymise_ids=True, key=KEY + "x", root="/data/cxr")
    pid = a.patient_id("MRN4821")
    assert pid.startswith("pid_") and len(pid) == 20 and pid == a.patient_id("MRN4821") != a.patient_id("MRN4822")
    assert pid != b.patient_id("MRN4821")  # another key, another pseudonym
    assert pid[4:] not in hashlib.sha256(b"MRN4821").hexdigest()  # not a plain (recomputable) hash
    assert a.patient_id(7) == a.patient_id("7") and a.patient_id(None) is None and a.patient_id("") == ""
    # one image, one pseudonym, wherever the data is mounted (the path relative to the root is what is hashed)
    moved = Privacy(pseudonymise_ids=True, key=KEY, root="/mnt/other")
    assert a.path("/data/cxr/img/x.dcm") == moved.path("/mnt/other/img/x.dcm") != a.path("/data/cxr/img/y.dcm")
    assert a.path("/data/cxr/img/x.dcm") != a.patient_id("img/x.dcm")  # separate domains
    assert a.stem("/data/cxr/img/MRN4821_0.dcm") == a.path("/data/cxr/img/MRN4821_0.dcm")
    text = a.text("/data/cxr/img/x.dcm: truncated; see /data/cxr/masks/m.png", ["/data/cxr/img/x.dcm"])
    assert "/data" not in text and a.path("/data/cxr/img/x.dcm") in text and a.path("/data/cxr/masks/m.png") in text
    assert KEY not in repr(a)


def test_relative_paths_and_off():
    rel = Privacy(relative_paths=True, root="/data/cxr")
    assert rel.path("/data/cxr/img/x.dcm") == "img/x.dcm" and rel.patient_id("MRN1") == "MRN1"
    assert rel.path("/elsewhere/y.png") == "../../elsewhere/y.png"
    assert rel.text("/data/cxr/img/x.dcm: bad", ["/data/cxr/img/x.dcm"]) == "img/x.dcm: bad"
    assert Privacy(relative_paths=True).path("/data/cxr/img/x.dcm") == "x.dcm"  # no root: the file name only
    off = Privacy.from_config({"pseudonymise_ids": "false", "relative_paths": False, "key_file": None})
    assert not off.active
    for v in ("/data/cxr/img/x.dcm", "MRN1", None, 7):
        assert off.path(v) == v and off.patient_id(v) == v and off.text(v, [v]) == v


def test_key_sources_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"no key.*{KEY_ENV}.*secrets.token_hex"):
        Privacy.from_config({"pseudonymise_ids": True})
    with pytest.raises(ValueError, match="unknown key.*pseudonymize_ids"):
        Privacy.from_config({"pseudonymize_ids": True})
    with pytest.raises(ValueError, match="key_file.*cannot be read"):
        load_key(tmp_path / "absent.key")
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="3 bytes, fewer than 16"):
        load_key(short)
    good = tmp_path / "good.key"
    good.write_text(KEY + "\n")
    assert load_key(good) == KEY.encode()
    monkeypatch.setenv(KEY_ENV, KEY)
    from_env = Privacy.from_config({"pseudonymise_ids": True})
    from_file = Privacy.from_config({"pseudonymise_ids": True, "key_file": str(good)})
    assert from_env.patient_id("MRN1") == from_file.patient_id("MRN1")


# ------------------------------------------------------------------------------------------------- the jobs
def _dataset(root) -> str:
    """Factory DICOMs named after their patient's MRN (as PACS exports are), two images per patient, and a
    truncated one in the test split (skipped: its path is in skipped.csv and inside its reason)."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img", exist_ok=True)
    splits = {"validation": [], "test": []}
    k = 0
    for split, n in (("validation", 8), ("test", 10)):
        for _ in range(n):
            mrn = f"MRN{4800 + k // 2}"
            p16 = (phantom(40, 36, seed=k) * 4095).astype(np.uint16)
            path = write(make_dataset(p16, bits_stored=12, patient_id=mrn), root / "img" / f"{mrn}_{k % 2}.dcm")
            rec = {"image": os.path.relpath(path, root), "label": rng.integers(0, 2, 3).tolist(), "patient_id": mrn}
            splits[split].append({**rec, "sex": "MF"[k % 2], "age": 30 + k})
            k += 1
    bad = _truncated_dicom(root / "img" / "MRN4999_0.dcm")
    splits["test"].append({"image": os.path.relpath(bad, root), "label": [0, 1, 0], "patient_id": "MRN4999"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "privacy", "classes": CLASSES, **splits}))
    return str(path)


def _evaluate(datalist, out, privacy=None, path_root=None, mlflow_logger=None, ckpt=None):
    torch.manual_seed(0)
    return evaluate(
        network=AlignerVLM(classes=CLASSES, **TINY),
        datalist=datalist,
        preprocessing=_preprocessing(CLASSES),
        output_dir=str(out),
        splits=("test",),
        n_boot=0,
        device=torch.device("cpu"),
        batch_size=8,
        min_count=1,
        n_overlays=0,
        ckpt_path=ckpt,
        mlflow_logger=mlflow_logger,
        privacy=privacy,
        path_root=path_root,
    )


def _inference(datalist_file, model, out, privacy=None):
    from monai.bundle import ConfigWorkflow

    extra = {"privacy": privacy} if privacy is not None else {}
    wf = ConfigWorkflow(
        config_file=os.path.join(CONFIGS, "inference.yaml"),
        workflow_type="inference",
        bundle_root=ROOT,
        input_path=datalist_file,
        input_split="test",
        ckpt_path=model,
        output_dir=str(out),
        batch_size=4,
        **INFERENCE_NET,
        **extra,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def _tiny_inference_model(folder) -> str:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.yaml"))
    parser.update({"bundle_root": ROOT, "ckpt_path": str(folder / "absent.pt"), **INFERENCE_NET})
    torch.manual_seed(0)
    path = str(folder / "inference_model.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _leaks(folder, needles) -> list[str]:
    """Every (file, needle) where a needle occurs in a file under ``folder``: the raw bytes of every file, gzip
    members unpacked, and the text chunks of PNGs."""
    found = []
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                data = f.read()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            if name.endswith(".png"):
                with Image.open(path) as im:
                    data += json.dumps(getattr(im, "text", {})).encode()
            found += [f"{os.path.relpath(path, folder)}: {n}" for n in needles if n.encode() in data]
            found += [f"{os.path.relpath(path, folder)}: {name}" for n in needles if n in name]
    return found


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    data = root / "data"
    datalist_file = _dataset(data)
    datalist = load(datalist_file)
    key_file = root / "pseudonym.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    cfg = {**ON, "key_file": str(key_file)}
    torch.manual_seed(0)
    ckpt = str(root / "model.pt")
    torch.save(AlignerVLM(classes=CLASSES, **TINY).state_dict(), ckpt)
    cwd = os.getcwd()
    os.chdir(root)  # MLflow puts a sqlite store's artifacts under the working folder
    try:
        uri = f"sqlite:///{root}/mlruns.db"
        handler = SafeMLFlowHandler(tracking_uri=uri, experiment_name="privacy", run_name="evaluate")
        summary_on = _evaluate(datalist, root / "out" / "eval_on", cfg, str(data), handler, ckpt)
        client = mlflow.MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("privacy").experiment_id])  # closed by evaluate
        artifacts = run.info.artifact_uri.replace("file://", "")
    finally:
        os.chdir(cwd)
    _evaluate(datalist, root / "out" / "eval_default", ckpt=ckpt)
    _evaluate(datalist, root / "out" / "eval_off", {"pseudonymise_ids": False, "relative_paths": False}, ckpt=ckpt)
    model = _tiny_inference_model(root)
    _inference(datalist_file, model, root / "out" / "infer_on", cfg)
    return {
        "root": root,
        "data": str(data),
        "datalist": datalist,
        "summary_on": summary_on,
        "params": run.data.params,
        "artifacts": artifacts,
        "privacy": Privacy.from_config(cfg, root=str(data)),
    }


def test_no_raw_id_or_absolute_path_in_any_written_file(jobs):
    root, datalist = jobs["root"], jobs["datalist"]
    ids = sorted({r["patient_id"] for s in ("validation", "test") for r in datalist[s]})
    needles = [*ids, "MRN", str(root), os.path.realpath(root), jobs["data"]]
    for job in ("eval_on", "infer_on"):
        folder = root / "out" / job
        assert sum(len(files) for _, _, files in os.walk(folder)) >= 4, job
        assert _leaks(folder, needles) == [], job
    assert _leaks(jobs["artifacts"], needles) == []  # what MLflow holds: copies of the report files
    assert os.path.isfile(os.path.join(jobs["artifacts"], "evaluation", "test", "predictions.csv"))
    assert not any(n in str(v) for v in jobs["params"].values() for n in needles), jobs["params"]
    assert jobs["params"]["evaluated_checkpoint"] == "model.pt"
    assert jobs["summary_on"]["test"]["report_dir"] == "test"


def test_pseudonyms_are_consistent_across_files_and_jobs(jobs):
    root, priv, datalist = jobs["root"], jobs["privacy"], jobs["datalist"]
    test = datalist["test"]
    ev = _csv(root / "out" / "eval_on" / "test" / "predictions.csv")
    assert [r["patient_id"] for r in ev] == [priv.patient_id(test[int(r["index"])]["patient_id"]) for r in ev]
    assert [r["image"] for r in ev] == [priv.path(test[int(r["index"])]["image"]) for r in ev]
    assert len({r["patient_id"] for r in ev}) == len(ev) // 2  # two images per patient: one pseudonym each
    bad = priv.path(test[-1]["image"])
    (skipped,) = _csv(root / "out" / "eval_on" / "test" / "skipped.csv")
    assert skipped["file"] == bad and bad in skipped["reason"]  # the reason names the same pseudonym
    # inference on the same datalist, same key and root: the same image pseudonyms, joinable with the evaluation
    inf = _csv(root / "out" / "infer_on" / "predictions.csv")
    assert {r["index"]: r["image"] for r in inf} == {r["index"]: r["image"] for r in ev}
    js = json.loads((root / "out" / "infer_on" / "predictions.json").read_text())
    assert [i["image"] for i in js["images"]] == [r["image"] for r in inf]
    for item in js["images"]:
        assert item["image"] in item["overlay"] and item["image"] in item["attention_map"]
        with Image.open(root / "out" / "infer_on" / item["overlay"]) as im:
            assert im.text["Source"] == item["image"]
    (inf_skipped,) = _csv(root / "out" / "infer_on" / "skipped.csv")
    assert inf_skipped["file"] == bad and js["skipped"][0]["file"] == bad


def test_outputs_unchanged_when_off(jobs):
    out = jobs["root"] / "out"
    for rel in ("summary.json", "model_selection.json", "test/predictions.csv", "test/skipped.csv"):
        default, off = (out / "eval_default" / rel).read_bytes(), (out / "eval_off" / rel).read_bytes()
        assert default.replace(b"eval_default", b"eval_off") == off, rel
    rows = _csv(out / "eval_off" / "test" / "predictions.csv")
    test = jobs["datalist"]["test"]
    assert [(r["patient_id"], r["image"]) for r in rows] == [
        (test[int(r["index"])]["patient_id"], test[int(r["index"])]["image"]) for r in rows
    ]  # raw ids and absolute paths, as before
    assert os.path.isabs(rows[0]["image"])
    assert _leaks(out / "eval_off", ["MRN4800", str(jobs["root"])])  # the leak check finds what is there


def test_scan_writes_relative_paths(jobs, tmp_path):
    """The inference scan's early skipped.csv goes through privacy too (relative paths only: ids kept)."""
    rel = Privacy(relative_paths=True, root=jobs["data"])
    recs = [{"image": os.path.join(jobs["data"], "img", "absent.dcm"), "index": 0}]
    recs.append({"image": jobs["datalist"]["test"][0]["image"], "index": 1})
    scan_inputs(recs, str(tmp_path), privacy=rel)
    (row,) = _csv(tmp_path / "skipped.csv")
    assert row["file"] == "img/absent.dcm" and jobs["data"] not in row["reason"]
