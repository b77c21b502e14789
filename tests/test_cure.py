import copy
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import cure_hub
from cure_hub.arguments import parse_train_config
from cure_hub.attacks import eval_mode
from cure_hub.config import AttackConfig, InputError, MethodConfig, TrainConfig
from cure_hub.losses import kl_divergence
from cure_hub.methods import build_method
from cure_hub.methods.cure import masked_parameter_names, revision_rate_at, start_share_of_revision
from cure_hub.methods.rgp import (
    ADVERSARIAL,
    NATURAL,
    ProminenceScores,
    _keep_mask_without_synchronisation,
    _keep_masks_by_one_sort,
    _keep_masks_in_chunks,
    chunks,
    prominence_mask,
    prominence_masks,
)
from cure_hub.trainer import Trainer
from helpers import free_port, non_robust_natural_model, pgd_accuracy, robust_vs_fragile_task, tiny_model
from test_trainer import tiny_config


def reference_mask(score: np.ndarray, percent: float) -> np.ndarray:
    """Brute force: a stable sort conserves the floor(p n / 100) lowest scores, earliest first."""
    flat = score.reshape(-1)
    conserved = np.argsort(flat, kind="stable")[: math.floor(percent * flat.size / 100)]
    keep = np.ones(flat.size, dtype=bool)
    keep[conserved] = False
    return keep.reshape(score.shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 3, 3, 3), (10**6,)])
@pytest.mark.parametrize("percent", [0.0, 10.0, 30.0, 50.0, 99.9])
def test_prominence_mask_matches_brute_force(shape, percent):
    score = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    keep = prominence_mask(score, percent)
    assert keep.dtype == torch.bool and keep.shape == score.shape
    np.testing.assert_array_equal(keep.numpy(), reference_mask(score.numpy(), percent))
    assert (~keep).sum().item() == math.floor(percent * score.numel() / 100)


@pytest.mark.parametrize("percent", [10.0, 30.0, 70.0])
def test_prominence_mask_breaks_ties_by_position(percent):
    score = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(1)).float()
    np.testing.assert_array_equal(prominence_mask(score, percent).numpy(), reference_mask(score.numpy(), percent))
    constant = torch.zeros(10)
    assert prominence_mask(constant, 30).tolist() == [False] * 3 + [True] * 7


@pytest.mark.parametrize("size", [1000, 100_000], ids=["kthvalue-path", "sampled-path"])
@pytest.mark.parametrize("percent", [30.0, 99.0])
def test_prominence_mask_ranks_nan_scores_last_on_both_paths(size, percent):
    """NaN ranks above every number, as NumPy's stable sort puts it: conserved only when every number is."""
    score = torch.rand(size, generator=torch.Generator().manual_seed(2))
    score[torch.randperm(size, generator=torch.Generator().manual_seed(3))[: size // 50]] = math.nan
    score[:3] = torch.tensor([math.inf, -math.inf, 0.5])
    keep = prominence_mask(score, percent)
    np.testing.assert_array_equal(keep.numpy(), reference_mask(score.numpy(), percent))
    assert (~keep).sum().item() == math.floor(percent * size / 100)
    assert keep[score.isnan()].all() == (percent < 98)


def test_a_percentile_below_one_warns_about_the_official_unit(caplog):
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        MethodConfig(method="cure", percentile=0.3)
    assert "pass --percentile 30 if you meant that" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        MethodConfig(method="cure", percentile=30)
        MethodConfig(method="cure", revision_mode="train", revision_buffers="keep")  # the official pair
    assert not caplog.text
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        MethodConfig(method="cure", revision_mode="eval", revision_buffers="keep")
    assert "batch-norm statistics stay those of the start" in caplog.text


def mask_without_synchronisation(score: torch.Tensor, percent: float) -> torch.Tensor:
    """The accelerator path of prominence_mask, which a CPU tensor of this size would not take."""
    conserved = math.floor(percent * score.numel() / 100)
    return _keep_mask_without_synchronisation(score.reshape(-1), conserved).view_as(score)


@pytest.mark.parametrize("implementation", [prominence_mask, mask_without_synchronisation])
@pytest.mark.parametrize("kind", ["ties", "sorted", "reversed", "constant", "mostly_zero", "periodic"])
@pytest.mark.parametrize("percent", [0.01, 30.0, 70.0])
def test_prominence_mask_on_large_structured_scores(implementation, kind, percent):
    """Large enough for the sampled selection on a CPU; inputs built to mislead a sample."""
    size = 200_000
    generator = torch.Generator().manual_seed(4)
    positions = torch.arange(size)
    score = {
        "ties": torch.randint(0, 4, (size,), generator=generator).float(),
        "sorted": positions.float(),
        "reversed": positions.flip(0).float(),
        "constant": torch.ones(size),
        "mostly_zero": torch.rand(size, generator=generator) * (torch.rand(size, generator=generator) < 0.1),
        "periodic": torch.rand(size, generator=generator) + 5.0 * (positions % 9 == 0),  # a 3x3 kernel's corner
    }[kind]
    np.testing.assert_array_equal(implementation(score, percent).numpy(), reference_mask(score.numpy(), percent))


@pytest.mark.parametrize("implementation", [prominence_mask, mask_without_synchronisation])
def test_prominence_mask_beyond_torch_quantile_limit(implementation):
    score = torch.rand(17_000_000, generator=torch.Generator().manual_seed(2))
    keep = implementation(score, 30)
    assert (~keep).sum().item() == math.floor(0.3 * score.numel())
    assert score[~keep].max() <= score[keep].min()


def many_scores(kind: str) -> list[torch.Tensor]:
    """A network's worth of score tensors, of many shapes, built to mislead a selection."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(16, 3, 3, 3), (16,), (1,), (7,), (32, 16, 3, 3), (32,), (10, 512), (10,), (3, 5), (2048,)] * 3
    make = {
        "random": lambda shape: torch.rand(shape, generator=generator),
        "ties": lambda shape: torch.randint(0, 3, shape, generator=generator).float(),
        "constant": lambda shape: torch.full(shape, 0.25),
        "signed": lambda shape: torch.randn(shape, generator=generator),  # --rgp-signed scores
        "signed zeros": lambda shape: (torch.randint(-1, 2, shape, generator=generator) * 0.0)  # -0.0 ties 0.0
        .masked_fill(torch.rand(shape, generator=generator) < 0.1, -1e-30),
        "bf16": lambda shape: torch.randn(shape, generator=generator).bfloat16(),  # many ties, and exact in float32
        "non-finite": lambda shape: torch.rand(shape, generator=generator).masked_fill(
            torch.rand(shape, generator=generator) < 0.05, math.nan).masked_fill(torch.rand(shape, generator=generator) < 0.02, -math.inf),
    }[kind]
    return [make(shape) for shape in shapes]


@pytest.mark.parametrize("kind", ["random", "ties", "constant", "signed", "signed zeros", "bf16", "non-finite"])
@pytest.mark.parametrize("percent", [0.01, 30.0, 50.0, 99.9])
def test_masks_of_many_tensors_at_once_match_the_reference(kind, percent):
    """The accelerator path (one sort for all tensors) gives each tensor the reference's mask,
    ties and non-finite scores included; so does the CPU path of prominence_masks."""
    scores = many_scores(kind)
    together = _keep_masks_by_one_sort(scores, percent)
    for score, keep, one_by_one in zip(scores, together, prominence_masks(scores, percent)):
        expected = reference_mask(score.float().numpy(), percent)
        assert keep.dtype == torch.bool and keep.shape == score.shape
        np.testing.assert_array_equal(keep.numpy(), expected)
        np.testing.assert_array_equal(one_by_one.numpy(), expected)


def test_masks_of_large_tensors_at_once_match_the_reference():
    scores = [torch.rand(300_000, generator=torch.Generator().manual_seed(6)), torch.randint(0, 5, (64, 64, 3, 3)).float()]
    for score, keep in zip(scores, _keep_masks_by_one_sort(scores, 30.0)):
        np.testing.assert_array_equal(keep.numpy(), reference_mask(score.numpy(), 30.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_cuda_match_the_reference_without_host_synchronisation():
    scores = [score.cuda() for score in many_scores("ties") + many_scores("non-finite")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = prominence_masks(scores, 30.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for score, keep in zip(scores, masks):
        np.testing.assert_array_equal(keep.cpu().numpy(), reference_mask(score.cpu().numpy(), 30.0))


def _sgd_step(method, model, images, labels, optimizer, step=0):
    output = method.compute_loss(model, images, labels)
    optimizer.zero_grad()
    output.loss.backward()
    method.before_optimizer_step(model)
    optimizer.step()
    method.after_optimizer_step(model, step)
    return output


def whole_branch_gradients(method, model, images, labels, adversarial_loss="ce"):
    """The two RGP gradients of Eq. 6 as whole tensors, by ``torch.autograd.grad`` of each branch's
    loss: the reference for ProminenceScores, which never holds them. The attack's draws and the
    model's batch statistics are put back afterwards, so that ``compute_loss`` sees what this did."""
    state, buffers = method.generator.get_state(), copy.deepcopy(model.state_dict())
    adversarial = method.adversarial_examples(model, images, labels, loss="kl")
    logits, adv_logits = model(images), model(adversarial)
    natural = F.cross_entropy(logits.float(), labels)
    robust = F.cross_entropy(adv_logits.float(), labels) if adversarial_loss == "ce" else kl_divergence(logits, adv_logits)
    grads = [[torch.zeros_like(p) if g is None else g for p, g in
              zip(method.masked_params, torch.autograd.grad(loss, method.masked_params, retain_graph=True, allow_unused=True))]
             for loss in (natural, robust)]
    method.generator.set_state(state)
    model.load_state_dict(buffers)
    return grads


@pytest.mark.parametrize("signed,adversarial_loss", [(False, "ce"), (True, "kl")])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_rgp_scores_are_bitwise_those_of_whole_gradients(signed, adversarial_loss, micro_batches):
    """ProminenceScores folds each gradient into the score as it arrives (one micro-batch), or sums
    it as it arrives (two), and never holds the branch gradients whole; its scores are bitwise Eq. 6
    computed from whole gradients, the magnitude taken of the sum over micro-batches."""
    images, labels = robust_vs_fragile_task(16)
    model = tiny_model()
    method = build_method(MethodConfig(method="cure", rgp_signed=signed, rgp_adversarial_loss=adversarial_loss), AttackConfig(steps=2))
    method.micro_batches = micro_batches
    method.setup(model, total_steps=10)
    method.generator = torch.Generator().manual_seed(0)
    natural = adversarial = None
    for batch in ([slice(None)] if micro_batches == 1 else [slice(0, 8), slice(8, 16)]):
        nat, adv = whole_branch_gradients(method, model, images[batch], labels[batch], adversarial_loss)
        natural = nat if natural is None else [a + b for a, b in zip(natural, nat)]
        adversarial = adv if adversarial is None else [a + b for a, b in zip(adversarial, adv)]
        method.compute_loss(model, images[batch], labels[batch])
    assert method._prominence.folds_on_arrival == (micro_batches == 1)
    alpha = method.config.alpha
    magnitude = (lambda g: g) if signed else torch.abs
    scores = method._prominence.take()
    assert len(scores) == len(method.masked_params) == len(natural)
    for score, g_nat, g_adv in zip(scores, natural, adversarial):
        assert torch.equal(score, magnitude(g_nat).mul(alpha).add(magnitude(g_adv), alpha=1 - alpha))
    assert not method._prominence.pending


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_rgp_of_weights_one_branch_or_neither_uses_by_hand(micro_batches):
    """Eq. 6 by hand: a weight only the adversarial branch uses scores (1 - alpha) |g_adv|, one
    neither uses scores zero; on either path (folded on arrival, or summed first)."""
    a, b, c = (torch.tensor(values, requires_grad=True) for values in ([1.0, -2.0], [3.0], [5.0]))
    prominence = ProminenceScores([a, b, c], alpha=0.25, signed=False, micro_batches=micro_batches)
    prominence.add((a * torch.tensor([2.0, 3.0])).sum(), NATURAL)  # g_a = (2, 3)
    prominence.add((a * a).sum() - 4 * b.sum(), ADVERSARIAL)  # g_a = 2a = (2, -4), g_b = -4
    assert a.grad is None and b.grad is None  # nothing reaches .grad, where the loss's own gradient goes
    score_a, score_b, score_c = prominence.take()
    assert score_a.tolist() == [0.25 * 2 + 0.75 * 2, 0.25 * 3 + 0.75 * 4]
    assert score_b.tolist() == [0.75 * 4] and score_c.tolist() == [0.0]


def test_sharded_selection_equals_the_whole_tensors_mask_on_every_process():
    """FSDP2-style row shards over 3 processes and over a group of 2 (short and empty parts
    included), and real FSDP2 parameters: ties broken by global position across processes, NaN,
    signed zeros, bf16, p from 0 to 100."""
    script = str(Path(__file__).parent / "distributed_selection.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(free_port()), script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    checked = dict(re.findall(r"process (\d): (\d+) masks equal", result.stdout))  # the processes' lines may interleave
    synthetic, fsdp = 5 * 16 * 7, 4 * 4  # kinds x percentiles x shapes; percentiles x parameters
    assert checked == {"0": str(2 * synthetic + fsdp), "1": str(2 * synthetic + fsdp), "2": str(synthetic + fsdp)}, checked


@pytest.mark.parametrize("processes", [2, 3])
def test_cure_steps_under_fsdp2_equal_the_same_steps_under_ddp(processes):
    """A CIFAR ResNet sharded by fully_shard: RGP from backward passes whose reduce-scattered
    shards are kept, masks selected across the shards, the revision model sharded alike and updated
    shard by shard. Over 2 processes three steps are bitwise DDP's (masked gradients, weights,
    revision weights), and a run stopped after its first step and resumed from each process's saved
    shards ends where the straight one does; over 3, whose means round otherwise, one step agrees to
    rounding, its masks exactly."""
    script = str(Path(__file__).parent / "distributed_fsdp_cure.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()), script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    checked = dict(re.findall(r"process (\d): (\d+) masked gradients equal", result.stdout))
    assert result.stdout.count("resumed run equal") == (2 if processes == 2 else 0)
    assert checked == {str(rank): str(60 * (3 if processes == 2 else 1)) for rank in range(processes)}, checked  # 60 masked tensors


def test_rgp_folded_on_arrival_refuses_a_second_micro_batch():
    images, labels = robust_vs_fragile_task(8)
    model = tiny_model()
    method = build_method(MethodConfig(method="cure"), AttackConfig(steps=1))
    method.setup(model, total_steps=10)
    method.compute_loss(model, images, labels)
    with pytest.raises(RuntimeError, match="second micro-batch"):
        method.compute_loss(model, images, labels)


def test_chunks_of_tensors_keep_their_order_within_the_budget():
    tensors = [torch.empty(n) for n in (5, 3, 9, 2, 2, 20, 1)]
    assert [[t.numel() for t in run] for run in chunks(tensors, budget=8)] == [[5, 3], [9], [2, 2], [20], [1]]
    assert [[t.numel() for t in run] for run in chunks(tensors)] == [[5, 3, 9, 2], [2], [20], [1]]  # the largest, 20 > 42 // 32
    assert [len(run) for run in chunks([torch.empty(10)] * 64)] == [2] * 32  # a 32nd of 640 entries


@pytest.mark.parametrize("kind", ["ties", "signed zeros", "bf16", "non-finite"])
@pytest.mark.parametrize("budget", [1, 3_000, 10**9])
def test_masks_selected_chunk_by_chunk_match_the_reference(kind, budget):
    """The accelerator path sorts a chunk of tensors at a time: every chunking gives the reference."""
    scores = many_scores(kind)
    for score, keep in zip(scores, _keep_masks_in_chunks(scores, 30.0, budget)):
        np.testing.assert_array_equal(keep.numpy(), reference_mask(score.float().numpy(), 30.0))


def test_conserved_weights_do_not_move_without_momentum_and_weight_decay():
    model = tiny_model()
    images, labels = robust_vs_fragile_task(32)
    method = build_method(MethodConfig(method="cure", percentile=30), AttackConfig(steps=2))
    method.setup(model, total_steps=10)
    method.generator = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, weight_decay=0.0)
    nat, adv = whole_branch_gradients(method, model, images, labels)
    expected = {n: prominence_mask(0.1 * g.abs() + 0.9 * a.abs(), 30) for n, g, a in zip(method.masked_names, nat, adv)}
    output = method.compute_loss(model, images, labels)
    optimizer.zero_grad()
    output.loss.backward()
    method.before_optimizer_step(model)
    optimizer.step()
    head = set(model.classifier_parameter_names())
    assert set(expected) == {n for n, _ in model.named_parameters()} - head
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        if name in head:
            assert moved.all()
            continue
        keep = expected[name]
        assert not moved[~keep].any(), f"a conserved entry of {name} moved"
        assert moved[keep].float().mean() > 0.95, f"updated entries of {name} did not move"


def test_layer_statistics_are_exact_and_recorded_only_when_asked():
    model = tiny_model()
    images, labels = robust_vs_fragile_task(32)
    method = build_method(MethodConfig(method="cure", percentile=30), AttackConfig(steps=1))
    method.setup(model, total_steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.compute_loss(model, images, labels).loss.backward()
    unmasked = {n: p.grad.clone() for n, p in model.named_parameters()}
    metrics = method.before_optimizer_step(model)
    statistics = method.layer_statistics()
    assert list(statistics) == method.masked_names
    for name, param in model.named_parameters():
        if name not in statistics:
            continue
        assert statistics[name]["grad_magnitude"] == pytest.approx(unmasked[name].abs().mean().item(), rel=1e-5)
        assert statistics[name]["updated_share"] == pytest.approx((param.grad != 0).float().mean().item())
        assert statistics[name]["ndim"] == param.ndim
        assert statistics[name]["updated_share"] <= 1 - math.floor(0.3 * param.numel()) / param.numel() + 1e-6
    shares = [s["updated_share"] for s in statistics.values()]
    assert metrics["updated_share"].item() == pytest.approx(sum(shares) / len(shares))

    optimizer.step()
    optimizer.zero_grad()
    method.record_statistics = False  # a step the trainer does not log
    method.compute_loss(model, images, labels).loss.backward()
    assert method.before_optimizer_step(model) == {}
    assert method.layer_statistics() == statistics


def test_loss_scaling_of_the_rgp_gradients_leaves_the_masks_unchanged():
    """In fp16 the trainer hands CURE the loss scaler's ``scale`` for its own RGP gradients; both
    terms must be scaled alike, so that the masks are those of an unscaled step."""
    images, labels = robust_vs_fragile_task(32)
    scaler, calls = torch.amp.GradScaler("cpu", init_scale=2.0**16), []
    conserved = []
    for scaled in (False, True):
        model = tiny_model()
        method = build_method(MethodConfig(method="cure", percentile=30, alpha=0.1), AttackConfig(steps=1))
        method.setup(model, total_steps=4)
        method.generator = torch.Generator().manual_seed(0)
        if scaled:
            method.scale_loss = lambda loss: calls.append(loss) or scaler.scale(loss)
        method.compute_loss(model, images, labels).loss.backward()
        method.before_optimizer_step(model)
        conserved.append({name: param.grad == 0 for name, param in model.named_parameters() if name in method.masked_names})
    assert len(calls) == 2  # the natural and the adversarial RGP term
    assert all(torch.equal(conserved[0][name], conserved[1][name]) for name in conserved[0])


def test_revision_follows_the_moving_average_when_r_is_1():
    model = tiny_model()
    images, labels = robust_vs_fragile_task(16)
    config = MethodConfig(method="cure", revision_rate=1.0, revision_decay=0.9, revision_rate_schedule="constant")
    method = build_method(config, AttackConfig(steps=1))
    method.setup(model, total_steps=3)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        _sgd_step(method, model, images, labels, optimizer, step)
        for name, param in model.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * param.detach()
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                expected_buffers[name] = 0.9 * expected_buffers[name] + 0.1 * buffer
    for name, param in method.revision_model.named_parameters():
        torch.testing.assert_close(param, expected[name])
    for name, buffer in method.revision_model.named_buffers():
        if buffer.is_floating_point():
            torch.testing.assert_close(buffer, expected_buffers[name])


def test_revision_never_changes_when_r_is_0():
    model = tiny_model()
    start = copy.deepcopy(model.state_dict())
    images, labels = robust_vs_fragile_task(16)
    method = build_method(MethodConfig(method="cure", revision_rate=0.0), AttackConfig(steps=1))
    method.setup(model, total_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        _sgd_step(method, model, images, labels, optimizer, step)
    for name, value in method.revision_model.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert not torch.equal(model.state_dict()["backbone.conv1.weight"], start["backbone.conv1.weight"])


def test_revision_warmup_follows_the_official_decay_sequence():
    """The official code: global_step += 1, then (with probability r) theta_rev <- a theta_rev + (1 - a) theta
    with a = min(1 - 1/(global_step + 1), d): decays 1/2, 2/3, 3/4 for its first three steps."""
    model = tiny_model()
    images, labels = robust_vs_fragile_task(16)
    config = MethodConfig(method="cure", revision_rate=1.0, revision_warmup=True, revision_rate_schedule="constant",
                          revision_decay=0.7, revision_buffers="keep")
    method = build_method(config, AttackConfig(steps=1))
    method.setup(model, total_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = [p.detach().clone() for p in model.parameters()]
    for step, decay in enumerate([1 / 2, 2 / 3, 0.7]):  # 3/4 is capped by d = 0.7
        _sgd_step(method, model, images, labels, optimizer, step=step)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
        for (name, rev), want in zip(method.revision_model.named_parameters(), expected):
            torch.testing.assert_close(rev, want, rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")
        assert not torch.equal(next(method.revision_model.parameters()), next(model.parameters()))  # never a copy


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_consistency_is_zero_when_revision_equals_model(mode):
    if mode == "train":  # batch norm: both use the batch's statistics
        model = tiny_model().train()
    else:  # no batch norm: eval and train mode agree
        model = cure_hub.create_model("vit", num_classes=3, image_size=16, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32).train()
    method = build_method(MethodConfig(method="cure", revision_mode=mode), AttackConfig(steps=1))
    method.setup(model, total_steps=1)
    images = torch.rand(8, 3, 16, 16)
    adversarial = (images + 0.03 * torch.randn_like(images)).clamp(0, 1)
    loss = method.consistency_loss(images, adversarial, model(images), model(adversarial))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    assert method.consistency_loss(images, adversarial, model(images), model(adversarial)).item() > 1e-4


def test_consistency_in_eval_mode_on_a_batch_norm_network_is_the_train_eval_gap():
    """At theta_rev = theta, eval-mode L_CR on a batch-norm network is not zero: it is the KL between
    the model's eval-mode (running statistics) and train-mode (batch statistics) predictions, the
    term docs/cure.md describes; the official train mode has none."""
    model = tiny_model().train()
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):  # running statistics that differ from a batch's
            model(torch.rand(8, 3, 16, 16) * 0.5)
    method = build_method(MethodConfig(method="cure", revision_mode="eval"), AttackConfig(steps=1))
    method.setup(model, total_steps=1)
    adversarial = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad(), eval_mode(model):  # before the train-mode passes, which update the running statistics
        eval_logits, eval_adv_logits = model(images), model(adversarial)
    logits, adv_logits = model(images), model(adversarial)
    expected = kl_divergence(eval_logits, logits) + kl_divergence(eval_adv_logits, adv_logits)
    loss = method.consistency_loss(images, adversarial, logits, adv_logits)
    assert loss.item() > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_revision_rate_schedules():
    assert revision_rate_at(50, 101, 0.2, 0.0, "constant") == 0.2
    assert revision_rate_at(0, 101, 0.2, 0.05, "linear") == pytest.approx(0.2)
    assert revision_rate_at(50, 101, 0.2, 0.0, "linear") == pytest.approx(0.1)
    assert revision_rate_at(100, 101, 0.2, 0.05, "cosine") == pytest.approx(0.05)
    assert revision_rate_at(50, 101, 0.2, 0.0, "cosine") == pytest.approx(0.1)
    assert revision_rate_at(25, 101, 0.2, 0.0, "cosine") > revision_rate_at(25, 101, 0.2, 0.0, "linear")


def test_start_share_of_revision_is_the_hand_computed_product():
    constant = MethodConfig(method="cure", revision_rate=0.2, revision_decay=0.999, revision_rate_schedule="constant")
    assert start_share_of_revision(constant, 1560) == pytest.approx((1 - 0.2 * 0.001) ** 1560, rel=1e-12)
    # The warm-up's decays (t+1)/(t+2) telescope: after T revisions, 1/(T+1) of the start is left.
    warmup = MethodConfig(method="cure", revision_rate=1.0, revision_decay=0.999, revision_rate_schedule="constant",
                          revision_warmup=True)
    assert start_share_of_revision(warmup, 99) == pytest.approx(1 / 100, rel=1e-12)
    # The paper's settings: most of the start after a short run, almost none after its 200 epochs.
    paper = MethodConfig(method="cure")
    assert start_share_of_revision(paper, 1560) > 0.8 > 0.01 > start_share_of_revision(paper, 78_000)


@pytest.mark.parametrize("warmup", [False, True])
def test_start_share_of_revision_is_what_the_revisions_leave(warmup):
    """The revision model of a one-weight model that starts at 0 and stands at 1 from the first
    step holds 1 - (the start's share): exactly when r = 1, on average over seeds for a decaying r."""
    model = torch.nn.Linear(1, 1, bias=False)
    def start_share_left(config, steps, seed=0):
        torch.nn.init.zeros_(model.weight)
        method = build_method(config, AttackConfig(steps=1))
        method.setup(model, total_steps=steps, seed=seed)
        torch.nn.init.ones_(model.weight)
        for step in range(steps):
            method.after_optimizer_step(model, step)
        return 1 - method.revision_model.weight.item()

    always = MethodConfig(method="cure", use_rgp=False, revision_rate=1.0, revision_decay=0.9,
                          revision_rate_schedule="constant", revision_warmup=warmup)
    assert start_share_left(always, 40) == pytest.approx(start_share_of_revision(always, 40), rel=1e-5)
    sometimes = MethodConfig(method="cure", use_rgp=False, revision_rate=0.5, revision_decay=0.9, revision_warmup=warmup)
    shares = np.array([start_share_left(sometimes, 40, seed) for seed in range(400)])
    error = 4 * shares.std() / math.sqrt(len(shares))
    assert shares.mean() == pytest.approx(start_share_of_revision(sometimes, 40), abs=error)


def test_mask_scopes():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert masked_parameter_names(model, "all") == names
    assert masked_parameter_names(model, "all_but_head") == names[:-2]
    official = masked_parameter_names(model, "official")
    assert "backbone.conv1.weight" not in official and "backbone.layer1.0.conv1.weight" in official
    assert all("conv1" in n for n in official) and len(official) == 8
    assert masked_parameter_names(model, "all", include=["layer4.*"], exclude=["*.bn*"]) == [
        n for n in names if n.startswith("backbone.layer4.") and ".bn" not in n
    ]


def test_state_dict_round_trip_restores_revision_and_its_draws():
    model = tiny_model()
    images, labels = robust_vs_fragile_task(16)
    method = build_method(MethodConfig(method="cure", revision_rate=0.5), AttackConfig(steps=1))
    method.setup(model, total_steps=4, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _sgd_step(method, model, images, labels, optimizer)
    saved = copy.deepcopy(method.state_dict())
    other = build_method(MethodConfig(method="cure", revision_rate=0.5), AttackConfig(steps=1))
    other.setup(tiny_model(seed=1), total_steps=4, seed=99)
    other.load_state_dict(saved)
    for a, b in zip(other.revision_model.state_dict().values(), method.revision_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(5, generator=other.revision_generator), torch.rand(5, generator=method.revision_generator))


def test_mask_interval_reuses_the_last_masks_and_a_resumed_run_applies_them():
    images, labels = robust_vs_fragile_task(16)

    def start(state=None):
        model = tiny_model()
        method = build_method(MethodConfig(method="cure", mask_interval=4, revision_rate=0.5), AttackConfig(steps=1))
        method.setup(model, total_steps=12, seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        method.generator = torch.Generator()  # the attack's draws, saved and restored as the trainer does
        if state:
            model.load_state_dict(state[0]), method.load_state_dict(state[1]), optimizer.load_state_dict(state[2])
            method.generator.set_state(state[3])
        return model, method, optimizer

    model, method, optimizer = start()
    masks, computed, saved = [], [], None
    for step in range(9):
        if step == 6:  # mid-interval: the masks of step 4 are in use
            saved = copy.deepcopy((model.state_dict(), method.state_dict(), optimizer.state_dict(), method.generator.get_state()))
        output = method.compute_loss(model, images, labels)
        computed.append(method._prominence.pending)  # the RGP gradients are taken on mask steps only
        optimizer.zero_grad()
        output.loss.backward()
        method.before_optimizer_step(model)
        optimizer.step()
        method.after_optimizer_step(model, step)
        masks.append([mask.clone() for mask in method._masks])
    assert computed == [step % 4 == 0 for step in range(9)]
    for step in range(9):
        assert all(torch.equal(a, b) for a, b in zip(masks[step], masks[step - step % 4])), step
    assert not all(torch.equal(a, b) for a, b in zip(masks[4], masks[0]))  # recomputed, and they moved
    assert all(mask.float().mean() == pytest.approx(0.7, abs=0.02) for mask in masks[0] if mask.numel() >= 100)

    resumed_model, resumed, resumed_optimizer = start(saved)
    for step in range(6, 9):
        _sgd_step(resumed, resumed_model, images, labels, resumed_optimizer, step)
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_cure_makes_a_natural_model_robust_on_a_small_task():
    images, labels = robust_vs_fragile_task(512)
    test_images, test_labels = robust_vs_fragile_task(256, seed=1)
    model = non_robust_natural_model()
    start_robust = pgd_accuracy(model, test_images, test_labels)
    method = build_method(MethodConfig(method="cure", beta=6.0), AttackConfig(steps=5))
    method.setup(model, total_steps=30)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for step in range(30):
        idx = torch.randint(0, len(labels), (64,), generator=generator)
        _sgd_step(method, model, images[idx], labels[idx], optimizer, step)
    # Measured over 6 model seeds and 1 and 2 threads: PGD accuracy 0.00-0.02 at the start and
    # 0.52-0.85 after these 30 steps; the bars leave margins of at least 0.2 on either side.
    assert start_robust < 0.2
    assert pgd_accuracy(model, test_images, test_labels) > start_robust + 0.3


def test_cure_settings_set_every_switch_of_their_reference_and_a_flag_beside_them_overrides_one(tmp_path):
    official = parse_train_config(["--cure-settings", "official", "--revision-mode", "eval", "--output-dir", str(tmp_path)])
    method = official.method
    assert (official.attack.epsilon, official.attack.step_size) == (0.031, 0.007)
    assert (method.beta, method.rgp_adversarial_loss, method.rgp_signed, method.mask_scope, method.revision_warmup,
            method.revision_buffers, method.revision_rate_schedule) == (5.0, "kl", True, "official", True, "keep", "constant")
    assert method.revision_mode == "eval"  # the flag beside the preset; the official code's is "train"
    assert TrainConfig.from_dict(official.to_dict()) == official  # config.yaml holds every resolved value
    paper = parse_train_config(["--cure-settings", "paper", "--output-dir", str(tmp_path)])
    assert (paper.attack.epsilon, paper.method.beta, paper.method.mask_scope, paper.method.revision_warmup) == (8 / 255, 1.0, "all", False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method:\n  cure_settings: official\n  beta: 6\n")
    from_recipe = parse_train_config(["--recipe", str(recipe), "--output-dir", str(tmp_path)])
    assert (from_recipe.method.beta, from_recipe.method.rgp_signed) == (6.0, True)
    assert parse_train_config(["--output-dir", str(tmp_path)]).method == MethodConfig()  # "default" changes nothing
    with pytest.raises(InputError, match="cure_settings 'official' sets CURE's switches; it does not apply to method 'trades'"):
        TrainConfig.from_dict({"method": {"method": "trades", "cure_settings": "official"}})


def test_cure_settings_and_their_values_reach_the_run_folder_and_the_card(tmp_path):
    sections = tiny_config(tmp_path / "run").to_dict()
    sections["method"] = {"method": "cure", "cure_settings": "official", "revision_rate": 0.7}
    sections["attack"] = {"steps": 2}
    Trainer(TrainConfig.from_dict(sections)).train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"]["cure_settings"] == "official" and saved["method"]["rgp_signed"] is True
    assert saved["attack"]["epsilon"] == 0.031
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert ("d = 0.999, warm-up min(1 − 1/(t+2), d); RGP on the TRADES KL of x_adv, signed, mask scope official; revision "
            "model in train mode, buffers keep; settings: official (`--cure-settings`)") in card


def test_the_loss_and_the_terms_the_collapse_alarm_compares():
    """L = CE + beta KL + gamma L_CR; the alarm reads gamma L_CR against the larger of CE and beta KL."""
    model = tiny_model(num_classes=3).train()
    method = build_method(MethodConfig(method="cure", beta=5.0, gamma=2.0, use_rgp=False), AttackConfig(steps=1))
    method.setup(model, total_steps=1)
    with torch.no_grad():  # the revision model away from the model, so that L_CR is not zero
        for param in method.revision_model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 3
    method.generator = torch.Generator().manual_seed(0)
    output = method.compute_loss(model, images, labels)
    metrics = output.metrics
    with torch.no_grad():  # train mode: the batch's own statistics, as in compute_loss
        ce = torch.nn.functional.cross_entropy(model(images), labels).item()
    assert output.loss.item() == pytest.approx(ce + 5.0 * metrics["kl"].item() + 2.0 * metrics["consistency"].item(), rel=1e-5)
    assert metrics["regulariser"].item() == pytest.approx(2.0 * metrics["consistency"].item())
    assert metrics["main_loss"].item() == pytest.approx(max(ce, 5.0 * metrics["kl"].item()), rel=1e-5)
    assert metrics["consistency"].item() > 0.01
