import math
import re

import pytest
import torch

from cure_hub.config import AttackConfig, InputError, MethodConfig, TrainConfig
from cure_hub.method_registry import register_method
from cure_hub.methods import METHOD_CLASSES, TRADES, build_method
from helpers import robust_vs_fragile_task, tiny_model


@pytest.mark.parametrize("name", METHOD_CLASSES)
def test_every_method_trains_a_few_steps_with_finite_losses(name):
    model = tiny_model()
    images, labels = robust_vs_fragile_task(16)
    method = build_method(MethodConfig(method=name), AttackConfig(steps=2))
    method.setup(model, total_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        output = method.compute_loss(model, images, labels)
        optimizer.zero_grad()
        output.loss.backward()
        metrics = {**output.metrics, **method.before_optimizer_step(model)}
        optimizer.step()
        method.after_optimizer_step(model, step)
        assert math.isfinite(output.loss.item())
        assert all(math.isfinite(v.item()) and not v.requires_grad for v in metrics.values())


def test_a_method_is_its_class_and_one_registration():
    """Registered once, a method is a --method choice, gets its default beta and its card title; a
    name registered twice is refused."""
    assert list(METHOD_CLASSES) == ["standard", "pgd_at", "trades", "mart", "cure"]
    assert [MethodConfig(method=name).beta for name in METHOD_CLASSES] == [0.0, 0.0, 6.0, 6.0, 5.0]
    with pytest.raises(InputError, match="method must be one of \\('standard', 'pgd_at', 'trades', 'mart', 'cure'\\), got 'trades_awp'"):
        MethodConfig(method="trades_awp")

    class TradesAWP(TRADES):
        name, title, default_beta = "trades_awp", "TRADES-AWP", 6.5

    register_method(TradesAWP)
    try:
        config = TrainConfig.from_dict({"method": {"method": "trades_awp"}})
        assert config.method.beta == 6.5 and isinstance(build_method(config.method, config.attack), TradesAWP)
        with pytest.raises(ValueError, match="two methods are named 'trades_awp': TradesAWP and Other"):
            register_method(type("Other", (TRADES,), {"name": "trades_awp"}))
    finally:
        del METHOD_CLASSES["trades_awp"]


def test_attack_starts():
    assert build_method(MethodConfig(method="pgd_at"), AttackConfig()).attack.random_start == "uniform"
    assert build_method(MethodConfig(method="trades"), AttackConfig()).attack.random_start == "normal"
    assert build_method(MethodConfig(method="pgd_at"), AttackConfig(random_start="none")).attack.random_start == "none"


def test_default_betas():
    assert MethodConfig(method="trades").beta == 6.0
    assert MethodConfig(method="cure").beta == 5.0
    assert MethodConfig(method="cure", beta=1.0).beta == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"percentile": 100.0}, r"percentile \(p\) must be in \[0, 100\), got 100.0"),
        ({"percentile": -1.0}, "percentile"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"revision_rate": -0.1}, "revision_rate must be in"),
        ({"revision_decay": 2.0}, "revision_decay must be in"),
        ({"method": "fgsm"}, "method must be one of"),
        ({"mask_scope": "some"}, "mask_scope must be one of"),
        ({"gamma": -1.0}, "gamma must be >= 0"),
    ],
)
def test_out_of_range_method_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [({"epsilon": 0.0}, "epsilon must be in (0, 1]"), ({"epsilon": 8.0}, "got 8: pass --epsilon 8/255"), ({"steps": -1}, "steps"), ({"norm": "l1"}, "norm must be one of")])
def test_out_of_range_attack_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AttackConfig(**kwargs)


def test_cure_gradient_accumulation_sums_rgp_gradients_before_masking():
    """Over micro-batches RGP is the magnitude of the summed gradients, not a sum of magnitudes:
    two halves of a batch give twice the whole batch's scores (the losses are means)."""
    images, labels = robust_vs_fragile_task(16)
    torch.manual_seed(0)
    model = tiny_model().eval()  # eval mode: no batch statistics, so halves add up to the whole
    scores = {}
    for micro_batches, batches in ((1, [slice(None)]), (2, [slice(0, 8), slice(8, 16)])):
        method = build_method(MethodConfig(method="cure"), AttackConfig(steps=0, random_start="none"))
        method.micro_batches = micro_batches
        method.setup(model, total_steps=1)
        for batch in batches:
            method.compute_loss(model, images[batch], labels[batch])
        scores[micro_batches] = method._prominence.take()
    for halves, whole in zip(scores[2], scores[1]):
        torch.testing.assert_close(halves / 2, whole, atol=1e-6, rtol=1e-4)
