"""Run by tests/test_cure.py under torchrun (gloo): CURE steps on a model sharded by FSDP2's
``fully_shard`` give, on every process, the part of the masked gradients, weights and revision
weights that the same steps under DDP give whole.

Every process builds the same CIFAR ResNet (batch norm included; DDP without buffer broadcasts,
so that each process keeps its own statistics in both) and trains it on its own part of one batch.
Three steps (one over 3 processes, below): the RGP gradients of both branches, the exact
per-tensor masks selected across the shards, the consistency loss against the revision model, and
the revision update (rate 1: every step) are all exercised. Over 2 processes a sharded run stopped
after its first step and resumed from the states each process saved (its shards of the weights,
the optimiser's momentum and the revision model, and the revision draws' generator) ends bitwise
where the straight run does.
"""

import io

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from cure_hub.config import AttackConfig, MethodConfig
from cure_hub.methods.cure import CURE
from cure_hub.methods.rgp import local
from cure_hub.models import create_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def build():
    torch.manual_seed(0)  # the same weights on every process
    return create_model("cifar_resnet18", num_classes=10, width=4)


def shard(model):
    for stage in (model.backbone.layer1, model.backbone.layer2, model.backbone.layer3, model.backbone.layer4):
        fully_shard(stage)
    fully_shard(model)
    return model


def part(full: torch.Tensor) -> torch.Tensor:
    """This process's rows of ``full`` under FSDP2's ``Shard(0)`` (torch.chunk's split)."""
    parts = full.chunk(world)
    return parts[rank] if rank < len(parts) else full[:0]


generator = torch.Generator().manual_seed(1)
# Over 2 processes every mean is exact (a division by 2), so three steps are bitwise DDP's. Over 3
# the reduce-scatter's mean rounds otherwise than DDP's all-reduce: the first step agrees to
# rounding (its masks exactly), after which the attack's sign amplifies the difference, so one step.
exact = world == 2
batches = [(torch.rand(4 * world, 3, 32, 32, generator=generator), torch.randint(0, 10, (4 * world,), generator=generator))
           for _ in range(3 if exact else 1)]
config = MethodConfig(method="cure", percentile=60.0, revision_rate=1.0, revision_rate_schedule="constant", revision_decay=0.5)
attack = AttackConfig(steps=1, random_start="none")
def train(engine: str, steps: range, resume_from: dict | None = None) -> dict:
    """``steps`` of ``batches`` under ``engine``; from ``resume_from`` (what :func:`state_of` kept
    of an earlier run) when given, as a resumed run starts: fresh modules, the states loaded."""
    model = build()
    method = CURE(config, attack)
    if engine == "fsdp2":
        wrapped = model = shard(model)
        method.sharded_copy = lambda _: shard(build())
    else:
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    method.setup(model, total_steps=len(batches), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if resume_from is not None:  # each process loads its own shards
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        method.load_state_dict(resume_from["method"])
    gradients = []
    for step in steps:
        images, labels = batches[step]
        output = method.compute_loss(wrapped, images.chunk(world)[rank], labels.chunk(world)[rank])
        output.loss.backward()
        method.before_optimizer_step(wrapped)
        gradients.append([local(p.grad).clone() for p in method.masked_params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(wrapped, step)
    return {"gradients": gradients, "weights": [local(p).detach().clone() for p in model.parameters()],
            "revision": [local(p).clone() for p in method.revision_model.parameters()], "sharded": method._prominence.sharded,
            "masked_names": method.masked_names, "state": state_of(model, optimizer, method)}


def state_of(model, optimizer, method) -> dict:
    """What a checkpoint keeps, through a round trip of torch.save (DTensor shards included)."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


trained = {engine: train(engine, range(len(batches))) for engine in ("ddp", "fsdp2")}
masked_names = trained["fsdp2"]["masked_names"]

ddp, fsdp2 = trained["ddp"], trained["fsdp2"]
assert fsdp2["sharded"] and not ddp["sharded"]


def compare(shard: torch.Tensor, expected: torch.Tensor) -> bool:
    if exact or not expected.numel():
        return torch.equal(shard, expected)
    return torch.allclose(shard, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


checked = 0
for step, (whole, shards) in enumerate(zip(ddp["gradients"], fsdp2["gradients"])):
    for name, full, shard_grad in zip(masked_names, whole, shards):
        expected = part(full)
        assert torch.equal(expected == 0, shard_grad == 0), f"step {step}, {name}: the masks differ"
        assert compare(shard_grad, expected), f"step {step}, {name}: the masked gradients differ"
        checked += 1
for kind in ("weights", "revision"):
    for full, shard_param in zip(ddp[kind], fsdp2[kind]):
        assert compare(shard_param, part(full)), f"the {kind} differ"
if exact:  # a sharded run stopped after its first step and resumed from its state is the straight run
    first = train("fsdp2", range(1))
    resumed = train("fsdp2", range(1, len(batches)), resume_from=first["state"])
    for kind in ("weights", "revision"):
        for straight, again in zip(fsdp2[kind], resumed[kind]):
            assert torch.equal(straight, again), f"the resumed run's {kind} differ"
    print(f"process {rank}: resumed run equal", flush=True)
print(f"process {rank}: {checked} masked gradients equal", flush=True)
dist.barrier()
dist.destroy_process_group()
