"""Peak memory per process of a TRADES and a CURE step under DDP and under FSDP2, side by side in one run.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/engine_memory.py --quick
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/engine_memory.py \\
        --model vit_base_patch16_224 --image-size 224 --batch-size 2 --attack-steps 2
    python -m torch.distributed.run --nproc_per_node 8 benchmarks/engine_memory.py --device cuda ...   # a GPU each

Every process builds the same model and trains it on its own batch, wrapped by DDP or sharded by
FSDP2 as Accelerate's transformer-based plan shards it (each ``--blocks`` module, then the root;
weights gathered and gradients reduced in float32, as cure_hub.sharding sets them). After one
warm-up step (the optimiser's momentum and CURE's revision model exist from then on), ``--repeats``
steps are measured, and the largest peak is kept. A process's peak is what it holds at the step's start (its parts of the weights, the
momentum, the revision model and the buffers) plus the peak the step adds over that: on a GPU,
the CUDA allocator's ``max_memory_allocated``; on a CPU, the profiler's record of every
allocation and free, as ``step_cost.py`` measures it. The ratios compare columns of this one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cure_hub
from cure_hub.config import AttackConfig, MethodConfig
from cure_hub.methods import build_method
from cure_hub.methods.rgp import local
from cure_hub.sharding import float32_gathers

sys.path.insert(0, os.path.dirname(__file__))
from step_cost import allocated_peak, train_step  # noqa: E402  (the benchmarks' one training step and CPU peak)

ENGINES, METHODS = ("ddp", "fsdp2"), ("trades", "cure")


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every process
    kwargs = {"width": args.width} if args.model.startswith("cifar_resnet") else {}
    if args.depth:
        kwargs["depth"] = args.depth
    return cure_hub.create_model(args.model, num_classes=10, image_size=args.image_size, **kwargs).to(args.device)


def shard(model: torch.nn.Module, blocks: set[str]) -> torch.nn.Module:
    """FSDP2 as Accelerate's transformer-based plan applies it: each block, then the root."""
    from torch.distributed.fsdp import fully_shard

    policy = float32_gathers()
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def held_bytes(*objects) -> int:
    """Bytes of the distinct storages behind the parameters, buffers and optimiser states of ``objects``."""
    storages = {}
    for thing in objects:
        if isinstance(thing, torch.optim.Optimizer):
            tensors = [value for state in thing.state.values() for value in state.values() if torch.is_tensor(value)]
        else:
            tensors = [*thing.parameters(), *thing.buffers()]
        for tensor in tensors:
            storage = local(tensor).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def step_rise(args, step) -> int:
    """The peak of tensor memory that ``step()`` allocates over what it starts with, in bytes."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return allocated_peak(step)


def measure(args, engine: str, method_name: str) -> dict:
    """This process's memory over a measured step of ``method_name`` under ``engine``, in MiB."""
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = set(args.blocks.split(","))
    model = build(args)
    method = build_method(MethodConfig(method=method_name), AttackConfig(steps=args.attack_steps))
    if engine == "fsdp2":
        wrapped = model = shard(model, blocks)
        method.sharded_copy = lambda _: shard(build(args), blocks)
    else:
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    method.setup(model, total_steps=1000)
    method.record_statistics = False  # as on the steps the trainer does not log
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size * world, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 10, (args.batch_size * world,), generator=generator)
    images, labels = images.chunk(world)[rank].to(args.device), labels.chunk(world)[rank].to(args.device)
    train_step(wrapped, method, optimizer, images, labels, 0, args.bf16)  # warm-up: momentum, revision model
    gc.collect()
    held = held_bytes(model, optimizer, *([method.revision_model] if getattr(method, "revision_model", None) else []))
    rise = max(step_rise(args, lambda: train_step(wrapped, method, optimizer, images, labels, step, args.bf16))
               for step in range(1, args.repeats + 1))
    return {"held_mib": held / 2**20, "step_mib": rise / 2**20, "peak_mib": (held + rise) / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--width", type=int, default=64, help="Channel width of the CIFAR ResNets.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=0, help="Blocks of a ViT (0: the architecture's own).")
    parser.add_argument("--batch-size", type=int, default=2, help="Examples per process.")
    parser.add_argument("--attack-steps", type=int, default=2)
    parser.add_argument("--blocks", default="Block,BasicBlock,Bottleneck,PreActBlock",
                        help="Class names of the modules FSDP2 shards one by one (Accelerate's transformer_cls_names_to_wrap).")
    parser.add_argument("--repeats", type=int, default=2,
                        help="Measured steps (the largest peak is reported: FSDP2's overlap of communication varies it).")
    parser.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per process (nccl).")
    parser.add_argument("--bf16", action="store_true", help="Train under bf16 autocast, as --mixed-precision bf16 does.")
    parser.add_argument("--quick", action="store_true", help="A two-block ViT-Ti at 32 px, one measured step: seconds on 2 cores.")
    parser.add_argument("--json", help="Also write the results (process 0's) to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.depth, args.attack_steps, args.repeats = "vit_tiny_patch16_224", 32, 2, 1, 1
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    parameters_mib = sum(p.numel() * p.element_size() for p in build(args).parameters()) / 2**20
    results = {engine: {name: measure(args, engine, name) for name in METHODS} for engine in ENGINES}
    peaks = torch.tensor([[results[e][m]["peak_mib"] for m in METHODS] for e in ENGINES], device=args.device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the largest process's, should the shards be uneven
    for i, engine in enumerate(ENGINES):
        for j, name in enumerate(METHODS):
            results[engine][name]["largest_process_peak_mib"] = peaks[i, j].item()
    if dist.get_rank() == 0:
        print(f"# {args.model} at {args.image_size} px, {args.batch_size} examples and {dist.get_world_size()} processes, "
              f"{args.attack_steps} attack steps, on {args.device}; parameters {parameters_mib:.1f} MiB")
        print(f"{'':14s} {'held':>10s} {'+ step':>10s} {'= peak':>10s}   (MiB per process)")
        for engine in ENGINES:
            for name in METHODS:
                r = results[engine][name]
                print(f"{engine:6s} {name:7s} {r['held_mib']:10.1f} {r['step_mib']:10.1f} {r['largest_process_peak_mib']:10.1f}")
        ratios = {name: results["fsdp2"][name]["largest_process_peak_mib"] / results["ddp"][name]["largest_process_peak_mib"]
                  for name in METHODS}
        print("FSDP2 / DDP peak: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"arguments": vars(args), "parameters_mib": parameters_mib, "results": results,
                           "fsdp2_over_ddp": ratios}, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
