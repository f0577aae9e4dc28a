"""MONAI's MLFlowHandler that never kills training, and the trainer's loss output_transform."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from types import SimpleNamespace

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from bundle.utils.dist import rank
from bundle.utils.mlflow import is_reachable, is_remote

logger = logging.getLogger("bundle")

__all__ = ["SafeMLFlowHandler", "loss_components"]


class SafeMLFlowHandler(MLFlowHandler):
    """MONAI's MLFlowHandler that never kills training when the tracking server is down.

    Before the first use, an http(s) tracking URI is probed with a short timeout; when unreachable,
    the handler falls back to a local SQLite store (``fallback_uri``) and says so. Any later MLflow
    error is logged once and disables the handler for the rest of the run. Under torch.distributed
    only rank 0 logs. Outside an engine (evaluation jobs): :meth:`start_standalone`, :meth:`log_metrics`,
    :meth:`log_artifact`.
    """

    def __init__(
        self,
        *args,
        fallback_uri: str | None = None,
        probe_timeout: float = 3.0,
        parent_run_id: str | None = None,
        run_tags: Mapping | None = None,
        run_of: SafeMLFlowHandler | None = None,
        **kwargs,
    ):
        # run_of: log into the run of another handler (the validator into the trainer's run), never into
        # "the latest active run" of the experiment, which may belong to another process of a study.
        self.run_of = run_of
        # parent_run_id nests this run under a study's parent run (MLflow's "mlflow.parentRunId" tag)
        self.run_tags = {**(run_tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri")
        self._disabled = rank() != 0  # under DDP only rank 0 logs
        if not self._disabled and is_remote(uri) and not is_reachable(uri, probe_timeout):
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
            os.makedirs(os.path.dirname(kwargs["tracking_uri"][len("sqlite:///") :]) or ".", exist_ok=True)
        super().__init__(*args, **kwargs)

    @property
    def disabled(self) -> bool:
        """True when this handler logs nothing (not rank 0, server unreachable without fallback, or an MLflow error)."""
        return self._disabled

    def _guard(self, fn: Callable, *args):
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
        if params:
            self.experiment_param = {**(self.experiment_param or {}), **{k: str(v) for k, v in params.items()}}
        self.start(SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch_length=None)))
        return self.cur_run is not None

    @property
    def run_id(self) -> str | None:
        return self.cur_run.info.run_id if self.cur_run else None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalars to the current run (no-op when disabled or before start; an error disables the handler)."""
        if self.cur_run is None:
            return
        self._guard(self._log_metrics, dict(metrics), step)

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
