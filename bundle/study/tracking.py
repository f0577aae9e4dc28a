"""MLflow for the study: one parent run per study (created once, recorded in ``<study>/mlflow_parent.json``, reused
by every later invocation and machine), its status, the cleanup of a redone run's child, and the report logged to it.

Each run's child is created by the training itself (configs/train.yaml's MLflow handler, nested through the
``mlflow_parent_run_id`` and ``mlflow_tags`` that :func:`bundle.study.grid.train_command` passes). Tracking never
stops a study: every function here warns and carries on when MLflow is unreachable or fails.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bundle.study.layout import BUNDLE_ROOT, CONFIG_FILE, PARENT_FILE, PARENT_LOCK, read_json, write_record
from bundle.utils.lock import file_lock
from bundle.utils.mlflow import flat_params, is_reachable, sanitize_key

if TYPE_CHECKING:  # annotations only
    from bundle.study.config import StudyConfig

__all__ = ["ensure_parent_run", "finish_parent_run", "delete_child_runs", "log_report"]


def ensure_parent_run(cfg: StudyConfig, log: Callable[[str], None] = print) -> str | None:
    """The study's parent MLflow run id (created once, recorded in ``<study>/mlflow_parent.json``, reused and reopened
    by later invocations and other machines). None (with a warning) when MLflow is unavailable: runs still train."""
    os.makedirs(cfg.study_dir, exist_ok=True)
    rec_path = os.path.join(cfg.study_dir, PARENT_FILE)
    if not is_reachable(cfg.tracking_uri):
        log(
            f"WARNING: MLflow server {cfg.tracking_uri} is unreachable: no parent run; each run falls back to its "
            "own store"
        )
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        with file_lock(os.path.join(cfg.study_dir, PARENT_LOCK)):  # two machines starting at once: one parent
            rec = read_json(rec_path) or {}
            if rec.get("tracking_uri") == cfg.tracking_uri and rec.get("run_id"):
                try:
                    run = client.get_run(rec["run_id"])
                    if run.info.lifecycle_stage == "active":
                        if run.info.status != "RUNNING":
                            client.update_run(run.info.run_id, status="RUNNING")
                        _log_config_artifact(client, run.info.run_id, cfg)
                        return run.info.run_id
                except Exception as e:  # deleted or from another store: make a new one
                    log(f"WARNING: recorded parent run {rec['run_id']} not usable ({type(e).__name__}); creating one")
            exp = client.get_experiment_by_name(cfg.experiment_name)
            if exp is None:
                art = None
                if cfg.tracking_uri.startswith("sqlite:///"):  # keep artifacts next to the SQLite store
                    art = os.path.join(os.path.dirname(cfg.tracking_uri[len("sqlite:///") :]), "mlruns")
                exp_id = client.create_experiment(cfg.experiment_name, artifact_location=art)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(
                exp_id,
                run_name=cfg.name,
                tags={
                    "study": cfg.name,
                    "profile": cfg.profile,
                    "role": "study_parent",
                    "mlflow.note.content": cfg.description or f"study {cfg.name} (profile {cfg.profile})",
                },
            )
            params = flat_params(
                {
                    "profile": cfg.profile,
                    "seeds": cfg.seeds,
                    "grid": cfg.grid,
                    "train_config": [os.path.relpath(p, BUNDLE_ROOT) for p in cfg.train_config],
                    "train_overrides": cfg.train_overrides,
                    "n_settings": len(cfg.settings),
                    "n_runs": len(cfg.runs),
                }
            )
            # MLflow keys allow alphanumerics and _-. :/ only ("network_def#vit_layers" -> "network_def_vit_layers")
            items = [Param(sanitize_key(k), v) for k, v in params.items()]
            try:
                for i in range(0, len(items), 100):
                    client.log_batch(run.info.run_id, params=items[i : i + 100])
                _log_config_artifact(client, run.info.run_id, cfg)
            except Exception as e:  # the parent is still usable for nesting
                log(f"WARNING: could not log the study config to the parent run ({type(e).__name__}: {e})")
            write_record(
                rec_path,
                {
                    "run_id": run.info.run_id,
                    "experiment_id": exp_id,
                    "tracking_uri": cfg.tracking_uri,
                    "created": time.strftime("%FT%T"),
                },
            )
            return run.info.run_id
    except Exception as e:  # tracking must never stop the study
        log(f"WARNING: MLflow parent run not available ({type(e).__name__}: {e}); runs are not nested")
        return None


def _log_config_artifact(client, run_id: str, cfg: StudyConfig) -> None:
    path = os.path.join(cfg.study_dir, CONFIG_FILE)
    write_record(path, cfg.to_dict())
    client.log_artifact(run_id, path)


def finish_parent_run(cfg: StudyConfig, run_id: str | None, status: str, log: Callable[[str], None] = print) -> None:
    if not run_id or not is_reachable(cfg.tracking_uri):
        return
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking_uri).set_terminated(run_id, status)
    except Exception as e:
        log(f"WARNING: could not set the parent run's status ({type(e).__name__}: {e})")


def delete_child_runs(cfg: StudyConfig, parent_run_id: str | None, run_name: str, log) -> None:
    """Redoing a stale run: remove its old MLflow child run(s) so the study shows one run per id."""
    if not parent_run_id or not is_reachable(cfg.tracking_uri):
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        exp = client.get_experiment_by_name(cfg.experiment_name)
        if exp is None:
            return
        for r in client.search_runs(
            [exp.experiment_id],
            # MLflow's filter syntax wants single-quoted values (repr could pick double quotes)
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.run_name = '{run_name}'",  # noqa: B907
        ):
            client.delete_run(r.info.run_id)
    except Exception as e:
        log(f"WARNING: could not delete the old MLflow run of {run_name} ({type(e).__name__}: {e})")


def log_report(study_dir: str, report_dir: str, metrics: Mapping[str, float], log) -> bool:
    """Log the report folder (and headline numbers) to the study's parent run; False (with a warning) on any error."""
    rec = read_json(os.path.join(study_dir, PARENT_FILE))
    if not rec or not rec.get("run_id") or not rec.get("tracking_uri"):
        log("note: no MLflow parent run recorded for this study; the report is not logged to MLflow")
        return False
    uri = rec["tracking_uri"]
    try:
        if not is_reachable(uri):
            log(f"WARNING: MLflow server {uri} is unreachable; the report is only on disk")
            return False
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=uri)
        client.log_artifacts(rec["run_id"], report_dir, artifact_path="report")
        ts = int(time.time() * 1000)
        items = [Metric(sanitize_key(k), float(v), ts, 0) for k, v in metrics.items() if math.isfinite(v)]
        if items:
            client.log_batch(rec["run_id"], metrics=items)
        return True
    except Exception as e:  # the report on disk is what matters
        log(f"WARNING: could not log the report to MLflow ({type(e).__name__}: {e})")
        return False
