"""MONAI engines whose iteration feeds the attention masks and alignment flags to the loss.

The batch goes through MONAI's ``prepare_batch`` extension point: :class:`AlignmentPrepareBatch` moves the image,
the label and the alignment inputs (``attn_mask``, ``attn_available``, ``align``, ``index``) to the device and
returns them as MONAI's 4-tuple ``(image, label, args, kwargs)``. Gradient clipping is a handler on MONAI's
``IterationEvents.BACKWARD_COMPLETED`` (fired between backward and the optimizer step). The iterations are still
overridden, minimally: MONAI's default iteration calls ``loss_function(pred, label)`` with two arguments only (the
extra batch keys from ``prepare_batch`` go to the *network*), so L_AL, which needs the human masks and the
per-(sample, class) alignment flags, needs its own iteration; and the evaluator must keep those keys and the
attention maps in its output for the metrics. The AMP steps in them are MONAI's, using the engine's ``scaler`` and
``amp_kwargs``. Everything else (events, handlers, decollation, DDP) is MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import CommonKeys as Keys

__all__ = ["AlignmentTrainer", "AlignmentEvaluator", "AlignmentPrepareBatch", "BATCH_KEYS"]

# Keys moved to the device for every batch (besides image and label).
BATCH_KEYS = ("attn_mask", "attn_available", "align", "index")


class AlignmentPrepareBatch(PrepareBatch):
    """``prepare_batch`` of the alignment engines: ``(image, label, (), {key: value for key in extra_keys})``.

    Every tensor is moved to ``device`` (MetaTensors become plain tensors); ``label`` is None and absent keys are
    left out when the batch has none. The returned kwargs are the alignment inputs: the engines give them to the
    loss and the output, not to the network.
    """

    def __init__(self, extra_keys: Sequence[str] = BATCH_KEYS) -> None:
        self.extra_keys = tuple(extra_keys)

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        moved = {}
        for k in (Keys.IMAGE, Keys.LABEL, *self.extra_keys):
            if k in batchdata:
                v = batchdata[k]
                v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)
                moved[k] = v.to(device, non_blocking=non_blocking, **kwargs)
        extra = {k: moved[k] for k in self.extra_keys if k in moved}
        return moved[Keys.IMAGE], moved.get(Keys.LABEL), (), extra


def _prepare(engine, batchdata) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
    """The engine's ``prepare_batch`` as MONAI's iterations call it, always as a 4-tuple."""
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    if len(batch) == 2:
        return batch[0], batch[1], (), {}
    return batch


def _model_outputs(out) -> dict:
    if isinstance(out, torch.Tensor):  # an inference wrapper returning probabilities only
        return {"pred": out}
    return {
        "pred": torch.sigmoid(out["logits"].float()),
        "logits": out["logits"],
        **{k: out[k] for k in ("attn", "attn_refined") if k in out},
    }


class AlignmentTrainer(SupervisedTrainer):
    """SupervisedTrainer whose loss is ``loss_function(net_out, label, attn_mask, align) -> dict``.

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (sigmoid probabilities), ``logits``, ``attn``,
    ``attn_refined``, ``loss`` (total), ``loss_ce``, ``loss_al`` and ``n_aligned`` (python floats for the three
    last), so that StatsHandler / MLFlowHandler can log L_CE and L_AL separately. ``grad_clip`` clips the gradient
    norm after backward (after unscaling under AMP). ``prepare_batch`` defaults to :class:`AlignmentPrepareBatch`.
    """

    def __init__(self, *args, grad_clip: float | None = None, **kwargs):
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("prepare_batch", AlignmentPrepareBatch())
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("AlignmentTrainer does not implement gradient accumulation (accumulation_steps=1)")
        super().__init__(*args, **kwargs)
        self.grad_clip = grad_clip
        self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._clip_gradients)

    def _clip_gradients(self, engine: AlignmentTrainer) -> None:
        if not self.grad_clip:
            return
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)

    # MONAI lacks a hook for a loss with more inputs than (pred, label): its iteration calls
    # loss_function(pred, label).mean() and sends prepare_batch's kwargs to the network. This override is MONAI's
    # iteration (same order: train mode, zero_grad, forward, loss, backward, BACKWARD_COMPLETED, step) with the
    # 4-argument loss, and it keeps the loss components and the attention maps in the output.
    def _iteration(self, engine: AlignmentTrainer, batchdata: dict) -> dict:
        image, label, args, extra = _prepare(engine, batchdata)
        label = label.float()
        mask = extra.get("attn_mask")
        align = extra.get("align", torch.zeros_like(label))
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward():
            out = engine.inferer(image, engine.network, *args)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(out, label, mask, align)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return out, losses

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                out, losses = forward()
            engine.scaler.scale(losses["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)  # gradient clipping: _clip_gradients
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            out, losses = forward()
            losses["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)  # gradient clipping: _clip_gradients
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
    which is what the fairness/alignment metrics in ``bundle.handlers`` consume. ``prepare_batch`` defaults to
    :class:`AlignmentPrepareBatch`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("prepare_batch", AlignmentPrepareBatch())
        super().__init__(*args, **kwargs)

    # MONAI's evaluator iteration sends prepare_batch's kwargs to the network and stores the network's raw output
    # under "pred"; here the alignment inputs stay in the output beside the probabilities and attention maps, and an
    # inference wrapper is run through forward_features. The forward (eval mode, AMP autocast) is MONAI's.
    def _iteration(self, engine: AlignmentEvaluator, batchdata: dict) -> dict:
        image, label, args, extra = _prepare(engine, batchdata)
        engine.state.output = {Keys.IMAGE: image, **({Keys.LABEL: label} if label is not None else {}), **extra}
        net = engine.network
        # An inference wrapper (AlignerVLMInference: forward -> probabilities, for Deploy/verify_net_in_out)
        # still gives the evaluator its attention maps through forward_features.
        inner = getattr(net, "module", net)
        if getattr(inner, "return_probs", False) and hasattr(inner, "forward_features"):
            net = inner.forward_features
        with engine.mode(engine.network):
            if engine.amp:
                with torch.autocast("cuda", **engine.amp_kwargs):
                    out = engine.inferer(image, net, *args)
            else:
                out = engine.inferer(image, net, *args)
        engine.state.output.update({k: v.detach().float() for k, v in _model_outputs(out).items()})
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
