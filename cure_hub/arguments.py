"""Command-line flags generated from the configuration dataclasses, one flag per field.

``--recipe FILE.yaml`` supplies a recipe; flags given on the command line override it; what is in
neither keeps the dataclass default. Flags are registered with ``argparse.SUPPRESS`` defaults, so
"given" and "left at its default" can be told apart. ``--resume-from RUN`` starts from the run's own
``config.yaml`` instead, and refuses flags that would change its trajectory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing

import yaml

from .config import InputError, TrainConfig, base_type, config_for_resume, merge_sections, parse_number, read_recipe


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors in one line (``PROG: error: ...``, exit status 2): the message, the
    nearest flag to an unrecognised one, and where the full usage is, instead of the usage itself."""

    def error(self, message: str):
        unknown = re.findall(r"(--[\w-]+)", message) if message.startswith("unrecognized arguments") else []
        known = [option for action in self._actions for option in action.option_strings]
        suggestions = [match for flag in unknown for match in difflib.get_close_matches(flag, known, n=1)]
        hint = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see {self.prog} --help\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def number(text: str) -> float:
    """An argparse type: ``0.1``, ``1e-3`` or a fraction such as ``8/255``."""
    try:
        return parse_number(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def add_config_arguments(parser: ArgumentParser) -> None:
    """Add ``--recipe`` and one flag for every field of every section of :class:`TrainConfig`."""
    parser.add_argument("--recipe", help="YAML recipe; flags given here override it.")
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        group = parser.add_argument_group(section.name, section.default_factory.__doc__.split("\n\n")[0])
        hints = typing.get_type_hints(section.default_factory)
        for field in dataclasses.fields(section.default_factory):
            default = getattr(getattr(defaults, section.name), field.name)
            kind = base_type(hints[field.name])
            options = {"dest": f"{section.name}.{field.name}", "default": argparse.SUPPRESS}
            if kind is not bool:
                options["metavar"] = field.name.upper()
            help_text = field.metadata.get("help", "")
            if "default" not in help_text.lower():  # a help that gives its own default (by method, by split) keeps it alone
                help_text = f"{help_text} (default: {default})".strip()
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            elif kind is dict:
                options.update(nargs="+", type=key_value, metavar="KEY=VALUE")
            elif typing.get_origin(kind) is list:
                options.update(nargs="+", type=typing.get_args(kind)[0])
            else:
                options["type"] = number if kind is float else kind
                if "choices" in field.metadata:
                    options["choices"] = [c for c in field.metadata["choices"] if c is not None]
                    options["metavar"] = "{" + ",".join(options["choices"]) + "}"
            group.add_argument(_flag(field.name), help=help_text.replace("%", "%%"), **options)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe (if any) with the flags that were given applied on top, validated."""
    overrides: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        overrides.setdefault(section, {})[name] = dict(value) if isinstance(value, list) and value and isinstance(value[0], tuple) else value
    resume_from = overrides.get("run", {}).get("resume_from")
    if resume_from:
        if args.recipe:  # the recipe's values count as flags: checked against the run's own
            overrides = merge_sections(read_recipe(args.recipe), overrides)
        return config_for_resume(resume_from, overrides)
    if args.recipe:
        return TrainConfig.from_yaml(args.recipe, overrides)
    return TrainConfig.from_dict(overrides)


def parse_train_config(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """Parse ``argv`` into a validated :class:`TrainConfig`; a bad flag or value exits with status 2."""
    parser = ArgumentParser(prog=prog, description="Train an adversarially robust model (CURE by default).", allow_abbrev=False)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except (InputError, FileNotFoundError) as err:
        parser.error(str(err))
