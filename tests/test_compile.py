"""``--compile``: CURE's step (the attack's input gradients, the branch-wise RGP gradients with a
retained graph, the revision model's inference-mode forward) runs compiled, agrees with eager
execution and compiles once, not every step."""

import shutil

import pytest
import torch

from cure_hub.config import AttackConfig, MethodConfig
from cure_hub.methods import build_method, compile_for_training
from helpers import robust_vs_fragile_task, tiny_model


def cure_steps(compiled: bool, steps: int, recompile_is_an_error_after: int | None = None):
    images, labels = robust_vs_fragile_task(16)
    model = tiny_model()
    method = build_method(MethodConfig(method="cure", percentile=30, revision_rate=1.0, revision_decay=0.5), AttackConfig(steps=2))
    if compiled:
        compile_for_training(model, method)
    method.setup(model, total_steps=steps)
    method.generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        with torch._dynamo.config.patch(error_on_recompile=recompile_is_an_error_after is not None
                                        and step >= recompile_is_an_error_after):
            output = method.compute_loss(model, images, labels)
            optimizer.zero_grad()
            output.loss.backward()
            if step == 0:
                first = {"scores": [score.clone() for score in method._prominence._scores]}
            method.before_optimizer_step(model)
        if step == 0:
            first["updated"] = [param.grad != 0 for param in method.masked_params]
        optimizer.step()
        method.after_optimizer_step(model, step)
        losses.append(output.loss.item())
    return model, method, losses, first


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's Inductor needs a C++ compiler on a CPU")
def test_compiled_cure_steps_agree_with_eager_and_compile_once():
    _, _, eager_losses, eager = cure_steps(compiled=False, steps=1)
    model, method, losses, compiled = cure_steps(compiled=True, steps=4, recompile_is_an_error_after=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(eager_losses[0], rel=1e-5)  # later steps drift apart by float rounding
    for ours, theirs in zip(compiled["scores"], eager["scores"]):
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()  # fused kernels round differently
    updated = torch.cat([m.flatten() for m in compiled["updated"]])
    agree = updated == torch.cat([m.flatten() for m in eager["updated"]])
    assert agree.float().mean() > 0.995  # only near-ties may fall the other way
    assert updated.float().mean() == pytest.approx(0.7, abs=0.02)
    # Both models ran compiled: their outputs carry the compiled graph's backward, or were compiled.
    assert type(model(torch.rand(2, 3, 16, 16)).grad_fn).__name__ == "CompiledFunctionBackward"
    assert method.revision_model._compiled_call_impl is not None


@pytest.mark.parametrize("method, donated", [("cure", False), ("trades", True)])
def test_compile_for_training_keeps_saved_buffers_only_where_a_graph_is_retained(method, donated):
    """CURE's RGP gradients reuse the step's graph, which a compiled backward that donates its saved
    buffers refuses (on ResNet-18 width 64; the tiny model above compiles without donated buffers,
    so only this switch guards that case). Other methods keep Inductor's default."""
    with torch._functorch.config.patch(donated_buffer=True):
        model = tiny_model()
        built = build_method(MethodConfig(method=method), AttackConfig(steps=2))
        compile_for_training(model, built)  # lazy: nothing compiles before the first call
        assert model._compiled_call_impl is not None and built.compile_models
        assert torch._functorch.config.donated_buffer is donated
