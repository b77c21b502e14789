"""Small tasks and models shared by the tests."""

import socket

import torch
from torch import nn

import cure_hub
from cure_hub.attacks import pgd_attack
from cure_hub.config import AttackConfig


def free_port() -> int:
    """A port no process listens on now: for torchrun's rendezvous, so that tests running at once
    (pytest -n) never share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def robust_vs_fragile_task(n: int, size: int = 16, seed: int = 0, brightness_predicts: bool = True):
    """Two classes carried by two features: a faint checkerboard of 2-pixel squares (amplitude
    4/255, perfectly predictive, inside the 8/255 ball, so fragile) and the image's brightness
    (+-32/255 on top of noise, predictive only in part, but robust). Robust training must use
    brightness.

    With ``brightness_predicts=False`` the brightness shift is drawn independently of the label:
    a model trained on that data can only use the checkerboard, so it is non-robust by
    construction on any machine, whatever the thread count or floating-point order of training
    (a model trained on the full task may or may not lean on brightness in part)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    sign = labels.float() * 2 - 1
    brightness_sign = sign if brightness_predicts else torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    squares = torch.arange(size) // 2
    checker = ((squares[:, None] + squares[None, :]) % 2).float() * 2 - 1
    brightness = 0.5 + brightness_sign.view(-1, 1, 1, 1) * (32 / 255) + 0.1 * torch.randn(n, 1, 1, 1, generator=g)
    pixels = brightness + 0.03 * torch.randn(n, 3, size, size, generator=g)
    images = pixels + sign.view(-1, 1, 1, 1) * (4 / 255) * checker
    return images.clamp(0, 1), labels


def non_robust_natural_model(seed: int = 0):
    """A tiny ResNet trained naturally on the fragile feature alone: accurate, and not robust."""
    return train_naturally(tiny_model(seed=seed), *robust_vs_fragile_task(512, brightness_predicts=False), steps=200)


def tiny_model(num_classes: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return cure_hub.create_model("cifar_resnet18", num_classes=num_classes, width=4)


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        acc = (model(images).argmax(1) == labels).float().mean().item()
        model.train(was_training)
    return acc


def pgd_accuracy(model, images, labels, steps: int = 10) -> float:
    config = AttackConfig(steps=steps, random_start="uniform")
    return accuracy(model, pgd_attack(model, images, labels, config), labels)


def train_naturally(model, images, labels, steps: int = 60, lr: float = 0.05, batch: int = 64):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


class Brightness(nn.Module):
    """Ten classes by mean brightness, class k around (k + 0.5) / 10: a model that is correct on
    every example below, differentiable unless it rounds its input to 8 bits first."""

    def __init__(self, rounding=False, softmax=False, noise=0.0):
        super().__init__()
        self.rounding, self.softmax, self.noise = rounding, softmax, noise
        self.register_buffer("centres", (torch.arange(10) + 0.5) / 10)

    def forward(self, images):
        if self.rounding:  # torch.round has a zero gradient everywhere
            images = torch.round(images * 255) / 255
        logits = -200 * (images.mean((1, 2, 3))[:, None] - self.centres) ** 2
        if self.noise:
            logits = logits + self.noise * torch.randn_like(logits)
        return logits.softmax(1) if self.softmax else logits
