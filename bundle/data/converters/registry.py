"""The converter registry: dataset name -> :class:`Converter`, each declaring its own command-line options.

A converter module (``bundle.data.converters.<dataset>``) lists its entry points in ``CONVERTERS``; the
registry imports the modules named in :data:`MODULES`, so ``scripts/prepare_data.py`` builds one sub-command
per entry (the options every conversion shares plus the converter's own) and :func:`prepare` runs one
conversion from Python. ``compose`` is a command too (:func:`commands`), without ``--root``.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from bundle.data.converters.common import CLASSES, ConversionError, finalize

__all__ = [
    "BLANK_OPTION",
    "add_output_arguments",
    "Option",
    "option",
    "Converter",
    "Command",
    "MODULES",
    "converters",
    "commands",
    "prepare",
]

#: converter modules (bundle.data.converters.<name>), each with a ``CONVERTERS`` tuple; CLI order
MODULES = ("nih", "vindr", "chexpert", "mimic", "padchest", "jsrt")
#: modules of the other prepare_data commands, each with a ``COMMAND``
COMMAND_MODULES = ("compose",)


@dataclass(frozen=True)
class Option:
    """One command-line option of a converter: ``flag`` (e.g. "--age-mode"), the converter's ``keyword`` it
    fills (default: the flag's name with "_" for "-") and the ``argparse`` settings. A value of None is not
    passed on (the converter's own default applies)."""

    flag: str
    keyword: str | None = None
    settings: Mapping = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser):
        parser.add_argument(self.flag, **dict(self.settings))


def option(flag: str, keyword: str | None = None, **settings) -> Option:
    """An :class:`Option` with the ``argparse.add_argument`` settings as keywords."""
    return Option(flag, keyword, settings)


#: "not mentioned" findings of the report-mined labels (CheXpert, MIMIC)
BLANK_OPTION = option(
    "--blank", type=int, choices=[-1, 0], default=-1, help="label of 'not mentioned' (blank) findings"
)


def add_output_arguments(parser: argparse.ArgumentParser):
    """``--out`` and ``--check-images``: what every prepare_data command writes and checks."""
    parser.add_argument("--out", required=True, help="datalist JSON to write (summary goes beside it)")
    parser.add_argument(
        "--check-images",
        action="store_true",
        help="open every image header; missing/unreadable images are listed, counted and left out",
    )


@dataclass(frozen=True)
class Command:
    """A prepare_data sub-command: ``add_arguments(parser)`` declares its options, ``run(args, parser)`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], object]


@dataclass(frozen=True)
class Converter:
    """A dataset converter: ``convert(root, **options) -> (records, report)`` and its own CLI options.

    ``name`` is the CLI name and the datalist's ``name``.
    """

    name: str
    convert: Callable
    help: str = ""
    options: tuple[Option, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser):
        """The options every conversion shares, then the converter's own."""
        parser.add_argument("--root", help="the dataset folder as downloaded")
        add_output_arguments(parser)
        parser.add_argument("--classes", nargs="+", default=None, choices=list(CLASSES), help="conditions to keep")
        parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
        parser.add_argument(
            "--val-fraction", type=float, default=0.1, help="patient share for validation (if no official)"
        )
        parser.add_argument("--test-fraction", type=float, default=0.2, help="patient share for test (if no official)")
        parser.add_argument("--absolute-paths", action="store_true", help="write absolute image paths")
        for opt in self.options:
            opt.add_to(parser)

    def keywords(self, args: argparse.Namespace) -> dict:
        """The converter keywords given on the command line (None: not given)."""
        values = {opt.keyword or opt.dest: getattr(args, opt.dest) for opt in self.options}
        return {k: v for k, v in values.items() if v is not None}

    def run(self, args: argparse.Namespace, parser: argparse.ArgumentParser):
        if not args.root:
            parser.error(f"{self.name} needs --root DIR (the dataset folder as downloaded)")
        return prepare(
            self.name,
            args.root,
            args.out,
            classes=args.classes,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            check=args.check_images,
            absolute_paths=args.absolute_paths,
            **self.keywords(args),
        )

    def as_command(self) -> Command:
        return Command(self.name, self.help, self.add_arguments, self.run)


@lru_cache(maxsize=1)
def converters() -> dict[str, Converter]:
    """CLI name -> :class:`Converter`, in :data:`MODULES` order."""
    out: dict[str, Converter] = {}
    for mod in MODULES:
        for conv in importlib.import_module(f"bundle.data.converters.{mod}").CONVERTERS:
            out[conv.name] = conv
    return out


def commands() -> dict[str, Command]:
    """Every prepare_data sub-command: the converters, then compose."""
    out = {name: conv.as_command() for name, conv in converters().items()}
    for mod in COMMAND_MODULES:
        cmd = importlib.import_module(f"bundle.data.converters.{mod}").COMMAND
        out[cmd.name] = cmd
    return out


def prepare(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    check: bool = False,
    absolute_paths: bool = False,
    verbose: bool = True,
    **options,
) -> tuple[dict, dict]:
    """Convert one dataset under ``root`` into the datalist ``out`` (+ summary). Returns (datalist, summary)."""
    conv = converters().get(dataset)
    if conv is None:
        raise ConversionError(f"unknown dataset {dataset!r}; choose one of {sorted(converters())}")
    if classes:
        bad = [c for c in classes if c not in CLASSES]
        if bad:
            raise ConversionError(f"--classes {bad} unknown; choose from {list(CLASSES)}")
    records, report = conv.convert(root, **options)
    return finalize(
        records,
        conv.name,
        out,
        report,
        classes,
        seed,
        val_fraction,
        test_fraction,
        check,
        absolute_paths,
        verbose=verbose,
    )
