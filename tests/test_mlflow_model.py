"""The best model as an MLflow model: logged into the training run (SafeMLFlowHandler) of a SQLite store, registered,
loaded back with mlflow.pyfunc and compared with the eager network on a PNG and a DICOM; ``mlflow models predict``
in a fresh process (the ``bundle`` package comes from the model's code_paths); arrays in; never raising."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bundle.mlflow_model import ARTIFACT_PATH, build_model_input, log_best_model, output_columns
from bundle.utils.dicom import make_dataset, phantom, write

CLASSES = ["nodule_mass", "pleural_effusion", "edema"]
SIZE = 64
NAME = "cxr_aligner_test"


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny trained-shape network, its state_dict, a PNG and a DICOM, and the model logged + registered."""
    import mlflow  # noqa: F401

    from bundle.handlers import SafeMLFlowHandler
    from bundle.networks import build_aligner_vlm, network_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    d = tmp_path_factory.mktemp("mlflow_model")
    torch.manual_seed(0)
    net = build_aligner_vlm(preset="demo", classes=CLASSES, image_size=SIZE, vit_layers=2).eval()
    ckpt = str(d / "model.pt")
    torch.save(net.state_dict(), ckpt)

    png = str(d / "chest.png")
    Image.fromarray((phantom(70, 100, seed=1) * 255).round().astype(np.uint8)).save(png)
    dcm = str(d / "chest.dcm")
    write(make_dataset((phantom(90, 60, seed=2) * 4095).round().astype(np.uint16), bits_stored=12), dcm)

    uri = f"sqlite:///{d}/mlruns.db"
    saved_env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    handler = SafeMLFlowHandler(tracking_uri=uri, experiment_name="mlflow_model_test", run_name="train")
    assert handler.start_standalone()
    warned = _Warnings()
    logging.getLogger("bundle").addHandler(warned)
    try:
        model_uri = log_best_model(handler, ckpt, network_config(net), registered_name=NAME)
    finally:
        logging.getLogger("bundle").removeHandler(warned)
    assert model_uri is not None, f"log_best_model failed: {warned.messages}"
    yield {
        "dir": d,
        "net": net,
        "ckpt": ckpt,
        "png": png,
        "dcm": dcm,
        "uri": uri,
        "run_id": handler.run_id,
        "model_uri": model_uri,
    }
    handler.close()
    if saved_env is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env


@pytest.fixture
def tracking(logged):
    """MLflow's global tracking URI set to the test store, and put back afterwards (set_tracking_uri also sets the
    MLFLOW_TRACKING_URI environment variable, which the other tests' handlers would read)."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils

    prev_uri, prev_env = getattr(tracking_utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(logged["uri"])
    yield logged["uri"]
    mlflow.set_tracking_uri(prev_uri)
    if prev_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = prev_env


def _eager(net, paths):
    """Probabilities and raw attention maps of the eager network, through the bundle's own preprocessing."""
    from monai.transforms import Compose

    from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd

    tf = Compose([LoadCXRd(keys="image", target_size=SIZE), Letterboxd(keys="image", size=SIZE), CXRIntensityd()])
    x = torch.stack([torch.as_tensor(tf({"image": p})["image"]).float() for p in paths])
    with torch.no_grad():
        out = net.forward_features(x)
    return torch.sigmoid(out["logits"]).numpy(), out["attn"].numpy(), x.numpy()


def _probs(df) -> np.ndarray:
    return df[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)


def test_logged_registered_and_loaded(logged, tracking):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=logged["uri"], registry_uri=logged["uri"])
    assert logged["model_uri"] == f"models:/{NAME}/1"
    version = client.get_model_version(NAME, "1")
    assert version.run_id == logged["run_id"]
    names = {f.path for f in client.list_artifacts(logged["run_id"], ARTIFACT_PATH)}
    assert {f"{ARTIFACT_PATH}/MLmodel", f"{ARTIFACT_PATH}/code", f"{ARTIFACT_PATH}/artifacts"} <= names

    for uri in (logged["model_uri"], f"runs:/{logged['run_id']}/{ARTIFACT_PATH}"):
        model = mlflow.pyfunc.load_model(uri)
        sig = model.metadata.signature
        assert sig.inputs.input_names() == ["image"]
        assert sig.outputs.input_names() == output_columns(CLASSES)
        assert model.metadata.saved_input_example_info is not None
        assert model.metadata.metadata["classes"] == CLASSES

        df = model.predict(build_model_input([logged["png"], logged["dcm"]]))
        assert list(df.columns) == output_columns(CLASSES) and len(df) == 2
        probs, attn, _ = _eager(logged["net"], [logged["png"], logged["dcm"]])
        np.testing.assert_allclose(_probs(df), probs, atol=1e-5)
        maps = np.asarray(df["attn"].tolist())
        assert maps.shape == attn.shape == (2, len(CLASSES), SIZE // 16, SIZE // 16)
        np.testing.assert_allclose(maps, attn, atol=1e-5)
        w = attn.shape[-1]
        peak = attn.reshape(2, len(CLASSES), -1).argmax(-1)
        for j, c in enumerate(CLASSES):
            np.testing.assert_array_equal(df[f"attn_peak_row_{c}"], peak[:, j] // w)
            np.testing.assert_array_equal(df[f"attn_peak_col_{c}"], peak[:, j] % w)

    # the stored input example (a relative path to the logged example image) runs as it is
    example = model.predict(build_model_input(["example_cxr.png"]))
    assert len(example) == 1 and np.all((_probs(example) > 0) & (_probs(example) < 1))


def test_array_input(logged, tracking):
    import mlflow

    py = mlflow.pyfunc.load_model(logged["model_uri"]).unwrap_python_model()
    probs, attn, x = _eager(logged["net"], [logged["png"], logged["dcm"]])
    for arr in (x, x[:, 0]):
        df = py.predict(None, arr)
        np.testing.assert_allclose(_probs(df), probs, atol=1e-5)
        np.testing.assert_allclose(np.asarray(df["attn"].tolist()), attn, atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        py.predict(None, np.zeros((1, 1, 32, 32), np.float32))


def test_array_signature(logged, tmp_path):
    """input_kind="array": a tensor signature (-1, 1, S, S) and an array input example; the pyfunc takes arrays."""
    import mlflow

    from bundle.mlflow_model import save_pyfunc_model

    path = save_pyfunc_model(str(tmp_path / "model"), logged["ckpt"], logged["net"], input_kind="array")
    model = mlflow.pyfunc.load_model(path)
    spec = model.metadata.signature.inputs.inputs[0]
    assert tuple(spec.shape) == (-1, 1, SIZE, SIZE) and spec.type == np.dtype("float32")
    probs, _, x = _eager(logged["net"], [logged["png"], logged["dcm"]])
    np.testing.assert_allclose(_probs(model.predict(x.astype(np.float32))), probs, atol=1e-5)


def test_run_id_and_sidecar(logged, tmp_path):
    """A run id + tracking URI (no handler), the architecture read from the checkpoint's sidecar (models/model.json)."""
    import shutil

    import mlflow

    from bundle.networks import write_network_config

    ckpt = str(tmp_path / "model.pt")
    shutil.copy(logged["ckpt"], ckpt)
    write_network_config(ckpt, logged["net"])
    warned = _Warnings()
    logging.getLogger("bundle").addHandler(warned)
    try:
        uri = log_best_model(logged["run_id"], ckpt, tracking_uri=logged["uri"])
    finally:
        logging.getLogger("bundle").removeHandler(warned)
    assert uri is not None, f"log_best_model failed: {warned.messages}"
    assert uri == f"runs:/{logged['run_id']}/{ARTIFACT_PATH}"
    client = mlflow.MlflowClient(tracking_uri=logged["uri"])
    local = client.download_artifacts(logged["run_id"], f"{ARTIFACT_PATH}/artifacts/network.json", str(tmp_path))
    with open(local) as f:
        assert json.load(f)["classes"] == CLASSES


def test_never_raises(logged, tmp_path, caplog):
    from types import SimpleNamespace

    caplog.set_level(logging.WARNING, logger="bundle")
    disabled = SimpleNamespace(disabled=True, cur_run=None)
    assert log_best_model(disabled, logged["ckpt"], registered_name=NAME) is None
    assert log_best_model(None, logged["ckpt"]) is None
    # an unreachable server is probed, not retried for minutes
    assert log_best_model("0" * 32, logged["ckpt"], tracking_uri="http://127.0.0.1:9") is None
    # a run id of the store, but no best model (no validation improved) / no sidecar and no kwargs
    assert log_best_model(logged["run_id"], str(tmp_path / "missing.pt"), tracking_uri=logged["uri"]) is None
    assert log_best_model(logged["run_id"], logged["ckpt"], tracking_uri=logged["uri"]) is None
    assert sum("MLflow model not logged" in r.getMessage() for r in caplog.records) == 5


@pytest.mark.slow
def test_mlflow_models_predict_cli(logged, tmp_path):
    """The real CLI in a fresh process, outside the repository (no PYTHONPATH): --env-manager local installs
    nothing; the bundle package comes from the model's code_paths."""
    inp = tmp_path / "input.json"
    inp.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[logged["png"]], [logged["dcm"]]]}}))
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=logged["uri"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "mlflow", "models", "predict", "-m", f"models:/{NAME}/1"]
    cmd += ["-i", str(inp), "-t", "json", "-o", str(out), "--env-manager", "local"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = json.loads(out.read_text())["predictions"]
    assert len(preds) == 2
    probs, attn, _ = _eager(logged["net"], [logged["png"], logged["dcm"]])
    got = np.array([[row[f"prob_{c}"] for c in CLASSES] for row in preds])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert np.asarray(preds[0]["attn"]).shape == attn.shape[1:]
