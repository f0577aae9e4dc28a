"""A training killed after an epoch and resumed ends exactly like an uninterrupted one (CPU, num_workers 0): same
network, optimiser, early-stopping and generator state, same validation metrics, bit for bit. Then the same folder
with other settings is refused before any training. docs/reliability.md states the tolerance (none: bit-identical)."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")
EPOCHS = 3


def _args(datalist, out, tiny_train_args, *extra):
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--datalist_file", datalist,
        "--output_dir", str(out / "eval"), "--best_model_path", str(out / "model.pt"), *tiny_train_args,
        "--max_epochs", str(EPOCHS), "--final_evaluation", "false", "--mlflow_log_model", "false",
        "--tracking_uri", f"sqlite:///{out.parent / 'mlruns.db'}", *extra,
    ]  # fmt: skip


def _env():
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _val_metrics(log: str, epoch: int) -> str:
    m = re.search(rf"Epoch\[{epoch}\] Metrics -- (.*)", log)
    assert m, f"no validation metrics of epoch {epoch} in the log"
    return m.group(1).strip()


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(
    tiny_datalist, tiny_train_args, run_cmd, tmp_path
):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_log = run_cmd(_args(tiny_datalist, ref, tiny_train_args))
    ref_log = ref_log.stdout + ref_log.stderr

    # the same command, killed (SIGKILL: no clean-up at all) once the epoch-1 checkpoint is on disk
    with open(tmp_path / "killed.log", "w") as log:
        p = subprocess.Popen(
            _args(tiny_datalist, cut, tiny_train_args), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            while not glob.glob(str(cut / "eval" / "checkpoints" / "checkpoint_epoch=*.pt")):
                assert p.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                time.sleep(0.02)
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    killed_at = int(re.search(r"epoch=(\d+)", os.listdir(cut / "eval" / "checkpoints")[0]).group(1))
    assert killed_at < EPOCHS

    # the same command again: resumes (allowing code changes, so that editing bundle/ meanwhile cannot fail the test)
    res = run_cmd(_args(tiny_datalist, cut, tiny_train_args, "--resume_on_code_change", "true"))
    log = res.stdout + res.stderr
    assert f"resumed from {cut / 'eval' / 'checkpoints'}" in log and "Epoch[1] Complete" not in log

    a = torch.load(ref / "eval" / "checkpoints" / f"checkpoint_epoch={EPOCHS}.pt", weights_only=True)
    b = torch.load(cut / "eval" / "checkpoints" / f"checkpoint_epoch={EPOCHS}.pt", weights_only=True)
    for key in ("network", "optimizer", "lr_scheduler", "trainer", "best_saver", "early_stop", "rng"):
        _assert_same(a[key], b[key], key)  # tolerance 0: bit-identical
    _assert_same(torch.load(ref / "model.pt", weights_only=True), torch.load(cut / "model.pt", weights_only=True))
    for epoch in range(killed_at + 1, EPOCHS + 1):
        assert _val_metrics(log, epoch) == _val_metrics(ref_log, epoch)
    assert a["run"]["digest"] == b["run"]["digest"]  # the same run (folders are not part of it)
    assert b["run"]["history"][-1]["event"] == "resumed" and b["run"]["history"][-1]["at_epoch"] == killed_at

    # the finished folder with other settings: refused before any training, state untouched
    ckpt = ref / "eval" / "checkpoints" / f"checkpoint_epoch={EPOCHS}.pt"
    mtime = ckpt.stat().st_mtime_ns
    args = _args(tiny_datalist, ref, tiny_train_args, "--alignment_fraction", "0", "--seed", "5", "--lambda_al", "0")
    p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    for line in ("alignment_fraction: 0.75 -> 0", "seed: 0 -> 5", "lambda_al: 1.0 -> 0", "--resume false"):
        assert line in out, out[-4000:]
    assert "Engine run resuming" not in out and "Epoch[" not in out
    assert ckpt.stat().st_mtime_ns == mtime
