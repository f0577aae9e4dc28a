"""``python -m bundle.deploy -i STUDY_DIR -o OUT -m MODEL [--config FILE ...] [--override KEY=VALUE ...] [-l LEVEL]``

-i/-o/-m/-l are the MONAI Deploy App SDK's (also HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH).
``--config`` (default configs/inference.yaml of this bundle) and ``--override`` describe the checkpoint's
architecture, e.g. ``--override image_size=64 --override network_def#vit_layers=2``.
"""

import argparse
import os
import sys

from bundle.deploy.model import DEFAULT_CONFIG, DEFAULT_MODEL, TRAIN_HINT, ModelSpec, parse_override, resolve_model_path


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m bundle.deploy", description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--config", action="append", default=None, help="bundle config file(s); default: %(default)s")
    p.add_argument("--override", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("-m", "--model", default=os.environ.get("HOLOSCAN_MODEL_PATH") or DEFAULT_MODEL)
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, sdk_args = parse(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    model = resolve_model_path(args.model)
    if model is None:
        print(f"Model checkpoint not found: {os.path.abspath(args.model)}. To get one, {TRAIN_HINT}.", file=sys.stderr)
        return 2
    try:
        overrides = tuple(parse_override(o) for o in args.override)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    spec = ModelSpec(tuple(os.path.abspath(c) for c in (args.config or [DEFAULT_CONFIG])), overrides, model)

    from bundle.deploy.app import CXRFindingsApp  # imports the SDK (holoscan): seconds

    CXRFindingsApp([sys.argv[0], *sdk_args, "-m", model], spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
