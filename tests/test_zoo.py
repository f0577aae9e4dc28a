"""The MONAI Model Zoo's checks, run offline on this bundle.

Each check is ported from Project-MONAI/model-zoo (ci/verify_bundle.py, ci/get_bundle_requirements.py, ci/utils.py,
.pre-commit-config.yaml, setup.cfg) and names its source. Checks of the zoo that live elsewhere in this suite:

- verify_net_in_out on configs/inference.yaml (zoo full mode, ``verify_data_shape``):
  tests/test_workflow.py::test_zoo_metadata_and_network_shape_checks (which also runs verify_metadata as a subprocess);
- the properties check of the train and inference workflows (zoo full mode, ``verify_bundle_properties``; the zoo runs
  it only when the metadata has ``supported_apps``): tests/test_workflow.py::test_bundle_properties_complete.

Not here: the zoo's TorchScript check (``verify_torchscript``: ``ckpt_export network_def``). It fails in the current
tree (scripting the Hugging Face ViT raises ``OSError: Failed to get source for ViTConfig.__init__``); export is being
added separately, with its own test.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from collections import OrderedDict

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
META = os.path.join(CONFIGS, "metadata.json")
SCHEMA = os.path.join(ROOT, "tests", "data", "meta_schema_20240725.json")
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

# The versions the zoo's CPU premerge installs from the metadata (ci/get_bundle_requirements.py: `torch==`, `numpy==`,
# `<name>==<version>`; `monai>=<v>rc1,<next>` with ALLOW_MONAI_RC). That job runs Python 3.10 (premerge-cpu.yml:
# python-version 3.10.14), so each is the newest release with a CPython 3.10 wheel on PyPI that the bundle works with,
# checked on 2026-12-02 with `pip index versions NAME --python-version 3.10 --abi cp310 --only-binary=:all:` and
# `pip download --no-deps --python-version 3.10 --only-binary=:all: NAME==VERSION`, and the whole set resolved together
# with `pip install --dry-run --python-version 3.10 --only-binary=:all: -r ...` (see docs/README.md, "System
# configuration"). requirements.txt keeps the Python 3.11 pins the bundle is developed on (numpy 2.4.6, pandas 3.1.1,
# ...: no Python 3.10 wheels). Change both together, re-checking the Python 3.10 side with those commands.
CHECKED_PY310 = {
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.2.6",
    "required_packages_version": {
        "pytorch-ignite": "0.5.5",
        "pydicom": "3.0.2",
        "pylibjpeg": "2.1.0",
        "pylibjpeg-openjpeg": "2.6.0",
        "pylibjpeg-libjpeg": "2.5.0",
        "pylibjpeg-rle": "2.2.0",
        "pyjpegls": "1.5.1",
        "transformers": "5.20.2",
        "scikit-image": "0.25.2",
        "nibabel": "5.4.2",
        "mlflow": "3.17.2",
        "scikit-learn": "1.7.2",
        "fairlearn": "0.14.0",
        "pycocotools": "2.0.11",
        "highdicom": "0.28.2",
        "matplotlib": "3.10.9",
        "pandas": "2.3.3",
        "pillow": "12.3.0",
        "pyyaml": "6.0.3",
        "tqdm": "4.70.1",
    },
}
EXACT_VERSION = re.compile(r"^\d+(\.\d+)*$")  # pip-installable as `==`: no local tag such as +cpu, no range


def _metadata() -> dict:
    with open(META) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------ metadata
def test_metadata_verifies_against_schema_20240725():
    """ci/verify_bundle.py verify_metadata_format, with the schema ci/prepare_schema.py would download (local copy)."""
    from monai.bundle import verify_metadata

    assert _metadata()["schema"] == SCHEMA_URL
    verify_metadata(meta_file=META, filepath=SCHEMA)  # raises on any schema error


def test_metadata_version_in_changelog():
    """ci/verify_bundle.py verify_version_changes (the model_info.json part needs the zoo repository)."""
    meta = _metadata()
    assert "version" in meta and "changelog" in meta
    assert meta["version"] in meta["changelog"]


def test_metadata_versions_are_the_checked_python310_versions():
    meta = _metadata()
    for key, checked in CHECKED_PY310.items():
        assert meta[key] == checked, key
    assert "optional_packages_version" not in meta  # the zoo would install it too


def _zoo_requirements(meta: dict) -> list[str]:
    """ci/get_bundle_requirements.py get_requirements (ALLOW_MONAI_RC=true, as run_premerge_cpu.sh sets it)."""
    major, minor, patch = (int(p) for p in meta["monai_version"].split("."))
    libs = [f"monai>={meta['monai_version']}rc1,<{major}.{minor}.{patch + 1}"]
    libs.append(f"torch=={meta['pytorch_version']}")
    libs.append(f"numpy=={meta['numpy_version']}")
    for key in ("optional_packages_version", "required_packages_version"):
        libs.extend(f"{name}=={version}" for name, version in meta.get(key, {}).items())
    return libs


def test_zoo_requirements_are_exact_versions():
    meta = _metadata()
    reqs = _zoo_requirements(meta)
    assert reqs[0] == "monai>=1.6.1rc1,<1.6.2"
    for line in reqs[1:]:
        name, version = line.split("==")
        assert EXACT_VERSION.match(version), line
    # every third-party package the bundle imports at run time is installed by the zoo (directly or as a dependency)
    names = {line.split("==")[0] for line in reqs[1:]}
    assert {"torch", "numpy", "pytorch-ignite", "transformers", "pydicom", "pandas", "mlflow", "fairlearn"} <= names


# ------------------------------------------------------------------------------------------ directory (min mode)
# Ported from ci/verify_bundle.py (Project-MONAI/model-zoo): necessary/preferred file lists, _find_bundle_file and
# verify_bundle_directory; the large-file download (ci/utils.py download_large_files) is passed in, so the test needs
# no network.
NECESSARY_FILES = ["configs/metadata.json", "LICENSE"]
PREFERRED_FILES = ["models/model.pt", "configs/inference.json"]


def _find_bundle_file(root_dir, file, suffix=("json", "yaml", "yml")):
    file_name = None
    for name in suffix:
        full_name = f"{file}.{name}"
        if full_name in os.listdir(root_dir):
            file_name = full_name
    return file_name


def _verify_bundle_directory(bundle_path, download_large_files):
    large_file_name = _find_bundle_file(bundle_path, "large_files")
    if large_file_name is not None:
        try:
            download_large_files(bundle_path=bundle_path, large_file_name=large_file_name)
        except Exception as e:
            raise ValueError(f"Download large files in {bundle_path} error.") from e
    for file in NECESSARY_FILES:
        if not os.path.exists(os.path.join(bundle_path, file)):
            raise ValueError(f"necessary file {file} is not existing.")
    for file in PREFERRED_FILES:
        if file == "configs/inference.json":
            if _find_bundle_file(os.path.join(bundle_path, "configs"), "inference") is None:
                raise ValueError("inference config file is not existing.")
        elif not os.path.exists(os.path.join(bundle_path, file)):
            raise ValueError(f"necessary file {file} is not existing.")


def _large_files(bundle_path) -> list[dict]:
    """What ci/utils.py download_large_files reads: ConfigParser(large_files.*).get()["large_files"]."""
    from monai.bundle import ConfigParser

    name = _find_bundle_file(bundle_path, "large_files")
    assert name is not None
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, name))
    return list(parser.get()["large_files"] or [])


def _write_fake_weights(bundle_path):
    """ci/verify_bundle.py _produce_fake_weights: the state_dict of network_def from the inference config."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=os.path.join(bundle_path, "configs", "inference.yaml"))
    parser.read_meta(f=os.path.join(bundle_path, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_path
    network = parser.get_parsed_content("network_def")
    os.makedirs(os.path.join(bundle_path, "models"), exist_ok=True)
    torch.save(network.state_dict(), os.path.join(bundle_path, "models", "model.pt"))


def _fresh_checkout(tmp_path) -> str:
    """The bundle's committed top-level files a zoo checkout has (no models/model.pt: weights are not committed)."""
    bundle = tmp_path / "cxr_aligner_fairness"
    shutil.copytree(CONFIGS, bundle / "configs")
    for name in os.listdir(ROOT):
        if name == "LICENSE" or name.startswith("large_files."):
            shutil.copy(os.path.join(ROOT, name), bundle / name)
    (bundle / "models").mkdir()
    shutil.copy(os.path.join(ROOT, "models", "README.md"), bundle / "models" / "README.md")
    return str(bundle)


def test_large_files_list_at_bundle_root():
    """The zoo looks for large_files.{json,yaml,yml} in the bundle root only (not in models/)."""
    assert _find_bundle_file(ROOT, "large_files") == "large_files.yml"
    assert _find_bundle_file(os.path.join(ROOT, "models"), "large_files") is None
    for entry in _large_files(ROOT):  # a published entry must be complete (download_url(url, filepath, hash...))
        assert set(entry) >= {"path", "url", "hash_val", "hash_type"}, entry
        assert entry["url"].startswith("https://"), entry
        assert entry["hash_type"] == "md5" and re.fullmatch(r"[0-9a-f]{32}", entry["hash_val"]), entry


def test_min_mode_directory_check_with_weights(tmp_path):
    """Min mode passes once models/model.pt is there (trained, or downloaded through large_files.yml)."""
    bundle = _fresh_checkout(tmp_path)
    _write_fake_weights(bundle)
    _verify_bundle_directory(bundle, download_large_files=lambda **kwargs: None)


def test_min_mode_directory_check_on_a_fresh_checkout(tmp_path):
    """What the zoo's min mode does on a fresh checkout now: it downloads every large_files.yml entry, then requires
    models/model.pt. Until the weights are published and listed, that is the error below (models/README.md says how to
    publish); once listed, downloading them (simulated here) satisfies the check."""
    bundle = _fresh_checkout(tmp_path)
    listed = {entry["path"] for entry in _large_files(bundle)}

    def download(bundle_path, large_file_name):  # stands in for ci/utils.py download_large_files
        if "models/model.pt" in listed:
            _write_fake_weights(bundle_path)

    if "models/model.pt" in listed:
        _verify_bundle_directory(bundle, download_large_files=download)
    else:
        with pytest.raises(ValueError, match="necessary file models/model.pt is not existing"):
            _verify_bundle_directory(bundle, download_large_files=download)


# ------------------------------------------------------------------------------------------------------- format
# The zoo's format rules: ./runtests.sh --codeformat (black, isort, flake8 with setup.cfg's settings, line length 120)
# and the hooks of its .pre-commit-config.yaml (pre-commit-hooks v4.6.0), ported below.
def _tool(*args):
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(args)}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"


@pytest.mark.parametrize(
    "args", [("black", "--check", "--quiet", "."), ("isort", "--check-only", "--quiet", "."), ("flake8", ".")]
)
def test_code_format(args):
    _tool(*args)


def _tracked() -> list[str]:
    """The files a commit of the work tree holds: tracked, plus new files git does not ignore."""
    args = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def _read(path) -> bytes:
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read()


BINARY_EXT = (".png", ".jpg", ".jpeg", ".dcm", ".pt", ".ts", ".onnx", ".gz", ".zip", ".npy", ".npz", ".pkl", ".db")


def _text_files() -> list[str]:
    return [p for p in _tracked() if not p.lower().endswith(BINARY_EXT) and b"\0" not in _read(p)[:8192]]


def test_end_of_file():
    """end-of-file-fixer: a non-empty file ends with exactly one newline."""
    bad = []
    for p in _text_files():
        data = _read(p)
        if data and (not data.endswith(b"\n") or data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")):
            bad.append(p)
    assert not bad, bad


def test_trailing_whitespace():
    """trailing-whitespace (excluding .ts/.pt, as the zoo's config does)."""
    bad = []
    for p in _text_files():
        for i, line in enumerate(_read(p).split(b"\n"), 1):
            if line.rstrip(b"\r") != line.rstrip(b"\r").rstrip():
                bad.append(f"{p}:{i}")
    assert not bad, bad


def test_mixed_line_ending():
    bad = []
    for p in _text_files():
        data = _read(p)
        crlf = data.count(b"\r\n")
        if crlf and crlf != data.count(b"\n"):
            bad.append(p)
    assert not bad, bad


def test_check_yaml():
    """check-yaml: every tracked YAML file loads (one document each)."""
    files = [p for p in _tracked() if p.endswith((".yaml", ".yml"))]
    assert "configs/train.yaml" in files and "large_files.yml" in files
    for p in files:
        yaml.safe_load(_read(p))


def test_check_toml():
    import tomllib

    for p in (p for p in _tracked() if p.endswith(".toml")):
        tomllib.loads(_read(p).decode())


def test_json_valid_and_pretty():
    """Every tracked JSON file is valid, and formatted as pretty-format-json --no-sort-keys --indent=4 leaves it."""
    bad = []
    for p in (p for p in _tracked() if p.endswith(".json")):
        text = _read(p).decode()
        pretty = json.dumps(json.loads(text, object_pairs_hook=OrderedDict), indent=4, ensure_ascii=True) + "\n"
        if text != pretty:
            bad.append(p)
    assert not bad, bad


def test_executables_have_shebangs():
    """check-executables-have-shebangs, on the modes git records."""
    out = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    bad = []
    for entry in out.decode().split("\0"):
        if entry.startswith("100755"):
            p = entry.split("\t", 1)[1]
            if not _read(p).startswith(b"#!"):
                bad.append(p)
    assert not bad, bad


def test_no_large_files():
    """check-added-large-files --maxkb=1024 (the zoo's limit for a committed file)."""
    bad = [p for p in _tracked() if os.stat(os.path.join(ROOT, p)).st_size > 1024 * 1024]
    assert not bad, bad


def test_case_conflict():
    seen = {}
    for p in _tracked():
        seen.setdefault(p.lower(), []).append(p)
    assert not [v for v in seen.values() if len(v) > 1]


def test_no_private_keys():
    """detect-private-key (its list of markers, assembled here so that this file does not match them itself)."""
    kinds = ["RSA ", "DSA ", "EC ", "OPENSSH ", "", "SSH2 ENCRYPTED ", "ENCRYPTED "]
    markers = [f"BEGIN {k}PRIVATE KEY".encode() for k in kinds]
    markers += [
        b"PuTTY-User-Key-File-" + b"2",
        b"BEGIN PGP " + b"PRIVATE KEY BLOCK",
        b"BEGIN OpenVPN " + b"Static key V1",
    ]
    assert not [p for p in _text_files() if any(m in _read(p) for m in markers)]


def _docstring_first_error(src: str):
    """check-docstring-first (pre-commit-hooks): no module-level string after code, no second module docstring."""
    non_code = {tokenize.COMMENT, tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.ENCODING}
    docstring_line = code_line = None
    for tok_type, _, (sline, scol), _, _ in tokenize.tokenize(io.BytesIO(src.encode()).readline):
        if tok_type == tokenize.STRING and scol == 0:
            if docstring_line is not None:
                return f"{sline}: multiple module docstrings (first on line {docstring_line})"
            if code_line is not None:
                return f"{sline}: module docstring after code (code on line {code_line})"
            docstring_line = sline
        elif tok_type not in non_code and code_line is None:
            code_line = sline
    return None


def test_docstring_first():
    assert _docstring_first_error('"""doc"""\nimport os\n') is None
    assert _docstring_first_error('import os\n"""doc"""\n') is not None
    bad = {p: e for p in _tracked() if p.endswith(".py") and (e := _docstring_first_error(_read(p).decode()))}
    assert not bad, bad
