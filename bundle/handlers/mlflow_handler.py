"""MONAI's MLFlowHandler that never costs a run, never blocks a step, and the trainer's loss output_transform.

docs/mlflow.md has the design and the measured costs.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace

from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from bundle.utils.atomic import read_json, write_json_atomic
from bundle.utils.dist import rank
from bundle.utils.mlflow import (
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    KeySanitizer,
    apply_client_defaults,
    as_metric_value,
    is_reachable,
    is_rejection,
    is_remote,
)
from bundle.utils.mlflow_spool import REPLAY_COMMAND, Sender, Spool, SpoolWorker, now_ms, spool_meta

logger = logging.getLogger("bundle")

__all__ = ["SafeMLFlowHandler", "loss_components", "default_spool_dir"]


def default_spool_dir(*uris: str | None) -> str:
    """``mlflow_spool`` beside the first local SQLite store among ``uris`` (the run's output folder in
    configs/train.yaml), else in the working directory."""
    for uri in uris:
        if uri and str(uri).startswith("sqlite:///"):
            return os.path.join(os.path.dirname(str(uri)[len("sqlite:///") :]), "mlflow_spool")
    return os.path.abspath("mlflow_spool")


class SafeMLFlowHandler(MLFlowHandler):
    """MONAI's MLFlowHandler that never costs a run (docs/mlflow.md).

    - Every record (metrics with their step and timestamp, params, tags, artifacts, the final status) goes to a
      local spool (``<spool_dir>/<run_id>/``, :mod:`bundle.utils.mlflow_spool`) that a background thread sends to
      MLflow in batches: a training step never waits for MLflow, and a server that dies or hangs mid-run costs
      nothing; what it missed is sent when it answers again, or by ``python scripts/mlflow_replay.py <spool_dir>``.
    - MLflow's HTTP client gets short timeouts and few retries (:func:`bundle.utils.mlflow.apply_client_defaults`).
    - At start an http(s) server is probed with a short timeout; when unreachable, the handler falls back to the
      local store ``fallback_uri`` (or, without one, logs nothing) and says so.
    - The handler creates its own run (never MONAI's "latest active run" of the experiment, which may belong to
      another process). With ``run_record`` (``<output_dir>/mlflow_run.json``) and ``resume_run``, a resumed
      training continues the recorded run and skips metric steps at or below those the run already has.
    - Metric, param and tag names go through one :class:`~bundle.utils.mlflow.KeySanitizer` per run.
    - Under torch.distributed only rank 0 logs. An unexpected error disables the handler, never the training.
    - ``run_of``: log into the run of another handler (the validator into the trainer's run).
    - Outside an engine (evaluation jobs): :meth:`start_standalone`, :meth:`log_metrics`, :meth:`log_artifact`.
    """

    def __init__(
        self,
        *args,
        fallback_uri: str | None = None,
        probe_timeout: float = 3.0,
        parent_run_id: str | None = None,
        run_tags: Mapping | None = None,
        run_of: SafeMLFlowHandler | None = None,
        spool_dir: str | None = None,
        run_record: str | None = None,
        resume_run: bool = False,
        resume_ckpt_dir: str | None = None,
        send_interval: float = 2.0,
        retry_interval: float = 15.0,
        **kwargs,
    ):
        apply_client_defaults()  # bounded HTTP timeouts/retries for every MLflow call of this process
        self.run_of = run_of
        # parent_run_id nests this run under a study's parent run (MLflow's "mlflow.parentRunId" tag)
        self.run_tags = {**(run_tags or {}), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        self.fallback_uri = fallback_uri
        self.run_record, self.resume_run, self.resume_ckpt_dir = run_record, bool(resume_run), resume_ckpt_dir
        self.send_interval, self.retry_interval = send_interval, retry_interval
        self.resumed = False
        self._spool: Spool | None = None
        self._worker: SpoolWorker | None = None
        self._keys = KeySanitizer()
        self._params: dict[str, str] = {}  # params of the run (sanitised key -> value)
        self._max_step: dict[str, int] = {}  # a resumed run's highest logged step per metric key
        self._n_skipped = 0
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri")
        self.spool_dir = os.path.abspath(spool_dir or default_spool_dir(fallback_uri, uri))
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

    # ------------------------------------------------------------------------------------------------ state
    @property
    def disabled(self) -> bool:
        """True when this handler logs nothing (not rank 0, server unreachable without fallback, or an error)."""
        return self._disabled

    @property
    def online(self) -> bool:
        """False while the tracking server does not answer (records then wait in the spool)."""
        owner = self._owner()
        return owner._worker is None or owner._worker.online

    @property
    def spool_folder(self) -> str | None:
        """This run's spool folder (None before the run is open)."""
        owner = self._owner()
        return owner._spool.folder if owner._spool is not None else None

    @property
    def tracking_uri(self) -> str:
        return str(self.client.tracking_uri)

    @property
    def run_id(self) -> str | None:
        return self.cur_run.info.run_id if self.cur_run else None

    def _owner(self) -> SafeMLFlowHandler:
        return self.run_of if self.run_of is not None else self

    def _guard(self, fn: Callable, *args):
        if self._disabled:
            return None
        try:
            return fn(*args)
        except Exception as e:  # tracking must never stop training
            self._disabled = True
            logger.warning(f"MLflow logging failed ({type(e).__name__}: {e}); disabled for the rest of this run")
            return None

    # ------------------------------------------------------------------------------------------------ the run
    def start(self, engine: Engine) -> None:
        if self.run_of is not None:
            if self.run_of.cur_run is None or self.run_of._spool is None:  # owner disabled or not started
                self._disabled = True
                return
            self.experiment, self.cur_run = self.run_of.experiment, self.run_of.cur_run
            return
        if self._disabled:
            return
        if self.cur_run is None:
            try:
                self._open_run()
            except Exception as e:
                if is_rejection(e) or not self.fallback_uri or not is_remote(self.tracking_uri):
                    self._guard(_raise, e)
                    return
                # the server answered the probe but failed now: the local store, as when it is down at start
                logger.warning(f"MLflow server {self.tracking_uri} failed ({type(e).__name__}: {e}): logging to the "
                               f"local store {self.fallback_uri} instead")  # fmt: skip
                self._use_fallback()
                self._guard(self._open_run)
                if self.cur_run is None:
                    return
        params = dict(self.experiment_param or {})
        params.update({attr: getattr(engine.state, attr, None) for attr in self.default_tracking_params})
        self._guard(self._log_params, params)
        if self.dataset_logger or self.dataset_dict:
            self._guard(self.dataset_logger or self._default_dataset_log, self.dataset_dict)

    def _use_fallback(self) -> None:
        import mlflow

        os.environ.pop("MLFLOW_TRACKING_URI", None)
        self.client = mlflow.MlflowClient(tracking_uri=self.fallback_uri)
        self.experiment = None
        if self.fallback_uri.startswith("sqlite:///"):
            from monai.utils import path_to_uri

            db = self.fallback_uri[len("sqlite:///") :]
            os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
            self.artifact_location = path_to_uri(os.path.join(os.path.dirname(db), "mlruns"))

    def _resuming(self) -> bool:
        if not self.resume_run:
            return False
        if self.resume_ckpt_dir is None:
            return True
        from bundle.handlers.resume import ResumeCheckpoint

        return bool(glob.glob(os.path.join(self.resume_ckpt_dir, ResumeCheckpoint.pattern.format("*"))))

    def _open_run(self) -> None:
        """Create this handler's run, or reopen the recorded one when resuming; then start the spool's sender."""
        self._set_experiment()
        uri, run = self.tracking_uri, None
        record = read_json(self.run_record) if self.run_record else None
        if record and self._resuming():
            run = self._recorded_run(record, uri)
        tags = {self._keys(k): str(v)[:MAX_TAG_LENGTH] for k, v in self.run_tags.items()}
        if run is not None:
            self.resumed = True
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            self._params = dict(run.data.params)
            self._max_step = self._logged_steps(run)
        else:
            run_name = f"run_{time.strftime('%Y%m%d_%H%M%S')}" if self.run_name is None else self.run_name
            run = self.client.create_run(self.experiment.experiment_id, run_name=run_name, tags=tags)
            if self.run_record:
                write_json_atomic(
                    self.run_record,
                    {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri,
                     "run_name": run.info.run_name, "created": now_ms()},  # fmt: skip
                )
        self.cur_run = run
        run_id = run.info.run_id
        self._spool = Spool.open(self.spool_dir, run_id, spool_meta(run.info.experiment_id, uri, run.info.run_name))
        if self.resumed:
            # a previous process of this run may have left unsent records: their steps count as logged too
            for _, _, rec in self._spool.read(self._spool.sent_offset()):
                if rec.get("op") == "metric":
                    self._max_step[rec["key"]] = max(self._max_step.get(rec["key"], -1), int(rec["step"]))
                elif rec.get("op") == "param":
                    self._params.setdefault(rec["key"], rec["value"])
            self._spool.append({"op": "tag", "key": k, "value": v} for k, v in tags.items())
            logger.info(f"MLflow: resuming run {run_id} (recorded in {self.run_record})")
        self._worker = SpoolWorker(
            self.client, run_id, self._spool, uri, interval=self.send_interval, retry_interval=self.retry_interval
        )
        self._worker.start()

    def _recorded_run(self, record: Mapping, uri: str):
        """The run in ``run_record`` when it is in this store, this experiment and not deleted; else None."""
        run_id = record.get("run_id")
        why = None
        if not run_id:
            why = "it has no run_id"
        elif record.get("tracking_uri") != uri:
            why = f"it was logged to {record.get('tracking_uri')}, not {uri}"
        else:
            try:
                run = self.client.get_run(run_id)
            except Exception as e:
                if not is_rejection(e) and getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run, why = None, f"run {run_id} is not in {uri}"
            if run is not None:
                if run.info.lifecycle_stage != "active":
                    why = f"run {run_id} is deleted"
                elif run.info.experiment_id != self.experiment.experiment_id:
                    why = f"run {run_id} belongs to another experiment"
                else:
                    return run
        logger.warning(f"MLflow: not resuming the run in {self.run_record} ({why}): starting a new run")
        return None

    def _logged_steps(self, run) -> dict[str, int]:
        """The highest step logged per metric key of ``run``. The run's latest metrics are the ones with the highest
        step (MLflow's stores keep them so); RunData keeps their Metric objects, its public ``metrics`` only values."""
        objs = getattr(run.data, "_metric_objs", None)
        if objs is not None:
            return {m.key: int(m.step) for m in objs}
        return {
            k: max(int(m.step) for m in self.client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics
        }

    # ------------------------------------------------------------------------------------------------ records
    def _append(self, records: list[dict]) -> None:
        owner = self._owner()
        if owner._spool is None:
            raise ValueError("Current Run is not Active to log")
        if records:
            owner._spool.append(records)

    def _record_metrics(self, metrics: Mapping, step: int | None, skip_logged: bool) -> None:
        owner, ts, s = self._owner(), now_ms(), int(step or 0)
        records = []
        for name, value in flatten_dict(dict(metrics)).items():
            v = as_metric_value(value)
            if v is None:
                continue  # not a number (MLflow would refuse the whole batch)
            key = owner._keys(name)
            if skip_logged and s <= owner._max_step.get(key, -1):
                owner._n_skipped += 1  # a resumed run: this step is in MLflow already
                continue
            records.append({"op": "metric", "key": key, "value": v, "step": s, "ts": ts})
        self._append(records)

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """MONAI's per-iteration and per-epoch logging lands here: into the spool, never a network call."""
        self._record_metrics(metrics, step, skip_logged=True)

    def _log_params(self, params: dict) -> None:
        owner = self._owner()
        records = []
        for name, value in params.items():
            key, val = owner._keys(name), str(value)[:MAX_PARAM_LENGTH]
            old = owner._params.get(key)
            if old == val:
                continue
            if old is not None:  # MLflow params are immutable (a resumed run with another max_epochs)
                logger.warning(f"MLflow param {key!r} of run {owner.run_id} was {old!r}, now {val!r}: params cannot "
                               f"change, the new value is logged as tag 'changed.{key}'")  # fmt: skip
                records.append({"op": "tag", "key": owner._keys(f"changed.{key}"), "value": val})
                continue
            owner._params[key] = val
            records.append({"op": "param", "key": key, "value": val})
        self._append(records)

    def epoch_completed(self, engine: Engine) -> None:
        self._guard(super().epoch_completed, engine)

    def iteration_completed(self, engine: Engine) -> None:
        self._guard(super().iteration_completed, engine)

    def complete(self) -> None:
        if self.artifacts and self.cur_run:
            self._guard(lambda: [self.log_artifact(p) for p in self._parse_artifacts()])

    def flush(self) -> bool:
        """Wait until every record so far is in MLflow; False (at once) while the server does not answer."""
        owner = self._owner()
        return owner._worker.flush() if owner._worker is not None else True

    def close(self) -> None:
        """Record the run's end, send what is left (bounded: a dead or hung server costs a few seconds), stop the
        sender; the spool folder goes when everything is in MLflow, else it stays for scripts/mlflow_replay.py."""
        if self.run_of is not None:  # the owner closes the run
            self.cur_run = None
            return
        try:
            if self._spool is not None and self.cur_run is not None:
                self._guard(self._finish)
        finally:
            self.cur_run, self._spool, self._worker = None, None, None
            if not self._disabled:
                try:
                    self._dispose_sqlite_store()
                except Exception as e:  # pragma: no cover - releasing a local store never fails a run
                    logger.debug(f"MLflow: could not release the SQLite store ({e})")

    def _finish(self) -> None:
        spool, worker, run_id = self._spool, self._worker, self.cur_run.info.run_id
        spool.append([{"op": "status", "status": self.run_finish_status, "end_time": now_ms()}])
        done = worker.flush()
        # an offline worker exits at once; one stuck in a request to a hung server is left behind (a daemon)
        worker.stop(abandon=not done, timeout=None if done else (5 if not worker.online else 0))
        if not done and not worker.is_alive() and is_reachable(self.tracking_uri, 2.0):
            # the store answers now (a local store after a locked database, a server back before the worker's next
            # probe): one last try from here
            try:
                sender = Sender(self.client, run_id, spool, dedupe=True)
                sender.send(worker.sent, spool.complete_end(worker.sent), progress=spool.set_sent)
                done = True
            except Exception as e:
                worker.last_error = f"{type(e).__name__}: {e}"
        if self._n_skipped:
            logger.info(f"MLflow: {self._n_skipped} metric points of steps run {run_id} already had were not logged")
        if done:
            spool.remove()
            return
        spool.copy_pending_artifacts(worker.sent)  # what was not uploaded is kept (the originals may go)
        spool.close()
        logger.warning(
            f"MLflow: run {run_id} is not complete in {self.tracking_uri} ({worker.last_error or 'server not answering'}"
            f"); its unsent records are kept in {spool.folder}. Send them with: {REPLAY_COMMAND} {self.spool_dir}"
        )

    # ------------------------------------------------------------------------------------------------ outside an engine
    def start_standalone(self, params: Mapping | None = None) -> bool:
        """Open a run without an engine (evaluation-only jobs); True when a run is open afterwards."""
        if params:
            self.experiment_param = {**(self.experiment_param or {}), **{k: str(v) for k, v in params.items()}}
        self.start(SimpleNamespace(state=SimpleNamespace(max_epochs=None, epoch_length=None)))
        return self.cur_run is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalars to the current run (no-op when disabled or before start; an error disables the handler)."""
        if self.cur_run is None:
            return
        self._guard(self._record_metrics, dict(metrics), step, step is not None)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log a file or folder to the current run (sent in the background; kept in the spool if the server is
        down). The file must stay where it is until :meth:`flush` or :meth:`close`."""
        if self.cur_run is None:
            return
        rec = {"op": "artifact", "path": os.path.abspath(os.fspath(path)), "artifact_path": artifact_path}
        self._guard(self._append, [rec])


def _raise(e: Exception):
    raise e


def loss_components(output: Mapping) -> dict[str, float]:
    """MLFlowHandler output_transform for the trainer: total loss, L_CE, L_AL and the number of aligned pairs."""
    out = {"train_loss": float(output["loss"])}
    for k in ("loss_ce", "loss_al", "n_aligned"):
        if k in output:
            out[f"train_{k}"] = float(output[k])
    return out
