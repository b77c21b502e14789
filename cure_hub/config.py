"""Configuration dataclasses. Every field is documented, validated in ``__post_init__``, and maps
one-to-one onto a recipe key (its section, then its name) and a command-line flag (its name with
dashes)."""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from pathlib import Path

import yaml

from .method_registry import METHOD_CLASSES
from .run_folder import RunFolder

#: The weights a training run writes (``RUN/weights/<name>.safetensors``), and what each is.
WEIGHT_CHOICES = {
    "last": "the model at the end of training",
    "best": "the checkpoint with the best PGD accuracy on the evaluation subset during training",
    "revision": "CURE's revision model, the stochastic moving average of the trained model",
    "start": "the weights the robust fine-tuning started from (after the natural warm-up, or the initial model)",
}


AUGMENTATIONS = ("auto", "cifar", "imagenet", "none")
#: Values that recipes and run folders of earlier versions hold, and what they mean now.
LEGACY_VALUES = {("data", "augment"): {True: "auto", False: "none"}}


class InputError(ValueError):
    """Bad input from the user (a flag, a recipe value, a dataset, a file): the command line
    reports it in one line, with exit status 2, and no traceback."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def parse_number(text: str) -> float:
    """A float from ``"0.1"``, ``"1e-3"`` or a fraction such as ``"8/255"``."""
    numerator, slash, denominator = str(text).partition("/")
    try:
        return float(numerator) / (float(denominator) if slash else 1.0)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"expected a number or a fraction like 8/255, got {text!r}") from None


def base_type(annotation):
    """``int | None`` -> int; anything else unchanged (``list[str]``, ``dict``, ``bool`` ...)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _coerce(name: str, annotation, value):
    """``value`` as the field's type: numbers from YAML strings (``1e-3``, ``8/255``) are accepted as
    the command line accepts them; anything that is not clearly of the type is refused, naming it."""
    kind = base_type(annotation)
    optional = kind is not annotation  # base_type took None out of a union
    if value is None:
        _check(optional, f"{name} must be set, got null")
        return None
    if kind is bool:
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    elif kind is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
    elif kind is float:
        _check(not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                return parse_number(value)
            except InputError:
                raise InputError(f"{name} must be a number or a fraction like 8/255, got {value!r}") from None
        _check(isinstance(value, (int, float)), f"{name} must be a number, got {value!r}")
        return float(value)
    elif kind is str:
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
    elif kind is dict:
        _check(isinstance(value, dict), f"{name} must be a mapping of KEY: VALUE, got {value!r}")
    elif typing.get_origin(kind) is list:
        _check(isinstance(value, list), f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    return value


def _check_choices(config) -> None:
    """Check every field whose metadata lists its ``choices``."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is not None:
            _check(value in choices, f"{field.name} must be one of {tuple(choices)}, got {value!r}")


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
    eval_split_fraction: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Hold out this fraction of the training split (class-stratified, drawn with subset_seed) as the "
                          "evaluation split 'held_out': for a dataset with only a train split."},
    )
    image_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Resize images to this square size (default: keep them as they are)."}
    )
    crop_pct: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Evaluation centre crop: images larger than image_size are resized to a shortest edge of "
                          "image_size / crop_pct and centre-cropped (timm's crop_pct; training keeps the largest centred "
                          "square). Default: the pretrained checkpoint's, else 1.0. Smaller images are resized whole."},
    )
    train_subset: int | None = dataclasses.field(
        default=None, metadata={"help": "Train on a class-balanced subset of this many examples."}
    )
    eval_subset: int | None = dataclasses.field(
        default=None, metadata={"help": "Evaluate during training on a class-balanced subset of this many examples."}
    )
    subset_seed: int = dataclasses.field(default=0, metadata={"help": "Seed that draws the subsets."})
    streaming: bool = dataclasses.field(
        default=False,
        metadata={"help": "Stream the training split (a datasets IterableDataset) instead of loading it: for datasets "
                          "larger than memory. Shuffled through a buffer, split across processes by shard (else by "
                          "example), resumed at the exact batch; the evaluation subset is the eval split's first "
                          "eval_subset examples."},
    )
    shuffle_buffer: int = dataclasses.field(
        default=10_000, metadata={"help": "With streaming: examples in the shuffle buffer (datasets' buffer_size)."})
    augment: str = dataclasses.field(
        default="auto",
        metadata={"help": "Training augmentation, on the device: 'cifar' (4-pixel padded random crop, flip), 'imagenet' "
                          "(random resized crop, flip), 'none', or 'auto' (cifar up to 64 px, imagenet above).",
                  "choices": AUGMENTATIONS},
    )

    def __post_init__(self):
        _check_choices(self)
        for name in ("image_size", "train_subset", "eval_subset"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be positive, got {value}")
        fraction = self.eval_split_fraction
        _check(fraction is None or 0 < fraction < 1, f"eval_split_fraction must be in (0, 1), got {fraction}")
        _check(self.crop_pct is None or 0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        _check(fraction is None or self.eval_split is None,
               "eval_split_fraction makes the evaluation split ('held_out'); do not name an eval_split as well")
        _check(self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.streaming:  # both need the whole split at hand
            _check(self.train_subset is None, "train_subset draws from the whole split, which streaming never holds: "
                                              "drop --train-subset, or --streaming")
            _check(fraction is None, "eval_split_fraction splits the whole training split, which streaming never holds: "
                                     "name an --eval-split, or drop --streaming")


#: Batches of training images over which an interpolated model's batch-norm statistics are
#: recomputed, by default (``cure-hub tradeoff --bn-batches``).
BATCH_NORM_BATCHES = 50


@dataclasses.dataclass
class AttackConfig:
    """The threat model and the PGD attack used to train against it."""

    epsilon: float = dataclasses.field(default=8 / 255, metadata={"help": "Radius of the perturbation ball (pixels in [0, 1])."})
    step_size: float = dataclasses.field(default=2 / 255, metadata={"help": "PGD step size."})
    steps: int = dataclasses.field(default=10, metadata={"help": "PGD steps."})
    norm: str = dataclasses.field(default="linf", metadata={"help": "Norm of the ball: linf or l2.", "choices": ("linf", "l2")})
    random_start: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Start: 'normal' (x + 0.001 N(0, I), TRADES and CURE), 'uniform' in the ball (Madry), "
            "or 'none'; unset: the training method's own (uniform for pgd_at, else normal).",
            "choices": (None, "normal", "uniform", "none"),
        },
    )

    def __post_init__(self):
        # Pixels are in [0, 1]: an epsilon of 8 (meaning 8/255) would train against any image at all.
        _check(0 < self.epsilon <= 1, f"epsilon must be in (0, 1] (pixel units; 8/255 = 0.0314), got {self.epsilon:g}: "
                                      f"pass --epsilon {self.epsilon:g}/255 if that is what you meant")
        _check(0 < self.step_size <= 1, f"step_size must be in (0, 1] (pixel units; 2/255 = 0.0078), got {self.step_size:g}: "
                                        f"pass --step-size {self.step_size:g}/255 if that is what you meant")
        _check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _check_choices(self)


#: ``--cure-settings``: every switch of one reference at once, as recipe sections (docs/cure.md,
#: "Differences from the official code"). A key that a recipe or a flag sets keeps that value.
CURE_SETTINGS = {
    # What produced every published number: NeurAI-Lab/CURE's train_cure.py and utilities/train.py.
    "official": {
        "attack": {"epsilon": 0.031, "step_size": 0.007},
        "method": {"beta": 5.0, "rgp_adversarial_loss": "kl", "rgp_signed": True, "mask_scope": "official",
                   "revision_warmup": True, "revision_mode": "train", "revision_buffers": "keep",
                   "revision_rate_schedule": "constant"},
    },
    # The paper's text read literally, where it speaks: Eqs. 4-8, Algorithm 1 ("every layer"), a fixed d.
    "paper": {
        "attack": {"epsilon": 8 / 255, "step_size": 2 / 255},
        "method": {"beta": 1.0, "rgp_adversarial_loss": "ce", "rgp_signed": False, "mask_scope": "all",
                   "revision_warmup": False},
    },
}


@dataclasses.dataclass
class MethodConfig:
    """The training method and its hyper-parameters (those of other methods are ignored)."""

    method: str = dataclasses.field(default="cure", metadata={"help": "Training method.", "choices": METHOD_CLASSES})
    cure_settings: str = dataclasses.field(
        default="default",
        metadata={"help": "CURE's switches all at once: 'default' (cure-hub's, each chosen by measurement: docs/cure.md), "
                          "'official' (the official code, which produced the paper's numbers) or 'paper' (the paper's "
                          "text read literally); a flag or recipe key beside it overrides that one switch.",
                  "choices": ("default", *CURE_SETTINGS)},
    )
    beta: float | None = dataclasses.field(
        default=None, metadata={"help": "KL weight of TRADES, MART and CURE (default 6, 6 and 5)."}
    )
    percentile: float = dataclasses.field(
        default=30.0, metadata={"help": "CURE p: percent of each masked tensor's weights conserved per step, in [0, 100)."}
    )
    alpha: float = dataclasses.field(default=0.1, metadata={"help": "CURE alpha: weight of the natural term in RGP (Eq. 6)."})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "CURE gamma: weight of the consistency loss (Eq. 8)."})
    revision_rate: float = dataclasses.field(default=0.2, metadata={"help": "CURE r: probability of a revision per step (Eq. 7)."})
    revision_decay: float = dataclasses.field(default=0.999, metadata={"help": "CURE d: moving-average decay of the revision model."})
    revision_rate_schedule: str = dataclasses.field(
        default="cosine",
        metadata={"help": "How r decays over training towards revision_rate_min.", "choices": ("constant", "linear", "cosine")},
    )
    revision_rate_min: float = dataclasses.field(default=0.0, metadata={"help": "The revision rate at the last step."})
    revision_warmup: bool = dataclasses.field(
        default=False, metadata={"help": "Use decay min(1 - 1/(t + 2), d) after step t, counted from 0 (official code)."}
    )
    revision_mode: str = dataclasses.field(
        default="eval",
        metadata={"help": "Mode of the revision model in the consistency loss; 'train' as the official code.", "choices": ("eval", "train")},
    )
    revision_buffers: str = dataclasses.field(
        default="average",
        metadata={"help": "Batch-norm statistics of the revision model: moving 'average' like its weights, or 'keep'.", "choices": ("average", "keep")},
    )
    mask_scope: str = dataclasses.field(
        default="all_but_head",
        metadata={
            "help": "Tensors CURE masks: every one but the classifier head, 'all', or 'official' (conv1 of each block).",
            "choices": ("all_but_head", "all", "official"),
        },
    )
    mask_include: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Parameter-name patterns (fnmatch) to mask, replacing mask_scope."}
    )
    mask_exclude: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "Parameter-name patterns (fnmatch) never masked."}
    )
    rgp_adversarial_loss: str = dataclasses.field(
        default="ce",
        metadata={"help": "Loss of RGP's adversarial term: 'ce' on x_adv (paper) or the TRADES 'kl' (official).", "choices": ("ce", "kl")},
    )
    rgp_signed: bool = dataclasses.field(
        default=False, metadata={"help": "Use signed gradients in RGP instead of magnitudes (official code)."}
    )
    mask_interval: int = dataclasses.field(
        default=1,
        metadata={"help": "Recompute RGP and the masks every k optimiser steps, reusing the last masks in between "
                          "(1: every step, as the paper; k > 1 is a deviation that saves the RGP gradients' cost)."},
    )
    use_rgp: bool = dataclasses.field(default=True, metadata={"help": "CURE ablation: mask gradients by RGP."})
    use_revision: bool = dataclasses.field(default=True, metadata={"help": "CURE ablation: keep the revision model and its consistency loss."})

    def __post_init__(self):
        _check_choices(self)
        _check(self.mask_interval >= 1, f"mask_interval must be >= 1, got {self.mask_interval}")
        if self.beta is None:
            self.beta = METHOD_CLASSES[self.method].default_beta
        _check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _check(0 <= self.percentile < 100, f"percentile (p) must be in [0, 100), got {self.percentile}")
        if self.method == "cure" and self.revision_mode == "eval" and self.revision_buffers == "keep":
            logging.getLogger("cure_hub").warning(
                "revision_mode='eval' with revision_buffers='keep': the revision model's batch-norm statistics stay those "
                "of the start while its weights move; use --revision-buffers average, or --revision-mode train (official)"
            )
        if self.method == "cure" and 0 < self.percentile < 1:
            logging.getLogger("cure_hub").warning(
                "percentile %g conserves %g %% of each tensor's weights; the official code's --percentile is a fraction "
                "(0.3 there is 30 here): pass --percentile %g if you meant that", self.percentile, self.percentile, self.percentile * 100,
            )
        for name in ("alpha", "revision_rate", "revision_decay", "revision_rate_min"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
        _check(self.revision_rate_min <= self.revision_rate, "revision_rate_min must not exceed revision_rate")
        _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")


@dataclasses.dataclass
class ModelConfig:
    """The network and where its starting weights come from."""

    model: str = dataclasses.field(
        default="cifar_resnet18",
        metadata={"help": "timm architecture or alias, transformers model type, config.json, folder or Hub id."},
    )
    model_kwargs: dict = dataclasses.field(
        default_factory=dict,
        metadata={"help": "Constructor arguments or config fields, e.g. width=16 or hidden_size=192."},
    )
    pretrained: bool = dataclasses.field(default=False, metadata={"help": "Start from the architecture's pretrained weights."})
    from_scratch: bool = dataclasses.field(
        default=False,
        metadata={"help": "Let CURE start from random weights although the architecture has pretrained ones (CURE "
                          "assumes a naturally trained start; without this, that start is refused, naming the fixes)."},
    )
    init_from: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Start from these weights: a state dict file, a run or export folder, or a Hub id."},
    )


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule, length and precision of training."""

    epochs: int = dataclasses.field(default=10, metadata={"help": "Training epochs."})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "Batch size per process."})
    optimizer: str = dataclasses.field(default="sgd", metadata={"help": "Optimiser.", "choices": ("sgd", "adamw")})
    lr: float = dataclasses.field(default=0.1, metadata={"help": "Peak learning rate."})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = dataclasses.field(default=5e-4, metadata={"help": "Weight decay."})
    lr_schedule: str = dataclasses.field(
        default="piecewise",
        metadata={"help": "piecewise (TRADES: x0.1 at each milestone), cosine or constant.", "choices": ("piecewise", "cosine", "constant")},
    )
    lr_milestones: list[float] = dataclasses.field(
        default_factory=lambda: [0.75, 0.9], metadata={"help": "Fractions of training where the piecewise schedule decays."}
    )
    lr_warmup_steps: int = dataclasses.field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    warmup_epochs: int = dataclasses.field(
        default=0, metadata={"help": "Epochs of natural training before the method starts (CURE-Eff)."}
    )
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    mixed_precision: str = dataclasses.field(
        default="no", metadata={"help": "Mixed precision.", "choices": ("no", "bf16", "fp16")}
    )
    compile: bool = dataclasses.field(
        default=False,
        metadata={"help": "Compile the model (and CURE's revision model) with torch.compile for training and evaluation. "
                          "The first step and evaluation compile, for minutes; float rounding changes, so it is fixed at "
                          "resume. benchmarks/step_cost.py --compile measures whether it pays."},
    )
    channels_last: bool = dataclasses.field(
        default=False,
        metadata={"help": "Train in the channels-last memory layout (timm's --channels-last): faster convolutions on CPUs "
                          "and under mixed precision on GPUs (a step of a width-16 CIFAR ResNet-18 in 0.86x "
                          "the time on this project's CPU: benchmarks/step_cost.py --channels-last); float rounding changes, so "
                          "it is fixed at resume. Refused on a CPU for strided 1x1 convolutions of fewer than 16 channels "
                          "(oneDNN#6035)."},
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Random seed (data order, attacks, revision draws)."})

    def __post_init__(self):
        _check_choices(self)
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 < m < 1 for m in self.lr_milestones), f"lr_milestones must be fractions in (0, 1), got {self.lr_milestones}")
        _check(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")


@dataclasses.dataclass
class RunConfig:
    """Where the run is written, how often it evaluates, logs and checkpoints."""

    output_dir: str = dataclasses.field(default="runs/cure", metadata={"help": "Run folder."})
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "Train into a run folder that already holds a run."}
    )
    resume_from: str | None = dataclasses.field(
        default=None, metadata={"help": "Resume from a checkpoint folder, or the latest checkpoint of a run folder."}
    )
    eval_every_epochs: int = dataclasses.field(default=1, metadata={"help": "Evaluate clean and PGD-20 accuracy every N epochs (and at the end)."})
    eval_attack_steps: int = dataclasses.field(default=20, metadata={"help": "PGD steps of the evaluation during training."})
    checkpoint_every_steps: int | None = dataclasses.field(
        default=None, metadata={"help": "Also checkpoint every N optimiser steps (always at each epoch's end and the end)."}
    )
    keep_checkpoints: int = dataclasses.field(default=2, metadata={"help": "Checkpoints kept (oldest removed)."})
    log_every_steps: int = dataclasses.field(default=10, metadata={"help": "Log training metrics every N optimiser steps."})
    report_to: str = dataclasses.field(default="none", metadata={"help": "Tracker: none, tensorboard, wandb, ... (Accelerate)."})
    num_workers: int = dataclasses.field(default=0, metadata={"help": "Data-loading worker processes."})
    keep_freed_memory: bool = dataclasses.field(
        default=True,
        metadata={"help": "On a CPU (Linux, glibc): keep freed memory in the process rather than fault it in again every "
                          "step (3-8 % of a CURE step); the process then holds its peak memory."},
    )
    overfitting_margin: float = dataclasses.field(
        default=0.02, metadata={"help": "Robust-overfitting alarm: how far below its best the PGD accuracy must fall."})
    overfitting_patience: int = dataclasses.field(
        default=2, metadata={"help": "Robust-overfitting alarm: for how many evaluations in a row."})
    stop_on_robust_overfitting: bool = dataclasses.field(
        default=False, metadata={"help": "End the run when the robust-overfitting alarm fires (the export follows as usual)."})
    stop_on_collapse: bool = dataclasses.field(
        default=False, metadata={"help": "End the run, naming the likely cause and the fix, when the training-collapse "
                                         "alarm fires (training accuracy far below its start while the regulariser "
                                         "is the largest term of the loss); nothing is exported."})
    collapse_drop: float = dataclasses.field(
        default=0.5, metadata={"help": "Training-collapse alarm: the training accuracy stays below this fraction of "
                                       "where the method started."})
    collapse_patience: int = dataclasses.field(
        default=20, metadata={"help": "Training-collapse alarm: for this many logged steps in a row."})
    export_weights: str = dataclasses.field(
        default="last", metadata={"help": "The weights of the export at the end: last, or best (the best PGD accuracy).",
                                  "choices": ("last", "best")})
    push_to_hub: bool = dataclasses.field(default=False, metadata={"help": "Push the exported model to the Hub at the end."})
    hub_model_id: str | None = dataclasses.field(default=None, metadata={"help": "Hub repository id to push to."})

    def __post_init__(self):
        _check(self.eval_every_epochs >= 1, f"eval_every_epochs must be >= 1, got {self.eval_every_epochs}")
        _check(self.eval_attack_steps >= 0, f"eval_attack_steps must be >= 0, got {self.eval_attack_steps}")
        _check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps must be >= 1")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every_steps >= 1, f"log_every_steps must be >= 1, got {self.log_every_steps}")
        _check(0 <= self.overfitting_margin < 1, f"overfitting_margin must be in [0, 1), got {self.overfitting_margin}")
        _check(self.overfitting_patience >= 1, f"overfitting_patience must be >= 1, got {self.overfitting_patience}")
        _check(0 < self.collapse_drop < 1, f"collapse_drop must be in (0, 1), got {self.collapse_drop}")
        _check(self.collapse_patience >= 1, f"collapse_patience must be >= 1, got {self.collapse_patience}")
        _check_choices(self)
        _check(not self.push_to_hub or self.hub_model_id, "push_to_hub needs hub_model_id")
        if self.hub_model_id is not None:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.hub_model_id)
            except HFValidationError:
                raise InputError(
                    f"hub_model_id {self.hub_model_id!r} is not a Hub repository id: use 'name' or 'owner/name' "
                    "with letters, digits, '-', '_' and '.'"
                ) from None


@dataclasses.dataclass
class TrainConfig:
    """A whole training run. Recipes (YAML) have one section per field; every leaf field is also
    a command-line flag (``--field-name``)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, sections: dict) -> "TrainConfig":
        """Build from nested sections, naming any unknown section or key. ``method.cure_settings``
        fills in its values for the keys the sections leave unset."""
        sections = with_cure_settings(sections)
        types = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = set(sections) - set(types)
        _check(not unknown, f"unknown recipe section(s) {sorted(unknown)}; sections are {sorted(types)}")
        built = {}
        for name, section_type in types.items():
            values = sections.get(name) or {}
            hints = typing.get_type_hints(section_type)
            known = {f.name for f in dataclasses.fields(section_type)}
            extra = set(values) - known
            _check(not extra, f"unknown key(s) {sorted(extra)} in section '{name}'; its keys are {sorted(known)}")
            values = {key: LEGACY_VALUES.get((name, key), {}).get(v, v) if isinstance(v, bool) else v for key, v in values.items()}
            built[name] = section_type(**{key: _coerce(f"{name}.{key}", hints[key], v) for key, v in values.items()})
        return cls(**built)

    @classmethod
    def of_run(cls, folder: str | os.PathLike) -> "TrainConfig":
        """The configuration that a run folder's config.yaml records. One that lacks a section (an
        empty or cut file) is refused, naming them: defaults in their place would resume another run."""
        path = RunFolder(folder).config_file
        sections = read_recipe(path)
        missing = [field.name for field in dataclasses.fields(cls) if not sections.get(field.name)]
        _check(not missing, f"{path} lacks the section(s) {', '.join(missing)} (an empty or cut file), so the run it "
                            "describes is unknown: restore it from a copy of the run, or start again with --overwrite-output-dir")
        return cls.from_dict(sections)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict | None = None) -> "TrainConfig":
        """A recipe file, with ``overrides`` ({section: {key: value}}) applied on top."""
        return cls.from_dict(merge_sections(read_recipe(path), overrides or {}))


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key or section given twice (YAML lets the second win silently)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            _check(key not in lines, f"{key!r} is given twice, on lines {lines.get(key)} and {key_node.start_mark.line + 1}; keep one")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_recipe(path: str | os.PathLike) -> dict:
    """The sections of a YAML recipe, as written (values are checked by :meth:`TrainConfig.from_dict`)."""
    try:
        with open(path) as f:
            sections = yaml.load(f, Loader=RecipeLoader) or {}
    except yaml.YAMLError as err:
        raise InputError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except InputError as err:
        raise InputError(f"recipe {path}: {err}") from None
    _check(isinstance(sections, dict), f"recipe {path} must be a mapping of sections")
    for name, values in sections.items():
        _check(values is None or isinstance(values, dict), f"recipe {path}: section '{name}' must be a mapping of keys, got {values!r}")
    return sections


def with_cure_settings(sections: dict) -> dict:
    """``sections`` with the values of ``method.cure_settings`` (:data:`CURE_SETTINGS`) under the
    keys that they set themselves: a key given beside a preset overrides that one switch."""
    method = sections.get("method") or {}
    preset = method.get("cure_settings", "default")
    if preset == "default":
        return sections
    _check(preset in CURE_SETTINGS, f"cure_settings must be one of {('default', *CURE_SETTINGS)}, got {preset!r}")
    _check(method.get("method", "cure") == "cure",
           f"cure_settings {preset!r} sets CURE's switches; it does not apply to method {method.get('method')!r}")
    return merge_sections(CURE_SETTINGS[preset], sections)


def merge_sections(base: dict, overrides: dict) -> dict:
    """``base`` with the keys of ``overrides`` replaced, section by section."""
    return {name: {**(base.get(name) or {}), **(overrides.get(name) or {})} for name in {*base, *overrides}}


# --------------------------------------------------------------------------------------------
# Resuming

#: The fields a resumed run may change: none of them alters the trajectory of training up to the
#: step it resumes from. More epochs or steps stretch the learning-rate and revision schedules
#: from that step on, as a longer run would have them.
CHANGEABLE_AT_RESUME = {
    "optim": {"epochs", "max_steps"},
    # output_dir too: a run folder is where it is (moved, copied or spelled another way), and
    # check_resume_changes holds the resumed run to it
    "run": {f.name for f in dataclasses.fields(RunConfig)},
}


def run_folder_of(resume_from: str | os.PathLike) -> Path:
    """The run folder that ``resume_from`` (a run folder or one of its checkpoints) belongs to."""
    path = Path(resume_from)
    for candidate in (path, path.parent.parent):
        if RunFolder(candidate).holds_run():
            return candidate
    raise InputError(f"cannot resume from {str(resume_from)!r}: it is not a run folder (no config.yaml) nor one of its checkpoints")


def config_for_resume(resume_from: str, overrides: dict | None = None) -> TrainConfig:
    """The configuration of the run that ``resume_from`` belongs to, written to its folder, with
    ``overrides`` on top; an override that would change the run's trajectory is refused."""
    folder = run_folder_of(resume_from)
    saved = TrainConfig.of_run(folder)
    sections = merge_sections(saved.to_dict(), {"run": {"output_dir": str(folder)}})
    sections = merge_sections(sections, overrides or {})
    sections["run"]["resume_from"] = str(resume_from)
    config = TrainConfig.from_dict(sections)
    check_resume_changes(saved, config, folder)
    return config


def check_resume_changes(saved: TrainConfig, config: TrainConfig, folder: Path) -> None:
    """Refuse, naming them, changes to ``saved`` (the run's own configuration) that a resumed
    run may not make; the run continues in its own folder."""
    if Path(config.run.output_dir).resolve() != folder.resolve():
        raise InputError(
            f"a resumed run continues in its own folder {str(folder)!r}, not output_dir {config.run.output_dir!r}; "
            "to branch it, copy the run folder and resume the copy"
        )
    old, new = saved.to_dict(), config.to_dict()
    changed = [
        f"{section}.{key} ({old[section][key]!r} -> {value!r})"
        for section, values in new.items() for key, value in values.items()
        if value != old[section][key] and (key not in CHANGEABLE_AT_RESUME.get(section, ())
                                           # a stream's order interleaves its loader workers' shards
                                           or (key == "num_workers" and config.data.streaming))
    ]
    if changed:
        raise InputError(
            f"cannot change {', '.join(changed)} when resuming {str(folder)!r}: it would change the run's trajectory. "
            "At resume only optim.epochs, optim.max_steps and the run section (logging, evaluation, checkpoints, "
            f"push) may change; to train on with other settings, start a new run with --init-from {folder}"
        )
