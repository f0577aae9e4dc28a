"""MONAI engines whose iteration feeds the attention masks and alignment flags to the loss.

MONAI's default iteration calls ``loss_function(pred, label)`` with two arguments only (extra batch
keys from ``prepare_batch`` go to the *network*), so L_AL, which needs the human masks and the
per-(sample, class) alignment flags, needs its own iteration. Everything else (events, handlers,
decollation, AMP, DDP) is MONAI's.
"""
from __future__ import annotations

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["AlignmentTrainer", "AlignmentEvaluator", "BATCH_KEYS"]

# Keys moved to the device for every batch (besides image and label).
BATCH_KEYS = ("attn_mask", "attn_available", "align", "index")


def _to_device(batch: dict, device, non_blocking: bool) -> dict:
    out = {}
    for k in (Keys.IMAGE, Keys.LABEL, *BATCH_KEYS):
        if k in batch:
            v = batch[k]
            v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)
            out[k] = v.to(device, non_blocking=non_blocking)
    return out


def _model_outputs(out) -> dict:
    if isinstance(out, torch.Tensor):  # an inference wrapper returning probabilities only
        return {"pred": out}
    return {"pred": torch.sigmoid(out["logits"].float()), "logits": out["logits"], **{
        k: out[k] for k in ("attn", "attn_refined") if k in out}}


class AlignmentTrainer(SupervisedTrainer):
    """SupervisedTrainer whose loss is ``loss_function(net_out, label, attn_mask, align) -> dict``.

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (sigmoid probabilities), ``loss``
    (total), ``loss_ce``, ``loss_al`` and ``n_aligned`` (python floats for the three last), so that
    StatsHandler / MLFlowHandler can log L_CE and L_AL separately.
    """

    def __init__(self, *args, grad_clip: float | None = None, **kwargs):
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.grad_clip = grad_clip

    def _iteration(self, engine: "AlignmentTrainer", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        b = _to_device(batchdata, engine.state.device, engine.non_blocking)
        image, label = b[Keys.IMAGE], b[Keys.LABEL].float()
        mask = b.get("attn_mask")
        align = b.get("align", torch.zeros_like(label))
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward():
            out = engine.inferer(image, engine.network)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(out, label, mask, align)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return out, losses

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                out, losses = forward()
            engine.scaler.scale(losses["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip:
                engine.scaler.unscale_(engine.optimizer)
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            out, losses = forward()
            losses["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
            engine.optimizer.step()
        engine.state.output.update({k: v.detach() for k, v in _model_outputs(out).items()})
        engine.state.output[Keys.LOSS] = losses["loss"].detach()
        for k in ("loss_ce", "loss_al", "n_aligned"):
            if k in losses:
                engine.state.output[k] = float(losses[k].detach()) if torch.is_tensor(losses[k]) else float(losses[k])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class AlignmentEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator that keeps the attention maps, masks and sample indices in the output.

    ``engine.state.output``: ``pred`` (B, C) probabilities, ``label``, ``attn`` (B, C, h, w),
    ``attn_mask`` (B, C, H, W), ``attn_available`` (B, C), ``index`` (B,), batched (no decollation),
    which is what the fairness/alignment metrics in ``bundle.handlers`` consume.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)

    def _iteration(self, engine: "AlignmentEvaluator", batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        b = _to_device(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = dict(b)
        net = engine.network
        # An inference wrapper (AlignerVLMInference: forward -> probabilities, for Deploy/verify_net_in_out)
        # still gives the evaluator its attention maps through forward_features.
        inner = getattr(net, "module", net)
        if getattr(inner, "return_probs", False) and hasattr(inner, "forward_features"):
            net = inner.forward_features
        with engine.mode(engine.network):
            if engine.amp:
                with torch.autocast("cuda", **engine.amp_kwargs):
                    out = engine.inferer(b[Keys.IMAGE], net)
            else:
                out = engine.inferer(b[Keys.IMAGE], net)
        engine.state.output.update({k: v.detach().float() for k, v in _model_outputs(out).items()})
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
