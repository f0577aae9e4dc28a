"""AlignmentLoss (L_AL) and AlignerLoss (L_CE + lambda L_AL) against hand-computed values, gradients, masking."""

import math

import pytest
import torch

from bundle.losses import AlignerLoss, AlignmentLoss


def _pairs():
    """Two 2x2 pairs computed by hand (w_fp = 2, alpha = 1, eps = 0):

    pair A: P = [[1, .5], [0, 0]], Y = [[1, 0], [0, 0]]: sum(YP) = 1, sum(Y+P) = 2.5, FP = .5
            loss = 1 - (2 + 1) / (2.5 + 1 * .5 + 1) = 1 - 3/4 = 0.25
    pair B: P = .5 everywhere, Y = bottom row: sum(YP) = 1, sum(Y+P) = 4, FP = 1
            loss = 1 - (2 + 1) / (4 + 1 + 1) = 0.5
    """
    p = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    y = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    p[0, 0] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    y[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p[0, 1] = 0.5
    y[0, 1] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    p[0, 2] = torch.tensor([[0.9, 0.1], [0.3, 0.7]])  # never selected: must not count
    y[0, 2] = 1.0
    return p, y, torch.tensor([[True, True, False]])


def test_alignment_loss_hand_computed():
    p, y, sel = _pairs()
    loss = AlignmentLoss(w_fp=2.0, alpha=1.0, eps=0.0)
    assert loss(p, y, sel).item() == pytest.approx((0.25 + 0.5) / 2, abs=1e-12)
    per_pair = AlignmentLoss(w_fp=2.0, alpha=1.0, eps=0.0, reduction="none")(p, y, sel)
    assert per_pair[0].tolist() == pytest.approx([0.25, 0.5, 0.0], abs=1e-12)
    assert AlignmentLoss(w_fp=2.0, alpha=1.0, eps=0.0, reduction="sum")(p, y, sel).item() == pytest.approx(0.75)
    # w_fp = 1 is the plain soft Dice: A: 1 - 3/3.5, B: 1 - 3/5.
    plain = AlignmentLoss(w_fp=1.0, alpha=1.0, eps=0.0, reduction="none")(p, y, sel)
    assert plain[0, :2].tolist() == pytest.approx([1 - 3 / 3.5, 1 - 3 / 5], abs=1e-12)
    # select given as 0/1 floats behaves like bool flags
    assert loss(p, y, sel.double()).item() == pytest.approx(0.375, abs=1e-12)


def test_alignment_loss_upsamples_attention_to_mask():
    """P 2x2 = [[1, 0], [0, 0]] bilinearly upsampled (align_corners=False) to 4x4 is r_i * r_j with
    r = [1, .75, .25, 0]; Y = the top-left 2x2 block. sum(YP) = 1.75^2 = 3.0625, sum(P) = 2^2 = 4, sum(Y) = 4,
    FP = 4 - 3.0625 = .9375: loss = 1 - (6.125 + 1) / (8 + .9375 + 1) = 1 - 7.125 / 9.9375."""
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    y = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    y[..., :2, :2] = 1.0
    sel = torch.ones(1, 1, dtype=torch.bool)
    got = AlignmentLoss(eps=0.0)(p, y, sel).item()
    assert got == pytest.approx(1 - 7.125 / 9.9375, abs=1e-12)
    # resolution="attention": Y area-pooled to 2x2 is exactly P -> perfect Dice, loss 0.
    assert AlignmentLoss(eps=0.0, resolution="attention")(p, y, sel).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("grid,size", [((8, 8), (128, 128)), ((14, 14), (224, 224)), ((3, 5), (10, 17))])
def test_alignment_loss_matches_explicit_upsampling(grid, size):
    """The loss (computed without materialising the upsampled maps) equals upsample-then-sum, values and grads."""
    torch.manual_seed(0)
    p = torch.rand(2, 3, *grid, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, *size, dtype=torch.float64)  # soft masks too
    y[0, 0] = (y[0, 0] > 0.5).double()
    sel = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    got = AlignmentLoss(w_fp=2.0, alpha=1.0, eps=1e-6, reduction="none")(p, y, sel)
    (g_got,) = torch.autograd.grad(got.sum(), p)
    up = torch.nn.functional.interpolate(p, size=size, mode="bilinear", align_corners=False)
    inter, tot, fp = (y * up).sum((-2, -1)), (y + up).sum((-2, -1)), (up * (1 - y)).sum((-2, -1))
    ref = (1 - (2 * inter + 1 + 1e-6) / (tot + fp + 1 + 1e-6)) * sel
    (g_ref,) = torch.autograd.grad(ref.sum(), p)
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(g_got, g_ref, atol=1e-12)


def test_alignment_loss_gradcheck():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(2, 3, 6, 6) > 0.5).double()
    sel = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    for res in ("mask", "attention"):
        fn = AlignmentLoss(w_fp=2.0, alpha=1.0, eps=1e-6, resolution=res)
        assert torch.autograd.gradcheck(lambda t: fn(t, y, sel), (p,), eps=1e-6, atol=1e-6)
    fn = AlignmentLoss(reduction="none")
    assert torch.autograd.gradcheck(lambda t: fn(t, y, sel), (p,), eps=1e-6, atol=1e-6)


def test_alignment_loss_zero_with_graph_when_nothing_selected():
    p = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = torch.ones(2, 3, 8, 8)
    loss = AlignmentLoss()(p, y, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_alignment_loss_false_positive_weight():
    """The same overlap with more attention outside the mask costs more, and more so with a larger w_fp."""
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :2] = 1
    tight = y.clone()
    spill = y.clone()
    spill[..., 2:, 2:] = 0.8  # extra false-positive mass
    sel = torch.ones(1, 1)
    for w in (1.0, 2.0, 4.0):
        fn = AlignmentLoss(w_fp=w)
        assert fn(spill, y, sel) > fn(tight, y, sel)
    assert (
        AlignmentLoss(w_fp=4.0)(spill, y, sel)
        > AlignmentLoss(w_fp=2.0)(spill, y, sel)
        > AlignmentLoss(w_fp=1.0)(spill, y, sel)
    )
    # a perfect map reaches 0 with alpha smoothing
    assert AlignmentLoss()(tight, y, sel).item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_loss_bad_shapes():
    with pytest.raises(ValueError, match="select must be"):
        AlignmentLoss()(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="same B, C"):
        AlignmentLoss()(torch.rand(2, 3, 4, 4), torch.rand(2, 2, 4, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="resolution"):
        AlignmentLoss(resolution="pixels")


def _output(logits, attn):
    return {"logits": logits, "attn": attn, "attn_refined": attn}


def test_aligner_loss_hand_computed_ce_and_total():
    """logits [0, ln 3, 5], labels [1, 0, -1]: BCE = ln 2 and ln 4 (unknown ignored) -> mean (ln 2 + ln 4) / 2."""
    p, y, _ = _pairs()
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]], dtype=torch.float64)
    label = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    align = torch.tensor([[1.0, 1.0, 1.0]])  # pair B is negative and pair C unknown: only A (loss 0.25) is aligned
    fn = AlignerLoss(lambda_al=0.5, w_fp=2.0, alpha=1.0, eps=0.0)
    out = fn(_output(logits, p), label, y, align)
    ce = (math.log(2.0) + math.log(4.0)) / 2
    assert out["loss_ce"].item() == pytest.approx(ce, abs=1e-12)
    assert out["loss_al"].item() == pytest.approx(0.25, abs=1e-12)
    assert out["loss"].item() == pytest.approx(ce + 0.5 * 0.25, abs=1e-12)
    assert int(out["n_aligned"]) == 1
    # method.md's sum over classes (mean over samples): ln 2 + ln 4
    summed = AlignerLoss(ce_reduction="sum_classes", eps=0.0)(_output(logits, p), label, y, align)
    assert summed["loss_ce"].item() == pytest.approx(math.log(2.0) + math.log(4.0), abs=1e-12)


def test_aligner_loss_unknown_labels_do_not_matter():
    torch.manual_seed(0)
    attn = torch.rand(4, 3, 4, 4)
    mask = (torch.rand(4, 3, 16, 16) > 0.5).float()
    label = torch.tensor([[1, -1, 0], [-1, -1, 1], [0, 1, -1], [1, 1, 1]], dtype=torch.float32)
    align = torch.ones(4, 3)
    logits = torch.randn(4, 3, requires_grad=True)
    fn = AlignerLoss()
    base = fn(_output(logits, attn), label, mask, align)
    changed = logits.detach().clone()
    changed[label < 0] += torch.tensor([100.0, -50.0, 7.0, 1e4])
    other = fn(_output(changed, attn), label, mask, align)
    assert other["loss_ce"].item() == pytest.approx(base["loss_ce"].item(), abs=1e-6)
    base["loss"].backward()
    assert torch.all(logits.grad[label < 0] == 0) and torch.all(logits.grad[label >= 0] != 0)
    # every known entry unknown -> a graph-connected zero
    none = fn(_output(logits, attn), torch.full((4, 3), -1.0), mask, torch.zeros(4, 3))
    assert none["loss"].item() == 0.0 and none["loss"].requires_grad and int(none["n_aligned"]) == 0


def test_aligner_loss_gradient_reaches_attention_only_for_aligned_pairs():
    attn = torch.rand(2, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 3, 8, 8)
    mask[..., 2:5, 2:5] = 1
    label = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 1.0]])
    align = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # only (0,0) and (1,2) are positive and aligned
    out = AlignerLoss()(_output(torch.zeros(2, 3), attn), label, mask, align)
    out["loss"].backward()
    touched = attn.grad.abs().sum((-2, -1)) > 0
    assert touched.tolist() == [[True, False, False], [False, False, True]]
    assert int(out["n_aligned"]) == 2


def test_aligner_loss_pos_weight_and_lambda():
    logits = torch.zeros(1, 2)
    label = torch.tensor([[1.0, 0.0]])
    attn, mask, align = torch.rand(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.ones(1, 2)
    plain = AlignerLoss()(_output(logits, attn), label, mask, align)
    weighted = AlignerLoss(pos_weight=[3.0, 1.0])(_output(logits, attn), label, mask, align)
    assert weighted["loss_ce"].item() == pytest.approx((3 * math.log(2) + math.log(2)) / 2, abs=1e-6)
    assert plain["loss_ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    no_al = AlignerLoss(lambda_al=0.0)(_output(logits, attn), label, mask, align)
    assert no_al["loss"].item() == pytest.approx(no_al["loss_ce"].item())
    assert no_al["loss_al"].item() == pytest.approx(plain["loss_al"].item()) and no_al["loss_al"].item() > 0
