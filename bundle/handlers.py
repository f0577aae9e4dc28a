"""Ignite metrics and handlers: prediction/attention collection, fairness + alignment metrics, checkpoints, MLflow.

Collection under torch.distributed: every rank collects its shard; ``compute`` all-gathers with
``monai.utils.evenly_divisible_all_gather`` (ignite's all_gather crashes on uneven shards, see
docs) and de-duplicates by the sample ``index`` so that a padding sampler cannot count a sample
twice. Metadata (sex, age, patient id, dataset) is joined afterwards from the split's records by
``index``, so strings never cross process boundaries.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.metrics import Metric
from monai.handlers import MLFlowHandler
from monai.utils import evenly_divisible_all_gather

logger = logging.getLogger("bundle")

__all__ = [
    "PredictionCollector",
    "MeanAUC",
    "AlignmentFairnessMetric",
    "attention_mass_in_mask",
    "BestModelSaver",
    "ResumeCheckpoint",
    "SafeMLFlowHandler",
    "EpochSummary",
    "loss_components",
    "atomic_torch_save",
    "unwrap",
]


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel, else the module itself."""
    return getattr(net, "module", net)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a crash never leaves half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


# --------------------------------------------------------------------------------------------- collection
def attention_mass_in_mask(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each attention map's mass that falls inside the human mask, per (sample, class).

    ``attn`` (B, C, h, w) sums to 1 over patches; ``mask`` (B, C, H, W) with H, W multiples of h, w.
    The mask is area-pooled to the patch grid (the fraction of each patch it covers), so the value is
    exact for patch-constant attention. Written by hand: no library offers this alignment measure.
    """
    cover = F.adaptive_avg_pool2d(mask.float(), attn.shape[-2:])
    a = attn.float()
    return (a * cover).flatten(2).sum(-1) / a.flatten(2).sum(-1).clamp_min(1e-12)


def _wrap_output(output):
    """Engine output -> 1-tuple: ignite metrics refuse a mapping without ('y_pred', 'y') keys, we need all keys."""
    return (output,)


class PredictionCollector(Metric):
    """Collects per-sample arrays from the evaluator's batched output and gathers them across ranks.

    ``compute`` returns ``{"index", "pred", "label", "hit", "iou", "mass"}`` as numpy arrays sorted by
    ``index`` (each sample exactly once). ``hit`` (pointing game), ``iou`` (Otsu-thresholded map vs mask)
    and ``mass`` (attention mass inside the mask) are (N, C), NaN where the pair has no human mask. Subclasses turn the arrays into metrics.
    """

    def __init__(self, output_transform: Callable = _wrap_output, device="cpu"):
        self.last: dict[str, np.ndarray] = {}
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    def reset(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._parts.setdefault(key, []).append(value.detach().to("cpu"))

    def update(self, output: Mapping) -> None:
        output = output[0] if isinstance(output, tuple) else output
        pred, label = output["pred"], output["label"]
        n = pred.shape[0]
        index = output.get("index")
        if index is None:
            raise ValueError("PredictionCollector needs 'index' in the batch (each record's position in its split)")
        self._add("index", torch.as_tensor(index).reshape(n).long())
        self._add("pred", pred.float())
        self._add("label", label.float())
        attn, mask, avail = output.get("attn"), output.get("attn_mask"), output.get("attn_available")
        if attn is not None and mask is not None:
            # one implementation of the CheXlocalize pointing game and mIoU for every caller: bundle.metrics
            from bundle.metrics import hit_rate, iou

            c = pred.shape[1]
            has = mask.flatten(2).amax(-1) > 0
            if avail is not None:
                has = has & (avail > 0)
            maps = attn.float().reshape(n * c, *attn.shape[-2:]).cpu().numpy()
            masks = mask.float().reshape(n * c, *mask.shape[-2:]).cpu().numpy()
            nan = torch.tensor(float("nan"))
            has = has.cpu()
            for key, values in (("hit", hit_rate(maps, masks)), ("iou", iou(maps, masks, threshold="otsu"))):
                v = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(n, c)
                self._add(key, torch.where(has, v, nan))
            self._add("mass", torch.where(has, attention_mass_in_mask(attn, mask).cpu(), nan))

    def gather(self) -> dict[str, np.ndarray]:
        if not self._parts:
            return {}
        out = {}
        for k, parts in self._parts.items():
            local = torch.cat(parts)
            out[k] = evenly_divisible_all_gather(local, concat=True).numpy()
        _, first = np.unique(out["index"], return_index=True)  # de-duplicate (padding samplers)
        order = first[np.argsort(out["index"][first])]
        self.last = {k: v[order] for k, v in out.items()}
        return self.last

    def compute(self):
        return self.gather()


def _masked_aucs(label: np.ndarray, pred: np.ndarray) -> list[float]:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in range(label.shape[1]):
        known = label[:, c] >= 0
        y, s = label[known, c], pred[known, c]
        aucs.append(float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan"))
    return aucs


class MeanAUC(PredictionCollector):
    """The key metric: macro AUC over classes, unknown labels (-1) excluded per class (NaN classes skipped)."""

    def update(self, output: Mapping) -> None:  # only predictions are needed here
        output = output[0] if isinstance(output, tuple) else output
        n = output["pred"].shape[0]
        self._add("index", torch.as_tensor(output["index"]).reshape(n).long())
        self._add("pred", output["pred"].float())
        self._add("label", output["label"].float())

    def compute(self) -> float:
        d = self.gather()
        if not d:
            return float("nan")
        aucs = [a for a in _masked_aucs(d["label"], d["pred"]) if not math.isnan(a)]
        return float(np.mean(aucs)) if aucs else float("nan")


class AlignmentFairnessMetric(PredictionCollector):
    """Per-epoch fairness and alignment summary for one split, as flat scalar metrics.

    Produces (each with ``prefix``) ``auc_<class>``, ``hit_rate`` / ``hit_rate_<class>``, ``attn_mass`` / ``attn_mass_<class>``
    and the subgroup gaps from ``bundle.metrics.flatten_for_mlflow`` (bootstrap off: per-epoch values
    only; ``configs/evaluate.yaml`` computes CIs). Thresholds are the split's own max-F1 ("test_f1")
    unless ``val_scores`` supplies validation scores.
    """

    def __init__(
        self,
        records: Sequence[Mapping],
        classes: Sequence[str],
        attributes: Sequence[str] = ("sex", "age"),
        age_scheme="chexclusion",
        min_count: int = 5,
        prefix: str = "val_",
        output_transform: Callable = _wrap_output,
        device="cpu",
    ):
        self.records, self.classes, self.prefix = list(records), list(classes), prefix
        self.attributes, self.age_scheme, self.min_count = list(attributes), age_scheme, min_count
        super().__init__(output_transform=output_transform, device=device)

    def groups_for(self, index: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from bundle.metrics import age_groups, sex_labels

        recs = [self.records[int(i)] for i in index]
        groups = {}
        for a in self.attributes:
            vals = [r.get(a) for r in recs]
            if a == "sex":
                groups[a] = np.asarray(sex_labels(vals), dtype=object)
            elif a == "age":
                ages = np.array([np.nan if v is None else float(v) for v in vals], dtype=float)
                groups[a] = np.asarray(age_groups(ages, scheme=self.age_scheme), dtype=object)
            else:
                groups[a] = np.asarray(["unknown" if v is None else str(v) for v in vals], dtype=object)
        # a record without a patient id is its own patient (never merged with other id-less records)
        pids = np.asarray([f"__record_{i}" if r.get("patient_id") in (None, "") else str(r["patient_id"])
                           for r, i in zip(recs, index)], dtype=object)
        return groups, pids

    def compute(self) -> dict[str, float]:
        from bundle.metrics import fairness_report, flatten_for_mlflow

        d = self.gather()
        if not d:
            return {}
        out: dict[str, float] = {}
        for cname, auc in zip(self.classes, _masked_aucs(d["label"], d["pred"])):
            out[f"auc_{cname}"] = auc
        for key, name in (("hit", "hit_rate"), ("mass", "attn_mass")):
            if key in d:
                v = d[key]
                out[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                for ci, cname in enumerate(self.classes):
                    col = v[:, ci]
                    out[f"{name}_{cname}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
        groups, pids = self.groups_for(d["index"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = fairness_report(d["label"], d["pred"], groups=groups, classes=self.classes, patient_id=pids,
                                     threshold="test_f1", n_boot=0, min_count=self.min_count)
        out.update(flatten_for_mlflow(report, prefix="fair_"))
        self.last_report = report
        return {f"{self.prefix}{k}": v for k, v in out.items()}


# --------------------------------------------------------------------------------------------- checkpoints
class BestModelSaver:
    """Saves the network's state_dict to ``save_path`` (atomically) whenever the key metric improves.

    Attach to the validator. Rank 0 writes; the state (best value and epoch) is itself checkpointable so
    a resumed run does not overwrite a better model with a worse one.
    """

    def __init__(self, save_path: str, network: torch.nn.Module, metric_name: str | None = None, mode: str = "max",
                 epoch_getter: Callable[[], int] | None = None):
        self.save_path, self.network, self.metric_name, self.mode = save_path, network, metric_name, mode
        self.epoch_getter = epoch_getter
        self.best, self.best_epoch = -math.inf if mode == "max" else math.inf, -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best = float(value)
            self.best_epoch = self.epoch_getter() if self.epoch_getter else engine.state.epoch
            if _rank() == 0:
                atomic_torch_save(unwrap(self.network).state_dict(), self.save_path)
                logger.info(f"new best {name} = {value:.4f} at epoch {self.best_epoch}: saved {self.save_path}")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


class ResumeCheckpoint:
    """Crash-safe training state: saved atomically after every epoch, loaded at start if present.

    ``objects`` is ``{"network": ..., "optimizer": ..., "trainer": ..., ...}``; anything with
    ``state_dict``/``load_state_dict`` works (lr scheduler, BestModelSaver, EarlyStopHandler's ignite
    handler). Attach to the trainer *after* the ValidationHandler so the saved state includes the
    epoch's validation. ``resume=False`` starts afresh (existing files are then overwritten).
    """

    pattern = "checkpoint_epoch={}.pt"

    def __init__(self, save_dir: str, objects: Mapping, resume: bool = True, keep: int = 1):
        self.save_dir, self.objects, self.resume, self.keep = save_dir, dict(objects), resume, keep

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _files(self) -> list[str]:
        files = glob.glob(os.path.join(self.save_dir, self.pattern.format("*")))
        return sorted(files, key=lambda f: int(re.search(r"epoch=(\d+)", f).group(1)))

    def _objects(self) -> dict:
        return {k: unwrap(v) if isinstance(v, torch.nn.Module) else v for k, v in self.objects.items() if v is not None}

    def load(self, engine: Engine) -> None:
        files = self._files()
        if not self.resume or not files:
            return
        ckpt = torch.load(files[-1], map_location="cpu", weights_only=False)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self._objects(), checkpoint=ckpt)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        logger.info(f"resumed from {files[-1]} (epoch {engine.state.epoch} of {engine.state.max_epochs})")

    def save(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        state = {k: v.state_dict() for k, v in self._objects().items()}
        atomic_torch_save(state, os.path.join(self.save_dir, self.pattern.format(engine.state.epoch)))
        for f in self._files()[: -self.keep]:
            os.remove(f)


# --------------------------------------------------------------------------------------------- MLflow
class SafeMLFlowHandler(MLFlowHandler):
    """MONAI's MLFlowHandler that never kills training when the tracking server is down.

    Before the first use, an http(s) tracking URI is probed with a short timeout; when unreachable,
    the handler falls back to a local SQLite store (``fallback_uri``) and says so. Any later MLflow
    error is logged once and disables the handler for the rest of the run. Under torch.distributed
    only rank 0 logs.
    """

    def __init__(self, *args, fallback_uri: str | None = None, probe_timeout: float = 3.0,
                 parent_run_id: str | None = None, run_tags: Mapping | None = None,
                 run_of: "SafeMLFlowHandler | None" = None, **kwargs):
        # run_of: log into the run of another handler (the validator into the trainer's run), never into
        # "the latest active run" of the experiment, which may belong to another process of a study.
        self.run_of = run_of
        # parent_run_id nests this run under a study's parent run (MLflow's "mlflow.parentRunId" tag)
        self.run_tags = {**(run_tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri")
        self._disabled = _rank() != 0  # under DDP only rank 0 logs
        if not self._disabled and uri and uri.startswith(("http://", "https://")) and not self._reachable(uri, probe_timeout):
            if fallback_uri:
                logger.warning(f"MLflow server {uri} is unreachable: logging to the local store {fallback_uri} instead")
                os.environ.pop("MLFLOW_TRACKING_URI", None)
                kwargs["tracking_uri"] = fallback_uri
            else:
                logger.warning(f"MLflow server {uri} is unreachable: MLflow logging is disabled for this run")
                self._disabled = True
        if self._disabled:
            # Never touch the store from a disabled handler: under DDP every rank would otherwise create the
            # SQLite tables at once (MLflow resolves the store eagerly) and race. An http URI is not contacted.
            saved_env = os.environ.pop("MLFLOW_TRACKING_URI", None)
            kwargs["tracking_uri"] = "http://mlflow-disabled.invalid"
            try:
                super().__init__(*args, **kwargs)
            finally:
                if saved_env is not None:
                    os.environ["MLFLOW_TRACKING_URI"] = saved_env
            return
        if (kwargs.get("tracking_uri") or "").startswith("sqlite:///"):
            os.makedirs(os.path.dirname(kwargs["tracking_uri"][len("sqlite:///"):]) or ".", exist_ok=True)
        super().__init__(*args, **kwargs)

    @staticmethod
    def _reachable(uri: str, timeout: float) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
            return True
        except Exception:
            return False

    def _guard(self, fn, *args):
        if self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as e:  # tracking must never stop training
            self._disabled = True
            logger.warning(f"MLflow logging failed ({type(e).__name__}: {e}); disabled for the rest of this run")
            return None

    def start(self, engine: Engine) -> None:
        if self.run_of is not None:
            if self.run_of.cur_run is None:  # the owner is disabled or not started: nothing to log into
                self._disabled = True
                return
            self.experiment, self.cur_run = self.run_of.experiment, self.run_of.cur_run
            return
        self._guard(super().start, engine)
        if self.cur_run is not None and self.run_tags:
            for k, v in self.run_tags.items():
                self._guard(self.client.set_tag, self.cur_run.info.run_id, k, str(v))

    def epoch_completed(self, engine: Engine) -> None:
        self._guard(super().epoch_completed, engine)

    def iteration_completed(self, engine: Engine) -> None:
        self._guard(super().iteration_completed, engine)

    def complete(self) -> None:
        self._guard(super().complete)

    def close(self) -> None:
        self._guard(super().close)

    def start_standalone(self, params: Mapping | None = None) -> bool:
        """Open a run without an engine (evaluation-only jobs); True when a run is open afterwards."""
        from types import SimpleNamespace

        if params:
            self.experiment_param = {**(self.experiment_param or {}), **{k: str(v) for k, v in params.items()}}
        self.start(SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch_length=None)))
        return self.cur_run is not None

    @property
    def run_id(self) -> str | None:
        return self.cur_run.info.run_id if self.cur_run else None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log a file or folder to the current run (no-op when disabled or before start)."""
        if self.cur_run is None:
            return
        fn = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
        self._guard(fn, self.cur_run.info.run_id, path, artifact_path)


def loss_components(output: Mapping) -> dict[str, float]:
    """MLFlowHandler output_transform for the trainer: total loss, L_CE, L_AL and the number of aligned pairs."""
    out = {"train_loss": float(output["loss"])}
    for k in ("loss_ce", "loss_al", "n_aligned"):
        if k in output:
            out[f"train_{k}"] = float(output[k])
    return out


class EpochSummary:
    """Epoch means of L_CE, L_AL, aligned pairs and the training throughput (images/s, training time only).

    Written to ``engine.state.metrics`` (so MLflow logs them per epoch) and printed as one line per epoch.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._n, self._images, self._t0 = {}, 0, 0, time.perf_counter()
        self._t_last = self._t0

    def _iter(self, engine: Engine) -> None:
        self._t_last = time.perf_counter()  # training time only: validation runs after the last iteration
        out = engine.state.output
        self._images += int(out["image"].shape[0]) if "image" in out else 0
        for k in ("loss", "loss_ce", "loss_al", "n_aligned"):
            if k in out:
                self._sum[k] = self._sum.get(k, 0.0) + float(out[k])
        self._n += 1

    def _epoch(self, engine: Engine) -> None:
        n = max(self._n, 1)
        secs = self._t_last - self._t0
        means = {f"train_{k}_epoch": v / n for k, v in self._sum.items()}
        means["train_images_per_s"] = self._images / max(secs, 1e-9)
        engine.state.metrics.update(means)
        msg = " ".join(f"{k[6:-6] if k.endswith('_epoch') else k[6:]}={v:.4g}" for k, v in means.items())
        logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs} train: {msg} ({secs:.1f}s)")


class InferenceWriter:
    """Writes inference results: ``predictions.csv`` (one row per image: probabilities and the attention peak
    per class) and, optionally, one attention-overlay PNG per image. Rank 0; files written atomically."""

    def __init__(self, output_dir: str, records: Sequence[Mapping], classes: Sequence[str], save_overlays: bool = True):
        self.output_dir, self.records, self.classes, self.save_overlays = output_dir, list(records), list(classes), save_overlays
        self.rows: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iter)
        engine.add_event_handler(Events.COMPLETED, self._done)

    def _iter(self, engine: Engine) -> None:
        from bundle.plots import attention_overlays

        o = engine.state.output
        probs, attn, image = o["pred"].cpu(), o["attn"].cpu(), o["image"].cpu()
        size = image.shape[-2:]
        up = F.interpolate(attn.float(), size=size, mode="bilinear", align_corners=False)
        for b, idx in enumerate(o["index"].cpu().tolist()):
            path = self.records[idx]["image"]
            row = [idx, path]
            for c in range(len(self.classes)):
                r, col = divmod(int(torch.argmax(up[b, c])), size[-1])
                row += [f"{float(probs[b, c]):.6f}", r, col]
            self.rows.append(row)
            if self.save_overlays and _rank() == 0:
                stem = os.path.splitext(os.path.basename(path))[0]
                samples = [{"image": image[b, 0].numpy(), "attn": attn[b, c].numpy(), "mask": np.zeros(tuple(size)),
                            "class_index": c, "score": float(probs[b, c])} for c in range(len(self.classes))]
                attention_overlays(samples, self.classes, os.path.join(self.output_dir, "overlays", f"{idx:05d}_{stem}.png"),
                                   title=os.path.basename(path), ncols=len(self.classes))

    def _done(self, engine: Engine) -> None:
        if _rank() != 0:
            return
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["index", "image"] + [f"{k}_{c}" for c in self.classes for k in ("prob", "attn_peak_row", "attn_peak_col")])
        w.writerows(sorted(self.rows, key=lambda r: r[0]))
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "predictions.csv")
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
        logger.info(f"inference: {len(self.rows)} images -> {path}")
