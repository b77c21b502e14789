"""Projected gradient descent attacks (l-inf and l2) on cross-entropy, TRADES KL or CW margin.

Every attack runs the model in eval mode (batch-norm statistics frozen, as in TRADES) and puts it
back in the mode it was in; takes input gradients with ``torch.autograd.grad``, so no parameter
``.grad`` is touched; and returns a detached tensor inside the epsilon-ball around ``images`` and
inside [0, 1].

Mixed precision (under ``torch.autocast``) needs two precautions, or the TRADES/CURE attack
silently weakens:

- Its start x + 0.001 N(0, I) lies where the KL is almost zero. In float16 or bfloat16 the
  logits there round to the clean ones for many examples (a third of them for a small CIFAR
  ResNet in bfloat16); their gradient is then exactly zero and they never move. So the KL
  attack's clean logits and its first step run in float32. One step of size ``step_size`` away,
  the KL is large enough for low precision.
- The gradient of the loss with respect to the logits is computed in float32 and rescaled per
  example so that its largest entry is 1 before it is sent back through the network. An
  example's input gradient only depends on its own logits (eval mode), so the rescaling leaves
  the l-inf step (its sign) and the l2 step (its direction) unchanged, while keeping the
  backward pass far from float16's underflow.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttackConfig
from .losses import cw_margin

AttackLoss = Literal["ce", "kl", "cw"]


@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool):
    """Put ``model`` in train or eval mode for the block, then restore the mode it had."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def eval_mode(model: nn.Module):
    return module_mode(model, training=False)


def _per_example_loss(loss: AttackLoss, logits, labels, clean_log_probs) -> torch.Tensor:
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "kl":
        log_probs = F.log_softmax(logits, dim=1)
        return (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(1)
    if loss == "cw":
        return cw_margin(logits, labels)
    raise ValueError(f"unknown attack loss {loss!r}; choose 'ce', 'kl' or 'cw'")


def _random_start(images, config: AttackConfig, generator) -> torch.Tensor:
    def noise(sampler):
        return sampler(images.shape, generator=generator, device=images.device, dtype=images.dtype)

    if config.random_start == "none":
        return images.clone()
    if config.random_start == "normal":  # TRADES / CURE: x + 0.001 N(0, I)
        start = images + 0.001 * noise(torch.randn)
    elif config.norm == "linf":
        start = images + (2 * noise(torch.rand) - 1) * config.epsilon
    else:  # uniform in the l2 ball: a random direction and a radius with density ~ r^(d-1)
        direction = noise(torch.randn)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        dims = images[0].numel()
        radius = noise(torch.rand)[:, :1, :1, :1] ** (1.0 / dims) * config.epsilon
        start = images + direction * radius
    return _project(start, images, config)


def _project(candidate, images, config: AttackConfig) -> torch.Tensor:
    delta = candidate - images
    if config.norm == "linf":
        delta = delta.clamp(-config.epsilon, config.epsilon)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (config.epsilon / norms).clamp(max=1.0)
    return (images + delta).clamp(0.0, 1.0)


def pgd_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    config: AttackConfig,
    loss: AttackLoss = "ce",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``loss`` over the ``config.norm`` ball of radius ``config.epsilon`` around ``images``.

    Args:
        model: maps [0, 1] images to logits.
        labels: needed by ``"ce"`` and ``"cw"``.
        config: epsilon, step size, steps, norm and random start.
        loss: ``"ce"`` (cross-entropy), ``"kl"`` (KL(p(x) || p(x + delta)), the TRADES/CURE
            attack, Eq. 4) or ``"cw"`` (Carlini-Wagner margin).
        generator: draws the random start, for reproducible attacks.
    """
    if loss in ("ce", "cw") and labels is None:
        raise ValueError(f"the {loss!r} attack needs labels")
    images = images.detach()
    float32 = torch.autocast(images.device.type, enabled=False)  # reusable; see the module docstring
    with eval_mode(model):
        clean_log_probs = None
        if loss == "kl":
            with torch.no_grad(), float32:
                clean_log_probs = F.log_softmax(model(images).float(), dim=1)
        adversarial = _random_start(images, config, generator)
        for step in range(config.steps):
            adversarial.requires_grad_(True)
            with torch.enable_grad(), float32 if loss == "kl" and step == 0 else contextlib.nullcontext():
                logits = model(adversarial)
                objective = _per_example_loss(loss, logits, labels, clean_log_probs).sum()
                logit_grad = torch.autograd.grad(objective, logits)[0].float()
                scale = logit_grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                (grad,) = torch.autograd.grad(logits, adversarial, grad_outputs=(logit_grad / scale).to(logits.dtype))
            adversarial = adversarial.detach()
            grad = grad.float()
            if config.norm == "linf":
                step = config.step_size * grad.sign()
            else:
                step = config.step_size * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            adversarial = _project(adversarial + step.to(images.dtype), images, config)
    return adversarial.detach()
