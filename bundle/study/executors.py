"""How one run of the study is executed, and the Ray executor.

:func:`execute_run` is the one definition of a run: take the run folder's lock, check ``DONE`` / the fingerprint,
write ``setting.json``, start the training subprocess (the command of :func:`bundle.study.grid.train_command`,
holding the lock), then write ``DONE`` or ``FAILED``. Both executors call it:

- ``local`` (bundle/study/runner.py): ``workers`` threads on this machine, each running one run at a time;
- ``ray`` (:func:`run_on_ray`): one Ray task per run, scheduled by Ray on any node of the cluster with the task's
  resources (``num_cpus`` = the training's threads, ``num_gpus``), retried by Ray when the training fails
  (``max_retries``; a retry resumes from the run's checkpoints).

Ray is optional: it is imported only inside :func:`run_on_ray` / :func:`init_ray`.
"""

from __future__ import annotations

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

from bundle.study.config import RayOptions, StudyConfig
from bundle.study.grid import RunSpec, train_command
from bundle.study.layout import (
    BUNDLE_ROOT,
    DONE,
    FAILED,
    LOG,
    SETTING,
    config_fingerprint,
    expects_summary,
    fingerprint,
    log_tail,
    read_json,
    summary_path,
    try_run_lock,
    wipe_run_dir,
    write_record,
)
from bundle.study.tracking import delete_child_runs

__all__ = [
    "RAY_PIN",
    "RunJob",
    "RunOutcome",
    "RunFailedError",
    "RayMissingError",
    "execute_run",
    "format_duration",
    "import_ray",
    "init_ray",
    "run_on_ray",
]

RAY_PIN = "ray==2.60.0"  # the version requirements-dev.txt pins and the tests run
INTERRUPT_CODES = (-signal.SIGINT, 130, -signal.SIGTERM, 143)


@dataclass
class RunJob:
    """Everything a run needs, picklable (a Ray task receives it)."""

    cfg: StudyConfig
    spec: RunSpec
    datalist: str | None
    parent_run_id: str | None
    threads: int
    redo_stale: bool = False


@dataclass
class RunOutcome:
    """finished | failed | busy (locked by another worker or machine) | interrupted | skipped (finished meanwhile)."""

    run_id: str
    status: str
    elapsed: float = 0.0
    why: str = ""
    log_path: str = ""
    host: str = field(default_factory=socket.gethostname)
    messages: list[str] = field(default_factory=list)

    def failure_text(self) -> str:
        return (
            f"FAILED {self.run_id} after {format_duration(self.elapsed)} ({self.why}); log: {self.log_path}\n    "
            + log_tail(self.log_path).replace("\n", "\n    ")
        )


class RayMissingError(ImportError):
    """``--executor ray`` without Ray installed."""


class RunFailedError(RuntimeError):
    """A run's training failed (non-zero exit or no summary.json). The Ray task raises it so that Ray retries the
    task (``retry_exceptions``); the outcome travels with it."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(f"{outcome.run_id}: {outcome.why}")
        self.outcome = outcome

    def __reduce__(self):  # Ray pickles the exception back to the driver
        return (RunFailedError, (self.outcome,))


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def execute_run(
    job: RunJob,
    env: Mapping,
    gpu: str | None = None,
    on_start: Callable[[subprocess.Popen | None], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    grace: float = 20.0,
) -> RunOutcome:
    """Run one training as a subprocess in its run folder (see the module docstring); never raises for a failed
    training (the outcome says). ``on_start(proc)`` / ``on_start(None)`` bracket the child's life (the local
    executor keeps it to stop it on Ctrl-C). A KeyboardInterrupt while the child runs (Ray's ``ray.cancel``) stops
    the child with SIGINT, like Ctrl-C: the run stays unfinished and resumes next time."""
    cfg, spec = job.cfg, job.spec
    out = RunOutcome(spec.run_id, "skipped")
    rdir = cfg.run_dir(spec)
    out.log_path = os.path.join(rdir, LOG)
    fp = fingerprint(cfg, spec, job.datalist)
    cfp = config_fingerprint(cfg, spec, job.datalist)
    os.makedirs(rdir, exist_ok=True)
    with try_run_lock(rdir) as fd:
        if fd is None:
            out.status = "busy"
            out.messages.append(f"skip {spec.run_id}: another worker or machine is running it")
            return out
        done = read_json(os.path.join(rdir, DONE))
        if done is not None:
            if done.get("fingerprint") in (None, fp) or not job.redo_stale:
                return out  # finished meanwhile by another machine (or stale, kept)
            out.messages.append(f"redo {spec.run_id}: finished with another configuration (--redo-stale)")
            delete_child_runs(cfg, job.parent_run_id, spec.run_id, out.messages.append)
            wipe_run_dir(rdir)
        prev = read_json(os.path.join(rdir, SETTING))
        if prev is not None and prev.get("fingerprint") != fp:
            out.messages.append(f"restart {spec.run_id}: its unfinished attempt used another configuration")
            wipe_run_dir(rdir)
        cmd = train_command(cfg, spec, job.datalist, job.parent_run_id)
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
        run_env = {
            **env,
            "OMP_NUM_THREADS": str(job.threads),
            "MKL_NUM_THREADS": str(job.threads),
            "MLFLOW_TRACKING_URI": cfg.tracking_uri,
        }
        if gpu is not None:
            run_env["CUDA_VISIBLE_DEVICES"] = gpu
        t0 = time.time()
        interrupted = False
        with open(out.log_path, "ab") as logf:
            logf.write(f"\n===== {time.strftime('%F %T')} on {socket.gethostname()}: {shlex.join(cmd)}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=BUNDLE_ROOT,
                    env=run_env,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(fd,),
                )
            except OSError as e:
                rc, proc = f"could not start ({e})", None
            if proc is not None:
                if on_start:
                    on_start(proc)
                try:
                    rc = proc.wait()
                except KeyboardInterrupt:  # ray.cancel(): stop the training like Ctrl-C (checkpoint kept)
                    interrupted = True
                    proc.send_signal(signal.SIGINT)
                    try:
                        rc = proc.wait(timeout=grace)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = proc.wait()
                finally:
                    if on_start:
                        on_start(None)
        out.elapsed = time.time() - t0
        if interrupted or should_stop() or rc in INTERRUPT_CODES:
            out.status = "interrupted"
            out.messages.append(f"interrupted {spec.run_id} after {format_duration(out.elapsed)}: resumes next time")
            return out  # unfinished, not failed; the training resumes from its last checkpoint
        summ = summary_path(cfg, spec)
        if rc == 0 and (not expects_summary(cfg) or os.path.isfile(summ)):
            write_record(
                os.path.join(rdir, DONE),
                {
                    **spec.fields(),
                    "fingerprint": fp,
                    "config_fingerprint": cfp,
                    "elapsed_s": round(out.elapsed, 1),
                    "host": socket.gethostname(),
                    "finished": time.strftime("%FT%T"),
                    "summary": os.path.relpath(summ, rdir),
                },
            )
            out.status = "finished"
            return out
        out.why = f"exit code {rc}" if rc != 0 else f"exit code 0 but no {os.path.relpath(summ, rdir)}"
        write_record(
            os.path.join(rdir, FAILED),
            {
                "returncode": rc if isinstance(rc, int) else None,
                "why": out.why,
                "at": time.strftime("%FT%T"),
                "host": socket.gethostname(),
            },
        )
        out.status = "failed"
        return out


# ================================================================================================ Ray
def import_ray():
    """``import ray``, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayMissingError(
            f"--executor ray needs Ray, which is not installed ({e}); install it with: pip install {RAY_PIN}"
        ) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Connect to (or start) Ray unless this process already is connected; True when this call connected (the caller
    then disconnects with ``ray.shutdown()``). Workers get the bundle root on PYTHONPATH (they import this module);
    the bundle must therefore be at the same path on every node, like the study folder."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    pp = os.pathsep.join(p for p in (BUNDLE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    kwargs: dict = {"runtime_env": {"env_vars": {"PYTHONPATH": pp}}, "logging_level": "warning"}
    starts_local = address in (None, "local") and not (address is None and os.environ.get("RAY_ADDRESS"))
    if starts_local:  # a new local instance: no dashboard (extra dependencies, a web server nobody asked for)
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    elif num_cpus is not None:
        log(f"note: ray.num_cpus={num_cpus} only sizes a new local instance; the cluster at {address} keeps its own")
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ConnectionError(
            f"could not connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')!r} ({e}); start it "
            "with `ray start --head` (docs/study.md) or pass --address local for a Ray instance on this machine"
        ) from None
    return True


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ray_task(job: RunJob) -> RunOutcome:
    """The body of one Ray task: the same :func:`execute_run` as the local executor, in the task's environment
    (Ray sets CUDA_VISIBLE_DEVICES for ``num_gpus``). A failed training raises :class:`RunFailedError` so that Ray
    retries it."""
    out = execute_run(job, os.environ)
    if out.status == "failed":
        # forwarded to the driver's console by Ray; the driver reports the final failure itself
        print(f"attempt of {out.run_id} failed (Ray retries it while retries remain): " + out.failure_text()[7:],
              file=sys.stderr, flush=True)  # fmt: skip
        raise RunFailedError(out)
    return out


def run_on_ray(
    jobs: Sequence[RunJob],
    options: RayOptions,
    log: Callable[[str], None],
    on_outcome: Callable[[RunOutcome, int], None],
    max_in_flight: int | None = None,
) -> bool:
    """Submit one task per job (at most ``max_in_flight`` at a time), hand each outcome to ``on_outcome(outcome,
    n_left)`` as it arrives; True when interrupted (Ctrl-C / SIGTERM: the tasks are cancelled, their trainings stop
    with SIGINT and resume next time). A task that still fails after its retries gives a ``failed`` outcome."""
    ray = import_ray()
    from ray.exceptions import RayError, RayTaskError, TaskCancelledError

    connected = init_ray(options.address, options.num_cpus, log)
    ray_term = None
    if threading.current_thread() is threading.main_thread():  # ray.init installs a SIGTERM handler that exits:
        ray_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # stop like Ctrl-C instead (tasks resume later)
    try:
        res = ray.cluster_resources()
        log(
            f"Ray: {res.get('CPU', 0):g} CPU(s), {res.get('GPU', 0):g} GPU(s) in the cluster; each run takes "
            f"{options.cpus_per_run:g} CPU(s), {options.gpus_per_run:g} GPU(s), up to {options.max_retries} retries"
        )
        for what, need, flag in (
            ("CPU", options.cpus_per_run, "--threads"),
            ("GPU", options.gpus_per_run, "--gpus-per-run"),
        ):
            if need > res.get(what, 0):  # such a task would wait for ever on a cluster that does not grow
                msg = (
                    f"each run asks for {need:g} {what}(s) ({flag}) but the Ray cluster has {res.get(what, 0):g}; "
                    f"lower {flag} or add nodes"
                )
                if connected and options.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
                    raise ValueError(msg)
                log(f"WARNING: {msg} (an autoscaling cluster may add them)")
        task = ray.remote(_ray_task).options(
            num_cpus=options.cpus_per_run,
            num_gpus=options.gpus_per_run,
            max_retries=options.max_retries,
            retry_exceptions=[RunFailedError],
            name="study_run",
        )
        queue, pending = list(jobs), {}
        limit = max_in_flight or len(queue)
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    job = queue.pop(0)
                    pending[task.remote(job)] = job
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, RunFailedError):
                            out = cause.outcome
                        else:  # a bug or a lost node: the run is failed for this invocation, retried next time
                            out = RunOutcome(job.spec.run_id, "failed", why=f"Ray task error: {str(e)[-500:]}")
                            out.log_path = os.path.join(job.cfg.run_dir(job.spec), LOG)
                    except TaskCancelledError:
                        out = RunOutcome(job.spec.run_id, "interrupted")
                    except RayError as e:  # worker or node died more often than max_retries
                        out = RunOutcome(job.spec.run_id, "failed", why=f"{type(e).__name__}: {str(e)[-500:]}")
                        out.log_path = os.path.join(job.cfg.run_dir(job.spec), LOG)
                    on_outcome(out, len(queue) + len(pending))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)  # KeyboardInterrupt inside the task: execute_run stops its training with SIGINT
            ray.wait(list(pending), num_returns=len(pending), timeout=30.0)
            return True
        return False
    finally:
        if connected:
            ray.shutdown()
        if ray_term is not None:
            signal.signal(signal.SIGTERM, ray_term)
