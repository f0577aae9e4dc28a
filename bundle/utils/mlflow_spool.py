"""The MLflow spool: a write-ahead log of one run's MLflow records, sent by a background thread, replayable later.

Training never waits for MLflow: the handler appends each record (metric with its step and timestamp, param, tag,
artifact, final status) to the spool, a local file, and :class:`SpoolWorker` sends what is new every few seconds
with ``MlflowClient.log_batch`` from its own thread. When the tracking server dies or hangs, the worker goes
offline (the records stay in the spool, artifacts are copied into it) and probes the server's ``/health`` every
``retry_interval`` seconds; when it answers, the worker sends the backlog and carries on. What is still unsent when
the run closes is sent later, into the same run, by ``python scripts/mlflow_replay.py <output_dir>/mlflow_spool``
(:func:`replay`); replays skip points MLflow already has, so a second replay adds nothing.

Why by hand: MLflow 3.17's own asynchronous logging (``log_batch(synchronous=False)``, ``AsyncLoggingQueue``) keeps
batches in memory only, drops a batch that failed (the error surfaces only on its future), retries every queued
batch against a dead server, and registers an ``atexit`` drain that blocks the end of the process while the server
hangs. Nothing in MLflow persists unsent data or replays it.

Layout of ``<spool_root>/<run_id>/``::

    meta.json          run id, experiment id, tracking URI, run name (written atomically, once)
    records.jsonl      one JSON record a line, appended (O_APPEND, one write per batch); a torn last line is ignored
    sent.json          {"offset": N}: bytes of records.jsonl known to be in MLflow (advisory: replays deduplicate)
    artifacts/<offset>/<name>   a copy of an artifact that could not be uploaded (temp folder + rename)
    .lock              flock held by the process that sends this spool (the training's worker or a replay)

A run closed with everything sent removes its folder; the spool root then holds only runs with unsent records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from bundle.utils.atomic import read_json, write_json_atomic
from bundle.utils.mlflow import apply_client_defaults, is_reachable, is_rejection, is_remote

logger = logging.getLogger("bundle")

__all__ = ["Spool", "Sender", "SpoolWorker", "replay", "spool_folders", "REPLAY_COMMAND"]

REPLAY_COMMAND = "python scripts/mlflow_replay.py"
FORMAT = 1
# MLflow's log_batch limits (mlflow.utils.validation): 1000 entities, of which at most 100 params and 100 tags
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000


def now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    """One run's spool folder (module docstring). ``append`` may be called from any thread."""

    META, RECORDS, SENT, ARTIFACTS, LOCK = "meta.json", "records.jsonl", "sent.json", "artifacts", ".lock"

    def __init__(self, folder: str):
        self.folder = os.path.abspath(os.fspath(folder))
        self._lock = threading.Lock()
        self._fd: int | None = None

    @classmethod
    def open(cls, root: str, run_id: str, meta: dict) -> Spool:
        """The spool of ``run_id`` under ``root`` (created, with ``meta``, when absent; kept as is when present)."""
        spool = cls(os.path.join(root, run_id))
        os.makedirs(spool.folder, exist_ok=True)
        if read_json(spool.path(cls.META)) is None:
            write_json_atomic(spool.path(cls.META), {"format": FORMAT, "run_id": run_id, **meta}, fsync=True)
        return spool

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def meta(self) -> dict:
        return read_json(self.path(self.META)) or {}

    # ---- the log
    def append(self, records: Iterable[dict]) -> int:
        """Append ``records`` in one write; returns the end offset of the log."""
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=True) + "\n" for r in records).encode()
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path(self.RECORDS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                size = os.fstat(self._fd).st_size
                if size:  # a process killed mid-write left a torn last line: start a fresh one
                    with open(self.path(self.RECORDS), "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":
                            os.write(self._fd, b"\n")
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            return os.fstat(self._fd).st_size

    def end(self) -> int:
        """Bytes in the log (its complete and incomplete lines)."""
        try:
            return os.path.getsize(self.path(self.RECORDS))
        except OSError:
            return 0

    def read(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, dict]]:
        """The complete records in bytes [start, end) as (line start, line end, record); unreadable lines (a torn
        write) are skipped with a warning."""
        try:
            with open(self.path(self.RECORDS), "rb") as f:
                f.seek(start)
                data = f.read(-1 if end is None else max(0, end - start))
        except OSError:
            return []
        out, pos = [], start
        for line in data.splitlines(keepends=True):
            line_start, pos = pos, pos + len(line)
            if not line.endswith(b"\n"):  # still being written (or torn): not a record yet
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning(f"{self.path(self.RECORDS)}: byte {line_start}: unreadable record skipped (torn write)")
                continue
            out.append((line_start, pos, rec))
        return out

    def complete_end(self, start: int = 0) -> int:
        """The offset after the last complete line at or after ``start``."""
        recs = self.read(start)
        return recs[-1][1] if recs else start

    # ---- progress and artifacts
    def sent_offset(self) -> int:
        return int((read_json(self.path(self.SENT)) or {}).get("offset", 0))

    def set_sent(self, offset: int) -> None:
        write_json_atomic(self.path(self.SENT), {"offset": int(offset), "time": now_ms()}, indent=None)

    def artifact_copy(self, offset: int, rec: dict) -> str:
        """Where the spool keeps its copy of the artifact record at ``offset``."""
        return os.path.join(self.folder, self.ARTIFACTS, str(offset), os.path.basename(rec["path"].rstrip("/")))

    def copy_artifact(self, offset: int, rec: dict) -> bool:
        """Copy the artifact of the record at ``offset`` into the spool (atomically: a temp folder, then rename);
        False when its source is gone."""
        dest = self.artifact_copy(offset, rec)
        if os.path.exists(dest):
            return True
        src = rec["path"]
        if not os.path.exists(src):
            return False
        final = os.path.dirname(dest)
        tmp = os.path.join(self.folder, self.ARTIFACTS, f".{offset}.{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            target = os.path.join(tmp, os.path.basename(dest))
            shutil.copytree(src, target) if os.path.isdir(src) else shutil.copy2(src, target)
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(dest):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def copy_pending_artifacts(self, start: int, end: int | None = None) -> int:
        """Copy every artifact recorded in [start, end) into the spool; returns how many are kept."""
        n = 0
        for off, _, rec in self.read(start, end):
            if rec.get("op") == "artifact":
                if self.copy_artifact(off, rec):
                    n += 1
                else:
                    logger.warning(f"MLflow spool: artifact {rec['path']} is gone: it cannot be kept for a replay")
        return n

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """Delete the folder (everything in it is in MLflow); the spool root goes too when it is left empty."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))
        except OSError:
            pass


def _value_key(v: float):
    return "nan" if isinstance(v, float) and math.isnan(v) else float(v)


class Sender:
    """Sends the records of a spool to its MLflow run, in order, in ``log_batch`` calls within MLflow's limits.

    ``dedupe``: skip metric points (key, step, timestamp, value) and params (key, value) the run already has
    (replays, and the backlog a previous process of a resumed run left). A batch MLflow refuses (a bad name, a
    param with another value) is resent entity by entity and the refused ones are skipped with a warning;
    any other error (an outage) propagates, with :attr:`offset` at the last record sent.
    """

    def __init__(self, client, run_id: str, spool: Spool, dedupe: bool = False):
        self.client, self.run_id, self.spool, self.dedupe = client, run_id, spool, dedupe
        self.offset = 0
        self.counts = {"metric": 0, "param": 0, "tag": 0, "artifact": 0, "status": 0, "skipped": 0, "refused": 0}
        self._history: dict[str, set] = {}
        self._params: dict[str, str] | None = None

    def _seen_points(self, key: str) -> set:
        if key not in self._history:
            hist = self.client.get_metric_history(self.run_id, key)
            self._history[key] = {(int(m.step), int(m.timestamp), _value_key(m.value)) for m in hist}
        return self._history[key]

    def _logged_params(self) -> dict[str, str]:
        if self._params is None:
            self._params = dict(self.client.get_run(self.run_id).data.params)
        return self._params

    def send(self, start: int, end: int | None = None, progress: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> int:  # fmt: skip
        """Send the records in bytes [start, end); returns the offset reached (== the end unless stopped)."""
        from mlflow.entities import Metric, Param, RunTag

        self.offset = start
        metrics, params, tags, last = [], [], [], start

        def flush_batch():
            nonlocal metrics, params, tags
            if metrics or params or tags:
                self._log_batch(metrics, params, tags)
                self.counts["metric"] += len(metrics)
                self.counts["param"] += len(params)
                self.counts["tag"] += len(tags)
            metrics, params, tags = [], [], []
            self._advance(last, progress)

        for off, off_end, rec in self.spool.read(start, end):
            op = rec.get("op")
            if op == "metric":
                point = (int(rec["step"]), int(rec["ts"]), _value_key(rec["value"]))
                if self.dedupe and point in self._seen_points(rec["key"]):
                    self.counts["skipped"] += 1
                else:
                    metrics.append(Metric(rec["key"], float(rec["value"]), int(rec["ts"]), int(rec["step"])))
            elif op == "param":
                if self.dedupe and self._logged_params().get(rec["key"]) == rec["value"]:
                    self.counts["skipped"] += 1
                else:
                    params.append(Param(rec["key"], rec["value"]))
            elif op == "tag":
                tags.append(RunTag(rec["key"], rec["value"]))
            elif op in ("artifact", "status"):
                flush_batch()
                self._send_one(off, rec)
            last = off_end
            if (
                len(metrics) >= MAX_METRICS
                or len(params) >= MAX_PARAMS
                or len(tags) >= MAX_TAGS
                or len(metrics) + len(params) + len(tags) >= MAX_ENTITIES
                or op in ("artifact", "status")
            ):
                flush_batch()
                if should_stop is not None and should_stop():
                    return self.offset
        flush_batch()
        return self.offset

    def _advance(self, offset: int, progress) -> None:
        if offset > self.offset:
            self.offset = offset
            if progress is not None:
                progress(offset)

    def _log_batch(self, metrics, params, tags) -> None:
        try:
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
        except Exception as e:
            if not is_rejection(e):
                raise
            # one refused entity refuses the whole batch: send them one by one and skip only the refused ones
            for kind, items in (("metric", metrics), ("param", params), ("tag", tags)):
                for item in items:
                    try:
                        self.client.log_batch(self.run_id, **{f"{kind}s": [item]})
                    except Exception as e1:
                        if not is_rejection(e1):
                            raise
                        self.counts["refused"] += 1
                        self.counts[kind] -= 1
                        msg = str(e1).splitlines()[0][:300]
                        logger.warning(f"MLflow refused {kind} {item.key!r} of run {self.run_id}; skipped: {msg}")

    def _send_one(self, offset: int, rec: dict) -> None:
        if rec["op"] == "status":
            self.client.set_terminated(self.run_id, rec["status"], rec.get("end_time"))
            self.counts["status"] += 1
            return
        copy = self.spool.artifact_copy(offset, rec)
        path = copy if os.path.exists(copy) else rec["path"]
        if not os.path.exists(path):
            logger.warning(f"MLflow: artifact {rec['path']} of run {self.run_id} is gone and was not kept; skipped")
            return
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, rec.get("artifact_path"))
        else:
            self.client.log_artifact(self.run_id, path, rec.get("artifact_path"))
        self.counts["artifact"] += 1


class SpoolWorker(threading.Thread):
    """The background thread that sends a spool to its run (module docstring). A daemon: a hung request never
    keeps the process alive."""

    def __init__(self, client, run_id: str, spool: Spool, uri: str, interval: float = 2.0,
                 retry_interval: float = 15.0, probe_timeout: float = 2.0):  # fmt: skip
        super().__init__(name=f"mlflow-spool-{run_id[:8]}", daemon=True)
        self.client, self.run_id, self.spool, self.uri = client, run_id, spool, uri
        self.interval, self.retry_interval, self.probe_timeout = interval, retry_interval, probe_timeout
        self.online = True
        self.sent = spool.sent_offset()
        self.inherited_end = spool.complete_end(self.sent)  # a previous process's unsent records: deduplicated
        self.last_error: str | None = None
        self._wake, self._stopping, self._abandon = threading.Event(), threading.Event(), threading.Event()
        self._cv = threading.Condition()
        self._copied = self.sent
        self._last_saved = time.monotonic()
        self._exc_logged = False

    # ---- called by the training thread
    def wake(self) -> None:
        self._wake.set()

    def flush(self, probe_every: float = 2.0) -> bool:
        """Send everything appended so far; True once it is in MLflow. Returns False as soon as the worker is
        offline, or, for a server, when no record went through for ``probe_every`` seconds and ``/health`` does
        not answer (a hung server costs about ``probe_every`` + ``probe_timeout`` seconds here, not the HTTP
        client's timeouts)."""
        target = self.spool.complete_end(self.sent)
        self._wake.set()
        with self._cv:
            while self.sent < target:
                if not self.online or not self.is_alive():
                    return False
                before = self.sent
                self._cv.wait(probe_every)
                if self.sent == before and self.online and is_remote(self.uri):
                    if not is_reachable(self.uri, self.probe_timeout):
                        return False
        return True

    def stop(self, abandon: bool = False, timeout: float | None = None) -> None:
        """Stop after the current request (``abandon``: send nothing more) and wait up to ``timeout`` seconds."""
        if abandon:
            self._abandon.set()
        self._stopping.set()
        self._wake.set()
        if self.is_alive() and timeout != 0:
            self.join(timeout)

    # ---- the thread
    def _progress(self, offset: int) -> None:
        with self._cv:
            self.sent = offset
            self._cv.notify_all()
        if time.monotonic() - self._last_saved > 2.0:
            self._save()

    def _save(self) -> None:
        try:
            self.spool.set_sent(self.sent)
            self._last_saved = time.monotonic()
        except OSError as e:  # progress is advisory (replays deduplicate): never fatal
            logger.debug(f"MLflow spool: could not save the sent offset ({e})")

    def _set_online(self, online: bool) -> None:
        with self._cv:
            self.online = online
            self._cv.notify_all()

    def run(self) -> None:
        from bundle.utils.lock import file_lock

        try:
            with file_lock(self.spool.path(Spool.LOCK)):  # one sender per spool (a replay waits for us)
                self.sent = max(self.sent, self.spool.sent_offset())
                self._loop()
        except Exception as e:  # the worker must never take the training down
            logger.warning(f"MLflow spool worker stopped ({type(e).__name__}: {e}); records stay in the spool")
            self._set_online(False)
        finally:
            self._save()
            with self._cv:
                self._cv.notify_all()

    def _loop(self) -> None:
        next_probe = 0.0
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping.is_set()
            if self._abandon.is_set():
                return
            end = self.spool.end()
            if self.online and self.sent < end:
                try:
                    sender = Sender(self.client, self.run_id, self.spool, dedupe=self.sent < self.inherited_end)
                    sender.send(self.sent, end, progress=self._progress, should_stop=self._abandon.is_set)
                except Exception as e:
                    self._went_offline(e)
                    next_probe = time.monotonic() + self.retry_interval
            if not self.online:
                self._copy_artifacts()
                if stopping or self._abandon.is_set():
                    return
                if time.monotonic() >= next_probe:
                    if is_reachable(self.uri, self.probe_timeout):
                        logger.warning(f"MLflow: {self.uri} answers again: sending the spooled records of run "
                                       f"{self.run_id}")  # fmt: skip
                        self._set_online(True)
                        self._wake.set()
                    else:
                        next_probe = time.monotonic() + self.retry_interval
            elif stopping and self.sent >= self.spool.complete_end(self.sent):
                return

    def _went_offline(self, e: Exception) -> None:
        self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self._set_online(False)
        logger.warning(
            f"MLflow: sending to {self.uri} failed ({self.last_error}); training goes on, run {self.run_id}'s records "
            f"are kept in {self.spool.folder} and sent when the server answers again (or: {REPLAY_COMMAND} "
            f"{os.path.dirname(self.spool.folder)})"
        )

    def _copy_artifacts(self) -> None:
        end = self.spool.complete_end(max(self._copied, self.sent))
        start = max(self._copied, self.sent)
        if end > start:
            try:
                self.spool.copy_pending_artifacts(start, end)
                self._copied = end
            except OSError as e:
                logger.warning(f"MLflow spool: could not copy an artifact into {self.spool.folder} ({e})")


# ------------------------------------------------------------------------------------------------ replay
def spool_folders(path: str) -> list[str]:
    """The run spools at ``path``: the folder itself when it has a meta.json, else its subfolders that have one."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, Spool.META)):
        return [path]
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, Spool.META)))


def replay(path: str, tracking_uri: str | None = None, keep: bool = False, from_start: bool = False,
           lock_wait: float = 60.0, log: Callable[[str], None] = print) -> int:  # fmt: skip
    """Send the unsent records of every run spool at ``path`` into their MLflow runs. Returns 0 when everything is
    in MLflow (the folders are then removed unless ``keep``), 1 when some could not be sent (they stay; rerun
    later), 2 when ``path`` holds no spool. ``tracking_uri`` overrides the URI recorded in each meta.json;
    ``from_start`` resends the whole log (points MLflow already has are skipped)."""
    apply_client_defaults()
    folders = spool_folders(path)
    if not folders:
        log(f"{path}: no MLflow spool here (expected {Spool.META} in it or in its <run_id>/ subfolders)")
        return 2
    rc = 0
    for folder in folders:
        spool = Spool(folder)
        meta = spool.meta
        run_id, uri = meta.get("run_id"), tracking_uri or meta.get("tracking_uri")
        if not run_id or not uri:
            field = "run_id" if not run_id else "tracking_uri"
            log(f"{spool.path(Spool.META)}: field {field!r} is missing; pass --tracking_uri, or delete the folder")
            rc = 1
            continue
        if is_remote(uri) and not is_reachable(uri):
            log(f"{folder}: MLflow server {uri} is unreachable; nothing sent, rerun when it is up")
            rc = 1
            continue
        with _lock_within(spool.path(Spool.LOCK), lock_wait) as locked:
            if not locked:
                log(f"{folder}: in use by a process still sending it (a training of run {run_id}); rerun when it ends")
                rc = 1
                continue
            rc = max(rc, _replay_one(spool, run_id, uri, keep, from_start, log))
    return rc


@contextlib.contextmanager
def _lock_within(path: str, wait: float) -> Iterator[bool]:
    """Hold the flock on ``path``, waiting up to ``wait`` seconds for its holder; yields False when it did not come."""
    from bundle.utils.lock import file_lock

    deadline = time.monotonic() + wait
    while True:
        with file_lock(path, blocking=False) as fd:
            if fd is not None:
                yield True
                return
        if time.monotonic() >= deadline:
            yield False
            return
        time.sleep(0.25)


def _replay_one(spool: Spool, run_id: str, uri: str, keep: bool, from_start: bool, log) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        log(f"{spool.path(Spool.META)}: run {run_id} (field 'run_id') is not in {uri} ({type(e).__name__}); pass "
            f"--tracking_uri with the store the training logged to")  # fmt: skip
        return 1
    if run.info.lifecycle_stage != "active":
        log(f"{spool.folder}: run {run_id} is deleted in {uri}; restore it (mlflow runs restore) and rerun")
        return 1
    start = 0 if from_start else spool.sent_offset()
    end = spool.complete_end(start)
    sender = Sender(client, run_id, spool, dedupe=True)
    try:
        sender.send(start, end, progress=spool.set_sent)
    except Exception as e:
        spool.set_sent(sender.offset)
        log(f"{spool.folder}: stopped at byte {sender.offset} of {end} ({type(e).__name__}: {e}); rerun later")
        return 1
    spool.set_sent(end)
    c = sender.counts
    log(
        f"run {run_id}: sent {c['metric']} metric points, {c['param']} params, {c['tag']} tags, {c['artifact']} "
        f"artifacts{', the final status' if c['status'] else ''}; {c['skipped']} already in MLflow"
        + (f"; {c['refused']} refused by MLflow" if c["refused"] else "")
    )
    if not keep and spool.complete_end(end) == end:
        spool.remove()
    return 0


def spool_meta(experiment_id: str, tracking_uri: str, run_name: str | None) -> dict:
    """What meta.json records about a run besides its id."""
    return {
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "run_name": run_name,
        "created": now_ms(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
