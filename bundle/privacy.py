"""Identifiers in shared outputs: keyed pseudonyms for patient ids and image paths, paths relative to the data root.

The evaluation (``bundle.evaluation``: predictions.csv, skipped.csv, summary.json, the MLflow run) and the inference
(``bundle.inference.scan_inputs``, ``bundle.handlers.InferenceWriter``: predictions.csv/.json, skipped.csv, overlay and
NIfTI file names, the overlay's ``Source`` text) pass every identifier they write through one :class:`Privacy`, built
from the config key ``privacy`` (docs/privacy.md)::

    privacy: {pseudonymise_ids: false, relative_paths: false, key_file: null}

``pseudonymise_ids``: patient ids become ``pid_<16 hex>`` and image paths ``img_<16 hex>``, the first 64 bits of
HMAC-SHA256 under a secret key (``key_file``, else the environment variable :data:`KEY_ENV`); never a plain hash,
which anyone could recompute from a list of candidate ids. Image paths are pseudonymised too because file and folder
names routinely carry patient, study or accession numbers (MIMIC ``p10/p10000032/s5041...``, CheXpert
``patient00001/``, PACS exports). The image pseudonym is the HMAC of the path *relative to the root*, so it is the
same for the evaluation and the inference of one dataset and on every machine that mounts it elsewhere; with the
key, the data owner recomputes it for each file (:meth:`Privacy.path`) to map results back.

``relative_paths``: paths are written relative to the root (the data root, else the datalist's folder or the inference
input folder) instead of absolute, so user names, mount points and folder layouts of the machine stay out.

Both off (the default): every method returns its input unchanged, so the outputs are byte for byte what they were.
Python's ``hmac`` and ``hashlib`` are the whole implementation: MONAI and MLflow have no pseudonymisation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping

logger = logging.getLogger("bundle")

__all__ = ["KEY_ENV", "MIN_KEY_BYTES", "CONFIG_KEYS", "Privacy", "load_key", "input_root"]

#: environment variable holding the pseudonymisation key when ``privacy.key_file`` is not set
KEY_ENV = "CXR_PSEUDONYM_KEY"
#: shortest key accepted: ids are often short sequential numbers, so the key's secrecy is all that protects them
MIN_KEY_BYTES = 16
CONFIG_KEYS = ("pseudonymise_ids", "relative_paths", "key_file")
_HEX = 16  # hex characters kept of the HMAC (64 bits: collisions need ~4e9 distinct ids)
_KEY_FIX = (
    "create a key once and keep it secret (the same key gives the same pseudonyms): "
    'python -c "import secrets; print(secrets.token_hex(32))" > ~/.cxr_pseudonym_key && '
    "chmod 600 ~/.cxr_pseudonym_key, then pass --privacy#key_file ~/.cxr_pseudonym_key "
    f"(or export {KEY_ENV}=<the key>)"
)


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """The secret key: the contents of ``key_file`` (surrounding blanks and newline stripped), else ``$CXR_PSEUDONYM_KEY``.

    Raises:
        ValueError: no key, a missing/unreadable key file or a key shorter than :data:`MIN_KEY_BYTES`; the message
            names the file or variable and says how to make a key.
    """
    if key_file not in (None, ""):
        path = os.path.expanduser(os.fspath(key_file))
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            raise ValueError(f"privacy.key_file {path!r} cannot be read ({e}); {_KEY_FIX}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(f"privacy: the key file {path} is readable by other users; chmod 600 it")
        where = f"privacy.key_file {path!r}"
    else:
        key = os.environ.get(KEY_ENV, "").strip().encode("utf-8")
        where = f"the environment variable {KEY_ENV}"
        if not key:
            raise ValueError(
                f"privacy.pseudonymise_ids is true but there is no key: privacy.key_file is not set and {KEY_ENV} is "
                f"empty; {_KEY_FIX}"
            )
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{where} holds a key of {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {_KEY_FIX}")
    return key


def input_root(input_path: str | os.PathLike) -> str:
    """The folder an inference input's paths are written relative to: the folder itself, or the folder of a file
    (a datalist JSON, whose relative image paths start there, or a single image)."""
    p = os.path.abspath(os.fspath(input_path))
    return os.path.dirname(p) if os.path.isfile(p) else p


def _as_bool(value, name: str) -> bool:
    from bundle.workflow import as_bool

    return as_bool(value, name)


class Privacy:
    """How identifiers are written: :meth:`patient_id`, :meth:`path`, :meth:`stem` (for file names), :meth:`text`
    (free text such as a skip reason, whose paths are rewritten).

    Args:
        pseudonymise_ids: patient ids and image paths -> keyed pseudonyms (HMAC-SHA256 under ``key``).
        relative_paths: paths -> relative to ``root``.
        key: the secret key (bytes or str); required with ``pseudonymise_ids``.
        root: the folder paths are made relative to (and image pseudonyms computed from); None: an absolute path is
            written as its file name (``relative_paths``) and its pseudonym is the HMAC of that file name.
    """

    def __init__(
        self,
        pseudonymise_ids: bool = False,
        relative_paths: bool = False,
        key: bytes | str | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.pseudonymise_ids = bool(pseudonymise_ids)
        self.relative_paths = bool(relative_paths)
        if self.pseudonymise_ids:
            if key is None or len(key) < MIN_KEY_BYTES:
                raise ValueError(f"Privacy: pseudonymise_ids needs a key of at least {MIN_KEY_BYTES} bytes; {_KEY_FIX}")
            self._key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        else:
            self._key = None
        self.root = os.path.abspath(os.fspath(root)) if root not in (None, "") else None
        roots = {self.root, os.path.realpath(self.root)} if self.root else set()
        # a path under the root inside free text: the root, then a separator and characters up to a blank, a quote,
        # a colon (the loaders write "<path>: <problem>"), a comma, semicolon or bracket
        self._in_text = [
            re.compile(re.escape(r) + r"(?:[/\\][^\s'\":,;()\[\]]*)?") for r in sorted(roots, key=len, reverse=True)
        ]

    def __repr__(self) -> str:  # never shows the key
        return f"Privacy(pseudonymise_ids={self.pseudonymise_ids}, relative_paths={self.relative_paths}, root={self.root!r})"

    def with_root(self, root: str | os.PathLike | None) -> Privacy:
        """The same options and key with another root."""
        return Privacy(self.pseudonymise_ids, self.relative_paths, self._key, root)

    @classmethod
    def from_config(cls, config: Mapping | Privacy | None = None, root: str | os.PathLike | None = None) -> Privacy:
        """From the config key ``privacy`` (a mapping of :data:`CONFIG_KEYS`; None = everything off), or a
        :class:`Privacy` as it is. The key is read here (:func:`load_key`) only when ``pseudonymise_ids`` is on."""
        if isinstance(config, Privacy):
            return config
        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"privacy: unknown key(s) {unknown}; the keys are {list(CONFIG_KEYS)} (docs/privacy.md), "
                "e.g. --privacy#pseudonymise_ids true --privacy#key_file ~/.cxr_pseudonym_key"
            )
        pseudo = _as_bool(config.get("pseudonymise_ids", False), "privacy#pseudonymise_ids")
        rel = _as_bool(config.get("relative_paths", False), "privacy#relative_paths")
        key = load_key(config.get("key_file")) if pseudo else None
        return cls(pseudonymise_ids=pseudo, relative_paths=rel, key=key, root=root)

    @property
    def active(self) -> bool:
        """True when anything is rewritten (either option on)."""
        return self.pseudonymise_ids or self.relative_paths

    def _mac(self, kind: str, value: str) -> str:
        # kind separates the domains: a patient id equal to some file name does not share its pseudonym
        return hmac.new(self._key, f"{kind}\0{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def patient_id(self, value):
        """``pid_<16 hex>`` with ``pseudonymise_ids`` (the id as a string: 7 and "7" are one patient); missing ids
        (None, "") and everything with the option off are returned as they are."""
        if not self.pseudonymise_ids or value is None or (isinstance(value, str) and value == ""):
            return value
        return "pid_" + self._mac("patient_id", str(value))[:_HEX]

    def _relative(self, path: str) -> str | None:
        """``path`` (absolute or relative to the working folder) relative to the root, "/"-separated; None without a
        root or when there is no relative path (another drive on Windows)."""
        if self.root is None:
            return None
        try:
            return os.path.relpath(os.path.abspath(path), self.root).replace(os.sep, "/")
        except ValueError:
            return None

    def path(self, value):
        """An image (or any data file) path as written, unchanged with both options off:

        - ``pseudonymise_ids``: ``img_<16 hex>``, the HMAC of the path relative to the root (of the absolute path
          without a root), so one file has one pseudonym wherever the data is mounted;
        - ``relative_paths``: relative to the root ("/"-separated; ``..`` for files outside it); without a root, the
          file name alone.

        Non-strings and empty strings are returned as they are."""
        if not self.active or not isinstance(value, str | os.PathLike) or os.fspath(value) == "":
            return value
        p = os.fspath(value)
        rel = self._relative(p)
        if self.pseudonymise_ids:
            return "img_" + self._mac("path", rel if rel is not None else os.path.abspath(p))[:_HEX]
        return rel if rel is not None else os.path.basename(p)

    def stem(self, value) -> str:
        """A file-name-safe stand-in for a path (output file names such as ``overlays/<index>_<stem>.png``): the
        pseudonym with ``pseudonymise_ids``, else the file name without its extension (never a folder)."""
        if self.pseudonymise_ids:
            return self.path(value)
        return os.path.splitext(os.path.basename(os.fspath(value)))[0]

    def text(self, value, paths: Iterable = ()):
        """Free text (a skip reason) with each of ``paths`` (as given and resolved) and every path under the root
        rewritten by :meth:`path`; unchanged when nothing is active or ``value`` is not a string."""
        if not self.active or not isinstance(value, str):
            return value
        known = {}
        for p in paths:
            if isinstance(p, str | os.PathLike) and os.fspath(p):
                p = os.fspath(p)
                for form in (p, os.path.abspath(p), os.path.realpath(p)):
                    known.setdefault(form, self.path(p))
        for form in sorted(known, key=len, reverse=True):  # longest first: a path never replaced inside a longer one
            value = value.replace(form, known[form])
        for pattern in self._in_text:
            value = pattern.sub(lambda m: self.path(m.group(0)), value)
        return value
