"""A missing text encoder or pretrained ViT: Python callers get a catchable FileNotFoundError
(``bundle.errors.MissingWeightsError``); ``python -m monai.bundle run`` ends with one clear last line (what is
missing, the command that fetches it, where to put it) and no traceback. Nothing downloads: every run here is
offline (HF_HUB_OFFLINE=1) with an empty Hugging Face cache."""

import os
import pickle
import subprocess
import sys

import pytest

from bundle.errors import MissingWeightsError, find_missing_weights
from bundle.networks import AlignerVLM
from bundle.text import TextEncoderNotFoundError, build_text_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = dict(classes=["a", "b"], image_size=32, patch_size=16, vit_hidden=16, vit_layers=1, vit_heads=2, vit_mlp=32)


def _offline_env(hf_home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "MLFLOW_TRACKING_URI"))}
    return {**env, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "TRANSFORMERS_OFFLINE": "1"}


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _paper_run(tmp_path, tiny_datalist, *extra) -> subprocess.CompletedProcess:
    (tmp_path / "hf").mkdir(exist_ok=True)
    args = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", repr([os.path.join(CONFIGS, "train.yaml"), os.path.join(CONFIGS, "paper.yaml")]),
        "--datalist_file", tiny_datalist, "--max_epochs", "1", "--num_workers", "0",
        "--output_dir", str(tmp_path / "eval"), "--best_model_path", str(tmp_path / "model.pt"), *extra,
    ]  # fmt: skip
    return subprocess.run(
        args, cwd=ROOT, env=_offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=300
    )


def _assert_one_clear_line(p: subprocess.CompletedProcess, start: str, end: str) -> str:
    lines = p.stderr.rstrip("\n").splitlines()
    assert p.returncode == 1, p.stderr[-4000:]
    assert lines and lines[-1].startswith(start) and lines[-1].endswith(end), p.stderr[-4000:]
    assert "Traceback" not in p.stderr and "Failed to instantiate" not in p.stderr, p.stderr[-4000:]
    return lines[-1]


def test_paper_run_without_med_kebert_ends_with_one_line(tmp_path, tiny_datalist):
    p = _paper_run(tmp_path, tiny_datalist)
    hub = os.path.join(str(tmp_path / "hf"), "hub")
    last = _assert_one_clear_line(
        p,
        f"Med-KEBERT (xmcmic/Med-KEBERT) is not in the local Hugging Face cache ({hub}): fetch it with "
        "'hf download xmcmic/Med-KEBERT --local-dir models/Med-KEBERT' on a machine with internet access, "
        f"copy that folder to {os.path.join(ROOT, 'models', 'Med-KEBERT')}, ",
        "and pass --network_def#text_encoder models/Med-KEBERT",
    )
    assert "random" not in last  # text_fallback is null in the paper preset: no silent random encoder


def test_paper_run_with_missing_vit_folder_ends_with_one_line(tmp_path, tiny_datalist):
    missing = str(tmp_path / "nowhere" / "vit-base-patch16-224")
    p = _paper_run(tmp_path, tiny_datalist, "--network_def#vit_pretrained", missing)
    _assert_one_clear_line(
        p,
        f"pretrained ViT is not at {missing} (the folder does not exist): fetch it with 'hf download google/vit-base-patch16-224 "
        f"--local-dir {missing}' on a machine with internet access, copy that folder to {missing}, ",
        f"and pass --network_def#vit_pretrained {missing}",
    )


def test_library_raises_catchable_file_not_found(tmp_path):
    if _cached("xmcmic/Med-KEBERT"):
        pytest.skip("Med-KEBERT is in this machine's Hugging Face cache")
    with pytest.raises(FileNotFoundError) as info:
        build_text_encoder("xmcmic/Med-KEBERT", ["a"])
    e = info.value
    assert isinstance(e, TextEncoderNotFoundError) and isinstance(e, MissingWeightsError)
    assert (e.repo_id, e.local_dir, e.param) == ("xmcmic/Med-KEBERT", "models/Med-KEBERT", "text_encoder")
    assert "pass text_encoder='models/Med-KEBERT'. A folder must hold" in str(e) and "\n" not in str(e)
    assert e.cli_message().endswith("pass --network_def#text_encoder models/Med-KEBERT")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is TextEncoderNotFoundError and str(again) == str(e)
    # a missing folder is never looked up on the hub, and names the folder
    with pytest.raises(TextEncoderNotFoundError, match="folder does not exist"):
        build_text_encoder(str(tmp_path / "Med-KEBERT"), ["a"])
    # an existing but incomplete folder says why it does not load
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderNotFoundError, match="could not be loaded offline"):
        build_text_encoder(str(tmp_path / "empty"), ["a"])
    with pytest.raises(MissingWeightsError, match="vit_pretrained="):
        AlignerVLM(vit_pretrained=str(tmp_path / "vit-b16"), text_encoder="random-small", **TINY)
    # the random fallback still works, with the missing encoder in text_source
    _, _, source = build_text_encoder("xmcmic/Med-KEBERT", ["a"], fallback="random-small")
    assert source == "random-small (fallback: xmcmic/Med-KEBERT not found locally)"


def test_find_missing_weights_follows_raise_from_only():
    missing = MissingWeightsError("Med-KEBERT", "xmcmic/Med-KEBERT", "text_encoder", "xmcmic/Med-KEBERT", "m/x")
    try:
        try:
            raise missing
        except MissingWeightsError as e:
            raise RuntimeError("Failed to instantiate component") from e
    except RuntimeError as wrapped:
        assert find_missing_weights(wrapped) is missing
    try:
        try:
            raise missing
        except MissingWeightsError:
            raise ValueError("a later, different error")  # noqa: B904 (an implicit context on purpose)
    except ValueError as later:
        assert find_missing_weights(later) is None


HOOK_SCRIPT = """
from bundle.errors import MissingWeightsError, install_cli_excepthook
assert install_cli_excepthook(force=True)
try:
    raise MissingWeightsError("Med-KEBERT", "xmcmic/Med-KEBERT", "text_encoder", "xmcmic/Med-KEBERT", "m/x")
except MissingWeightsError as e:
    raise RuntimeError("Failed to instantiate component") from e
"""


@pytest.mark.parametrize("traceback_env", ["", "1"])
def test_cli_hook_prints_one_line_unless_asked(tmp_path, traceback_env):
    env = {**_offline_env(tmp_path), "BUNDLE_TRACEBACK": traceback_env}
    p = subprocess.run([sys.executable, "-c", HOOK_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 1
    if traceback_env:
        assert "Traceback" in p.stderr and p.stderr.rstrip().endswith("Failed to instantiate component")
    else:
        assert p.stderr.endswith("and pass --network_def#text_encoder m/x\n") and p.stderr.count("\n") == 1, p.stderr


def test_cli_hook_leaves_other_errors_alone(tmp_path):
    script = "from bundle.errors import install_cli_excepthook\ninstall_cli_excepthook(force=True)\nraise KeyError('x')"
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_offline_env(tmp_path), capture_output=True)
    assert p.returncode == 1 and b"Traceback" in p.stderr and p.stderr.rstrip().endswith(b"KeyError: 'x'")


def test_hook_not_installed_in_library_use():
    assert not getattr(sys.excepthook, "_bundle_missing_weights", False)
