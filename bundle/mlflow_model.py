"""The best model as an MLflow model (pyfunc) and, optionally, a Model Registry entry (docs/mlflow_model.md).

:class:`CXRAlignerPyfunc` rebuilds AlignerVLM from two artifacts, the state_dict (``models/model.pt``) and a JSON
with the network's constructor kwargs, and scores image files (PNG/JPEG/DICOM, the bundle's own preprocessing:
LoadCXRd -> Letterboxd -> CXRIntensityd at the model's image_size) or preprocessed arrays. Output: one row per image
with ``prob_<class>``, the per-class attention maps ``attn`` (C, h, w) and each map's peak cell.

:func:`log_best_model` logs it into the training run under the artifact path ``model`` (after training; it never
raises into training) and registers it under a name when one is given. The ``bundle`` package travels with the model
(``code_paths``), so it loads in a fresh process without this repository on ``sys.path``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np

logger = logging.getLogger("bundle")

__all__ = [
    "ARTIFACT_PATH",
    "CXRAlignerPyfunc",
    "IMAGE_COLUMN",
    "build_model_input",
    "log_best_model",
    "output_columns",
    "save_pyfunc_model",
]

ARTIFACT_PATH = "model"  # the model's artifact path in the training run: runs:/<run_id>/model
IMAGE_COLUMN = "image"  # the input DataFrame's column of image file paths
EXAMPLE_IMAGE = "example_cxr.png"  # the input example's image, logged with the model (resolved against it)
NETWORK_JSON = "network.json"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_FILES = (".py", ".yaml", ".json")  # what the package needs at run time (no caches, no temporary files)


def output_columns(classes: Sequence[str]) -> list[str]:
    """The output DataFrame's columns, in order: probabilities, attention peaks (row, col per class), ``attn``."""
    cols = [f"prob_{c}" for c in classes]
    cols += [f"attn_peak_{axis}_{c}" for c in classes for axis in ("row", "col")]
    return cols + ["attn"]


def _network_kwargs(network_kwargs: Any, ckpt_path: str) -> dict:
    """AlignerVLM kwargs: a mapping as given, a built network's ``network_config``, or the checkpoint's sidecar."""
    from bundle.networks import network_config, read_network_config

    if network_kwargs is None:
        record = read_network_config(ckpt_path, check=True)
        if record is None:
            raise FileNotFoundError(f"no network kwargs given and {ckpt_path} has no architecture sidecar (.json)")
        kwargs = dict(record["kwargs"])
    elif isinstance(network_kwargs, Mapping):
        kwargs = {k: v for k, v in network_kwargs.items() if k != "_target_"}
    else:  # a built network (DDP-wrapped or not)
        kwargs = network_config(network_kwargs)
    kwargs.pop("return_probs", None)
    kwargs["classes"] = list(kwargs.get("classes") or [])
    if not kwargs["classes"]:
        from bundle.networks import DEFAULT_CLASSES

        kwargs["classes"] = list(DEFAULT_CLASSES)
    return json.loads(json.dumps(kwargs, default=str))  # plain JSON types only


class CXRAlignerPyfunc(mlflow.pyfunc.PythonModel):
    """AlignerVLM as an MLflow pyfunc: image paths (DataFrame column ``image``) or arrays in, probabilities and
    attention maps out (a DataFrame, one row per image; :func:`output_columns`).

    Arrays: float (N, 1, S, S) or (N, S, S) at the model's image_size S, already preprocessed (what the bundle's
    transforms produce: letterboxed, intensity-scaled). Relative paths that do not exist in the working directory
    are looked up beside the logged example image (so the stored input example runs anywhere).
    """

    batch_size = 8

    def load_context(self, context) -> None:
        import torch

        from bundle.networks import AlignerVLM

        with open(context.artifacts["network_config"]) as f:
            self.kwargs = json.load(f)
        self.classes = list(self.kwargs["classes"])
        self.image_size = int(self.kwargs["image_size"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = AlignerVLM(**self.kwargs)
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # a CheckpointSaver dict
            state = state["model"]
        net.load_state_dict(state, strict=True)
        self.net = net.eval().to(self.device)
        example = context.artifacts.get("example_image")
        self.example_dir = os.path.dirname(example) if example else None
        self._preprocess = None

    # ------------------------------------------------------------------------------------------------- inputs
    def _transforms(self):
        if self._preprocess is None:
            from monai.transforms import Compose

            from bundle.transforms import CXRIntensityd, Letterboxd, LoadCXRd

            s = self.image_size
            self._preprocess = Compose(
                [LoadCXRd(keys="image", target_size=s), Letterboxd(keys="image", size=s), CXRIntensityd(keys="image")]
            )
        return self._preprocess

    def _resolve(self, path: str) -> str:
        path = os.path.expanduser(str(path))
        if not os.path.exists(path) and not os.path.isabs(path) and self.example_dir:
            candidate = os.path.join(self.example_dir, path)
            if os.path.exists(candidate):
                return candidate
        return path

    def load_images(self, paths: Sequence[str]) -> np.ndarray:
        """Image files -> (N, 1, S, S) float32 through the bundle's preprocessing."""
        tf = self._transforms()
        out = []
        for p in paths:
            img = tf({"image": self._resolve(p)})["image"]
            out.append(np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img, dtype=np.float32))
        return np.stack(out) if out else np.zeros((0, 1, self.image_size, self.image_size), np.float32)

    def _as_array(self, model_input) -> np.ndarray:
        import pandas as pd

        if isinstance(model_input, Mapping) and not isinstance(model_input, pd.DataFrame):
            model_input = model_input.get(IMAGE_COLUMN, next(iter(model_input.values())))
            if isinstance(model_input, str):
                model_input = [model_input]
        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame(IMAGE_COLUMN)
        if isinstance(model_input, pd.DataFrame):
            col = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
            values = list(model_input[col])
            if values and all(isinstance(v, (str, os.PathLike)) for v in values):
                return self.load_images(values)
            model_input = np.stack([np.asarray(v, dtype=np.float32) for v in values])
        if isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], (str, os.PathLike)):
            return self.load_images(model_input)
        arr = np.asarray(model_input, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[:, None]
        s = self.image_size
        if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[-2:] != (s, s):
            raise ValueError(
                f"CXRAlignerPyfunc: arrays must be (N, 1, {s}, {s}) or (N, {s}, {s}) preprocessed images at the "
                f"model's image_size, got shape {arr.shape}; give image file paths to use the bundle's preprocessing"
            )
        return arr

    # ------------------------------------------------------------------------------------------------ predict
    def predict(self, context, model_input, params=None):
        """``model_input``: DataFrame with a column ``image`` of file paths, a list of paths, or an array (see class
        docstring). Returns a DataFrame: ``prob_<class>``, ``attn_peak_row_<class>``/``attn_peak_col_<class>``
        (cell of the map's maximum, in the h x w attention grid) and ``attn`` (nested lists C x h x w)."""
        import pandas as pd
        import torch

        arr = self._as_array(model_input)
        probs, maps = [], []
        with torch.no_grad():
            for i in range(0, len(arr), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(arr[i : i + self.batch_size])).to(self.device)
                out = self.net.forward_features(x)
                probs.append(torch.sigmoid(out["logits"]).float().cpu().numpy())
                maps.append(out["attn"].float().cpu().numpy())
        n_cls = len(self.classes)
        probs = np.concatenate(probs) if probs else np.zeros((0, n_cls), np.float32)
        maps = np.concatenate(maps) if maps else np.zeros((0, n_cls, 1, 1), np.float32)
        cols: dict[str, Any] = {f"prob_{c}": probs[:, j].astype(np.float64) for j, c in enumerate(self.classes)}
        h, w = maps.shape[-2:]
        flat = maps.reshape(len(maps), n_cls, -1).argmax(-1)
        for j, c in enumerate(self.classes):
            cols[f"attn_peak_row_{c}"] = (flat[:, j] // w).astype(np.int64)
            cols[f"attn_peak_col_{c}"] = (flat[:, j] % w).astype(np.int64)
        cols["attn"] = [m.astype(np.float64).tolist() for m in maps]
        return pd.DataFrame(cols, columns=output_columns(self.classes))


# ---------------------------------------------------------------------------------------------------- logging
def _example_png(path: str, size: int) -> str:
    """A small chest-like PNG (the bundle's DICOM phantom, display convention) for the input example."""
    from PIL import Image

    from bundle.utils.dicom import phantom

    h, w = max(16, size), max(16, (size * 5) // 6)
    att = phantom(h, w, seed=0)
    Image.fromarray((att * 255).round().astype(np.uint8)).save(path)
    return path


def _copy_package(dst: str) -> str:
    """A copy of the ``bundle`` package for ``code_paths``: its source and config files only (no caches, no editor
    or temporary files); a file that disappears while it is copied (being rewritten) is skipped."""
    target = os.path.join(dst, os.path.basename(_PACKAGE_DIR))
    for folder, dirs, files in os.walk(_PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        out = os.path.join(target, os.path.relpath(folder, _PACKAGE_DIR))
        os.makedirs(out, exist_ok=True)
        for f in files:
            if f.startswith((".", "#")) or not f.endswith(_PACKAGE_FILES):
                continue
            try:
                shutil.copy2(os.path.join(folder, f), os.path.join(out, f))
            except FileNotFoundError:
                continue
    return target


def _pip_requirements() -> list[str]:
    """Pinned to what trained the model; given explicitly so MLflow does not load the model to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "monai", "transformers", "numpy", "pandas", "pillow", "pydicom", "pytorch-ignite"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def build_model_input(paths: Sequence[str]):
    """The pyfunc's input for image files: a DataFrame with the column ``image``."""
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [os.fspath(p) for p in paths]})


def save_pyfunc_model(
    path: str, ckpt_path: str, network_kwargs: Any = None, input_kind: str = "path", work_dir: str | None = None
) -> str:
    """Write the MLflow model (pyfunc, signature, input example, the ``bundle`` package) to the folder ``path``.

    ``network_kwargs``: AlignerVLM kwargs (a config's network_def), a built network, or None (the checkpoint's
    sidecar ``models/model.json``). ``input_kind``: ``"path"`` (signature: a DataFrame column ``image`` of file
    paths) or ``"array"`` (a float32 tensor (-1, 1, S, S) of preprocessed images).
    """
    from mlflow.models import infer_signature
    from mlflow.pyfunc.model import PythonModelContext

    if input_kind not in ("path", "array"):
        raise ValueError(f"input_kind={input_kind!r}: 'path' or 'array'")
    ckpt_path = os.fspath(ckpt_path)
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    kwargs = _network_kwargs(network_kwargs, ckpt_path)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        cfg = os.path.join(tmp, NETWORK_JSON)
        with open(cfg, "w") as f:
            json.dump(kwargs, f, indent=2)
        example = _example_png(os.path.join(tmp, EXAMPLE_IMAGE), int(kwargs["image_size"]))
        artifacts = {"state_dict": ckpt_path, "network_config": cfg, "example_image": example}
        model = CXRAlignerPyfunc()
        model.load_context(PythonModelContext(artifacts=artifacts, model_config=None))
        if input_kind == "path":
            input_example = build_model_input([EXAMPLE_IMAGE])  # resolved against the logged example image
        else:
            input_example = model.load_images([example])
        output = model.predict(None, input_example)
        with warnings.catch_warnings():  # the peak columns are integers by design (never missing)
            warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
            signature = infer_signature(input_example, output)
        code_dir = os.path.join(tmp, "code")
        os.makedirs(code_dir)
        mlflow.pyfunc.save_model(
            path,
            python_model=model.__class__(),
            artifacts=artifacts,
            code_paths=[_copy_package(code_dir)],
            signature=signature,
            input_example=input_example,
            pip_requirements=_pip_requirements(),
            metadata={"classes": kwargs["classes"], "image_size": int(kwargs["image_size"]), "input_kind": input_kind},
        )
    return path


def _client_and_run(mlflow_logger_or_run_id, tracking_uri: str | None):
    """(MlflowClient, run_id) or (None, reason)."""
    from mlflow import MlflowClient

    from bundle.utils.dist import rank
    from bundle.utils.mlflow import is_reachable

    if mlflow_logger_or_run_id is None:
        return None, "no MLflow run"
    if isinstance(mlflow_logger_or_run_id, str):
        if rank() != 0:
            return None, "not rank 0"
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not is_reachable(uri):  # MLflow's client would retry an unreachable server for minutes
            return None, f"MLflow server {uri} is unreachable"
        return MlflowClient(tracking_uri=uri, registry_uri=uri), mlflow_logger_or_run_id
    handler = mlflow_logger_or_run_id
    if getattr(handler, "disabled", False) or getattr(handler, "cur_run", None) is None:
        return None, "MLflow logging is disabled or its run is not open"
    if not getattr(handler, "online", True):  # the server went away mid-run: do not wait on it for every file
        return None, "the MLflow server went offline during the run (the model stays in models/; docs/mlflow.md)"
    client = handler.client
    if tracking_uri:
        if not is_reachable(tracking_uri):
            return None, f"MLflow server {tracking_uri} is unreachable"
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return client, handler.cur_run.info.run_id


def log_best_model(
    mlflow_logger_or_run_id,
    ckpt_path: str,
    network_kwargs: Any = None,
    registered_name: str | None = None,
    tracking_uri: str | None = None,
    input_kind: str = "path",
) -> str | None:
    """Log the checkpoint as an MLflow model under ``runs:/<run_id>/model`` and register it as ``registered_name``.

    ``mlflow_logger_or_run_id``: the training's SafeMLFlowHandler (``mlflow_train``) or a run id (then
    ``tracking_uri`` or MLFLOW_TRACKING_URI names the store). ``network_kwargs``: see :func:`save_pyfunc_model`.
    Returns the model URI (``models:/<name>/<version>`` when registered, else ``runs:/<run_id>/model``), or None
    with a warning when MLflow is disabled/unreachable, the checkpoint is missing or anything fails: it never raises.
    """
    try:
        client, run_id = _client_and_run(mlflow_logger_or_run_id, tracking_uri)
        if client is None:
            logger.warning(f"MLflow model not logged: {run_id}")
            return None
        if not os.path.isfile(os.fspath(ckpt_path)):
            logger.warning(f"MLflow model not logged: no checkpoint at {ckpt_path} (no best model was saved)")
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, ARTIFACT_PATH)
            save_pyfunc_model(local, ckpt_path, network_kwargs, input_kind=input_kind, work_dir=tmp)
            client.log_artifacts(run_id, local, ARTIFACT_PATH)
        uri = f"runs:/{run_id}/{ARTIFACT_PATH}"
        logger.info(f"MLflow model logged: {uri}")
        if registered_name:
            uri = register_model(client, run_id, registered_name)
            logger.info(f"MLflow model registered: {uri}")
        return uri
    except Exception as e:  # tracking must never stop training
        logger.warning(f"MLflow model not logged ({type(e).__name__}: {e})")
        return None


def register_model(client, run_id: str, name: str) -> str:
    """A new version of the registered model ``name`` (created when absent) from ``runs:/<run_id>/model``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="AlignerVLM chest X-ray classifier (bundle.mlflow_model)")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + f"/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    return f"models:/{name}/{version.version}"
