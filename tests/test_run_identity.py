"""A run knows what it is: its fingerprint (run.json, in every checkpoint), the refusal to resume another run's
checkpoint, the lock on its output folder, orphaned temp files, the restored early stopping and random generators,
and that the best model evaluated is the one it saved. In-process and fast; the end-to-end kill-and-resume test
is tests/test_resume_exact.py."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

from bundle.handlers import BestModelSaver, ResumeCheckpoint, RNGState
from bundle.run_identity import (
    LOCK_FILE,
    RUN_FILE,
    RunIdentity,
    RunInUseError,
    RunMismatchError,
    claim_output_dir,
    model_lock_path,
)
from bundle.utils.atomic import atomic_path, remove_stale_temp_files, temp_file_owner, write_text_atomic
from bundle.utils.lock import release_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = {"alignment_fraction": 0.75, "seed": 0, "lambda_al": 1.0, "max_epochs": 4, "data_ratio": 1.0}


def _identity(tmp_path, datalist=None, **knobs) -> RunIdentity:
    if datalist is None:
        datalist = tmp_path / "datalist.json"
        if not datalist.exists():
            tmp_path.mkdir(parents=True, exist_ok=True)
            datalist.write_text('{"classes": ["a"], "training": [], "validation": []}')
    net = torch.nn.Linear(3, 2)
    return RunIdentity(
        str(tmp_path / "eval"),
        {**KNOBS, **knobs},
        datalist_file=str(datalist),
        components={"network": net, "optimizer": torch.optim.AdamW(net.parameters(), lr=1e-3)},
    )


def _roundtrip(state, tmp_path):
    """What a checkpoint gives back: torch.save, then torch.load(weights_only=True)."""
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------ the fingerprint
def test_fingerprint_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    run = _identity(tmp_path)
    fp = run.fingerprint
    assert {"alignment_fraction", "seed", "network", "optimizer", "data", "code", "distributed"} <= set(fp)
    assert fp["data"]["datalist_file"] == str(tmp_path / "datalist.json") and len(fp["data"]["datalist_sha256"]) == 16
    assert len(fp["code"]["bundle_sources"]) == 16
    state = _roundtrip(run.state_dict(), tmp_path)
    same = _identity(tmp_path)
    same.check_resume(state, "ckpt.pt", 2)  # identical: accepted
    assert same.digest() == state["digest"] and same.history[-1]["event"] == "resumed"
    assert _identity(tmp_path, data_ratio=1).digest() == run.digest()  # --data_ratio 1 is data_ratio: 1.0


def test_other_settings_are_refused_with_the_keys_and_the_fix(tmp_path):
    state = _roundtrip(_identity(tmp_path).state_dict(), tmp_path)
    other = _identity(tmp_path, alignment_fraction=0, seed=5, lambda_al=0)
    with pytest.raises(RunMismatchError) as e:
        other.check_resume(state, "/x/checkpoints/checkpoint_epoch=4.pt", 4)
    msg = str(e.value)
    for line in ("alignment_fraction: 0.75 -> 0", "seed: 0 -> 5", "lambda_al: 1.0 -> 0"):
        assert line in msg, msg
    assert "3 setting(s) differ" in msg and "--output_dir" in msg and "--resume false" in msg
    assert "Nothing was trained" in msg and "checkpoint_epoch=4.pt (epoch 4)" in msg


def test_network_data_and_code_are_part_of_the_fingerprint(tmp_path):
    state = _roundtrip(_identity(tmp_path).state_dict(), tmp_path)
    other_data = tmp_path / "other.json"
    other_data.write_text('{"classes": ["b"], "training": [], "validation": []}')
    keys = {k for k, _, _ in _identity(tmp_path, datalist=other_data).differences(state["fingerprint"])}
    assert keys == {"data.datalist_file", "data.datalist_sha256"}

    run = _identity(tmp_path)
    run.components["network"] = torch.nn.Linear(3, 5)
    assert "network.out_features" in {k for k, _, _ in run.differences(state["fingerprint"])}

    changed = _roundtrip(_identity(tmp_path).state_dict(), tmp_path)
    changed["fingerprint"]["code"] = dict(changed["fingerprint"]["code"], bundle_sources="0" * 16, git_commit="abc")
    with pytest.raises(RunMismatchError, match=r"(?s)code\.bundle_sources.*--resume_on_code_change true"):
        _identity(tmp_path).check_resume(changed, "c.pt", 1)  # the git commit alone is not compared
    allowed = _identity(tmp_path)
    allowed.allow_code_change = True
    allowed.check_resume(changed, "c.pt", 1)
    assert [h["event"] for h in allowed.history] == ["code_changed", "resumed"]


def test_max_epochs_may_only_grow(tmp_path):
    def identity(max_epochs):  # the cosine schedule's T_max follows max_epochs, as in configs/train.yaml
        run = _identity(tmp_path, max_epochs=max_epochs)
        opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        run.components["lr_scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
        return run

    state = _roundtrip(identity(4).state_dict(), tmp_path)
    longer = identity(6)
    longer.check_resume(state, "c.pt", 4)
    assert longer.history[0]["event"] == "extended" and longer.history[0]["max_epochs"] == [4, 6]
    with pytest.raises(RunMismatchError, match=r"(?s)max_epochs: 4 -> 3.*may only grow"):
        identity(3).check_resume(state, "c.pt", 2)


def test_checkpoint_without_fingerprint_is_refused(tmp_path):
    with pytest.raises(RunMismatchError, match=r"(?s)records no run fingerprint.*--resume false"):
        _identity(tmp_path).check_resume(None, "old.pt", 3)


# ------------------------------------------------------------------------------------------------ the checkpoint
def _toy(net, opt, scores, max_epochs):
    """A toy trainer with a validation score per epoch, early stopping (patience 2) and a best-model saver."""

    def step(engine, batch):
        opt.zero_grad()
        loss = (net(batch) ** 2).mean() + 1e-3 * torch.randn(()).abs()  # consumes the torch generator
        loss.backward()
        opt.step()
        return loss.item()

    eng = Engine(step)
    eng.state.max_epochs = max_epochs
    es = EarlyStopHandler(patience=2, score_function=lambda e: e.state.metrics["auc"], epoch_level=True)
    es.set_trainer(eng)
    return eng, es, scores


def _attach_validation(eng, es, scores, saver):
    @eng.on(Events.EPOCH_COMPLETED)
    def validate(e):
        e.state.metrics["auc"] = scores[e.state.epoch - 1]
        saver(e)
        es(e)


def _objects(net, opt, eng, es, saver):
    return {"network": net, "optimizer": opt, "trainer": eng, "early_stop": es, "best_saver": saver, "rng": RNGState()}


def _train(tmp_path, max_epochs, scores, knobs=None, resume=True, seed=0):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, generator=g) for _ in range(3)]  # the same data in every "process"
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    eng, es, scores = _toy(net, opt, scores, max_epochs)
    saver = BestModelSaver(str(tmp_path / "model.pt"), net, metric_name="auc")
    _attach_validation(eng, es, scores, saver)
    run = _identity(tmp_path, **{"max_epochs": max_epochs, **(knobs or {})})
    resume_ckpt = ResumeCheckpoint(str(tmp_path / "eval" / "ckpt"), _objects(net, opt, eng, es, saver), resume, run=run)
    epochs = []
    eng.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    resume_ckpt.attach(eng)
    eng.run(data, max_epochs=max_epochs)
    return net, es, epochs, resume_ckpt, run


SCORES = [0.6, 0.7, 0.65, 0.66, 0.64, 0.9, 0.95]  # no improvement after epoch 2: patience 2 stops at epoch 4


def test_early_stopping_and_generators_resume_exactly(tmp_path):
    ref_net, ref_es, ref_epochs, _, _ = _train(tmp_path / "ref", 7, SCORES)
    assert ref_epochs == [1, 2, 3, 4]  # stopped early
    _train(tmp_path / "cut", 3, SCORES, knobs={"max_epochs": 7})  # "killed" after epoch 3 (counter 1)
    net, es, epochs, _, run = _train(tmp_path / "cut", 7, SCORES, seed=123)  # another seed: the state is restored
    assert epochs == [4]  # resumed at epoch 4, stopped there like the uninterrupted run
    assert (es._handler.counter, es._handler.best_score) == (ref_es._handler.counter, ref_es._handler.best_score)
    for k, v in ref_net.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k  # the torch generator was restored too
    assert [h["event"] for h in run.history] == ["resumed"]
    # the finished (early-stopped) run resumed again trains nothing
    _, _, epochs, _, _ = _train(tmp_path / "cut", 7, SCORES)
    assert epochs == []


def test_resume_of_another_run_is_refused_before_training_and_resume_false_starts_afresh(tmp_path):
    _train(tmp_path, 2, SCORES)
    ckpt = tmp_path / "eval" / "ckpt" / "checkpoint_epoch=2.pt"
    before = json.loads((tmp_path / "eval" / RUN_FILE).read_text())
    assert before["best_model"]["epoch"] == 2 and before["fingerprint"]["seed"] == 0
    with pytest.raises(RunMismatchError, match=r"seed: 0 -> 5"):
        _train(tmp_path, 2, SCORES, knobs={"seed": 5})
    assert json.loads((tmp_path / "eval" / RUN_FILE).read_text())["digest"] == before["digest"]  # untouched
    assert ckpt.is_file()
    _, _, epochs, _, run = _train(tmp_path, 2, SCORES, knobs={"seed": 5}, resume=False)
    assert epochs == [1, 2]  # afresh
    after = json.loads((tmp_path / "eval" / RUN_FILE).read_text())
    assert after["fingerprint"]["seed"] == 5 and after["history"] == [] and after["resumed_from"] is None
    assert torch.load(ckpt, weights_only=True)["run"]["fingerprint"]["seed"] == 5


def test_best_model_must_be_this_runs(tmp_path):
    _, _, _, resume_ckpt, run = _train(tmp_path, 2, SCORES)
    resume_ckpt.check_best_model()  # the file this run saved
    saved = (tmp_path / "model.pt").read_bytes()
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")  # another run wrote the same path
    with pytest.raises(RuntimeError, match=r"not the best model this run saved at epoch 2.*replaced"):
        resume_ckpt.check_best_model()
    (tmp_path / "model.pt").write_bytes(saved)
    resume_ckpt.check_best_model()
    run.best_model = None  # no validation gave a finite metric
    with pytest.raises(RuntimeError, match=r"this run saved no best model.*comes from another run"):
        resume_ckpt.check_best_model()
    (tmp_path / "model.pt").unlink()  # nothing there: nothing stale to take for this run's; a warning, no error
    resume_ckpt.check_best_model()


def test_transform_generators_are_restored_including_lazily_built_ones(tmp_path):
    from monai.transforms import Compose, RandGaussianNoised

    from bundle.transforms.augment import JointAugmentd

    def pipeline():
        t = Compose([JointAugmentd(prob=1.0), RandGaussianNoised("image", prob=1.0)])
        t.set_random_state(seed=7)
        return t

    sample = {"image": torch.rand(1, 16, 16), "attn_mask": (torch.rand(1, 16, 16) > 0.5).float()}
    first = pipeline()
    first(dict(sample))  # builds JointAugmentd's affine for 16 x 16 and advances every generator
    state = _roundtrip(RNGState(first).state_dict(), tmp_path)
    torch_draw, np_draw, py_draw = torch.rand(3), np.random.rand(3), random.random()
    expected = first(dict(sample))["image"]

    second = pipeline()  # a fresh process: generators at their initial state, no affine built yet
    torch.manual_seed(99)
    RNGState(second).load_state_dict(state)
    assert torch.equal(torch.rand(3), torch_draw) and np.array_equal(np.random.rand(3), np_draw)
    assert random.random() == py_draw
    assert torch.equal(second(dict(sample))["image"], expected)


# ------------------------------------------------------------------------------------------------ lock and temps
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from bundle.run_identity import claim_output_dir
    claim_output_dir(sys.argv[2], sys.argv[3])
    print("holding", flush=True)
    time.sleep(120)
""")


def test_second_process_is_refused_with_the_holder_and_a_crash_frees_the_folder(tmp_path):
    out, model = tmp_path / "eval", tmp_path / "models" / "model.pt"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, str(out), str(model)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        with pytest.raises(RunInUseError) as e:
            claim_output_dir(str(out), str(tmp_path / "elsewhere.pt"))
        msg = str(e.value)
        assert f"pid {p.pid} on host" in msg and " since " in msg and "--output_dir" in msg and str(out) in msg
        with pytest.raises(RunInUseError, match=r"model\.pt is in use by another training.*--best_model_path"):
            claim_output_dir(str(tmp_path / "other_eval"), str(model))  # same best model path, other folder
        release_lock(tmp_path / "other_eval" / LOCK_FILE)
    finally:
        p.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        p.wait()
    claim_output_dir(str(out), str(model))
    release_lock(out / LOCK_FILE)
    release_lock(model_lock_path(str(model)))


ORPHAN = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from bundle.utils.atomic import atomic_path
    with atomic_path(sys.argv[2]) as tmp:
        open(tmp, "w").write("half")
        print(tmp, flush=True)
        os._exit(9)  # killed mid-write: the temp file stays
""")


def test_orphaned_temp_files_are_removed_at_start_and_live_ones_kept(tmp_path):
    out = tmp_path / "eval"
    (out / "checkpoints").mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", ORPHAN, ROOT, str(out / "checkpoints" / "checkpoint_epoch=3.pt")],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert os.path.isfile(dead) and temp_file_owner(dead)[0] > 0
    with atomic_path(out / "run.json") as live:  # a write in progress in this (live) process
        open(live, "w").write("x")
        other_host_new = out / ".summary.json.tmp-123@otherhost.abcdefgh.tmp"
        other_host_old = out / ".summary.json.tmp-124@otherhost.abcdefgh.tmp"
        unrelated = out / ".notes.tmp"
        for f in (other_host_new, other_host_old, unrelated):
            f.write_text("x")
        old = time.time() - 48 * 3600
        os.utime(other_host_old, (old, old))
        model_dir = tmp_path / "models"
        model_dir.mkdir()
        model_orphan = model_dir / f".model.pt.tmp-{temp_file_owner(dead)[0]}@{temp_file_owner(dead)[1]}.zzzzzzzz.tmp"
        model_orphan.write_text("x")
        removed = claim_output_dir(str(out), str(model_dir / "model.pt"))["removed"]
        assert sorted(removed) == sorted([dead, str(other_host_old), str(model_orphan)])
        assert os.path.isfile(live) and other_host_new.is_file() and unrelated.is_file()
    assert (out / "run.json").read_text() == "x"
    release_lock(out / LOCK_FILE)
    release_lock(model_lock_path(str(model_dir / "model.pt")))
    assert remove_stale_temp_files(out) == []


def test_temp_names_carry_pid_and_host_and_writes_stay_atomic(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        pid, host = temp_file_owner(tmp)
        assert pid == os.getpid() and host and os.path.basename(tmp).startswith(".a.json.tmp-")
    long_name = "x" * 250  # the temp name stays within NAME_MAX
    write_text_atomic(tmp_path / long_name, "ok")
    assert (tmp_path / long_name).read_text() == "ok" and sorted(os.listdir(tmp_path)) == ["a.json", long_name]


# ------------------------------------------------------------------------------------------------ empty validation
def test_empty_validation_split_fails_before_training(tmp_path, tiny_datalist):
    from monai.bundle import ConfigParser

    from bundle.data.datalist import DatalistError

    d = json.loads(open(tiny_datalist).read())
    d["validation"] = []
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(d))
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.yaml"))
    parser.update({"bundle_root": ROOT, "datalist_file": str(path), "output_dir": str(tmp_path / "eval")})
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("datalist")  # resolved while the trainer is built, before any epoch
    err = e.value
    while err is not None and not isinstance(err, DatalistError):
        err = err.__cause__
    assert err is not None and "required split 'validation' is empty" in str(err) and str(path) in str(err)
