"""The interface every training method implements, and the attack helper they share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..attacks import AttackLoss, pgd_attack
from ..config import AttackConfig, MethodConfig, TrainConfig


@dataclasses.dataclass
class StepOutput:
    """What a method's :meth:`Method.compute_loss` returns.

    ``metrics`` hold detached scalar tensors on the model's device, so that logging them costs a
    host synchronisation only when the trainer actually logs.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


#: The metrics a method with a regulariser reports besides its loss, each as weighted in the loss:
#: the largest of its other terms (TRADES: CE; MART: its boosted CE; CURE: CE or beta KL, whichever
#: is larger), and the regulariser (TRADES, MART: beta KL; CURE: gamma L_CR). The collapse alarm
#: (cure_hub.alarms) fires only while the regulariser is the largest term of the loss.
MAIN_LOSS, REGULARISER = "main_loss", "regulariser"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean().detach()


class Method:
    """A training method. The trainer calls, for each optimiser step:

    1. :meth:`compute_loss` on every micro-batch, then ``backward`` of the returned loss through
       the (possibly distributed) model;
    2. :meth:`before_optimizer_step`, where a method may change the accumulated gradients;
    3. the optimiser step, then :meth:`after_optimizer_step`, where a method may update its state.

    ``model`` is the module the trainer differentiates (it may be wrapped for data parallelism);
    attacks and auxiliary forward passes run on :func:`unwrap` of it, outside the wrapper.
    """

    name: ClassVar[str]
    #: What the model card calls the method.
    title: ClassVar[str]
    #: ``beta`` when the method config leaves it unset (methods without a KL term ignore it).
    default_beta: ClassVar[float] = 0.0
    #: The attack's random start when the attack config leaves it unset.
    default_random_start: ClassVar[str] = "normal"
    #: Whether the method differentiates through a retained graph (see :func:`compile_for_training`).
    retains_graph: ClassVar[bool] = False
    #: Whether the method trains against attacks: the robust-overfitting alarm watches only these.
    adversarial: ClassVar[bool] = True
    #: The likely cause and fix named when the training-collapse alarm stops a run (cure_hub.alarms).
    collapse_advice: ClassVar[str] = ("the regulariser has overwhelmed the rest of the loss: lower --lr, or the regulariser's "
                                      "weight (--beta)")

    def __init__(self, config: MethodConfig, attack: AttackConfig):
        self.config = config
        self.attack = attack if attack.random_start else dataclasses.replace(attack, random_start=self.default_random_start)
        #: Draws the attacks' random starts; the global RNG when None. The trainer sets and checkpoints it.
        self.generator: torch.Generator | None = None
        #: Applied to losses a method differentiates itself. In fp16 the trainer sets the loss
        #: scaler's ``scale`` here: it multiplies by the scale on the device, with no host sync.
        self.scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
        #: Whether this step's statistics will be read. The trainer clears it on the steps it does not
        #: log, so that statistics nobody reads cost nothing.
        self.record_statistics: bool = True
        #: Whether the model is compiled (``--compile``, :func:`compile_for_training`): models of the
        #: method's own, such as CURE's revision model, are compiled then too.
        self.compile_models: bool = False
        #: Micro-batches per optimiser step (``gradient_accumulation_steps``), which the trainer sets
        #: before :meth:`setup`: CURE's scores are folded as they arrive only when there is one.
        self.micro_batches: int = 1
        #: Under FSDP2, which cannot deep-copy a sharded module: makes a module of the model's
        #: architecture, sharded as the model is (its weights are then copied shard by shard).
        #: The trainer sets it; a method's second model (CURE's revision model) is made by it.
        self.sharded_copy: Callable[[nn.Module], nn.Module] | None = None

    # ---- checks before training (cure_hub.preflight calls them) -------------------------------
    @classmethod
    def check_start(cls, config: TrainConfig) -> None:
        """Refuse (:class:`~cure_hub.config.InputError`) or warn about a start the method cannot
        train well from, before any data is loaded."""

    @classmethod
    def check_engine(cls, engine: str, config: TrainConfig) -> None:
        """Refuse an engine (:func:`cure_hub.sharding.engine_name`: ``MULTI_GPU``, ``FSDP2``,
        ``DEEPSPEED``, ...), or a setting under it, with which the method would silently train
        something else."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the method cannot train, before the first step (it may come after a warm-up)."""

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """Warnings about the method's settings over a run of ``total_steps`` of its steps."""
        return []

    # ---- the model card (cure_hub.hub) --------------------------------------------------------
    @classmethod
    def card_settings(cls, method: dict) -> str:
        """The method's settings as the model card gives them, from the run's ``method`` section."""
        return ""

    # ---- training ----------------------------------------------------------------------------
    def setup(self, model: nn.Module, total_steps: int, seed: int = 0) -> None:
        """Called once before training with the (unwrapped) model and the number of optimiser steps."""

    def compute_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def before_optimizer_step(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Act on the accumulated (and, in data-parallel training, averaged) gradients."""
        return {}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Update method state after optimiser step ``step`` (counted from 0)."""

    def extra_weights(self) -> dict[str, nn.Module]:
        """Models of the method's own, saved beside the model's at the end (``weights/<name>.safetensors``)."""
        return {}

    def layer_statistics(self) -> dict[str, dict[str, float]]:
        """Per-parameter statistics of the last step that recorded them (the trainer writes them
        to ``layer_statistics.jsonl`` when it logs)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def adversarial_examples(self, model: nn.Module, images, labels, loss: AttackLoss) -> torch.Tensor:
        return pgd_attack(unwrap(model), images, labels, self.attack, loss=loss, generator=self.generator)


class CleanAndAdversarialMethod(Method):
    """A method whose loss compares the model on clean and adversarial images (TRADES, MART): a
    main term plus beta times a regulariser, ``terms(f(x), f(x_adv), y)``, with x_adv from the
    ``attack_loss`` attack."""

    attack_loss: ClassVar[AttackLoss]
    #: TRADES's and MART's CIFAR-10 settings.
    default_beta = 6.0

    @classmethod
    def card_settings(cls, method: dict) -> str:
        return f"β = {method['beta']}"

    @staticmethod
    def terms(clean_logits, adv_logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, model, images, labels) -> StepOutput:
        adversarial = self.adversarial_examples(model, images, labels, loss=self.attack_loss)
        logits, adv_logits = model(images), model(adversarial)
        main, regulariser = self.terms(logits, adv_logits, labels)
        weighted = self.config.beta * regulariser
        loss = main + weighted
        metrics = {"loss": loss.detach(), "clean_acc": accuracy(logits, labels), "adv_acc": accuracy(adv_logits, labels),
                   MAIN_LOSS: main.detach(), REGULARISER: weighted.detach()}
        return StepOutput(loss, metrics)
