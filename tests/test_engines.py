"""The alignment engines in process: a training iteration equals a hand-written step, the evaluator's output."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor

from bundle.engines import BATCH_KEYS, AlignmentEvaluator, AlignmentPrepareBatch, AlignmentTrainer
from bundle.losses import AlignerLoss
from bundle.networks import AlignerVLM
from tests.test_networks import TINY as TINY_NET

CLASSES = ("a", "b", "c")
# The tiny network of test_networks (32 px images, 8 px patches -> 4 x 4 attention maps); dropout stays on, so the
# order of random draws matters.
TINY = dict(classes=CLASSES, **TINY_NET)
TRAIN_KEYS = ["image", "label", "pred", "logits", "attn", "attn_refined", "loss", "loss_ce", "loss_al", "n_aligned"]


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return AlignerVLM(**TINY)


def _batches(n_batches=2, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        label = (torch.rand(b, 3, generator=g) > 0.5).float()
        label[0] = 1.0
        label[1, 2] = -1.0  # an unknown label
        mask = torch.zeros(b, 3, 32, 32)
        mask[:, :, 4:12, 8:20] = 1.0
        mask[2] = 0.0  # a sample without human masks
        out.append(
            {
                "image": torch.randn(b, 1, 32, 32, generator=g),
                "label": label,
                "attn_mask": mask,
                "attn_available": (mask.flatten(2).amax(-1) > 0).float(),
                "align": torch.ones(b, 3),
                "index": torch.arange(b) + b * i,
            }
        )
    return out


def _trainer(net, opt, batches, loss_fn, **kwargs) -> AlignmentTrainer:
    return AlignmentTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=opt,
        loss_function=loss_fn,
        **kwargs,
    )


def _hand_step(net, opt, loss_fn, batch, grad_clip):
    """What one training iteration must do, written out: the reference for AlignmentTrainer."""
    net.train()
    opt.zero_grad(set_to_none=False)
    out = net(batch["image"])
    losses = loss_fn(out, batch["label"].float(), batch["attn_mask"], batch["align"])
    losses["loss"].backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return out, losses


@pytest.mark.parametrize("grad_clip", [0.05, None])
def test_training_iterations_equal_hand_written_steps(tiny_net, grad_clip):
    batches = _batches()
    loss_fn = AlignerLoss(lambda_al=1.0)

    torch.manual_seed(123)
    ref = copy.deepcopy(tiny_net)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_losses = []
    for batch in batches:
        out, losses = _hand_step(ref, ref_opt, loss_fn, batch, grad_clip)
        ref_losses.append((out, losses))

    torch.manual_seed(123)
    net = copy.deepcopy(tiny_net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = _trainer(net, opt, batches, loss_fn, grad_clip=grad_clip)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()

    assert len(outputs) == len(batches)
    for got, (out, losses), batch in zip(outputs, ref_losses, batches, strict=True):
        assert [str(k) for k in got] == TRAIN_KEYS
        assert torch.equal(got["loss"], losses["loss"].detach())
        assert got["loss_ce"] == float(losses["loss_ce"].detach()) and got["loss_al"] == float(
            losses["loss_al"].detach()
        )
        assert got["n_aligned"] == float(losses["n_aligned"]) > 0
        assert torch.equal(got["logits"], out["logits"].detach())
        assert torch.equal(got["pred"], torch.sigmoid(out["logits"].detach().float()))
        assert torch.equal(got["attn"], out["attn"].detach())
        assert torch.equal(got["image"], batch["image"]) and torch.equal(got["label"], batch["label"])
    for (k, a), (k2, b) in zip(ref.state_dict().items(), net.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k  # the same updated weights, bit for bit
    changed = [k for k, v in tiny_net.state_dict().items() if not torch.equal(v, net.state_dict()[k])]
    assert changed, "the optimizer step changed nothing"


def test_grad_clip_clips_before_the_step(tiny_net):
    """A tiny clip norm gives different weights than no clipping (the handler runs before the optimizer step)."""
    batches = _batches(n_batches=1)
    states = []
    for clip in (None, 1e-4):
        torch.manual_seed(5)
        net = copy.deepcopy(tiny_net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        _trainer(net, opt, batches, AlignerLoss(), grad_clip=clip).run()
        states.append(net.state_dict())
    k = "classifier.weight" if "classifier.weight" in states[0] else next(iter(states[0]))
    delta_free = (states[0][k] - tiny_net.state_dict()[k]).norm()
    delta_clip = (states[1][k] - tiny_net.state_dict()[k]).norm()
    assert delta_clip < delta_free


def test_evaluator_output_keys_and_shapes(tiny_net):
    batches = _batches(n_batches=2, b=3)
    evaluator = AlignmentEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=tiny_net)
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    evaluator.run()
    assert len(outputs) == 2
    o = outputs[0]
    expected = ["image", "label", "attn_mask", "attn_available", "align", "index", "pred", "logits", "attn"]
    assert [str(k) for k in o] == expected + ["attn_refined"]
    assert o["pred"].shape == o["logits"].shape == o["label"].shape == (3, 3)
    assert o["attn"].shape == o["attn_refined"].shape == (3, 3, 4, 4)
    assert o["attn_mask"].shape == (3, 3, 32, 32) and o["attn_available"].shape == (3, 3)
    assert o["index"].tolist() == [0, 1, 2] and outputs[1]["index"].tolist() == [3, 4, 5]
    assert torch.allclose(o["pred"], torch.sigmoid(o["logits"]))
    assert all(not v.requires_grad for v in o.values())
    tiny_net.eval()
    with torch.no_grad():
        ref = tiny_net(batches[0]["image"])
    assert torch.allclose(o["logits"], ref["logits"]) and torch.allclose(o["attn"], ref["attn"])


def test_evaluator_gets_attention_from_an_inference_wrapper(tiny_net):
    """A network whose forward returns probabilities (Deploy) still gives the evaluator its attention maps."""
    wrapper = AlignerVLM(**TINY, return_probs=True)
    wrapper.load_state_dict(tiny_net.state_dict())
    batches = _batches(n_batches=1)
    outs = {}
    for name, net in (("plain", tiny_net), ("wrapper", wrapper)):
        ev = AlignmentEvaluator(device="cpu", val_data_loader=batches, network=net)
        ev.run()
        outs[name] = ev.state.output
    assert torch.allclose(outs["plain"]["pred"], outs["wrapper"]["pred"])
    assert torch.allclose(outs["plain"]["attn"], outs["wrapper"]["attn"])


def test_prepare_batch_moves_alignment_inputs_as_kwargs():
    batch = _batches(n_batches=1)[0]
    batch["image"] = MetaTensor(batch["image"])
    batch["extra"] = "not moved"
    image, label, args, kwargs = AlignmentPrepareBatch()(batch, torch.device("cpu"), False)
    assert type(image) is torch.Tensor and torch.equal(image, batch["image"].as_tensor())
    assert torch.equal(label, batch["label"]) and args == ()
    assert list(kwargs) == list(BATCH_KEYS)
    assert all(torch.equal(kwargs[k], batch[k]) for k in BATCH_KEYS)
    no_label = {"image": batch["image"], "index": batch["index"]}
    image, label, args, kwargs = AlignmentPrepareBatch()(no_label)
    assert label is None and list(kwargs) == ["index"]


def test_trainer_rejects_gradient_accumulation(tiny_net):
    with pytest.raises(ValueError, match="accumulation"):
        _trainer(tiny_net, torch.optim.SGD(tiny_net.parameters(), lr=0.1), [], AlignerLoss(), accumulation_steps=2)
