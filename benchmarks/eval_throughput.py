"""Evaluation throughput: examples per second of each attack of ``cure-hub eval``, in one process
and in two (data-parallel over the batches, as ``accelerate launch -m cure_hub.cli eval`` runs it).

Each configuration runs in its own launch with the machine's cores shared out (one process with
all of them; two with half each), on the same model and images, through the same code as
``cure-hub eval`` (:func:`cure_hub.sharded_eval.run_evaluation`), without the reliability checks
(the large-ε check would double every PGD figure). The images are random and labelled with the
model's own predictions, so that every attack runs on every example, as it would on a model that
classifies them all correctly; a real model's throughput is higher by the share it misclassifies.
AutoAttack stops attacking an example once one of its attacks breaks it, so its throughput depends
on the model: the table gives the accuracy left after each attack (an untrained network on random
images is nearly constant, and hard for AutoAttack to break within ε).

    python benchmarks/eval_throughput.py                        # cifar_resnet18 width 16, 32 px
    python benchmarks/eval_throughput.py --examples 512 --width 64 --attacks clean,pgd20,cw
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import cure_hub
from cure_hub.data import collate
from cure_hub.evaluation import EvaluationSuite
from cure_hub.sharded_eval import process_state, run_evaluation
from cure_hub.system import usable_cpu_cores


def worker(args) -> None:
    processes = process_state()
    torch.manual_seed(0)
    model = cure_hub.create_model("cifar_resnet18", num_classes=10, image_size=32, width=args.width).eval()
    images = torch.randint(0, 256, (args.examples, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = torch.cat([model(batch.float() / 255).argmax(1) for batch in images.split(256)])
    dataset = [{"image": image, "label": int(label)} for image, label in zip(images, labels)]
    seconds = {}
    for attack in args.attacks.split(","):
        suite = EvaluationSuite(("clean", attack) if attack != "clean" else ("clean",), sanity_checks=False)
        examples = dataset[: args.aa_examples] if attack.startswith("aa") else dataset
        processes.wait_for_everyone()
        start = time.perf_counter()
        results = run_evaluation(model, examples, suite, args.batch_size, collate, device="cpu", progress=False)
        seconds[attack] = (time.perf_counter() - start, len(examples), results["accuracy"][attack])
    if processes.is_main_process:
        print("RESULT " + json.dumps(seconds), flush=True)


def launch(args, num_processes: int) -> dict:
    threads = max(1, len(usable_cpu_cores()) // num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "true"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_port", "29581"]
    command = [sys.executable, *(launcher if num_processes > 1 else []), __file__, "--worker",
               *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker")]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--aa-examples", type=int, default=16, help="AutoAttack's share of the examples (it is slow).")
    parser.add_argument("--attacks", default="clean,pgd20,cw,aa")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="Small enough that every process gets batches of AutoAttack's share.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one, two = launch(args, 1), launch(args, 2)
    print(f"cifar_resnet18 width {args.width}, 32 px, batch {args.batch_size}, {len(usable_cpu_cores())} usable CPU cores, torch {torch.__version__}")
    print("| attack | examples | accuracy left | 1 process (img/s) | 2 processes (img/s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for attack, (seconds, n, accuracy) in one.items():
        rate_one, rate_two = n / seconds, two[attack][1] / two[attack][0]
        assert two[attack][2] == accuracy, "two processes must give the results of one"
        print(f"| {attack} | {n} | {accuracy:.3f} | {rate_one:.2f} | {rate_two:.2f} | {rate_two / rate_one:.2f}x |")


if __name__ == "__main__":
    main()
