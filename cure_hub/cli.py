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


def _train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    return train_main(args.train_args, prog="cure-hub train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cure-hub",
        description="Adversarially robust fine-tuning (CURE) for timm and Hugging Face vision models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="Train a robust model (the flags of cure_hub/train.py; see cure-hub train --help).", add_help=False
    )
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)
    models = commands.add_parser("models", help="List the model names create_model accepts.")
    models.add_argument("pattern", nargs="?", default="*", help="Shell-style filter, e.g. 'vit_*'.")
    models.set_defaults(run=_models)
    return parser


def setup_logging() -> None:
    """Our own progress at INFO; other libraries' at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cure_hub").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
