"""A real ``mlflow server`` goes away mid-run: killed, then hung (SIGSTOP). Training (a handler-driven ignite engine
with a fixed step time) must go on at full speed and end within seconds; a server on the same store then receives
every spooled point from ``scripts/mlflow_replay.py``, exactly once (docs/mlflow.md)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from ignite.engine import Engine, Events

from tests.conftest import ROOT

STEP_S = 0.02  # the "training step"
EPOCHS, EPOCH_LEN = 3, 40
N_IT = EPOCHS * EPOCH_LEN
OUTAGE_AT = 30  # iteration after which the server goes away
CLASSES = ["nodule(mass)", "effusion, left", "nodule_mass_"]  # "(" and "," must not cost a metric


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 in its own process group (killed or stopped as a whole)."""

    def __init__(self, store: str, artifacts: str, port: int, log: str):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
            artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 180  # a loaded 2-core machine takes long to import the server
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mlflow server did not start: {open(log).read()[-3000:]}") from None
                time.sleep(0.2)

    def signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(30)
        if not self.log.closed:
            self.log.close()


def _train(server_url: str, tmp, name: str, outage) -> dict:
    """Run the engine against the server; ``outage()`` is called after iteration OUTAGE_AT. Returns timings."""
    from bundle.handlers import SafeMLFlowHandler, loss_components

    (tmp / f"{name}_model.pt").write_bytes(b"weights")
    h = SafeMLFlowHandler(
        tracking_uri=server_url,
        experiment_name="outage",
        run_name=name,
        experiment_param={"lr": 0.1, "classes": ",".join(CLASSES)},
        output_transform=loss_components,
        tag_name="train_loss",
        artifacts=[str(tmp / f"{name}_model.pt")],
        spool_dir=str(tmp / name / "mlflow_spool"),
        run_record=str(tmp / name / "mlflow_run.json"),
    )
    net = torch.nn.Linear(2, 1)

    def step(engine, batch):
        time.sleep(STEP_S)
        return {"loss": torch.tensor(1.0 / engine.state.iteration), "loss_ce": 0.5, "loss_al": 0.25}

    eng = Engine(step)
    eng.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    stamps = []
    eng.add_event_handler(Events.ITERATION_STARTED, lambda e: stamps.append(time.perf_counter()))

    @eng.on(Events.EPOCH_COMPLETED)
    def val(e):
        e.state.metrics.update({f"val_auc_{c}": 0.5 + 0.01 * e.state.epoch + i / 100 for i, c in enumerate(CLASSES)})

    eng.add_event_handler(Events.ITERATION_COMPLETED(once=OUTAGE_AT), lambda e: outage())
    h.attach(eng)
    t0 = time.perf_counter()
    eng.run(range(EPOCH_LEN), max_epochs=EPOCHS)
    t_run = time.perf_counter() - t0
    run_id, spool = h.run_id, h.spool_folder
    t0 = time.perf_counter()
    h.close()
    t_close = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"run_id": run_id, "spool": spool, "t_run": t_run, "t_close": t_close, "max_gap": max(gaps)}


def _check_complete(url: str, run_id: str, artifact: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, N_IT + 1)), f"train_loss steps {sorted(steps)}"  # each exactly once
    assert len(client.get_metric_history(run_id, "lr_group_0")) == N_IT
    keys = {k for k in run.data.metrics if k.startswith("val_auc_")}
    assert len(keys) == len(CLASSES) and "val_auc_nodule_mass_" in keys  # the colliding name kept its own key
    for k in keys:
        assert sorted(m.step for m in client.get_metric_history(run_id, k)) == list(range(1, EPOCHS + 1)), k
    assert run.data.params["lr"] == "0.1" and run.data.params["max_epochs"] == str(EPOCHS)
    assert artifact in {a.path for a in client.list_artifacts(run_id)}
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_server_killed_then_hung_mid_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from bundle.utils.mlflow_spool import replay

    store, arts, port = f"sqlite:///{tmp_path}/server.db", str(tmp_path / "artifacts"), _free_port()
    servers = []
    base = N_IT * STEP_S
    try:
        # 1. killed: the step never waits, close() returns at once, the records stay in the spool
        servers.append(Server(store, arts, port, str(tmp_path / "server.log")))
        killed = _train(servers[-1].url, tmp_path, "killed", outage=lambda: servers[-1].kill())
        assert killed["max_gap"] < 1.0 and killed["t_run"] < base + 3.0, killed
        assert killed["t_close"] < 8.0, killed
        assert os.path.isdir(killed["spool"]), "the unsent records must be kept"
        # the same server comes back: the documented command sends everything into the same run
        servers.append(Server(store, arts, port, str(tmp_path / "server.log")))
        env = {**os.environ, "PYTHONPATH": ROOT}
        spool_root = str(tmp_path / "killed" / "mlflow_spool")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "mlflow_replay.py"), spool_root, "--keep"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        _check_complete(servers[-1].url, killed["run_id"], "killed_model.pt")
        # replaying again (all of it) adds nothing
        assert replay(spool_root, from_start=True, log=lambda s: None) == 0
        _check_complete(servers[-1].url, killed["run_id"], "killed_model.pt")
        assert not os.path.exists(spool_root)  # sent and not kept: removed

        # 2. hung (SIGSTOP): connections are accepted, nothing answers; the step still never waits
        hung = _train(servers[-1].url, tmp_path, "hung", outage=lambda: servers[-1].signal(signal.SIGSTOP))
        assert hung["max_gap"] < 1.0 and hung["t_run"] < base + 3.0, hung
        assert hung["t_close"] < 8.0, hung  # /health probes, not MLflow's HTTP timeouts
        servers[-1].signal(signal.SIGCONT)
        assert replay(str(tmp_path / "hung" / "mlflow_spool"), log=print) == 0
        _check_complete(servers[-1].url, hung["run_id"], "hung_model.pt")
    finally:
        for s in servers:
            s.kill()
    print(f"killed: {killed}\nhung: {hung}")


# ------------------------------------------------------------------------------------------------ measurements
def _measure(handler_cls, uri: str, n: int, step_s: float, outage=None, spool_dir=None) -> dict:
    """Run an engine of ``n`` iterations with ``handler_cls`` (None: no MLflow); returns wall and CPU timings."""
    from bundle.handlers import loss_components

    h = None
    if handler_cls is not None:
        kw = {"spool_dir": spool_dir} if spool_dir else {}
        h = handler_cls(tracking_uri=uri, experiment_name="bench", output_transform=loss_components,
                        tag_name="train_loss", **kw)  # fmt: skip
    eng = Engine(lambda e, b: (time.sleep(step_s), {"loss": torch.tensor(1.0), "loss_ce": 0.5, "loss_al": 0.5})[1])
    eng.optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    stamps = []
    eng.add_event_handler(Events.ITERATION_STARTED, lambda e: stamps.append(time.perf_counter()))
    if outage is not None:
        eng.add_event_handler(Events.ITERATION_COMPLETED(once=n // 2), lambda e: outage())
    if h is not None:
        h.attach(eng)
    t0, c0 = time.perf_counter(), time.process_time()
    eng.run(range(n), max_epochs=1)
    t_run = time.perf_counter() - t0
    t1 = time.perf_counter()
    if h is not None:
        h.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"run_s": t_run, "close_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c0,
            "max_gap_s": max(gaps), "disabled": bool(h and h.disabled)}  # fmt: skip


def main(argv=None) -> None:
    """The numbers of docs/mlflow.md: ``python -m tests.test_mlflow_outage [--handler_file OLD.py] [--no_hang]``.
    The "before" column: ``git show <commit>:bundle/handlers/mlflow_handler.py > /tmp/old.py`` and pass it."""
    import argparse
    import importlib.util
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--handler_file", default=None, help="another version of bundle/handlers/mlflow_handler.py")
    ap.add_argument("--no_hang", action="store_true", help="skip the SIGSTOP case (the old handler blocks > 14 min)")
    args = ap.parse_args(argv)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if args.handler_file:
        spec = importlib.util.spec_from_file_location("other_handler", args.handler_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cls = mod.SafeMLFlowHandler
    else:
        from bundle.handlers import SafeMLFlowHandler

        cls = SafeMLFlowHandler

    d = tempfile.mkdtemp()
    spool = None if args.handler_file else os.path.join(d, "spool")
    n = 300
    for step_s in (0.0, 0.02):  # logging alone; a 20 ms step that releases the GIL, as torch kernels do
        none = _measure(None, "", n, step_s)
        r = _measure(cls, f"sqlite:///{d}/local_{step_s}.db", n, step_s, spool_dir=spool)
        print(f"SQLite store, {1000 * step_s:.0f} ms step: +{1000 * (r['run_s'] - none['run_s']) / n:.3f} ms wall and "
              f"+{1000 * (r['cpu_s'] - none['cpu_s']) / n:.3f} ms CPU per iteration ({n} iterations, close() included "
              f"in CPU; close {r['close_s']:.2f} s)")  # fmt: skip
    cases = [("killed", signal.SIGKILL)] + ([] if args.no_hang else [("hung", signal.SIGSTOP)])
    for name, sig in cases:
        srv = Server(f"sqlite:///{d}/{name}.db", os.path.join(d, "art"), _free_port(), os.path.join(d, f"{name}.log"))
        try:
            up = _measure(cls, srv.url, 100, 0.02, spool_dir=spool)
            r = _measure(cls, srv.url, 100, 0.02, outage=lambda s=srv, g=sig: s.signal(g), spool_dir=spool)
        finally:
            srv.kill()
        print(f"server up: 100 iterations of 20 ms in {up['run_s']:.2f} s; server {name} after iteration 50: "
              f"{r['run_s']:.2f} s, longest step gap {r['max_gap_s']:.2f} s, close {r['close_s']:.1f} s, logging "
              f"disabled: {r['disabled']}")  # fmt: skip


if __name__ == "__main__":
    main()
