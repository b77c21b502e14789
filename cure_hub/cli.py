"""The ``cure-hub`` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys


def _models(args: argparse.Namespace) -> int:
    from .models import known_model_names

    names = [n for n in known_model_names() if fnmatch.fnmatch(n, args.pattern)]
    print("\n".join(names) if names else f"no model matches {args.pattern!r}")
    return 0 if names else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cure-hub",
        description="Adversarially robust fine-tuning (CURE) for timm and Hugging Face vision models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = commands.add_parser("models", help="List the model names create_model accepts.")
    models.add_argument("pattern", nargs="?", default="*", help="Shell-style filter, e.g. 'vit_*'.")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
