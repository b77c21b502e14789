"""Seconds per training step and peak memory of each method, relative to TRADES, in one run.

Every method trains the same model on the same batch with the same attack. Steps are timed
round-robin (one step of each method in turn, after a warm-up), so slow drifts of the machine
touch every method alike; the median is reported, and the ratio to TRADES is the median of the
per-round ratios. On a CPU the process keeps its freed heap memory, as the trainer does
(``cure_hub.system.keep_freed_heap_memory``; ``--default-allocator`` measures without). Peak memory is the CUDA allocator's peak on
a GPU; on a CPU, the rise of the process's peak resident memory over one step (Linux resets the
peak through /proc/self/clear_refs), and beside it the peak of the tensor memory allocated over the
step's start, from the profiler's record of allocations (what CUDA's allocator counts, without the
heap's page layout). Each peak is also printed as CURE's extra over TRADES's in multiples of the
parameters' bytes. ``--breakdown`` profiles one CURE step and splits its time
into the parts CURE adds to TRADES (the labels in cure_hub/methods/cure.py).

    python benchmarks/step_cost.py --quick
    python benchmarks/step_cost.py --width 64 --batch-size 128 --repeats 7 --breakdown
    python benchmarks/step_cost.py --model vit_small --batch-size 128 --breakdown
    python benchmarks/step_cost.py --width 64 --batch-size 128 --mask-interval 4   # + amortised masks
    python benchmarks/step_cost.py --methods trades,cure --compile                  # + torch.compile
    python benchmarks/step_cost.py --quick --methods trades,cure --channels-last    # + channels-last layout
    python benchmarks/step_cost.py --device cuda --batch-size 128 --bf16            # bf16 autocast
    python benchmarks/step_cost.py --model vit_base_patch16_224 --image-size 224 --batch-size 2 --attack-steps 2 \
        --repeats 1 --methods trades,cure                                           # CURE's memory for a ViT-B
    bash benchmarks/cuda_checks.sh OUT                                               # every GPU check at once
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import cure_hub
from cure_hub.config import AttackConfig, MethodConfig
from cure_hub.method_registry import METHOD_CLASSES
from cure_hub.methods import build_method, compile_for_training
from cure_hub.models import check_channels_last_training_on_cpu
from cure_hub.system import keep_freed_heap_memory


def build(args, method_name: str, mask_interval: int = 1, compiled: bool = False, channels_last: bool = False):
    torch.manual_seed(0)
    kwargs = {"width": args.width} if args.model.startswith("cifar_resnet") else {}
    model = cure_hub.create_model(args.model, num_classes=10, image_size=args.image_size, **kwargs).to(args.device)
    if channels_last:  # as --channels-last trains
        if args.device == "cpu":
            check_channels_last_training_on_cpu(model)
        model.to_channels_last()
    extra = {"mask_interval": mask_interval} if method_name == "cure" else {}
    method = build_method(MethodConfig(method=method_name, **extra), AttackConfig(steps=args.attack_steps))
    if compiled:
        compile_for_training(model, method)
    method.setup(model, total_steps=1000)
    method.record_statistics = False  # as on the steps the trainer does not log
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, method, optimizer


def train_step(model, method, optimizer, images, labels, step: int, bf16: bool = False) -> None:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):  # as the trainer's bf16
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


def _peak_rss_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure_memory(args, setup, step: int) -> float | None:
    """Peak memory one training step adds, in MiB (CUDA allocator, or resident memory on Linux)."""
    model, method, optimizer = setup
    images, labels = batch(args)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, method, optimizer, images, labels, step, args.bf16)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, so the step must fault its own pages in
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
    except OSError:
        return None
    base = _rss_mib()
    train_step(model, method, optimizer, images, labels, step, args.bf16)
    return _peak_rss_mib() - base


def measure_allocated(args, setup, step: int) -> float:
    """Peak of the tensor memory one training step allocates over what it starts with, in MiB: on
    a CPU from the profiler's record of every allocation and free (the analogue of CUDA's
    ``max_memory_allocated``, blind to how the heap lays the blocks out in pages)."""
    model, method, optimizer = setup
    images, labels = batch(args)
    return allocated_peak(lambda: train_step(model, method, optimizer, images, labels, step, args.bf16)) / 2**20


def allocated_peak(run) -> int:
    """The peak of the tensor memory ``run()`` allocates on a CPU over what it starts with, in bytes,
    from the profiler's record of every allocation and free."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    live = peak = 0
    allocations = (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]")
    for event in sorted(allocations, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def cure_breakdown(args, setup) -> dict[str, float]:
    """Seconds of one CURE step spent in each labelled part (on a GPU, the parts' spans on the device)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, method, optimizer = setup
    images, labels = batch(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        train_step(model, method, optimizer, images, labels, 0, args.bf16)
        synchronise(args.device)
    if args.device.startswith("cuda"):  # the host only queues kernels: the labels' spans on the device
        on_device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        total = (max(e.time_range.end for e in on_device) - min(e.time_range.start for e in on_device)) / 1e6
        parts = defaultdict(float)
        for event in on_device:
            if event.name.startswith("cure."):
                parts[event.name] += event.time_range.elapsed_us() / 1e6
        parts = dict(parts)
    else:
        total = time.perf_counter() - start
        parts = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("cure.")}
    parts["rest (backward of L, optimiser)"] = total - sum(parts.values())
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--width", type=int, default=64, help="Channel width of the CIFAR ResNets (64 = paper).")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per method (median reported).")
    parser.add_argument("--methods", default=",".join(METHOD_CLASSES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="Train under bf16 autocast, as --mixed-precision bf16 does.")
    parser.add_argument("--quick", action="store_true", help="Width 16, 3 repeats: under a minute on 2 cores.")
    parser.add_argument("--breakdown", action="store_true", help="Also split one CURE step into its parts.")
    parser.add_argument("--mask-interval", type=int, default=0,
                        help="Also time CURE with masks every K steps (amortised: each round times K steps).")
    parser.add_argument("--compile", action="store_true",
                        help="Also time TRADES and CURE compiled as --compile trains them (compiled in the warm-up round).")
    parser.add_argument("--channels-last", action="store_true",
                        help="Also time TRADES and CURE in the channels-last memory layout, as --channels-last trains them.")
    parser.add_argument("--default-allocator", action="store_true", help="Leave glibc's heap trimming on (the trainer turns it off on a CPU).")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.repeats = 16, 3
    torch.manual_seed(0)
    methods = args.methods.split(",")
    if "trades" not in methods:
        parser.error("--methods must include trades, the reference of the ratios")

    if args.device == "cpu" and not args.default_allocator:
        keep_freed_heap_memory()
    images, labels = batch(args)
    setups = {name: build(args, name) for name in methods}
    steps_per_round = dict.fromkeys(methods, 1)
    if args.mask_interval > 1:
        name = f"cure-k{args.mask_interval}"
        methods.append(name)
        setups[name], steps_per_round[name] = build(args, "cure", args.mask_interval), args.mask_interval
    for variant, options in (("compile", {"compiled": True}), ("channels_last", {"channels_last": True})):
        for name in ("trades", "cure"):
            if getattr(args, variant) and name in setups:
                methods.append(f"{name}+{variant}")
                setups[f"{name}+{variant}"] = build(args, name, **options)
                steps_per_round[f"{name}+{variant}"] = 1
    times = {name: [] for name in methods}
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for name, (model, method, optimizer) in setups.items():
            synchronise(args.device)
            start = time.perf_counter()
            for step in range(repeat * steps_per_round[name], (repeat + 1) * steps_per_round[name]):
                train_step(model, method, optimizer, images, labels, step, args.bf16)
            synchronise(args.device)
            if repeat:  # per step: a round of cure-kK holds one mask step and K - 1 without
                times[name].append((time.perf_counter() - start) / steps_per_round[name])

    width = f" width {args.width}" if args.model.startswith("cifar_resnet") else ""
    print(f"# {args.model}{width} at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.attack_steps} attack steps, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    parameter_mib = sum(p.numel() * p.element_size() for p in setups["trades"][0].parameters()) / 2**20
    print(f"# parameters: {parameter_mib:.1f} MiB; 'extra': peak memory over TRADES's, in multiples of the parameters' bytes")
    # After the timed rounds, on a mask step of cure-kK.
    mask_step = {name: (args.repeats + 1) * steps_per_round[name] for name in methods}
    memories = {name: measure_memory(args, setups[name], mask_step[name]) for name in methods}
    allocated = ({name: measure_allocated(args, setups[name], mask_step[name] + steps_per_round[name]) for name in methods}
                 if args.device == "cpu" else {})
    results = {}
    for name in methods:
        seconds = statistics.median(times[name])
        ratio = statistics.median(t / r for t, r in zip(times[name], times["trades"]))
        results[name] = {"seconds_per_step": seconds, "relative_to_trades": ratio}
        memory_text = ""
        for kind, peaks in (("peak memory", memories), ("allocated", allocated)):
            if peaks.get(name) is not None:
                extra = (peaks[name] - peaks["trades"]) / parameter_mib
                results[name].update({f"{kind.replace(' ', '_')}_mib": peaks[name], f"{kind.replace(' ', '_')}_extra_in_parameters": extra})
                memory_text += f"  {kind} +{peaks[name]:7.1f} MiB (extra {extra:+.2f}x)"
        print(f"{name:21s} {seconds:8.3f} s/step{memory_text}  {ratio:.2f}x")
    if args.breakdown and "cure" in setups:
        parts = cure_breakdown(args, setups["cure"])
        results["cure_breakdown_seconds"] = parts
        print("# one CURE step, by part (profiled, so a little slower than above):")
        for part, seconds in parts.items():
            print(f"#   {part:34s} {seconds:7.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
