"""MLflow helpers shared by the training handlers, the study runner and the report.

MLflow's own client retries an unreachable server for minutes, so every caller probes first with
:func:`is_reachable`; metric and param names go through :func:`sanitize_key` (MLflow rejects other characters).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

__all__ = ["is_reachable", "sanitize_key", "flat_params", "is_remote"]

# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, colons and slashes in names.
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000


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


def sanitize_key(name: str) -> str:
    """A metric/param name MLflow accepts: other characters become "_", at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY_LENGTH]


def flat_params(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` strings (non-strings as JSON), each cut to MLflow's param length."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v, default=str))[:MAX_PARAM_LENGTH]
    return out
