"""Does CURE collapse at the paper's learning rate where TRADES recovers, and why?

From each seed's natural start of a trade-off preset (cpu-small: a quarter-width ResNet-18 on 4,000
CIFAR-10 images), fine-tunes at every learning rate of --lrs: TRADES, CURE with the paper's r and d
at a fixed d, and the same with the official code's decay warm-up (--revision-warmup). Every run
logs its training metrics every --log-every-steps steps; the figure plots, against steps, the
training batches' clean accuracy, the regulariser (TRADES: beta KL; CURE: gamma L_CR) and the largest
other term of the loss (TRADES: CE; CURE: CE or beta KL), as the collapse alarm compares them (runs
logged before that alarm's definition record CURE's L_adv there), one panel row per learning rate, a thin line
per seed and a thick one for their mean. A markdown table gives each run's lowest and final
training accuracy (over a window of logged steps) and its clean and PGD-20 accuracy on the
preset's test examples. Runs go --jobs at a time, as in tradeoff.py.

    python benchmarks/collapse.py --dataset ../shared/data/cifar10 --seeds 0,1,2 --output-dir runs/collapse
    python benchmarks/collapse.py --preset smoke --dataset digits --seeds 0 --epochs 1    # a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from tradeoff import PRESETS, evaluate, runs_for, train, worker_pool  # noqa: E402

from cure_hub.system import usable_cpu_cores  # noqa: E402

ROWS = ("trades", "cure (paper's r, d)", "cure (paper's r, d, warm-up)")
#: Logged steps averaged for the "final" training accuracy (the batches are small and noisy).
WINDOW = 5


def folder_of(out: Path, key: tuple, lr_schedule: str = "cosine") -> Path:
    """The folder of the run ``(row, lr, seed)``; runs of another schedule than the preset's cosine
    have their own (the natural start is shared)."""
    name, lr, seed = key
    if name == "natural":
        return out / f"seed{seed}" / "natural"
    schedule = "" if lr_schedule == "cosine" else f"-{lr_schedule}"
    return out / f"seed{seed}" / f"lr{lr:g}{schedule}" / "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_-.")


def run(preset, dataset: str, folder: Path, method: dict | None, lr: float, epochs: int, seed: int, natural: Path,
        log_every_steps: int, lr_schedule: str = "cosine") -> dict:
    """One run, trained and evaluated: the natural start (``method`` None) or a fine-tuning from it."""
    if method is None:
        seconds = train(preset, dataset, folder, {"method": "standard"}, preset.natural_epochs, preset.natural_lr, seed,
                        reuse=True)
    else:
        seconds = train(preset, dataset, folder, method, epochs, lr, seed, init_from=str(natural), reuse=True,
                        log_every_steps=log_every_steps, lr_schedule=lr_schedule)
    return {"train_seconds": seconds, "eval": evaluate(folder, dataset, preset, "cpu")}


def training_curve(folder: Path) -> list[dict]:
    """The logged training steps of a run (metrics.jsonl without its evaluations)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "train/loss" in r]


def describe(curve: list[dict]) -> dict:
    """Training accuracy at the first logged step, its lowest mean over WINDOW logged steps, and its
    mean over the last WINDOW; the share of logged steps where the regulariser outweighed the rest of the loss."""
    accuracy = [r["train/clean_acc"] for r in curve]
    means = [statistics.fmean(accuracy[i:i + WINDOW]) for i in range(max(1, len(accuracy) - WINDOW + 1))]
    outweighed = [r["train/regulariser"] > r["train/main_loss"] for r in curve if "train/regulariser" in r]
    return {"first": accuracy[0], "lowest": min(means), "final": means[-1],
            "regulariser_above_main": statistics.fmean(outweighed) if outweighed else None}


def plot(curves: dict, lrs: list[float], output: Path) -> None:
    from cure_hub.plots import _pyplot

    plt = _pyplot()
    panels = (("train/clean_acc", "training accuracy"), ("train/main_loss", "largest other term of the loss"),
              ("train/regulariser", "regulariser (β KL, γ L_CR)"))
    figure, axes = plt.subplots(len(lrs), len(panels), figsize=(4.2 * len(panels), 3.2 * len(lrs)), squeeze=False)
    for i, lr in enumerate(lrs):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for k, row in enumerate(ROWS):
                runs = [c for (name, rate, _), c in curves.items() if name == row and rate == lr]
                for curve in runs:
                    ax.plot([r["step"] for r in curve], [r.get(key, float("nan")) for r in curve], color=f"C{k}", alpha=0.3, lw=0.8)
                if runs:
                    length = min(len(c) for c in runs)
                    mean = [statistics.fmean(c[t].get(key, float("nan")) for c in runs) for t in range(length)]
                    ax.plot([r["step"] for r in runs[0][:length]], mean, color=f"C{k}", lw=2, label=row)
            ax.set_title(f"{title}, lr {lr:g}", fontsize="medium")
            ax.set_xlabel("optimiser step")
            if key != "train/clean_acc":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--dataset", default="uoft-cs/cifar10")
    parser.add_argument("--output-dir", default="runs/collapse")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="0.1,0.02", help="Comma-separated fine-tuning learning rates.")
    parser.add_argument("--epochs", type=int, default=4, help="Fine-tuning epochs (the GPU run that collapsed: 4).")
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--log-every-steps", type=int, default=2)
    parser.add_argument("--lr-schedule", default="cosine", choices=("cosine", "piecewise", "constant"),
                        help="The fine-tuning schedule: the preset's cosine, or the paper recipes' piecewise (the lr "
                             "held for the first half of the run, then divided by 10 at 50 %% and again at 75 %%).")
    parser.add_argument("--jobs", type=int, default=len(usable_cpu_cores()))
    args = parser.parse_args(argv)
    seeds, lrs = [int(s) for s in args.seeds.split(",")], [float(v) for v in args.lrs.split(",")]
    preset = dataclasses.replace(PRESETS[args.preset], eval_examples=args.eval_examples, autoattack_examples=0)
    rows = {name: runs_for(preset)[name] for name in ROWS}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, results, pending = time.perf_counter(), {}, {}
    with worker_pool(args.jobs, 1) as pool:
        for seed in seeds:
            natural = folder_of(out, ("natural", None, seed))
            pending[pool.submit(run, preset, args.dataset, natural, None, 0.0, 0, seed, natural, 0)] = ("natural", None, seed)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                results[key] = future.result()
                print(f"{key}: {results[key]['eval']['accuracy']} in {results[key]['train_seconds'] / 60:.1f} min", flush=True)
                name, _, seed = key
                if name == "natural":
                    natural = folder_of(out, key)
                    for lr in lrs:
                        for row, method in rows.items():
                            folder = folder_of(out, (row, lr, seed), args.lr_schedule)
                            future = pool.submit(run, preset, args.dataset, folder, method, lr, args.epochs, seed, natural,
                                                 args.log_every_steps, args.lr_schedule)
                            pending[future] = (row, lr, seed)
    curves = {key: training_curve(folder_of(out, key, args.lr_schedule)) for key in results if key[0] != "natural"}
    lines = ["| lr | run | seed | first train acc | lowest | final | regulariser > main (share of logged steps) | Nat | PGD-20 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, lr, seed), curve in sorted(curves.items(), key=lambda item: (-item[0][1], ROWS.index(item[0][0]), item[0][2])):
        d, accuracy = describe(curve), results[name, lr, seed]["eval"]["accuracy"]
        share = "—" if d["regulariser_above_main"] is None else f"{d['regulariser_above_main']:.2f}"
        lines.append(f"| {lr:g} | {name} | {seed} | {100 * d['first']:.1f} | {100 * d['lowest']:.1f} | {100 * d['final']:.1f} | "
                     f"{share} | {100 * accuracy['clean']:.1f} | {100 * accuracy['pgd20']:.1f} |")
    for seed in seeds:
        accuracy = results["natural", None, seed]["eval"]["accuracy"]
        lines.append(f"| — | natural (start) | {seed} | | | | | {100 * accuracy['clean']:.1f} | {100 * accuracy['pgd20']:.1f} |")
    table = "\n".join(lines)
    note = (f"Preset {args.preset} natural start, {args.epochs} epochs of fine-tuning at lr {args.lrs} ({args.lr_schedule}), logged every "
            f"{args.log_every_steps} steps; training accuracy on the training batches, 'lowest' and 'final' over {WINDOW} logged "
            f"steps; Nat and PGD-20 on {args.eval_examples} class-balanced test examples. {(time.perf_counter() - started) / 60:.1f} "
            f"min, {args.jobs} job(s) of one thread.")
    print(table + "\n\n" + note)
    stem = "collapse" if args.lr_schedule == "cosine" else f"collapse-{args.lr_schedule}"
    plot(curves, lrs, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(table + "\n\n" + note + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "results": {repr(k): v for k, v in results.items()},
                                                   "curves": {repr(k): v for k, v in curves.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
