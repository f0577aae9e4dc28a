"""The study runner: every unfinished run of this machine's share, ``workers`` training subprocesses at a time.

Each run holds its folder's lock while it trains (the child inherits it), writes ``setting.json`` before and
``DONE`` / ``FAILED`` after; a crash of one run never stops the study, Ctrl-C / SIGTERM stop the children (they
resume next time). At the end the parent MLflow run gets its status and the report is written.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bundle.study.config import StudyConfig, resolve_path
from bundle.study.grid import RunSpec, select_runs, train_command
from bundle.study.layout import (
    BUNDLE_ROOT,
    CONFIG_FILE,
    DONE,
    FAILED,
    LOG,
    SETTING,
    config_fingerprint,
    expects_summary,
    fingerprint,
    log_tail,
    read_json,
    run_status,
    summary_path,
    try_run_lock,
    wipe_run_dir,
    write_record,
)
from bundle.study.report import make_report
from bundle.study.tracking import delete_child_runs, ensure_parent_run, finish_parent_run

__all__ = ["StudyResult", "run_study", "resolve_datalist", "format_duration"]


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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


class _Runner:
    def __init__(
        self,
        cfg: StudyConfig,
        specs: list[RunSpec],
        workers: int,
        threads: int,
        env: Mapping,
        datalist_file: str | None,
        parent_run_id: str | None,
        gpus: Sequence[str] | None,
        redo_stale: bool,
        log: Callable[[str], None],
        total: int,
        prior_durations: list[float],
    ):
        self.cfg, self.specs, self.workers, self.threads = cfg, specs, workers, threads
        self.env, self.datalist, self.parent = dict(env), datalist_file, parent_run_id
        self.gpus, self.redo_stale, self.log = list(gpus or []), redo_stale, log
        self.queue = list(specs)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.durations = list(prior_durations)
        self.finished, self.failed, self.busy = [], [], []
        self.total, self.n_done_before = total, 0
        self.t0 = time.time()

    def _next(self) -> RunSpec | None:
        with self.lock:
            return self.queue.pop(0) if self.queue and not self.stop.is_set() else None

    def worker(self, slot: int) -> None:
        while (spec := self._next()) is not None:
            try:
                self.run_one(spec, slot)
            except Exception as e:  # a runner bug for one run must not end the study
                with self.lock:
                    self.failed.append(spec.run_id)
                self.log(f"ERROR {spec.run_id}: {type(e).__name__}: {e}")

    def run_one(self, spec: RunSpec, slot: int) -> None:
        cfg = self.cfg
        rdir = cfg.run_dir(spec)
        fp = fingerprint(cfg, spec, self.datalist)
        cfp = config_fingerprint(cfg, spec, self.datalist)
        os.makedirs(rdir, exist_ok=True)
        with try_run_lock(rdir) as fd:
            if fd is None:
                with self.lock:
                    self.busy.append(spec.run_id)
                self.log(f"skip {spec.run_id}: another worker or machine is running it")
                return
            done = read_json(os.path.join(rdir, DONE))
            if done is not None:
                if done.get("fingerprint") in (None, fp) or not self.redo_stale:
                    return  # finished meanwhile by another machine (or stale, kept)
                self.log(f"redo {spec.run_id}: finished with another configuration (--redo-stale)")
                delete_child_runs(cfg, self.parent, spec.run_id, self.log)
                wipe_run_dir(rdir)
            prev = read_json(os.path.join(rdir, SETTING))
            if prev is not None and prev.get("fingerprint") != fp:
                self.log(f"restart {spec.run_id}: its unfinished attempt used another configuration")
                wipe_run_dir(rdir)
            cmd = train_command(cfg, spec, self.datalist, self.parent)
            write_record(
                os.path.join(rdir, SETTING),
                {
                    **spec.fields(),
                    "fingerprint": fp,
                    "config_fingerprint": cfp,
                    "command": cmd,
                    "study": cfg.name,
                    "profile": cfg.profile,
                },
            )
            if os.path.exists(os.path.join(rdir, FAILED)):
                os.remove(os.path.join(rdir, FAILED))
            env = {
                **self.env,
                "OMP_NUM_THREADS": str(self.threads),
                "MKL_NUM_THREADS": str(self.threads),
                "MLFLOW_TRACKING_URI": cfg.tracking_uri,
            }
            if self.gpus:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
            t0 = time.time()
            with open(os.path.join(rdir, LOG), "ab") as logf:
                logf.write(f"\n===== {time.strftime('%F %T')} on {socket.gethostname()}: {shlex.join(cmd)}\n".encode())
                logf.flush()
                try:
                    proc = subprocess.Popen(
                        cmd,
                        cwd=BUNDLE_ROOT,
                        env=env,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        pass_fds=(fd,),
                    )
                except OSError as e:
                    rc, proc = f"could not start ({e})", None
                if proc is not None:
                    with self.lock:
                        self.procs[spec.run_id] = proc
                    rc = proc.wait()
                    with self.lock:
                        self.procs.pop(spec.run_id, None)
            elapsed = time.time() - t0
            if self.stop.is_set() or rc in (-signal.SIGINT, 130, -signal.SIGTERM, 143):
                self.log(f"interrupted {spec.run_id} after {format_duration(elapsed)}: resumes next time")
                return  # Ctrl-C / SIGTERM: unfinished, not failed; the training resumes from its last checkpoint
            summ = summary_path(cfg, spec)
            if rc == 0 and (not expects_summary(cfg) or os.path.isfile(summ)):
                write_record(
                    os.path.join(rdir, DONE),
                    {
                        **spec.fields(),
                        "fingerprint": fp,
                        "config_fingerprint": cfp,
                        "elapsed_s": round(elapsed, 1),
                        "host": socket.gethostname(),
                        "finished": time.strftime("%FT%T"),
                        "summary": os.path.relpath(summ, rdir),
                    },
                )
                with self.lock:
                    self.finished.append(spec.run_id)
                    self.durations.append(elapsed)
                self._progress(spec, elapsed)
            else:
                why = f"exit code {rc}" if rc != 0 else f"exit code 0 but no {os.path.relpath(summ, rdir)}"
                write_record(
                    os.path.join(rdir, FAILED),
                    {
                        "returncode": rc if isinstance(rc, int) else None,
                        "why": why,
                        "at": time.strftime("%FT%T"),
                        "host": socket.gethostname(),
                    },
                )
                with self.lock:
                    self.failed.append(spec.run_id)
                self.log(
                    f"FAILED {spec.run_id} after {format_duration(elapsed)} ({why}); log: "
                    f"{os.path.join(rdir, LOG)}\n    " + log_tail(os.path.join(rdir, LOG)).replace("\n", "\n    ")
                )

    def _progress(self, spec: RunSpec, elapsed: float) -> None:
        with self.lock:
            n_fin, n_fail = len(self.finished), len(self.failed)
            left = len(self.queue) + len(self.procs)
            mean = sum(self.durations) / len(self.durations) if self.durations else None
        done_total = self.n_done_before + n_fin
        eta = mean * left / max(1, min(self.workers, left)) if mean is not None and left else 0.0
        self.log(
            f"[{done_total}/{self.total}] {spec.run_id} done in {format_duration(elapsed)} | this invocation: "
            f"{n_fin} done, {n_fail} failed, {left} to go | elapsed {format_duration(time.time() - self.t0)}, "
            f"ETA {format_duration(eta)}"
        )

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


def run_study(
    cfg: StudyConfig,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    report: bool = True,
    redo_stale: bool = False,
    threads: int | None = None,
    gpus: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    env: Mapping | None = None,
) -> StudyResult:
    """Train (and evaluate) every unfinished run of the study (this shard's share, matching ``only``).

    ``workers`` subprocesses at a time, each with ``threads`` CPU threads (default: cores // workers). A failing run is
    reported and left for the next invocation; Ctrl-C / SIGTERM stops the children (they resume next time).
    ``dry_run`` only reports each run's status. At the end (unless ``report`` is False) the report is written,
    for a shard only once the whole study is finished.
    """
    log = log or (lambda s: print(s, flush=True))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
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
    log(
        f"study {cfg.name} (profile {cfg.profile}): {len(all_runs)} runs in all, {len(specs)} selected"
        f"{f' (shard {shard[0]}/{shard[1]})' if shard else ''}, {len(res.done)} finished, {len(todo)} to run with "
        f"{workers} worker(s) x {threads} thread(s); folder {cfg.study_dir}; MLflow {cfg.tracking_uri}"
    )
    runner = _Runner(
        cfg,
        todo,
        workers,
        threads,
        env if env is not None else os.environ,
        datalist,
        parent,
        gpus,
        redo_stale,
        log,
        len(specs),
        prior,
    )
    runner.n_done_before = len(specs) - len(todo)
    pool = [threading.Thread(target=runner.worker, args=(k,), daemon=True) for k in range(min(workers, len(todo)))]
    old_term = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(signum, frame):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        for t in pool:
            t.start()
        while any(t.is_alive() for t in pool):
            for t in pool:
                t.join(0.2)
    except KeyboardInterrupt:
        res.interrupted = True
        log("interrupted: stopping the running trainings (they resume from their last checkpoint next time)")
        runner.terminate()
        for t in pool:
            t.join(5)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    res.finished_now, res.failed, res.skipped_busy = runner.finished, runner.failed, runner.busy
    res.done = sorted(set(res.done) | set(runner.finished))
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
