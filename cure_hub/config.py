"""Configuration dataclasses. Every field is documented, validated in ``__post_init__``, and maps
one-to-one onto a recipe key (its section, then its name) and a command-line flag (its name with
dashes)."""

from __future__ import annotations

import dataclasses


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_choices(config) -> None:
    """Check every field whose metadata lists its ``choices``."""
    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        _check(choices is None or value in choices, f"{field.name} must be one of {choices}, got {value!r}")


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
        _check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}")
        _check(self.step_size > 0, f"step_size must be > 0, got {self.step_size}")
        _check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _check_choices(self)


METHODS = ("standard", "pgd_at", "trades", "mart", "cure")

#: The KL weight each method uses when ``beta`` is not set: TRADES and MART as their papers'
#: CIFAR-10 settings, CURE as the literal reading of its Eq. 5 (the paper recipes set 5, see docs/cure.md).
DEFAULT_BETA = {"trades": 6.0, "mart": 6.0, "cure": 1.0}


@dataclasses.dataclass
class MethodConfig:
    """The training method and its hyper-parameters (those of other methods are ignored)."""

    method: str = dataclasses.field(default="cure", metadata={"help": "Training method.", "choices": METHODS})
    beta: float | None = dataclasses.field(
        default=None, metadata={"help": "KL weight of TRADES, MART and CURE (default 6, 6 and 1)."}
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
        default=False, metadata={"help": "Use decay min(1 - 1/(t + 1), d) at step t (official code)."}
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
    use_rgp: bool = dataclasses.field(default=True, metadata={"help": "CURE ablation: mask gradients by RGP."})
    use_revision: bool = dataclasses.field(default=True, metadata={"help": "CURE ablation: keep the revision model and its consistency loss."})

    def __post_init__(self):
        _check_choices(self)
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.method, 0.0)
        _check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        _check(0 <= self.percentile < 100, f"percentile (p) must be in [0, 100), got {self.percentile}")
        for name in ("alpha", "revision_rate", "revision_decay", "revision_rate_min"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
        _check(self.revision_rate_min <= self.revision_rate, "revision_rate_min must not exceed revision_rate")
        _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
