"""Configuration dataclasses. Every field is documented, validated in ``__post_init__``, and maps
one-to-one onto a recipe key (its section, then its name) and a command-line flag (its name with
dashes)."""

from __future__ import annotations

import dataclasses


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass
class DataConfig:
    """Where the images come from and how many of them are used."""

    dataset: str = dataclasses.field(
        default="uoft-cs/cifar10",
        metadata={"help": "Hub dataset id, local dataset folder, or a packaged dataset ('digits')."},
    )
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "Dataset configuration name."})
    image_column: str | None = dataclasses.field(default=None, metadata={"help": "Image column (detected when unset)."})
    label_column: str | None = dataclasses.field(default=None, metadata={"help": "Label column (detected when unset)."})
    train_split: str | None = dataclasses.field(default=None, metadata={"help": "Training split (default: train)."})
    eval_split: str | None = dataclasses.field(
        default=None, metadata={"help": "Evaluation split (default: test, else validation)."}
    )
    image_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Resize images to this square size (default: keep them as they are)."}
    )
    train_subset: int | None = dataclasses.field(
        default=None, metadata={"help": "Train on a class-balanced subset of this many examples."}
    )
    eval_subset: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate during training on a class-balanced subset of this many examples."}
    )
    subset_seed: int = dataclasses.field(default=0, metadata={"help": "Seed that draws the subsets."})

    def __post_init__(self):
        for name in ("image_size", "train_subset", "eval_subset"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be positive, got {value}")
