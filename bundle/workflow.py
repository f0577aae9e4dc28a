"""Small glue used by the bundle configs (kept here so that every ``$`` expression in configs/ is one short line)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence

import torch

from bundle.utils.atomic import file_sha256, write_json_atomic
from bundle.utils.dist import unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "as_bool",
    "available_cores",
    "resolve_num_workers",
    "set_threads",
    "with_index",
    "split_records",
    "file_digest",
    "pick_device",
    "experiment_params",
    "network_params",
    "parameter_groups",
    "image_records",
    "save_run_config",
]


def as_bool(value, name: str = "flag") -> bool:
    """A command-line flag as a bool: fire passes ``--x false`` as the *string* "false", which is truthy."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("true", "yes", "1", "on"):
        return True
    if s in ("false", "no", "0", "off", "none", ""):
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value: use true or false")


def with_index(records: Sequence[Mapping]) -> list[dict]:
    """Copies of the records with ``index`` = position in the split (joins predictions back to metadata)."""
    return [{**r, "index": i} for i, r in enumerate(records)]


def split_records(datalist: Mapping, split: str) -> list[dict]:
    """The records of one split, with ``index``; a clear error when the split does not exist."""
    if split not in datalist or not isinstance(datalist[split], list):
        have = [k for k, v in datalist.items() if isinstance(v, list) and k != "classes"]
        raise KeyError(f"the datalist has no split {split!r}; it has {have}. Set the split name in the config.")
    return with_index(datalist[split])


def file_digest(path: str, n: int = 12) -> str:
    """Short sha256 of a file (the dataset digest logged with every run)."""
    return file_sha256(path)[:n]


def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available unless a device is named (``cpu``, ``cuda:1``)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cgroup_cpu_limit() -> float | None:
    """The cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``) CPU quota in cores, None when unlimited or unknown."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(quota_file) as f:
                parts = f.read().split()
            if period_file is None:
                quota, period = parts[0], (parts[1] if len(parts) > 1 else "100000")
            else:
                with open(period_file) as f:
                    quota, period = parts[0], f.read().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            q, per = float(quota), float(period)
        except ValueError:
            return None
        return q / per if q > 0 and per > 0 else None
    return None


def available_cores() -> int:
    """Physical CPU cores this process may run on: its affinity set (``os.sched_getaffinity``: taskset, cgroup
    cpusets, Slurm), hyperthread siblings counted once, capped by a cgroup CPU quota (docker ``--cpus``). >= 1."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:  # SMT siblings share (package, core): two logical CPUs of one core do not make a second core for torch
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                pkg = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                cores.add((pkg, f.read().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    n = len(cores) or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-6)))
    return max(1, n)


def _processes_per_node() -> int:
    """Training processes sharing this node's cores: torchrun's LOCAL_WORLD_SIZE (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_num_workers(value="auto", name: str = "num_workers") -> int:
    """DataLoader workers: an int >= 0, or ``"auto"`` (also null): 0 below 4 cores per process, else
    ``min(4, cores // 4)``.

    Why 0 on small machines (docs/performance.md): the cached training items only go through the random
    augmentation, about a quarter of an iteration's CPU time (0.09 s of 0.39 s per batch of 32 on one thread); on
    2 cores a worker takes one core from the network, whose second thread is worth more (1.6x on the network step)
    than moving the augmentation off the main process. From 4 cores up, one worker per 4 cores keeps up with the
    network threads of the others. Workers draw the augmentation from their own seeded streams, so a run with
    workers is reproducible but differs from one without: pin ``num_workers`` to compare results across machines.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        per_process = available_cores() // _processes_per_node()
        return 0 if per_process < 4 else min(4, per_process // 4)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or (isinstance(value, float) and value != n) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: give a number of DataLoader workers >= 0, or auto (--{name} auto)")
    return n


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _busy_cores(cores: int) -> int:
    """Cores other processes keep busy: the 1-minute load average rounded (a core counts from 0.75 of load), at most
    ``cores - 1``; 0 when the load cannot be read."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0
    return max(0, min(cores - 1, int(load + 0.25)))


def set_threads(num_threads=None, num_workers=0, interop_threads=None, name: str = "num_threads") -> dict:
    """Set torch's intra-op (and inter-op) CPU threads for this run; returns what was set and why.

    ``num_threads``: an int >= 1 is used as given. None / ``"auto"``: OMP_NUM_THREADS (or MKL_NUM_THREADS) when
    the user or a launcher set it (the study runner sets it per training), else the physical cores available to
    this process (:func:`available_cores`) divided among torchrun's local processes, minus the DataLoader workers
    (``num_workers``, each busy on a core of its own), minus the cores other processes keep busy at the start
    (:func:`_busy_cores`, from the load average), at least 1. ``interop_threads``: None -> 1 (eager CPU
    training runs one op at a time; a larger inter-op pool only adds idle threads), settable only once per
    process: later calls keep the first value. Torch's own default is one thread per *logical* CPU of the machine,
    which oversubscribes a shared or hyperthreaded machine (a step 2-3x slower on the shared 2-core VM).
    """
    import torch

    source = "config"
    if num_threads is None or (isinstance(num_threads, str) and num_threads.strip().lower() == "auto"):
        env = next((k for k in _THREAD_ENV if os.environ.get(k, "").strip().isdigit()), None)
        if env is not None and int(os.environ[env]) > 0:
            n, source = int(os.environ[env]), env
        else:
            workers = resolve_num_workers(num_workers)
            cores = available_cores()
            n, source = max(1, cores // _processes_per_node() - workers), "auto"
            busy = _busy_cores(cores)
            if busy and n > 1:
                # cores other processes keep busy are not free: a thread that waits for a busy core stalls every
                # parallel op of the step (2 threads with one core busy: 59 s per main-job epoch, 1 thread: ~25 s).
                # The price: the thread count, hence the last bits of the results, then depends on the machine's
                # load; --num_threads N pins it (docs/performance.md).
                n, source = max(1, n - busy), f"auto, {busy} of {cores} cores busy"
    else:
        try:
            n = int(num_threads)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or isinstance(num_threads, bool) or (isinstance(num_threads, float) and num_threads != n):
            raise ValueError(f"{name}={num_threads!r}: give a number of CPU threads >= 1, or null/auto (--{name} 2)")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    interop = 1 if interop_threads is None else int(interop_threads)
    if torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError:  # only settable before the first inter-op parallel work of the process
            interop = torch.get_num_interop_threads()
    logger.info("torch CPU threads: %d (%s), inter-op %d", n, source, interop)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    if n > 1 and load > available_cores():  # an explicit or launcher-set count is kept; say what it costs
        logger.warning(
            "the CPU is busy (1-min load average %.1f on %d cores): %d torch threads will fight over the cores and "
            "can make each step several times slower; with other jobs running, pass --num_threads 1 "
            "(docs/performance.md)",
            load,
            available_cores(),
            n,
        )
    return {"num_threads": n, "source": source, "interop_threads": interop}


def experiment_params(params: Mapping) -> dict:
    """The config's ``mlflow_params`` as MLflow params: strings, None -> 'none'. A value that is itself a mapping
    (the network's sizes from :func:`network_params`) is logged key by key, without its own name."""
    flat: dict = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            flat.update(v)
        else:
            flat[k] = v
    return {k: ("none" if v is None else str(v)) for k, v in flat.items()}


def network_params(net: torch.nn.Module) -> dict:
    """Model sizes worth logging with a run, read from the built network (whatever its sizes came from)."""
    net = unwrap(net)
    n_all = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = {"model": type(net).__name__, "n_parameters": n_all, "n_trainable": n_trainable}
    vit = getattr(getattr(net, "image_encoder", None), "config", None)
    if vit is not None:
        out.update(
            image_size=getattr(net, "image_size", vit.image_size),
            patch_size=vit.patch_size,
            vit_hidden=vit.hidden_size,
            vit_layers=vit.num_hidden_layers,
            vit_heads=vit.num_attention_heads,
        )
    txt = getattr(getattr(net, "text_encoder", None), "config", None)
    if txt is not None:
        out.update(
            text_encoder=getattr(net, "text_source", "?"),
            text_hidden=txt.hidden_size,
            text_layers=txt.num_hidden_layers,
            freeze_text=getattr(net, "freeze_text", None),
        )
    if hasattr(net, "layers"):
        out.update(
            fusion_layers=len(net.layers),
            fusion_dim=getattr(net, "fusion_dim", None),
            aligner=getattr(net, "aligner_type", None),
        )
    return out


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in KAD: no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def image_records(input_path: str, split: str = "test", exclude: str | None = None) -> list[dict]:
    """Records for inference from a folder (recursive), one file, or a datalist JSON (+ split).

    Each record has ``image`` and ``index``; a datalist keeps its metadata too. A folder gives *every* file under
    it, whatever its name (DICOM files often have no extension), except hidden ones (``.*``) and those under
    ``exclude`` (the output folder): :func:`bundle.inference.scan_inputs` then decides by content which are chest
    radiographs and lists the others, with the reason, in ``skipped.csv``.
    """
    if not os.path.exists(input_path):
        raise FileNotFoundError(
            f"inference input {input_path!r} does not exist: give a folder of PNG/JPEG/DICOM "
            f"files, one image file, or a datalist JSON with --input_path"
        )
    if os.path.isfile(input_path) and input_path.lower().endswith(".json"):
        from bundle.data import datalist as dl

        return split_records(dl.load(input_path), split)
    if os.path.isfile(input_path):
        return with_index([{"image": os.path.abspath(input_path)}])
    skip = os.path.abspath(exclude) if exclude else None
    files = []
    for root, dirs, names in os.walk(input_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) != skip)
        files += [os.path.join(root, f) for f in names if not f.startswith(".")]
    if not files:
        raise FileNotFoundError(f"no files found under {input_path!r} (hidden files are not read)")
    return with_index([{"image": os.path.abspath(f)} for f in sorted(files)])


def save_run_config(output_dir: str) -> str:
    """Record what was executed (for MLflow): the command line with its overrides and a copy of every config file
    it names, in ``<output_dir>/run_config/``. Returns the folder."""
    folder = os.path.join(output_dir, "run_config")
    os.makedirs(folder, exist_ok=True)
    argv = list(sys.argv)
    files: list[str] = []
    for i, a in enumerate(argv[:-1]):
        if a in ("--config_file", "--meta_file"):
            spec = argv[i + 1].strip()
            names = [x.strip(" '\"") for x in spec.strip("[]").split(",")] if spec.startswith("[") else [spec]
            files += [n for n in names if os.path.isfile(n)]
    for f in files:
        shutil.copy2(f, os.path.join(folder, os.path.basename(f)))
    write_json_atomic(os.path.join(folder, "command.json"), {"argv": argv, "cwd": os.getcwd(), "config_files": files})
    return folder
