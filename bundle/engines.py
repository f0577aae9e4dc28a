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

``amp`` (:func:`resolve_amp`) is MONAI's flag extended to the CPU and to a choice of precision: false, true (fp16 with
a GradScaler on CUDA, bf16 elsewhere), "bf16" or "fp16"; MONAI's own engines autocast on CUDA only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.engines.workflow import Workflow
from monai.utils import CommonKeys as Keys

__all__ = ["AlignmentTrainer", "AlignmentEvaluator", "AlignmentPrepareBatch", "BATCH_KEYS", "resolve_amp"]

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


_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_amp(amp: bool | str | None, device: str | torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device``, None when mixed precision is off.

    false / null / "false": off. true / "true": fp16 on CUDA (MONAI's default, with a GradScaler), bf16 on any other
    device (the CPU: bf16 keeps fp32's exponent range, so it needs no loss scaling, and CPUs with AVX512-BF16/AMX
    run it natively). "bf16" / "fp16": that precision on any device (fp16 always with a GradScaler).
    """
    if isinstance(amp, torch.dtype) and amp in (torch.bfloat16, torch.float16):
        return amp
    if amp is None or amp is False or (isinstance(amp, int) and not isinstance(amp, bool) and amp == 0):
        return None
    name = str(amp).strip().lower()
    if name in ("false", "no", "off", "none", "0", ""):
        return None
    if amp is True or name in ("true", "yes", "on", "1"):
        return torch.float16 if torch.device(device or "cpu").type == "cuda" else torch.bfloat16
    if name in _AMP_NAMES:
        return _AMP_NAMES[name]
    raise ValueError(f"amp={amp!r} is not a precision: use false, true, bf16 or fp16 (configs/train.yaml, --amp bf16)")


def _setup_amp(engine, amp, device, kwargs: dict) -> None:
    """Resolve ``amp`` into MONAI's ``amp`` flag and ``amp_kwargs`` (the autocast dtype) before MONAI's __init__."""
    dtype = resolve_amp(amp, device)
    kwargs["amp"] = dtype is not None
    if dtype is not None:
        kwargs["amp_kwargs"] = {"dtype": dtype, **(kwargs.get("amp_kwargs") or {})}
        dtype = kwargs["amp_kwargs"]["dtype"]
    engine.amp_dtype = dtype
    engine.amp_device_type = torch.device(device or "cpu").type


def _autocast(engine):
    """The engine's autocast context (its device type and dtype), or a no-op when AMP is off."""
    if not engine.amp:
        return contextlib.nullcontext()
    return torch.autocast(engine.amp_device_type, **engine.amp_kwargs)


CLASS_SCHEDULES = ("batched", "sequential")


def _check_class_schedule(value: str) -> str:
    value = str(value).strip().lower()
    if value not in CLASS_SCHEDULES:
        raise ValueError(f"class_schedule={value!r}: use one of {CLASS_SCHEDULES} (configs/train.yaml class_schedule)")
    return value


def _prepare(engine, batchdata) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
    """The engine's ``prepare_batch`` as MONAI's iterations call it, always as a 4-tuple."""
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    if len(batch) == 2:
        return batch[0], batch[1], (), {}
    return batch


def _prepare_training(engine, batchdata) -> tuple:
    """The batch of a training iteration (image, float labels, args, masks, alignment flags), the network in train
    mode and the engine's output started: what the batched and the sequential class schedules share."""
    image, label, args, extra = _prepare(engine, batchdata)
    label = label.float()
    engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
    engine.network.train()
    return image, label, args, extra.get("attn_mask"), extra.get("align", torch.zeros_like(label))


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
    ``class_schedule``: "batched" (default: all class prompts in one forward, one optimizer step per batch) or
    "sequential" (the paper's wording: per batch, each class in turn with only its prompt, its own loss and its own
    optimizer step; see ``_sequential_iteration``).
    """

    def __init__(
        self,
        *args,
        grad_clip: float | None = None,
        amp: bool | str | None = False,
        class_schedule: str = "batched",
        **kwargs,
    ):
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("prepare_batch", AlignmentPrepareBatch())
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("AlignmentTrainer does not implement gradient accumulation (accumulation_steps=1)")
        _setup_amp(self, amp, kwargs["device"] if "device" in kwargs else args[0], kwargs)
        super().__init__(*args, **kwargs)
        self.grad_clip = grad_clip
        self.class_schedule = _check_class_schedule(class_schedule)
        self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._clip_gradients)

    def run(self) -> None:
        """MONAI's Trainer.run, except for the scaler: MONAI builds a CUDA-only ``torch.cuda.amp.GradScaler``
        whenever amp is on; here fp16 gets a GradScaler on the engine's device and bf16 (fp32's exponent range,
        no underflowing gradients) none."""
        self.scaler = torch.amp.GradScaler(self.amp_device_type) if self.amp_dtype == torch.float16 else None
        Workflow.run(self)

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
        if self.class_schedule == "sequential":
            return self._sequential_iteration(engine, batchdata)
        image, label, args, mask, align = _prepare_training(engine, batchdata)
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward():
            out = engine.inferer(image, engine.network, *args)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(out, label, mask, align)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return out, losses

        if engine.amp and engine.scaler is not None:
            with _autocast(engine):
                out, losses = forward()
            engine.scaler.scale(losses["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)  # gradient clipping: _clip_gradients
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            with _autocast(engine):  # bf16 (no scaler) or off
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

    # The paper trains "sequentially for each class per epoch, with the disease name as a prompt". Here, for each batch,
    # each class c in turn: a forward with only c's prompt (the network's class-subset forward, classes=[c]), the loss
    # of c alone (its L_CE + lambda * its L_AL), backward, BACKWARD_COMPLETED (gradient clipping) and an optimizer step:
    # C steps per batch. The output holds every class's logits and maps (each from the forward before its step) and the
    # loss terms reduced as the batched schedule reduces them (L_CE: mean over the known labels, L_AL: mean over the
    # aligned pairs), so the logged curves of the two schedules compare. MODEL_COMPLETED fires once per batch.
    def _sequential_iteration(self, engine: AlignmentTrainer, batchdata: dict) -> dict:
        image, label, args, mask, align = _prepare_training(engine, batchdata)
        outs, terms = [], []
        for c in range(label.shape[1]):
            one = slice(c, c + 1)
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with _autocast(engine):
                out = engine.inferer(image, engine.network, *args, classes=[c])
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                losses = engine.loss_function(out, label[:, one], None if mask is None else mask[:, one], align[:, one])
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            if engine.amp and engine.scaler is not None:
                engine.scaler.scale(losses["loss"]).backward()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)  # gradient clipping: _clip_gradients
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                losses["loss"].backward()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                engine.optimizer.step()
            outs.append({k: v.detach() for k, v in _model_outputs(out).items()})
            terms.append({k: losses[k].detach().float() for k in ("loss", "loss_ce", "loss_al", "n_aligned")})
        engine.state.output.update({k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]})
        n_known = (label >= 0).sum(dim=0).float()
        n_al = torch.stack([t["n_aligned"] for t in terms])
        ce = torch.stack([t["loss_ce"] for t in terms])
        al = torch.stack([t["loss_al"] for t in terms])
        weighted_al = torch.stack([t["loss"] - t["loss_ce"] for t in terms])  # lambda * L_AL of each class
        loss_ce = (ce * n_known).sum() / n_known.sum().clamp_min(1.0)
        engine.state.output[Keys.LOSS] = loss_ce + (weighted_al * n_al).sum() / n_al.sum().clamp_min(1.0)
        engine.state.output["loss_ce"] = float(loss_ce)
        engine.state.output["loss_al"] = float((al * n_al).sum() / n_al.sum().clamp_min(1.0))
        engine.state.output["n_aligned"] = float(n_al.sum())
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class AlignmentEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator that keeps the attention maps, masks and sample indices in the output.

    ``engine.state.output``: ``pred`` (B, C) probabilities, ``label``, ``attn`` (B, C, h, w),
    ``attn_mask`` (B, C, H, W), ``attn_available`` (B, C), ``index`` (B,), batched (no decollation),
    which is what the fairness/alignment metrics in ``bundle.handlers`` consume. ``prepare_batch`` defaults to
    :class:`AlignmentPrepareBatch`.
    """

    def __init__(self, *args, amp: bool | str | None = False, **kwargs):
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("prepare_batch", AlignmentPrepareBatch())
        _setup_amp(self, amp, kwargs["device"] if "device" in kwargs else args[0], kwargs)
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
            with _autocast(engine):
                out = engine.inferer(image, net, *args)
        engine.state.output.update({k: v.detach().float() for k, v in _model_outputs(out).items()})
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
