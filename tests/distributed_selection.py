"""Run by tests/test_cure.py under torchrun (gloo, 3 processes): the sharded selection of CURE's
masks equals prominence_mask of the whole tensor on every process's part, for row shards cut as
FSDP2 cuts them (consecutive rows, ceil(rows / processes) each, the last parts short or empty),
over all three processes and over a group of the first two, and for the shards of real FSDP2
parameters."""

import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from cure_hub.methods.rgp import prominence_mask, sharded_prominence_masks

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pair = dist.new_group([0, 1])  # every process takes part in making it


def rows_of(tensor: torch.Tensor, group=None) -> torch.Tensor:
    size, index = dist.get_world_size(group), dist.get_rank(group)
    per_process = math.ceil(tensor.shape[0] / size)
    start = min(index * per_process, tensor.shape[0])
    return tensor[start:min(start + per_process, tensor.shape[0])]


generator = torch.Generator().manual_seed(3)  # the same tensors on every process
shapes = [(1,), (2, 4), (7, 5), (3, 3, 3), (64, 9), (1000,), (5, 0)]
kinds = {
    "random": lambda shape: torch.rand(shape, generator=generator),
    "ties": lambda shape: torch.randint(0, 3, shape, generator=generator).float(),
    "signed zeros": lambda shape: torch.randint(-1, 2, shape, generator=generator) * 0.0,
    "non-finite": lambda shape: torch.randn(shape, generator=generator).masked_fill(
        torch.rand(shape, generator=generator) < 0.1, math.nan).masked_fill(torch.rand(shape, generator=generator) < 0.05, -math.inf),
    "bf16": lambda shape: torch.randn(shape, generator=generator).bfloat16(),
}
checked = 0
for kind, make in kinds.items():
    whole = [make(shape) for shape in shapes]  # made on every process: the generator stays in step
    for group in (None, pair):
        if group is pair and rank > 1:
            continue
        for percent in [*range(0, 101, 10), 0.01, 1, 33.3, 99, 99.99]:
            masks = sharded_prominence_masks([rows_of(t, group) for t in whole], percent, [t.numel() for t in whole], group)
            for tensor, mask in zip(whole, masks):
                expected = rows_of(prominence_mask(tensor, percent), group)
                assert torch.equal(mask, expected), f"{kind}, p = {percent}, shape {tuple(tensor.shape)}, process {rank}, {group}"
                checked += 1

# The parts of real FSDP2 parameters (DTensors sharded on dim 0), scored with ties.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
with torch.no_grad():
    for param in model.parameters():
        param.copy_((param * 4).round())
whole = [param.detach().clone() for param in model.parameters()]
for layer in (model[0], model[2], model):
    fully_shard(layer)
parts = [param.to_local() for param in model.parameters()]
assert (parts[2].numel() == 0) == (rank >= 2)  # the 2-row weight leaves the third process nothing
for percent in (10, 30, 50, 90):
    for tensor, part, mask in zip(whole, parts, sharded_prominence_masks(parts, percent, [t.numel() for t in whole])):
        assert torch.equal(mask, rows_of(prominence_mask(tensor, percent))), f"FSDP2 part, p = {percent}, process {rank}"
        checked += 1
print(f"process {rank}: {checked} masks equal", flush=True)
dist.barrier()
# Leave without running destructors: under load, gloo's threads torn down at interpreter exit
# after fully_shard aborted a process now and then ("terminate called without an active exception").
os._exit(0)
