"""Losses of the alignment method (shared/docs/method.md): L_total = L_CE + lambda * L_AL.

L_AL, per selected (sample, class) pair, with Y the human mask and P the refined model attention on the same grid:

    L = 1 - (2 sum(Y P) + alpha + eps) / (sum(Y + P) + (w_fp - 1) sum(P (1 - Y)) + alpha + eps)

a Dice loss whose denominator counts the soft false positives w_fp times instead of once. Sums run over all pixels
of the pair's map. Written by hand because MONAI's DiceLoss has no false-positive weight and reduces over channels,
not over an arbitrary selection of (sample, class) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESOLUTIONS = ("mask", "attention")
REDUCTIONS = ("mean", "sum", "none")
CE_REDUCTIONS = ("mean", "sum_classes")


def _as_flags(x: torch.Tensor) -> torch.Tensor:
    """A (B, C) selection given as bool, {0, 1} floats or ints -> bool."""
    return x if x.dtype == torch.bool else x > 0.5


def _interp_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """(n_in, n_out) matrix of 1-D linear interpolation exactly as F.interpolate(bilinear, align_corners=False)."""
    eye = torch.eye(n_in, dtype=dtype, device=device).view(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False).view(n_in, n_out)


def _upsampled_sums(p: torch.Tensor, y: torch.Tensor):
    """sum(Y U(P)), sum(U(P)), sum(Y) for P (K, h, w) bilinearly upsampled (U) to Y's (K, H, W) grid.

    Bilinear upsampling is separable and linear, U(P) = Rh^T P Rw, so sum(Y U(P)) = sum(P (Rh Y Rw^T)) and
    sum(U(P)) = sum(P (Rh 1)(Rw 1)^T). Same values as upsampling then summing, but neither the forward nor the
    backward pass touches a (K, H, W) tensor that depends on P: ~10x faster at 128-224 px masks on CPU.
    """
    (h, w), (hh, ww) = p.shape[-2:], y.shape[-2:]
    rh = _interp_matrix(h, hh, p.dtype, p.device)  # (h, H)
    rw = _interp_matrix(w, ww, p.dtype, p.device)  # (w, W)
    y_back = rh @ y @ rw.T  # (K, h, w): the adjoint of the upsampling applied to Y (constant, no grad)
    inter = (p * y_back).sum((-2, -1))
    sum_p = (p * torch.outer(rh.sum(1), rw.sum(1))).sum((-2, -1))
    return inter, sum_p, y.sum((-2, -1))


class AlignmentLoss(nn.Module):
    """L_AL: Dice with false-positive suppression over the selected (sample, class) pairs.

    Args:
        w_fp: weight of the soft false positives P * (1 - Y) in the denominator (1 = plain soft Dice).
        alpha, eps: smoothing added to numerator and denominator (alpha = 1 keeps an empty-vs-empty pair at loss 0).
        reduction: "mean" over the selected pairs (default, method.md), "sum" over them, or "none": a (B, C) tensor
            with the per-pair loss and 0 where not selected.
        resolution: where the comparison happens when P (h, w) and Y (H, W) differ. "mask" (default): P is
            upsampled bilinearly (align_corners=False) to (H, W); it stays in [0, 1]. "attention": Y is
            area-averaged down to (h, w) (soft mask values = covered fraction of each patch).

    forward(P (B, C, h, w), Y (B, C, H, W), select (B, C) bool/0-1) -> scalar (or (B, C) for "none").
    The caller makes ``select`` = positive & annotated & in the p-subset. No selected pair -> a zero connected to
    the graph of P (so backward() and DDP gradient reduction still work).
    """

    def __init__(
        self, w_fp: float = 2.0, alpha: float = 1.0, eps: float = 1e-6, reduction: str = "mean", resolution="mask"
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"AlignmentLoss reduction={reduction!r}; choose one of {REDUCTIONS}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"AlignmentLoss resolution={resolution!r}; choose one of {RESOLUTIONS}")
        if w_fp < 0 or alpha < 0 or eps < 0:
            raise ValueError(f"AlignmentLoss needs w_fp, alpha, eps >= 0, got {w_fp}, {alpha}, {eps}")
        self.w_fp, self.alpha, self.eps = float(w_fp), float(alpha), float(eps)
        self.reduction, self.resolution = reduction, resolution

    def forward(self, pred: torch.Tensor, target: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 4 or target.ndim != 4 or pred.shape[:2] != target.shape[:2]:
            raise ValueError(
                f"AlignmentLoss expects attention (B, C, h, w) and masks (B, C, H, W) with the same B, C; got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if tuple(select.shape) != tuple(pred.shape[:2]):
            raise ValueError(
                f"AlignmentLoss select must be (B, C) = {tuple(pred.shape[:2])}, got {tuple(select.shape)}"
            )
        sel = _as_flags(select.to(pred.device))
        if not bool(sel.any()):
            zero = pred.sum() * 0.0
            return zero.expand(pred.shape[:2]).clone() if self.reduction == "none" else zero
        # Only the selected maps are resized: (K, 1, h, w). Sums over up to 224^2 pixels lose too much in
        # float16/bfloat16 (AMP), so the loss is computed in at least float32.
        dtype = torch.promote_types(pred.dtype, torch.float32)
        p = pred[sel].to(dtype)
        y = target.to(device=pred.device, dtype=dtype)[sel]
        if p.shape[-2:] != y.shape[-2:] and self.resolution == "mask":
            inter, sum_p, sum_y = _upsampled_sums(p, y)
        else:
            if p.shape[-2:] != y.shape[-2:]:
                y = F.interpolate(y.unsqueeze(1), size=p.shape[-2:], mode="area").squeeze(1)
            inter, sum_p, sum_y = (y * p).sum((-2, -1)), p.sum((-2, -1)), y.sum((-2, -1))
        per_pair = self.dice_fp(inter, sum_p, sum_y)
        if self.reduction == "mean":
            return per_pair.mean()
        if self.reduction == "sum":
            return per_pair.sum()
        out = torch.zeros(pred.shape[:2], dtype=dtype, device=pred.device) + pred.sum().to(dtype) * 0.0
        return out.masked_scatter(sel, per_pair)

    def dice_fp(self, inter: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor) -> torch.Tensor:
        """Per-pair loss from sum(Y P), sum(P), sum(Y); sum(P (1 - Y)) = sum(P) - sum(Y P)."""
        fp = sum_p - inter
        num = 2.0 * inter + self.alpha + self.eps
        den = sum_y + sum_p + (self.w_fp - 1.0) * fp + self.alpha + self.eps
        return 1.0 - num / den


class AlignerLoss(nn.Module):
    """L_total = L_CE + lambda_al * L_AL on the AlignerVLM output dict.

    forward(output {"logits" (B, C), "attn_refined" (B, C, h, w)}, label (B, C) with 1/0 and -1 = unknown,
    attn_mask (B, C, H, W), align (B, C)) -> {"loss", "loss_ce", "loss_al", "n_aligned"}.

    L_CE: BCE-with-logits over the known labels only. ``ce_reduction="mean"`` (default) averages over the known
    (sample, class) entries; method.md writes a sum over classes (then a mean over samples), available as
    ``"sum_classes"``. The mean is the default because it keeps L_CE per decision (~0.69 at chance) on the same scale
    as L_AL (in [0, 1] per pair) whatever C is, so lambda = 1 weighs the two terms as in the paper's single-finding
    models (C = 1, where both reductions coincide).
    L_AL: AlignmentLoss over the pairs with align = 1 AND label = 1 (a negative or unknown pair is never aligned,
    even if the caller flagged it). ``n_aligned`` (long scalar, no grad) counts those pairs.
    ``pos_weight``: optional (C,) weight of the positives in the BCE (class imbalance).
    """

    def __init__(
        self,
        lambda_al: float = 1.0,
        w_fp: float = 2.0,
        alpha: float = 1.0,
        eps: float = 1e-6,
        pos_weight=None,
        ce_reduction: str = "mean",
        resolution: str = "mask",
    ):
        super().__init__()
        if ce_reduction not in CE_REDUCTIONS:
            raise ValueError(f"AlignerLoss ce_reduction={ce_reduction!r}; choose one of {CE_REDUCTIONS}")
        if lambda_al < 0:
            raise ValueError(f"AlignerLoss lambda_al={lambda_al} must be >= 0")
        self.lambda_al = float(lambda_al)
        self.ce_reduction = ce_reduction
        self.alignment = AlignmentLoss(w_fp=w_fp, alpha=alpha, eps=eps, reduction="mean", resolution=resolution)
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32).flatten()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def classification(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if tuple(label.shape) != tuple(logits.shape):
            raise ValueError(f"AlignerLoss label must match logits {tuple(logits.shape)}, got {tuple(label.shape)}")
        label = label.to(device=logits.device, dtype=logits.dtype)
        known = label >= 0  # -1 (and NaN) = unknown
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device, logits.dtype)
        target = label.clamp(0, 1).nan_to_num(0.0)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
        ce = torch.where(known, ce, torch.zeros_like(ce))  # where(), not *: keeps a NaN/inf at unknowns out of grads
        if not bool(known.any()):
            return logits.sum() * 0.0
        if self.ce_reduction == "mean":
            return ce.sum() / known.sum()
        rows = known.any(dim=1)
        return ce.sum(dim=1)[rows].mean()

    def forward(self, output: dict, label: torch.Tensor, attn_mask: torch.Tensor, align: torch.Tensor) -> dict:
        logits, attn = output["logits"], output["attn_refined"]
        loss_ce = self.classification(logits, label)
        select = _as_flags(align.to(logits.device)) & (label.to(logits.device) == 1)
        loss_al = self.alignment(attn, attn_mask, select)  # computed even at lambda = 0, so that it can be logged
        return {
            "loss": loss_ce + self.lambda_al * loss_al,
            "loss_ce": loss_ce,
            "loss_al": loss_al,
            "n_aligned": select.sum().detach(),
        }
