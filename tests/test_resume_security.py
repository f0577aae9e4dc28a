"""Resuming never runs code from a checkpoint file: a planted pickle payload is refused, a real checkpoint loads."""

import os

import pytest
import torch
from ignite.engine import Engine

from bundle.handlers import ResumeCheckpoint


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # what an attacker plants: unpickling calls os.system / open / ...
        return (open, (self.marker, "w"))


def _engine(max_epochs: int = 3) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = max_epochs
    return engine


def test_planted_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save({"network": _Payload(str(marker))}, ckpt_dir / "checkpoint_epoch=9.pt")
    net = torch.nn.Linear(2, 2)
    resume = ResumeCheckpoint(str(ckpt_dir), {"network": net})
    with pytest.raises(RuntimeError, match=r"checkpoint_epoch=9\.pt: not a plain training checkpoint, refused"):
        resume.load(_engine())
    assert not marker.exists(), "the payload ran"


def test_saved_state_resumes_with_weights_only(tmp_path):
    net, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    trainer = _engine(5)
    trainer.state.epoch, trainer.state.iteration, trainer.state.epoch_length = 2, 20, 10
    ResumeCheckpoint(str(tmp_path), {"network": net, "optimizer": opt, "trainer": trainer}).save(trainer)
    assert os.listdir(tmp_path) == ["checkpoint_epoch=2.pt"]

    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    fresh = _engine(5)
    ResumeCheckpoint(str(tmp_path), {"network": other, "optimizer": opt2, "trainer": fresh}).load(fresh)
    assert torch.equal(other.weight, net.weight) and fresh.state.epoch == 2 and fresh.state.iteration == 20
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
