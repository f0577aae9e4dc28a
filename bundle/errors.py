"""Missing pretrained weights: one exception type for Python callers, one clear line on the command line.

Library code (``bundle.text``, ``bundle.networks``) raises :class:`MissingWeightsError`, a ``FileNotFoundError``
that Python callers can catch like any other; it carries what is missing and how to get it as attributes.

On the command line (``python -m monai.bundle run ...``) MONAI's ``ConfigComponent.instantiate`` wraps every
``Exception`` into ``RuntimeError("Failed to instantiate component ...") from e``, so Python would print a long
traceback ending in MONAI's generic line. Raising a ``SystemExit`` from library code instead would bypass that, but
would also change the exception type depending on how the process was started and skip every ``except Exception``
of a Python caller. So the library always raises the ordinary exception, and only the command-line boundary
changes how an *uncaught* one is printed: when this module is imported in a process started as
``python -m monai.bundle``, :func:`install_cli_excepthook` sets a ``sys.excepthook`` that, for an uncaught exception
whose ``raise ... from`` chain contains a :class:`MissingWeightsError`, prints only that error's one-line message
(exit status 1, as for any uncaught exception); every other exception goes to the previous hook unchanged.
Set ``BUNDLE_TRACEBACK=1`` to get the full traceback back.
"""

from __future__ import annotations

import os
import sys

HF_DOWNLOAD = "hf download"  # huggingface_hub >= 0.34 ships the `hf` command (`huggingface-cli` before)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache this process reads (``HF_HUB_CACHE`` / ``HF_HOME`` aware)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` (or ``name``) with no path prefix: transformers tries it as a folder first, then as a hub id."""
    return spec.count("/") <= 1 and not spec.startswith((".", "/", "~")) and not os.path.isabs(spec)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are neither in a local folder nor in the local Hugging Face cache (nothing is ever
    downloaded at run time).

    Attributes: ``what`` (e.g. ``"Med-KEBERT"``), ``spec`` (the value given), ``param`` (the constructor argument,
    e.g. ``"text_encoder"``; on the command line ``--network_def#<param>``), ``repo_id`` (the hub id to fetch),
    ``local_dir`` (where to put it), ``reason`` (why an existing folder could not be loaded, else ``""``), ``hint``
    (more detail: what a folder must hold, other options). ``str(e)`` is the message for Python callers (with the
    hint); :meth:`cli_message` the one line for the command line (with the option, without the hint).
    """

    # B042: pickle and copy go through __reduce__ below, which passes every argument back
    def __init__(  # noqa: B042
        self, what: str, spec: str, param: str, repo_id: str, local_dir: str, reason: str = "", hint: str = ""
    ) -> None:
        self.what, self.spec, self.param = what, str(spec), param
        self.repo_id, self.local_dir, self.reason = repo_id, local_dir, " ".join(str(reason).split())
        self.hint = hint
        super().__init__(f"{self.render(cli=False)}. {hint.rstrip('.')}." if hint else self.render(cli=False))

    def __reduce__(self):  # picklable (e.g. across multiprocessing) despite the custom signature
        return (type(self), (self.what, self.spec, self.param, self.repo_id, self.local_dir, self.reason, self.hint))

    def render(self, cli: bool) -> str:
        """One line: what is missing, the command that fetches it, where to put it and how to point to it."""
        spec = self.spec
        where = os.path.abspath(os.path.expanduser(spec))
        if self.reason:
            head = f"{self.what} at {where} could not be loaded offline ({self.reason})"
        elif looks_like_hub_id(spec) and not os.path.exists(spec):
            head = f"{self.what} ({spec}) is not in the local Hugging Face cache ({hf_cache_dir()})"
            if spec != self.repo_id:
                head += f" or at {where}"
        else:
            head = f"{self.what} is not at {where} (the folder does not exist)"
        dest = os.path.abspath(os.path.expanduser(self.local_dir))
        use = f"--network_def#{self.param} {self.local_dir}" if cli else f"{self.param}={self.local_dir!r}"
        return (
            f"{head}: fetch it with '{HF_DOWNLOAD} {self.repo_id} --local-dir {self.local_dir}' on a machine with "
            f"internet access, copy that folder to {dest}, and pass {use}"
        )

    def cli_message(self) -> str:
        return self.render(cli=True)


def fetch_target(spec: str, known: dict[str, str], default_repo: str) -> tuple[str, str]:
    """``(repo_id, local_dir)`` to suggest for a missing ``spec``: a hub id is fetched into ``models/<name>``; a folder
    is fetched where it was expected, from the hub id its name is known under (``known``: lower-case folder name ->
    hub id), else from ``default_repo``."""
    base = os.path.basename(os.path.normpath(os.path.expanduser(spec)))
    repo = known.get(base.lower()) or (spec if looks_like_hub_id(spec) else default_repo)
    return repo, (f"models/{base}" if spec == repo else spec)


def find_missing_weights(exc: BaseException | None) -> MissingWeightsError | None:
    """The :class:`MissingWeightsError` (or other error with a ``cli_message``) in ``exc``'s explicit ``raise ... from``
    chain (``__cause__``), if any.

    Implicit contexts (an error raised while handling another) are not followed: there the later error is the one
    that ended the run (e.g. a failing random fallback after a missing encoder)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        # MissingWeightsError, and any other error of the bundle that says the fix in one line (a `cli_message`:
        # run_identity's refusals of a busy output folder or of another run's checkpoint)
        if isinstance(exc, MissingWeightsError) or callable(getattr(exc, "cli_message", None)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def _running_bundle_cli() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle")


def install_cli_excepthook(force: bool = False) -> bool:
    """Install the one-line hook (idempotent); only under ``python -m monai.bundle`` unless ``force``.
    Returns whether the hook is installed."""
    if getattr(sys.excepthook, "_bundle_missing_weights", False):
        return True
    if not (force or _running_bundle_cli()):
        return False
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        found = find_missing_weights(exc)
        if found is None or os.environ.get("BUNDLE_TRACEBACK", "") not in ("", "0"):
            return previous(exc_type, exc, tb)
        sys.stderr.write(found.cli_message() + "\n")
        sys.stderr.flush()

    hook._bundle_missing_weights = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True


install_cli_excepthook()
