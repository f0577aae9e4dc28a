"""Shared test fixtures: the tiny synthetic benchmark and the tiny network every integration test trains.

One definition here instead of copies in each test module. Tests that train in a subprocess are marked
``slow``; ``pytest -m "not slow"`` is the fast subset to run before each commit.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One torch thread per test process, and for the trainings the tests start in subprocesses (the bundle's
# set_threads honours OMP_NUM_THREADS): CI runs `pytest -n 2` on 2 cores, and two processes with two threads each
# made a tiny training 10-25x slower on a loaded machine. A user's explicit setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except ImportError:  # the format-only checks need no torch
    pass
CONFIGS = os.path.join(ROOT, "configs")

# The synthetic generator's knobs for a benchmark that generates in about a second (64 px site A, 80x72 site B).
TINY_SYNTH = {"n_train": 64, "n_val": 32, "n_test": 32, "n_ood": 32, "size_a": [64, 64], "size_b": [80, 72]}
TINY_SEED = 5
# Command-line overrides of configs/train.yaml for a network and images small enough that an epoch takes seconds.
TINY_TRAIN = ["--image_size", "64", "--batch_size", "16", "--network_def#vit_layers", "2", "--eval_n_boot", "20"]


@pytest.fixture(scope="session")
def tiny_synth() -> dict:
    """The tiny synthetic benchmark's generator knobs (a copy: tests may change it)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in TINY_SYNTH.items()}


@pytest.fixture(scope="session")
def tiny_datalist(tmp_path_factory) -> str:
    """Path of the tiny synthetic benchmark's datalist, generated once per test session (per xdist worker)."""
    from bundle.data.synthetic import ensure_synthetic

    return ensure_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=TINY_SEED, progress=False, **TINY_SYNTH)


@pytest.fixture(scope="session")
def tiny_train_args() -> list[str]:
    """configs/train.yaml overrides for the tiny network (a copy)."""
    return list(TINY_TRAIN)


def run_bundle_command(args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a command as a user would (bundle root on PYTHONPATH, no inherited MLflow server); assert it succeeds."""
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    if not env.get("MLFLOW_TRACKING_URI"):
        env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (
        p.returncode == 0
    ), f"command failed ({p.returncode}): {' '.join(map(str, args))}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="session")
def run_cmd():
    """:func:`run_bundle_command` as a fixture."""
    return run_bundle_command


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
