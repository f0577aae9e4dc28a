"""MLflow helpers shared by the training handlers, the spool, the study runner and the report.

MLflow's own HTTP client retries an unreachable or hung server for minutes (120 s timeout, 7 retries with
exponential backoff); :func:`apply_client_defaults` bounds that for this process. Metric, param and tag names go
through :func:`sanitize_key` (MLflow rejects other characters), and within one run through a :class:`KeySanitizer`,
so that two names that sanitise alike never overwrite each other. docs/mlflow.md has the whole picture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
from collections.abc import Mapping

__all__ = [
    "CLIENT_DEFAULTS",
    "apply_client_defaults",
    "is_reachable",
    "is_remote",
    "is_rejection",
    "sanitize_key",
    "KeySanitizer",
    "flat_params",
    "as_metric_value",
]

logger = logging.getLogger("bundle")

# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, colons and slashes in names.
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000

# Bounded MLflow HTTP client for training and evaluation (set only where the user has not set them):
# a hung server costs a call at most 3 attempts x 10 s + 2 s backoff, a dead one about 3 s (connection refused).
# The values are strings because they are environment variables; MLflow parses the backoff factor as an int.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per attempt (connect and read); MLflow's default: 120
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # retries after the first attempt; MLflow's default: 7
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # sleeps 0 s, then 2 s between attempts; MLflow's default: 2
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",  # + up to 0.5 s at random; MLflow's default: 1.0
}

# MLflow error codes that mean "this request is wrong" (resending it cannot help), as opposed to an outage.
_REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"}


def apply_client_defaults() -> dict[str, str]:
    """Set :data:`CLIENT_DEFAULTS` in ``os.environ`` where unset (MLflow reads them at every request); returns
    the ones it set."""
    applied = {k: v for k, v in CLIENT_DEFAULTS.items() if not os.environ.get(k)}
    os.environ.update(applied)
    return applied


def is_remote(uri: str | None) -> bool:
    """An http(s) tracking server (as opposed to a local SQLite store)."""
    return bool(uri) and str(uri).startswith(("http://", "https://"))


def is_reachable(uri: str | None, timeout: float = 3.0) -> bool:
    """A local store is always reachable; an http(s) server must answer ``/health`` within ``timeout`` seconds."""
    if not is_remote(uri):
        return True
    import urllib.request

    try:
        urllib.request.urlopen(str(uri).rstrip("/") + "/health", timeout=timeout)
        return True
    except Exception:
        return False


def is_rejection(exc: BaseException) -> bool:
    """True when MLflow refused the request itself (bad name or value, a param logged twice with different values):
    resending cannot help. Anything else (connection refused, timeout, 5xx, locked database) is an outage."""
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in _REJECTION_CODES


def sanitize_key(name: str) -> str:
    """A metric/param/tag name MLflow accepts: other characters become "_", no empty, "." or ".." path parts (MLflow
    refuses names that are not normalised paths), at most 250 characters. Valid names are returned unchanged."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    parts = [("__" if p == ".." else p) for p in key.split("/") if p not in ("", ".")]
    key = "/".join(parts)[:MAX_KEY_LENGTH].rstrip("/")
    return key or "_"


class KeySanitizer:
    """:func:`sanitize_key` for one run, without collisions: when two different names sanitise to the same key
    ("auc_a(b)" and "auc_a_b_"), the later one gets a short hash suffix instead of overwriting the first."""

    def __init__(self):
        self._keys: dict[str, str] = {}  # name -> key
        self._owner: dict[str, str] = {}  # key -> name

    def __call__(self, name) -> str:
        name = str(name)
        key = self._keys.get(name)
        if key is not None:
            return key
        key = sanitize_key(name)
        if self._owner.get(key, name) != name:
            suffix = "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
            key = key[: MAX_KEY_LENGTH - len(suffix)] + suffix
            plain = sanitize_key(name)
            logger.warning(
                f"MLflow: {name!r} and {self._owner[plain]!r} both sanitise to {plain!r}; {name!r} is logged as {key!r}"
            )
        self._keys[name], self._owner[key] = key, name
        return key


def as_metric_value(v) -> float | None:
    """A metric value as a float (0-d tensors and numpy scalars included, bools as 0/1); None when not a number."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, numbers.Real):  # bool is an int; MLflow itself refuses bools, 0/1 is what they mean
        return float(v)
    return None


def flat_params(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` strings (non-strings as JSON), each cut to MLflow's param length."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM_LENGTH]
    return out
