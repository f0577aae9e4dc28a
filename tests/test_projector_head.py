"""The alignment projector head (``aligner="projector"``, the paper preset's default): a learned head on the fused
per-class and per-patch features that turns the cross-attention into the map L_AL compares with the human masks."""

import pytest
import torch

from bundle.export import ATOL, compare, export_onnx, trace_network
from bundle.losses import AlignerLoss, AlignmentLoss
from bundle.networks import (
    PAPER_PRESET,
    ProjectorAligner,
    build_aligner_vlm,
    build_from_checkpoint,
    network_config,
    write_network_config,
)
from bundle.utils.atomic import torch_save_atomic

TINY = {"image_size": 64, "vit_layers": 1, "aligner": "projector"}
HEAD = ("aligner.query.0.weight", "aligner.query.0.bias", "aligner.query.2.weight", "aligner.query.2.bias")


def _net(**kw):
    torch.manual_seed(0)
    return build_aligner_vlm("demo", **{**TINY, **kw})


def _perturb_head(net, scale=0.5):
    """Give the zero-initialised last layer weights, so that the head changes the map."""
    torch.manual_seed(1)
    with torch.no_grad():
        net.aligner.query[-1].weight.normal_(0, scale)
        net.aligner.query[-1].bias.normal_(0, scale)
    return net


def test_shapes_range_and_identity_at_initialisation():
    net = _net().eval()
    x = torch.rand(3, 1, 64, 64)
    out = net(x)
    assert out["attn_refined"].shape == out["attn"].shape == (3, 3, 4, 4) and out["logits"].shape == (3, 3)
    p = out["attn_refined"]
    # zero-initialised last layer: the head starts as the max_norm aligner (M / max M)
    torch.testing.assert_close(p, out["attn"] / out["attn"].amax(dim=(-2, -1), keepdim=True), atol=1e-6, rtol=1e-5)
    _perturb_head(net)
    p = net(x)["attn_refined"]
    assert not torch.allclose(p, out["attn"] / out["attn"].amax(dim=(-2, -1), keepdim=True), atol=1e-3)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    torch.testing.assert_close(p.amax(dim=(-2, -1)), torch.ones(3, 3))  # max 1 in every map
    sub = net(x, classes=[2])["attn_refined"]  # the class-subset forward goes through the head too
    assert sub.shape == (3, 1, 4, 4) and float(sub.min()) >= 0.0 and float(sub.max()) <= 1.0


def test_extreme_attention_stays_in_range():
    head = ProjectorAligner(8, 4)
    torch.manual_seed(0)
    torch.nn.init.normal_(head.query[-1].weight, std=50.0)
    m = torch.softmax(torch.randn(2, 3, 5, 5) * 30, dim=-1)  # near one-hot maps, many exact zeros after underflow
    p = head(m, torch.randn(2, 3, 8), torch.randn(2, 25, 8))
    assert torch.isfinite(p).all() and float(p.min()) >= 0.0 and float(p.max()) <= 1.0


def test_alignment_loss_gradients_reach_every_head_parameter():
    net = _net().train()
    x = torch.rand(4, 1, 64, 64)
    mask = torch.zeros(4, 3, 64, 64)
    mask[:, :, 8:40, 16:48] = 1.0
    select = torch.ones(4, 3, dtype=torch.bool)
    loss_fn = AlignmentLoss()
    opt = torch.optim.SGD(net.aligner.parameters(), lr=0.5)
    names = dict(net.named_parameters())

    loss_fn(net(x)["attn_refined"], mask, select).backward()
    # step 1: L_AL reaches the zero-initialised last layer (the rest of the head sits behind its zero weights)
    assert float(names["aligner.query.2.weight"].grad.abs().sum()) > 0
    assert float(names["aligner.query.2.bias"].grad.abs().sum()) > 0
    opt.step()
    opt.zero_grad()
    loss_fn(net(x)["attn_refined"], mask, select).backward()
    for name, p in net.aligner.named_parameters():  # step 2: every parameter of the head
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # ... and L_AL still moves the attention itself (through M), not only the head
    assert float(names["layers.0.cross_attn.in_proj_weight"].grad.abs().sum()) > 0

    # L_CE alone never touches the alignment head
    net.zero_grad()
    out = net(x)
    AlignerLoss(lambda_al=0.0)(out, torch.ones(4, 3), mask, torch.zeros(4, 3))["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in net.aligner.parameters())


def test_head_is_in_the_state_dict_and_the_sidecar_round_trips(tmp_path):
    net = _perturb_head(_net(aligner_dim=24)).eval()
    state = net.state_dict()
    assert all(k in state for k in (*HEAD, "aligner.key.weight", "aligner.key.bias"))
    assert state["aligner.query.2.weight"].shape == (24, 192) and state["aligner.key.weight"].shape == (24, 192)
    path = str(tmp_path / "model.pt")
    torch_save_atomic(path, state)
    write_network_config(path, net)
    cfg = network_config(net)
    assert cfg["aligner"] == "projector" and cfg["aligner_dim"] == 24
    rebuilt = build_from_checkpoint(path)
    assert network_config(rebuilt) == cfg
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)["attn_refined"], net(x)["attn_refined"])
    # a network without the head does not take these weights silently
    with pytest.raises(RuntimeError, match="aligner.query"):
        _net(aligner="max_norm").load_state_dict(state)


class _Maps(torch.nn.Module):
    """The refined maps as the traced output (the exported graph itself returns probabilities only)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net.forward_features(x)
        return torch.cat([torch.sigmoid(out["logits"]), out["attn_refined"].flatten(1)], dim=1)


def test_traced_network_with_the_head_equals_eager(tmp_path):
    net = _perturb_head(_net()).eval()
    images = [torch.rand(1, 1, 64, 64), torch.rand(4, 1, 64, 64)]
    maps = _Maps(net).eval()
    traced = trace_network(maps, [2, 1, 64, 64])  # traced at batch 2, run at 1 and 4
    assert max(compare(maps, traced, images)) <= ATOL

    path = str(tmp_path / "model.pt")  # the export path: the inference network rebuilt from the checkpoint
    torch_save_atomic(path, net.state_dict())
    write_network_config(path, net)
    eager = build_from_checkpoint(path, inference=True)
    assert max(compare(eager, trace_network(eager, [1, 1, 64, 64]), images)) <= ATOL
    try:
        import onnxruntime  # noqa: F401

        from bundle.export import run_onnx
    except ImportError:
        return
    onnx_path = export_onnx(maps, str(tmp_path / "maps.onnx"), [1, 1, 64, 64])
    assert max(compare(maps, lambda x: run_onnx(onnx_path, x), images)) <= ATOL


def test_parameter_counts_of_the_presets():
    """docs/model.md states these: k = min(d, 256); 3 Linear layers (d x d, d x k, d x k) with biases."""
    assert PAPER_PRESET["aligner"] == "projector"
    assert sum(p.numel() for p in ProjectorAligner(192).parameters()) == 111_168  # demo width
    assert sum(p.numel() for p in ProjectorAligner(768).parameters()) == 984_320  # paper width
    with pytest.raises(ValueError, match="aligner='bogus'"):
        _net(aligner="bogus")
