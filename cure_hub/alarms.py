"""Training-health alarms, raised from the evaluations the trainer already runs.

* **Robust overfitting** (Rice, Wong & Kolter 2020): adversarial training's robust accuracy on
  held-out data peaks and then falls while training accuracy keeps rising. The alarm fires when the
  PGD accuracy of the last ``patience`` evaluations after the best one all lie more than ``margin``
  below the best; ``--stop-on-robust-overfitting`` then ends the run (the best weights are kept
  in ``weights/best.safetensors`` either way, and ``--export-weights best`` exports them).
* **Training collapse**, from the training metrics the trainer logs: the training batches'
  accuracy stays below ``drop`` times where the method started (its first batch, through the
  starting weights) for ``patience`` logged steps in a row, while the method's regulariser
  (TRADES's and MART's beta-weighted KL, CURE's gamma L_CR) is the largest term of its loss
  (``MAIN_LOSS`` is the largest of the others: CE; for CURE, CE or beta KL). Adversarial training from a natural model loses
  clean accuracy at first and wins part of it back; a run whose regulariser has taken over does
  not (CURE at the paper's fixed decay in a short run on a GPU: docs/cure.md, "A guard against
  collapse"). ``--stop-on-collapse`` ends the run, naming the likely cause and the fix.
* **Gradient masking** (catastrophic overfitting included): PGD accuracy above clean accuracy, or
  PGD at ε = 64/255 leaving more than 20 % of the first 32 evaluation examples standing, the same test
  ``cure-hub eval`` makes on every evaluation (:mod:`cure_hub.evaluation_checks`).
"""

from __future__ import annotations

import logging

import torch

from .attacks import pgd_attack
from .config import AttackConfig
from .evaluation_checks import LARGE_EPSILON, LARGE_EPSILON_TOLERANCE

logger = logging.getLogger(__name__)


class TrainingCollapsedError(RuntimeError):
    """The training-collapse alarm fired under ``--stop-on-collapse``: the run stopped, with a checkpoint and no export."""


ROBUST_OVERFITTING = "robust overfitting"
TRAINING_COLLAPSE = "training collapse"
GRADIENT_MASKING = "gradient masking"
#: PGD steps of the large-ε probe: with steps of ε/4 it can travel 2.5 ε, whatever the
#: evaluation's own number of steps.
PROBE_STEPS = 10
#: Examples of the first evaluation batch the probe attacks: enough to see a masked model (one
#: that keeps most of them standing), a small cost next to the evaluation itself.
PROBE_EXAMPLES = 32


def robust_overfitting(history: list[float], margin: float, patience: int) -> str | None:
    """The alarm's message when the last ``patience`` PGD accuracies of ``history`` (one per
    evaluation, oldest first) all come after the best and lie more than ``margin`` below it."""
    if len(history) <= patience:
        return None
    best = max(history)
    best_at = history.index(best)
    recent = history[-patience:]
    if best_at < len(history) - patience and all(value < best - margin for value in recent):
        return (f"{ROBUST_OVERFITTING}: PGD accuracy {recent[-1]:.4f} has stayed more than {margin:g} below its best "
                f"{best:.4f} (evaluation {best_at + 1}) for {patience} evaluations")
    return None


def training_collapse(history: list[list[float]], drop: float, patience: int) -> str | None:
    """The alarm's message when training has collapsed. ``history`` holds ``[training accuracy,
    largest other term of the loss, regulariser]`` of the method's first step (the starting weights' accuracy), then of
    each logged step: it fires when the accuracy of each of the last ``patience`` logged steps lies
    below ``drop`` times the first, and the regulariser outweighs every other term of the loss on
    their average."""
    if len(history) < 1 + patience:
        return None
    start = history[0][0]
    recent = history[-patience:]
    accuracy, main, regulariser = (sum(values) / patience for values in zip(*recent))
    if all(step[0] < drop * start for step in recent) and regulariser > main:
        return (f"{TRAINING_COLLAPSE}: training accuracy {accuracy:.4f} has stayed below {drop:g} x its start {start:.4f} "
                f"for {patience} logged steps while the regulariser ({regulariser:.3g}) outweighs every other term of the loss (at most {main:.3g})")
    return None


def gradient_masking(clean: float, robust: float, large_epsilon_accuracy: float | None) -> str | None:
    """The alarm's message when PGD cannot be trusted on this model at this point of training."""
    if robust > clean + 1e-9:
        return f"{GRADIENT_MASKING}: PGD accuracy {robust:.4f} is above clean accuracy {clean:.4f}"
    if large_epsilon_accuracy is not None and large_epsilon_accuracy > LARGE_EPSILON_TOLERANCE:
        return (f"{GRADIENT_MASKING}: PGD at eps = {LARGE_EPSILON * 255:.0f}/255 still leaves {large_epsilon_accuracy:.4f} "
                "accuracy on an evaluation batch; gradients may be masked (catastrophic overfitting?)")
    return None


def record_training_step(state, run, values: list[float]) -> str | None:
    """Adds ``values`` (:func:`training_collapse`'s history entry) to ``state.training_history``; the
    collapse alarm's message the first time it fires (then also in ``state.alarms``, and logged)."""
    state.training_history.append(values)
    message = training_collapse(state.training_history, run.collapse_drop, run.collapse_patience)
    if message is None or any(alarm.startswith(TRAINING_COLLAPSE) for alarm in state.alarms):
        return None
    logger.warning("step %d: %s", state.step, message)
    state.alarms.append(message)
    return message


def record_evaluation(state, run, adversarial: bool, clean: float, robust: float, large_epsilon: float) -> list[str]:
    """The alarms of an evaluation: robust overfitting for an adversarial method only (natural
    training's PGD accuracy near zero wobbles below its best and means nothing), and gradient
    masking. Each is logged and kept in ``state.alarms``; robust overfitting under
    ``--stop-on-robust-overfitting`` sets ``state.stopped_by_alarm``."""
    if adversarial:
        state.robust_history.append(robust)
    overfitting = robust_overfitting(state.robust_history, run.overfitting_margin, run.overfitting_patience) if adversarial else None
    fired = [message for message in (overfitting, gradient_masking(clean, robust, large_epsilon)) if message]
    for message in fired:
        logger.warning("step %d: %s", state.step, message)
        if message not in state.alarms:
            state.alarms.append(message)
        if message.startswith(ROBUST_OVERFITTING) and run.stop_on_robust_overfitting:
            state.stopped_by_alarm = True
    return fired


def large_epsilon_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Per example, whether PGD at ε = 64/255 (l-inf, step ε/4) leaves it classified correctly."""
    config = AttackConfig(epsilon=LARGE_EPSILON, step_size=LARGE_EPSILON / 4, steps=PROBE_STEPS, norm="linf",
                          random_start="uniform")
    adversarial = pgd_attack(model, images, labels, config, generator=generator)
    with torch.no_grad():
        return model(adversarial).argmax(1) == labels
