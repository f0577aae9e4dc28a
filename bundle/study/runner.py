"""The study runner: every unfinished run of this machine's share, executed locally (``workers`` training
subprocesses at a time) or as Ray tasks on a cluster (bundle/study/executors.py).

Each run holds its folder's lock while it trains (the child inherits it), writes ``setting.json`` before and
``DONE`` / ``FAILED`` after; a crash of one run never stops the study, Ctrl-C / SIGTERM stop the children (they
resume next time). At the end the parent MLflow run gets its status and the report is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bundle.study.config import EXECUTORS, RayOptions, StudyConfig, resolve_path
from bundle.study.executors import RunJob, RunOutcome, execute_run, format_duration, import_ray, run_on_ray
from bundle.study.grid import RunSpec, select_runs, train_command
from bundle.study.layout import BUNDLE_ROOT, CONFIG_FILE, DONE, fingerprint, read_json, run_status, write_record
from bundle.study.report import make_report
from bundle.study.tracking import ensure_parent_run, finish_parent_run

__all__ = ["StudyResult", "run_study", "resolve_datalist", "format_duration"]


def resolve_datalist(cfg: StudyConfig) -> str:
    """The datalist every run uses, prepared once here (the built-in synthetic benchmark is generated on first use)
    instead of by each run: fails early, and the path and digest become part of each run's fingerprint."""
    dl = cfg.train_overrides.get("datalist_file")
    if isinstance(dl, str) and not dl.startswith("$"):
        path = resolve_path(dl)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{cfg.source}: train_overrides.datalist_file {path} does not exist; give the "
                "path of a datalist JSON (docs/datalist.md)"
            )
        return path
    if BUNDLE_ROOT not in sys.path:
        sys.path.insert(0, BUNDLE_ROOT)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(cfg.train_config)
    parser.update({"bundle_root": BUNDLE_ROOT, **cfg.train_overrides})
    with contextlib.chdir(BUNDLE_ROOT):  # relative paths in overrides mean what they mean to the runs (cwd = root)
        return os.path.abspath(parser.get_parsed_content("datalist_file"))


@dataclass
class StudyResult:
    study_dir: str
    selected: list[str]
    done: list[str] = field(default_factory=list)  # finished now or before
    finished_now: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)  # locked by another worker/machine
    stale: list[str] = field(default_factory=list)
    interrupted: bool = False
    parent_run_id: str | None = None
    report_dir: str | None = None
    statuses: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


class _Progress:
    """The outcomes of this invocation's runs and the progress line of each finished one (both executors)."""

    def __init__(self, total: int, n_done_before: int, slots: int, prior_durations: list[float], log):
        self.total, self.n_done_before, self.slots, self.log = total, n_done_before, slots, log
        self.durations = list(prior_durations)
        self.finished, self.failed, self.busy = [], [], []
        self.lock = threading.Lock()
        self.t0 = time.time()

    def add(self, out: RunOutcome, left: int) -> None:
        """``left``: the runs still queued or running after this one."""
        for m in out.messages:
            self.log(m)
        with self.lock:
            if out.status == "busy":
                self.busy.append(out.run_id)
            elif out.status == "failed":
                self.failed.append(out.run_id)
            elif out.status == "finished":
                self.finished.append(out.run_id)
                self.durations.append(out.elapsed)
            n_fin, n_fail = len(self.finished), len(self.failed)
            mean = sum(self.durations) / len(self.durations) if self.durations else None
        if out.status == "failed":
            self.log(out.failure_text())
        elif out.status == "finished":
            eta = mean * left / max(1, min(self.slots, left)) if mean is not None and left else 0.0
            self.log(
                f"[{self.n_done_before + n_fin}/{self.total}] {out.run_id} done in {format_duration(out.elapsed)} "
                f"on {out.host} | this invocation: {n_fin} done, {n_fail} failed, {left} to go | elapsed "
                f"{format_duration(time.time() - self.t0)}, ETA {format_duration(eta)}"
            )


class _LocalRunner:
    """The local executor: ``workers`` threads, each running :func:`execute_run` for one run at a time."""

    def __init__(self, jobs: list[RunJob], env: Mapping, gpus: Sequence[str] | None, progress: _Progress):
        self.queue, self.env, self.gpus, self.progress = list(jobs), dict(env), list(gpus or []), progress
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}

    def _next(self) -> RunJob | None:
        with self.lock:
            return self.queue.pop(0) if self.queue and not self.stop.is_set() else None

    def _track(self, run_id: str, proc: subprocess.Popen | None) -> None:
        with self.lock:
            if proc is None:
                self.procs.pop(run_id, None)
            else:
                self.procs[run_id] = proc

    def worker(self, slot: int) -> None:
        while (job := self._next()) is not None:
            rid = job.spec.run_id
            try:
                out = execute_run(
                    job,
                    self.env,
                    gpu=self.gpus[slot % len(self.gpus)] if self.gpus else None,
                    on_start=lambda p, rid=rid: self._track(rid, p),
                    should_stop=self.stop.is_set,
                )
            except Exception as e:  # a runner bug for one run must not end the study
                self.progress.log(f"ERROR {rid}: {type(e).__name__}: {e}")
                with self.progress.lock:
                    self.progress.failed.append(rid)
                continue
            with self.lock:
                left = len(self.queue) + len(self.procs)
            self.progress.add(out, left)

    def terminate(self, grace: float = 20.0) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # lets the training stop like Ctrl-C (checkpoint from last epoch kept)
        deadline = time.time() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()

    def run(self, workers: int, log) -> bool:
        """Run the queue; True when interrupted (Ctrl-C / SIGTERM)."""
        pool = [threading.Thread(target=self.worker, args=(k,), daemon=True) for k in range(workers)]
        try:
            for t in pool:
                t.start()
            while any(t.is_alive() for t in pool):
                for t in pool:
                    t.join(0.2)
        except KeyboardInterrupt:
            log("interrupted: stopping the running trainings (they resume from their last checkpoint next time)")
            self.terminate()
            for t in pool:
                t.join(5)
            return True
        return False


def run_study(
    cfg: StudyConfig,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    report: bool = True,
    redo_stale: bool = False,
    threads: int | None = None,
    gpus: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    env: Mapping | None = None,
    executor: str | None = None,
    ray: RayOptions | None = None,
) -> StudyResult:
    """Train (and evaluate) every unfinished run of the study (this shard's share, matching ``only``).

    ``executor`` (default ``cfg.executor``): ``local`` runs ``workers`` (default 1) subprocesses at a time on this
    machine, each with ``threads`` CPU threads (default: cores // workers), worker k on GPU ``gpus[k % len]``;
    ``ray`` runs each run as a Ray task (``ray``, default ``cfg.ray``: address, CPUs and GPUs per run, retries;
    ``threads`` overrides ``ray.cpus_per_run``, ``workers`` caps the runs in flight). Both execute the same
    subprocess (:func:`bundle.study.executors.execute_run`). A failing run is reported and left for the next
    invocation; Ctrl-C / SIGTERM stops the children (they resume next time). ``dry_run`` only reports each run's
    status. At the end (unless ``report`` is False) the report is written, for a shard only once the whole study is
    finished.
    """
    log = log or (lambda s: print(s, flush=True))
    executor = executor or cfg.executor
    ray_opts = ray or cfg.ray
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose one of {list(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if executor == "ray":
        if not dry_run:
            import_ray()  # a missing Ray is one clear line before anything is prepared
        if shard:
            raise ValueError(
                "--shard splits a study between independent invocations; with --executor ray one invocation "
                "schedules every run on the whole cluster: drop --shard"
            )
        if gpus:
            raise ValueError(
                "--gpus pins local workers to GPU ids; with --executor ray give --gpus-per-run N (Ray assigns the "
                "GPUs and sets CUDA_VISIBLE_DEVICES)"
            )
        if threads is not None:
            ray_opts = dataclasses.replace(ray_opts, cpus_per_run=threads)
    all_runs = cfg.runs
    specs = select_runs(all_runs, shard, only)
    if only and not specs:
        raise ValueError(
            f"--only {list(only)} matches no run of study {cfg.name}; run ids look like "
            f"{all_runs[0].run_id!r} (try --dry-run)"
        )
    res = StudyResult(cfg.study_dir, [s.run_id for s in specs])
    # fingerprints need the datalist path; a dry run does not prepare data, so it uses the recorded one
    datalist = None if dry_run else resolve_datalist(cfg)
    if dry_run:
        datalist = (read_json(os.path.join(cfg.study_dir, CONFIG_FILE)) or {}).get("datalist_file")
    statuses = {s.run_id: run_status(cfg, s, fingerprint(cfg, s, datalist) if datalist else None) for s in specs}
    res.statuses = statuses
    res.stale = [k for k, v in statuses.items() if v == "stale"]
    res.done = [k for k, v in statuses.items() if v in ("done", "stale")]
    if dry_run:
        _print_plan(cfg, specs, statuses, shard, datalist, log)
        return res
    os.makedirs(cfg.study_dir, exist_ok=True)
    if executor == "ray":
        threads = max(1, int(ray_opts.cpus_per_run))
    else:
        workers = workers or 1
        threads = threads or max(
            1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // workers
        )
    todo = [
        s
        for s in specs
        if statuses[s.run_id] not in ("done",) and not (statuses[s.run_id] == "stale" and not redo_stale)
    ]
    if res.stale and not redo_stale:
        log(
            f"WARNING: {len(res.stale)} finished run(s) were made with another configuration and are kept: "
            f"{', '.join(res.stale[:6])}{' ...' if len(res.stale) > 6 else ''}. Use --redo-stale to redo them or "
            "--name to start a new study."
        )
    parent = ensure_parent_run(cfg, log)
    res.parent_run_id = parent
    rec = {**cfg.to_dict(), "datalist_file": datalist, "parent_run_id": parent}
    write_record(os.path.join(cfg.study_dir, CONFIG_FILE), rec)
    prior = [
        d["elapsed_s"]
        for s in specs
        if (d := read_json(os.path.join(cfg.run_dir(s), DONE))) and isinstance(d.get("elapsed_s"), int | float)
    ]
    how = (
        f"{workers} worker(s) x {threads} thread(s)"
        if executor == "local"
        else f"Ray tasks of {threads} thread(s)" + (f", at most {workers} at a time" if workers else "")
    )
    log(
        f"study {cfg.name} (profile {cfg.profile}): {len(all_runs)} runs in all, {len(specs)} selected"
        f"{f' (shard {shard[0]}/{shard[1]})' if shard else ''}, {len(res.done)} finished, {len(todo)} to run with "
        f"{how}; folder {cfg.study_dir}; MLflow {cfg.tracking_uri}"
    )
    jobs = [RunJob(cfg, s, datalist, parent, threads, redo_stale) for s in todo]
    progress = _Progress(len(specs), len(specs) - len(todo), workers or len(todo), prior, log)
    old_term = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(signum, frame):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        if jobs and executor == "ray":  # nothing to run: Ray is not even started
            if run_on_ray(jobs, ray_opts, log, progress.add, max_in_flight=workers):
                res.interrupted = True
                log("interrupted: the Ray tasks were cancelled (their trainings resume from their checkpoints)")
        elif jobs:
            local = _LocalRunner(jobs, env if env is not None else os.environ, gpus, progress)
            res.interrupted = local.run(min(workers, len(jobs)), log)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    res.finished_now, res.failed, res.skipped_busy = progress.finished, progress.failed, progress.busy
    res.done = sorted(set(res.done) | set(progress.finished))
    all_done = all(run_status(cfg, s) in ("done", "stale") for s in all_runs)
    if res.failed or res.interrupted:
        finish_parent_run(cfg, parent, "FAILED" if res.failed else "KILLED", log)
    elif all_done:
        finish_parent_run(cfg, parent, "FINISHED", log)
    log(
        f"study {cfg.name}: {len(res.done)}/{len(specs)} selected runs finished"
        + (
            f", {len(res.failed)} FAILED ({', '.join(res.failed)}): run the same command again to retry them"
            if res.failed
            else ""
        )
        + (f", {len(res.skipped_busy)} left to other workers" if res.skipped_busy else "")
        + (" (interrupted)" if res.interrupted else "")
    )
    if report and not res.interrupted and (all_done or not shard):
        try:
            out = make_report(cfg.study_dir, log=log)
            res.report_dir = out["report_dir"]
            log(f"report: {os.path.join(res.report_dir, 'results.md')}")
        except Exception as e:  # the runs are safe on disk; the report can be redone with scripts/report.py
            log(
                f"WARNING: the report failed ({type(e).__name__}: {e}); rerun: python scripts/report.py "
                f"{cfg.study_dir}"
            )
    return res


def _print_plan(
    cfg: StudyConfig, specs: Sequence[RunSpec], statuses: Mapping[str, str], shard, datalist: str | None, log
) -> None:
    log(f"study {cfg.name} (profile {cfg.profile}) in {cfg.study_dir}")
    log(
        f"  {len(cfg.settings)} settings x {len(cfg.seeds)} seeds = {len(cfg.runs)} runs; selected {len(specs)}"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
    )
    log(f"  MLflow: {cfg.tracking_uri} (experiment {cfg.experiment_name})")
    for s in specs:
        log(f"  {statuses[s.run_id]:<8} {s.run_id:<28} groups={','.join(s.setting.groups)}")
    counts: dict[str, int] = {}
    for v in statuses.values():
        counts[v] = counts.get(v, 0) + 1
    log("  " + ", ".join(f"{v}: {k}" for k, v in sorted(counts.items())))
    pending = [s for s in specs if statuses[s.run_id] not in ("done", "stale")]
    if pending:
        log("  command of the first run to do:\n    " + shlex.join(train_command(cfg, pending[0], datalist)))
