"""Seconds per training step and peak memory of each method, relative to TRADES, in one run.

Every method trains the same model on the same batch with the same attack. Steps are timed
round-robin (one step of each method in turn, after a warm-up), so slow drifts of the machine
touch every method alike, and the median is reported. Peak memory is the CUDA allocator's peak on
a GPU; on a CPU it is the peak resident memory of a fresh process that runs two steps of that
method alone (skipped by --quick).

    python benchmarks/step_cost.py --quick
    python benchmarks/step_cost.py --width 64 --batch-size 128 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time

import torch

import cure_hub
from cure_hub.config import METHODS, AttackConfig, MethodConfig
from cure_hub.methods import build_method


def build(args, method_name: str):
    torch.manual_seed(0)
    kwargs = {"width": args.width} if args.model.startswith("cifar_resnet") else {}
    model = cure_hub.create_model(args.model, num_classes=10, image_size=args.image_size, **kwargs).to(args.device)
    method = build_method(MethodConfig(method=method_name), AttackConfig(steps=args.attack_steps))
    method.setup(model, total_steps=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, method, optimizer


def train_step(model, method, optimizer, images, labels, step: int) -> None:
    output = method.compute_loss(model, images, labels)
    output.loss.backward()
    method.before_optimizer_step(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(model, step)


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch(args):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
    return images.to(args.device), labels.to(args.device)


def peak_memory_of(args, method_name: str, queue) -> None:
    model, method, optimizer = build(args, method_name)
    images, labels = batch(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step in range(2):
        train_step(model, method, optimizer, images, labels, step)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # KiB -> MiB


def measure_memory(args, method_name: str) -> float:
    if args.device.startswith("cuda"):
        model, method, optimizer = build(args, method_name)
        images, labels = batch(args)
        torch.cuda.reset_peak_memory_stats()
        for step in range(2):
            train_step(model, method, optimizer, images, labels, step)
        return torch.cuda.max_memory_allocated() / 2**20
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=peak_memory_of, args=(args, method_name, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--width", type=int, default=64, help="Channel width of the CIFAR ResNets (64 = paper).")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per method (median reported).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="Width 16, 3 repeats, no memory: under a minute on 2 cores.")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.repeats = 16, 3
    methods = args.methods.split(",")
    if "trades" not in methods:
        parser.error("--methods must include trades, the reference of the ratios")

    images, labels = batch(args)
    setups = {name: build(args, name) for name in methods}
    times = {name: [] for name in methods}
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for name, (model, method, optimizer) in setups.items():
            synchronise(args.device)
            start = time.perf_counter()
            train_step(model, method, optimizer, images, labels, repeat)
            synchronise(args.device)
            if repeat:
                times[name].append(time.perf_counter() - start)

    print(f"# {args.model} width {args.width}, batch {args.batch_size}, {args.attack_steps} attack steps, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    reference = statistics.median(times["trades"])
    results = {}
    for name in methods:
        seconds = statistics.median(times[name])
        memory = None if args.quick else measure_memory(args, name)
        results[name] = {"seconds_per_step": seconds, "peak_memory_mib": memory, "relative_to_trades": seconds / reference}
        memory_text = "" if memory is None else f"  peak memory {memory:8.1f} MiB"
        print(f"{name:10s} {seconds:8.3f} s/step{memory_text}  {seconds / reference:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
