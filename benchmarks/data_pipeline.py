"""Images per second of the data pipeline alone, against a training step's, at 224 px.

The pipeline is the trainer's: ``load_data`` (decode, RGB, resize to ``--image-size``), or with
``--streaming`` the streamed split and its shuffle buffer, read through a DataLoader with
``--num-workers`` processes, collated to floats in [0, 1], and the on-device
augmentation (``--augment``: random resized crop and flip for ``imagenet``). The step is one
training step of ``--method`` on ``--model`` with batches of that size (``benchmarks/step_cost.py``'s
step). The pipeline keeps the step fed when its images per second exceed the step's.

    python benchmarks/data_pipeline.py --dataset ../shared/data/cifar10 --num-workers 0,2
    python benchmarks/data_pipeline.py --device cuda --num-workers 0,4,8     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import build, synchronise, train_step  # noqa: E402

from cure_hub.config import DataConfig  # noqa: E402
from cure_hub.data import augment, load_data  # noqa: E402
from cure_hub.streaming import load_streamed_data  # noqa: E402


def pipeline_images_per_second(data, args, workers: int) -> float:
    """Images per second through loader, collation, transfer and augmentation, after two warm-up
    batches (which start the workers)."""
    shuffle = None if args.streaming else True  # a stream shuffles itself
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=shuffle, collate_fn=data.train_collate,
                        num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator(args.device).manual_seed(0)
    batches = iter(loader)
    for _ in range(2):
        augment(next(batches)[0].to(args.device), args.augment, generator)
    synchronise(args.device)
    start = time.perf_counter()
    for _ in range(args.batches):
        images, _ = next(batches)
        augment(images.to(args.device), args.augment, generator)
    synchronise(args.device)
    return args.batches * args.batch_size / (time.perf_counter() - start)


def step_images_per_second(args) -> float:
    """Images per second of training steps on batches of the pipeline's shape, after one warm-up."""
    model, method, optimizer = build(args, args.method)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(args.device)
    train_step(model, method, optimizer, images, labels, 0)
    synchronise(args.device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        train_step(model, method, optimizer, images, labels, step)
    synchronise(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="a Hub id or local copy (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--augment", default="imagenet", choices=("imagenet", "cifar", "none"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", default="0,2", help="comma-separated worker counts to measure (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--width", type=int, default=64, help="for cifar_resnet* models")
    parser.add_argument("--method", default="cure")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streaming", action="store_true", help="read the training split as a stream (--streaming), "
                        "shuffle buffer included")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.streaming:
        data = load_streamed_data(DataConfig(dataset=args.dataset, image_size=args.image_size, streaming=True, eval_subset=10))
    else:
        subset = (args.batches + 2) * args.batch_size
        data = load_data(DataConfig(dataset=args.dataset, image_size=args.image_size, train_subset=subset, eval_subset=10))
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "augment": args.augment, "device": args.device,
              "streaming": args.streaming,
              "pipeline_images_per_second": {w: pipeline_images_per_second(data, args, int(w)) for w in args.num_workers.split(",")},
              "step": f"{args.method} on {args.model}, {args.attack_steps} attack steps",
              "step_images_per_second": step_images_per_second(args)}
    print(f"{args.image_size} px, batch {args.batch_size}, {args.device}:")
    for workers, rate in result["pipeline_images_per_second"].items():
        print(f"  data pipeline, {workers} workers: {rate:8.1f} images/s")
    print(f"  training step ({result['step']}): {result['step_images_per_second']:8.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
