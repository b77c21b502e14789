"""Does CURE beat PGD-AT, TRADES and MART here, and at what cost?

One command reproduces the paper's comparison at a chosen scale: train a natural model (or take one
with --natural-run), fine-tune a copy of it with every method under the same budget, plus CURE's
ablations (RGP only, revision only), and evaluate every result with the same attacks on the same
test examples, once per seed of --seeds (every seed its own natural model). Prints a markdown table
(mean ± standard deviation over seeds, with the 95 % interval of one run's accuracy) and writes it,
with the raw numbers, to OUTPUT_DIR/tradeoff.json and OUTPUT_DIR/tradeoff.md, and the clean-robust
plot, with the interpolation curve of a CURE run (cure-hub tradeoff), to OUTPUT_DIR/tradeoff.png.
On a CPU the runs go --jobs at a time, each in a process of its own with one thread (by default one
job per thread): small models use one thread each better than several threads one run, and a run's
numbers then do not depend on the machine's number of cores.

    python benchmarks/tradeoff.py --preset cpu-small --dataset ../shared/data/cifar10 --seeds 0,1,2
    python benchmarks/tradeoff.py --preset smoke --dataset digits --seeds 0,1      # seconds
    python benchmarks/tradeoff.py --preset paper-resnet18          # a GPU machine, days
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from cure_hub.config import DataConfig, MethodConfig, TrainConfig
from cure_hub.data import collate, load_eval_split
from cure_hub.evaluation import evaluate_robustness, natural_robustness_ratio, wilson_interval
from cure_hub.interpolation import tradeoff_curve
from cure_hub.models import load_robust_model
from cure_hub.system import usable_cpu_cores
from cure_hub.trainer import Trainer


@dataclasses.dataclass
class Preset:
    model: str
    model_kwargs: dict
    train_subset: int | None  # class-balanced training examples (None: the whole split)
    eval_examples: int  # class-balanced test examples, the same for every model and attack
    autoattack_examples: int  # AutoAttack runs on the first this-many of them (it is slow on a CPU)
    natural_epochs: int
    natural_lr: float
    epochs: int  # adversarial fine-tuning, every method alike
    lr: float
    batch_size: int
    attack_steps: int
    weight_decay: float
    # CURE's revision settings scaled to the run's length (see the note in the output)
    revision_rate: float
    revision_decay: float
    beta_cure: float = 5.0
    mixed_precision: str = "no"
    augment: str = "auto"  # the trainer's --augment
    channels_last: bool = False  # the trainer's --channels-last (faster on a CPU: README, Training)


PRESETS = {
    # 75 minutes for --seeds 0,1,2 on this project's 2-core CPU machine (2026-11-26; two runs at a time
    # of one thread each, in the channels-last layout; 114.5 minutes before, one run at a time).
    # AutoAttack is off: on this CPU it takes 3 to 9 minutes per robust model for 250 examples,
    # about 2 hours more for the preset's 24 robust models (--autoattack-examples 250 runs it; with
    # --reuse-runs on a finished folder, 53 + 64 minutes in two calls: README, Results).
    "cpu-small": Preset(
        model="cifar_resnet18", model_kwargs={"width": 16}, train_subset=4000, eval_examples=1000,
        autoattack_examples=0, natural_epochs=15, natural_lr=0.1, epochs=3, lr=0.02, batch_size=128,
        attack_steps=10, weight_decay=5e-4, revision_rate=0.5, revision_decay=0.95, channels_last=True,
    ),
    # Seconds, for CI: a narrow ResNet on a few hundred images (use --dataset digits).
    "smoke": Preset(
        model="cifar_resnet18", model_kwargs={"width": 8}, train_subset=320, eval_examples=40, autoattack_examples=0,
        natural_epochs=4, natural_lr=0.05, epochs=1, lr=0.02, batch_size=32, attack_steps=2, weight_decay=5e-4,
        revision_rate=0.5, revision_decay=0.9, augment="none",  # 8-px digits do not survive 4-pixel crops
    ),
    # The paper's settings (Table 9), for a GPU machine.
    "paper-resnet18": Preset(
        model="cifar_resnet18", model_kwargs={}, train_subset=None, eval_examples=10000, autoattack_examples=10000,
        natural_epochs=200, natural_lr=0.1, epochs=200, lr=0.1, batch_size=128, attack_steps=10, weight_decay=5e-3,
        revision_rate=0.2, revision_decay=0.999, mixed_precision="bf16",
    ),
    "paper-wrn34-10": Preset(
        model="cifar_wrn34_10", model_kwargs={}, train_subset=None, eval_examples=10000, autoattack_examples=10000,
        natural_epochs=200, natural_lr=0.1, epochs=200, lr=0.1, batch_size=128, attack_steps=10, weight_decay=5e-3,
        revision_rate=0.2, revision_decay=0.999, mixed_precision="bf16",
    ),
}

def runs_for(preset: Preset) -> dict[str, dict]:
    """Row name -> the method section of its config (CURE with the paper's Table 9 p, alpha, gamma).
    The rows after :data:`DEFAULT_ROWS` run only when --methods names them."""
    wide = preset.model == "cifar_wrn34_10"
    cure = {"method": "cure", "beta": preset.beta_cure, "percentile": 50.0 if wide else 30.0, "alpha": 0.3 if wide else 0.1,
            "gamma": 0.5 if wide else 1.0, "revision_rate": preset.revision_rate, "revision_decay": preset.revision_decay}
    return {
        "pgd_at": {"method": "pgd_at"},
        "trades": {"method": "trades", "beta": 6.0},
        "mart": {"method": "mart", "beta": 6.0},
        "cure": cure,
        # The paper's r and d, made for 200-epoch runs: the revision model then averages over ~5,000 steps.
        "cure (paper's r, d)": {**cure, "revision_rate": 0.2, "revision_decay": 0.999},
        "cure (RGP only)": {**cure, "use_revision": False},
        "cure (revision only)": {**cure, "use_rgp": False},
        # Masks every 4 steps (an opt-in deviation: docs/cure.md).
        "cure (mask every 4)": {**cure, "mask_interval": 4},
        # The official code's revision mode: batch statistics in L_CR, so L_CR is zero when theta_rev = theta
        # (the default eval mode adds a train/eval batch-norm term; docs/cure.md).
        "cure (revision in train mode)": {**cure, "revision_mode": "train"},
        # The paper's r and d with the official code's decay warm-up, min(1 - 1/(t + 2), d) (docs/cure.md).
        "cure (paper's r, d, warm-up)": {**cure, "revision_rate": 0.2, "revision_decay": 0.999, "revision_warmup": True},
        # The two references of --cure-settings, on the row's p, alpha, gamma, r and d: every switch of the
        # official code, and every literal reading of the paper (its beta, 1, included).
        "cure (official)": {**cure, "cure_settings": "official"},
        "cure (paper)": {**{key: value for key, value in cure.items() if key != "beta"}, "cure_settings": "paper"},
    }


DEFAULT_ROWS = 8


def select_rows(rows: dict[str, dict], methods: str) -> dict[str, dict]:
    """The rows named in ``methods``, comma-separated (a name's own commas stand in parentheses:
    "pgd_at,cure (paper's r, d)"), in the table's order; a name that is no row is refused."""
    names = re.split(r",(?![^()]*\))", methods)
    if unknown := [name for name in names if name not in rows]:
        raise SystemExit(f"--methods: no row named {', '.join(map(repr, unknown))}; the rows are: {'; '.join(rows)}")
    return {name: method for name, method in rows.items() if name in names}


def grid_rows(preset: Preset, grid: str) -> dict[str, dict]:
    """One cure row per combination of ``grid``'s values, e.g. ``beta=5,8;percentile=10,30``: the
    fields of the method config, on top of the preset's cure row."""
    axes = []
    for axis in grid.split(";"):
        key, _, values = axis.partition("=")
        if not values or key.strip() not in {field.name for field in dataclasses.fields(MethodConfig)}:
            raise SystemExit(f"--cure-grid: {axis!r} is not FIELD=V1,V2,... with a field of the method config")
        axes.append([(key.strip(), yaml.safe_load(value)) for value in values.split(",")])
    cure = runs_for(preset)["cure"]
    return {"cure (" + ", ".join(f"{k}={v}" for k, v in combination) + ")": {**cure, **dict(combination)}
            for combination in itertools.product(*axes)}


def train(preset: Preset, dataset: str, output: Path, method: dict, epochs: int, lr: float, seed: int, init_from=None,
          reuse: bool = False, log_every_steps: int = 50, lr_schedule: str = "cosine") -> float:
    """Trains one row's model into ``output`` and returns the seconds it took. With ``reuse``, a
    finished run already there with the same configuration is kept (its recorded time returned)."""
    config = TrainConfig.from_dict({
        "model": {"model": preset.model, "model_kwargs": preset.model_kwargs, "init_from": init_from},
        "data": {"dataset": dataset, "train_subset": preset.train_subset, "eval_subset": min(preset.eval_examples, 200),
                 "augment": preset.augment},
        "method": method,
        "attack": {"steps": preset.attack_steps},
        "optim": {"epochs": epochs, "batch_size": preset.batch_size, "lr": lr, "lr_schedule": lr_schedule,
                  # the paper recipes' milestones (docs/cure.md), where the schedule has them
                  **({"lr_milestones": [0.5, 0.75]} if lr_schedule == "piecewise" else {}),
                  "weight_decay": preset.weight_decay, "seed": seed, "mixed_precision": preset.mixed_precision,
                  "channels_last": preset.channels_last},
        "run": {"output_dir": str(output), "overwrite_output_dir": True, "eval_every_epochs": max(epochs, 1),
                "eval_attack_steps": 10, "log_every_steps": log_every_steps},
    })
    summary = output / "summary.json"
    if reuse and summary.is_file() and TrainConfig.of_run(output).to_dict() == config.to_dict():
        print(f"kept the finished run {output}", flush=True)
        return json.loads(summary.read_text())["train_seconds"]
    start = time.perf_counter()
    Trainer(config).train()
    return time.perf_counter() - start


def evaluate(run: Path, dataset: str, preset: Preset, device: str) -> dict:
    model = load_robust_model(run)
    if preset.channels_last:
        model.to_channels_last()
    examples = load_eval_split(DataConfig(dataset=dataset), preset.eval_examples).dataset
    batches = DataLoader(examples, batch_size=250, collate_fn=collate)
    # Without the large-ε gradient-masking check (a fifth of the preset's evaluation time): every
    # run already checked for masking at its own evaluations (its summary.json's alarms, kept below).
    results = evaluate_robustness(model, batches, ["clean", "pgd20", "cw"], device=device, progress=False, sanity_checks=False)
    if (summary := run / "summary.json").is_file():
        results["training_alarms"] = json.loads(summary.read_text())["alarms"]
    if preset.autoattack_examples:
        subset = examples.select(range(min(preset.autoattack_examples, len(examples))))
        aa_batches = DataLoader(subset, batch_size=250, collate_fn=collate)
        aa = evaluate_robustness(model, aa_batches, ["clean", "aa"], device=device, progress=False, sanity_checks=False)
        results["accuracy"]["aa"] = aa["accuracy"]["aa"]
        results["aa_clean"] = aa["accuracy"]["clean"]
        results["aa_examples"] = aa["n_examples"]
    accuracy = results["accuracy"]
    results["nrr"] = {"cw": natural_robustness_ratio(accuracy["clean"], accuracy["cw"])}
    if "aa" in accuracy:  # AA's NRR uses the clean accuracy of the same examples
        results["nrr"]["aa"] = natural_robustness_ratio(results["aa_clean"], accuracy["aa"])
    return results


#: The table's columns: name, where the value is, whether it is an accuracy (with an interval).
COLUMNS = (("Nat", ("accuracy", "clean"), True), ("PGD-20", ("accuracy", "pgd20"), True), ("C&W", ("accuracy", "cw"), True),
           ("AA", ("accuracy", "aa"), True), ("NRR (C&W)", ("nrr", "cw"), False), ("NRR (AA)", ("nrr", "aa"), False))


def summarise(runs: list[dict], n_examples: int, aa_examples: int) -> dict:
    """Per column, the mean and standard deviation over seeds, and for accuracies the 95 % Wilson
    interval of the mean at the evaluation's sample size (the sampling error of one run)."""
    summary = {}
    for name, (section, key), is_accuracy in COLUMNS:
        values = [run["eval"][section].get(key) for run in runs]
        if any(v is None for v in values):
            continue
        mean = statistics.fmean(values)
        entry = {"mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else None, "values": values}
        if is_accuracy:
            n = aa_examples if key == "aa" else n_examples
            entry["interval"] = list(wilson_interval(round(mean * n), n))
        summary[name] = entry
    summary["train_minutes"] = statistics.fmean(run["train_seconds"] for run in runs) / 60
    return summary


def markdown_table(rows: dict[str, dict]) -> str:
    """Mean ± sd over seeds, and [the 95 % interval of one run's accuracy on these examples]."""
    header = "| model | " + " | ".join(name for name, _, _ in COLUMNS) + " | training time |"
    lines = [header, "|---" * (len(COLUMNS) + 2) + "|"]
    for row_name, row in rows.items():
        cells = []
        for name, _, _ in COLUMNS:
            entry = row["summary"].get(name)
            if entry is None:
                cells.append("—")
                continue
            text = f"{100 * entry['mean']:.2f}" + (f" ± {100 * entry['sd']:.2f}" if entry["sd"] is not None else "")
            if "interval" in entry:
                text += f" [{100 * entry['interval'][0]:.1f}–{100 * entry['interval'][1]:.1f}]"
            cells.append(text)
        lines.append(f"| {row_name} | " + " | ".join(cells) + f" | {row['summary']['train_minutes']:.1f} min |")
    return "\n".join(lines)


#: The columns compared seed by seed.
PAIRED_COLUMNS = ("Nat", "PGD-20", "C&W", "AA", "NRR (C&W)", "NRR (AA)")


def paired_differences(rows: dict[str, dict], reference: str) -> dict[str, dict]:
    """Per row and column, ``reference`` minus the row, seed by seed (both start from that seed's
    natural model and see the same examples, so the pairing removes what they share): the mean
    difference and its 95 % t-interval over seeds. An interval that excludes 0 is a difference
    these seeds resolve; one that does not, one they cannot tell from noise."""
    from scipy.stats import t

    differences = {}
    for name, row in rows.items():
        if name == reference:
            continue
        entry = {}
        for column in PAIRED_COLUMNS:
            ours, theirs = rows[reference]["summary"].get(column), row["summary"].get(column)
            if ours is None or theirs is None:
                continue
            values = [a - b for a, b in zip(ours["values"], theirs["values"])]
            mean = statistics.fmean(values)
            half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
            entry[column] = {"mean": mean, "interval": [mean - half, mean + half], "values": values,
                             "resolved": not mean - half <= 0 <= mean + half}
        differences[name] = entry
    return differences


def paired_differences_table(rows: dict[str, dict], reference: str) -> str:
    """``reference`` minus each row, in points: mean [95 % t-interval over seeds], * where it excludes 0."""
    differences = paired_differences(rows, reference)
    lines = [f"| {reference} minus | " + " | ".join(PAIRED_COLUMNS) + " |", "|---" * (len(PAIRED_COLUMNS) + 1) + "|"]
    for name, entry in differences.items():
        cells = [f"{100 * d['mean']:+.2f} [{100 * d['interval'][0]:+.1f}, {100 * d['interval'][1]:+.1f}]"
                 + ("*" if d["resolved"] else "") if (d := entry.get(column)) else "—" for column in PAIRED_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], curve: dict | None, output: Path) -> Path:
    """Clean against C&W accuracy: a small point per run, a large one per row's mean, and the
    interpolation curve of the first seed's CURE run."""
    from cure_hub.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (name, row) in enumerate(rows.items()):
        colour = f"C{index % 10}"
        runs = row["runs"]
        axes.scatter([r["eval"]["accuracy"]["clean"] for r in runs], [r["eval"]["accuracy"]["cw"] for r in runs],
                     s=12, color=colour, alpha=0.5)
        axes.scatter(row["summary"]["Nat"]["mean"], row["summary"]["C&W"]["mean"], s=70, color=colour, label=name, edgecolors="black")
    if curve:
        points = curve["points"]
        axes.plot([p["accuracy"]["clean"] for p in points], [p["accuracy"]["cw"] for p in points], "k--", linewidth=1,
                  label="cure: θ(λ) from its start (seed of the first run)")
    axes.set(xlabel="clean accuracy", ylabel="C&W accuracy", title="Clean–robust trade-off (small: runs, large: mean over seeds)")
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="CIFAR-10: Hub id or local copy.")
    parser.add_argument("--output-dir", default="runs/tradeoff")
    parser.add_argument("--seeds", default="0", help="Comma-separated: every row is trained once per seed, from the natural model of that seed.")
    parser.add_argument("--natural-run", help="Start from this natural run folder instead of training one (one seed).")
    parser.add_argument("--methods", help="Comma-separated subset of the rows to run.")
    parser.add_argument("--cure-grid", help="Add a cure row per combination of these method settings, e.g. "
                        "'beta=5,8;percentile=10,30' (a settings search: run it on seeds the table does not use).")
    parser.add_argument("--reference", default="cure", help="The row the paired-differences table subtracts the others from.")
    parser.add_argument("--reuse-runs", action="store_true", help="Keep the finished runs already in --output-dir whose "
                        "configuration matches, and evaluate them again (an interrupted benchmark, or more attacks: "
                        "--autoattack-examples 250); train the rest.")
    parser.add_argument("--curve-points", type=int, default=6, help="Points of the cure run's interpolation curve (0: none).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply data sizes and epochs (a smoke test: 0.1).")
    parser.add_argument("--jobs", type=int, help="Runs trained and evaluated at a time, each in its own process "
                        "(default: on a CPU one per thread, which is faster than threads within one run; on a GPU 1).")
    parser.add_argument("--autoattack-examples", type=int, help="AutoAttack on the first this-many evaluation examples "
                        "(default: the preset's; 0: none).")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.natural_run and len(seeds) > 1:
        parser.error("--natural-run is one natural model: give one seed")
    preset = PRESETS[args.preset]
    if args.scale != 1.0:
        scaled = lambda n: max(1, int(n * args.scale))  # noqa: E731
        preset = dataclasses.replace(
            preset, train_subset=scaled(preset.train_subset) if preset.train_subset else None,
            eval_examples=max(10, scaled(preset.eval_examples)), autoattack_examples=max(10, scaled(preset.autoattack_examples)),
            natural_epochs=scaled(preset.natural_epochs), epochs=scaled(preset.epochs),
        )
    if args.autoattack_examples is not None:
        preset = dataclasses.replace(preset, autoattack_examples=min(args.autoattack_examples, preset.eval_examples))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chosen = runs_for(preset)
    if args.methods:
        chosen = select_rows(chosen, args.methods)
    else:
        chosen = dict(list(chosen.items())[:DEFAULT_ROWS])
    if args.cure_grid:
        chosen.update(grid_rows(preset, args.cure_grid))
    if args.reference not in chosen:
        parser.error(f"--reference {args.reference!r} is not among the rows: {', '.join(chosen)}")
    rows = {name: {"runs": [], "method": method} for name, method in {"natural (start)": None, **chosen}.items()}
    jobs = args.jobs or (1 if args.device.startswith("cuda") else torch.get_num_threads())
    threads = max(1, torch.get_num_threads() // jobs)
    runs, curve = run_jobs(preset, args, chosen, seeds, out, jobs, threads)
    for name, row in rows.items():
        row["runs"] = [runs[name, seed] for seed in seeds]
        row["summary"] = summarise(row["runs"], preset.eval_examples, preset.autoattack_examples)
    table = markdown_table(rows)
    if len(seeds) > 1:
        table += "\n\n" + paired_differences_table(rows, args.reference)
    total = time.perf_counter() - started
    settings = dataclasses.asdict(preset)
    note = (
        f"Preset {args.preset}: {preset.model} {preset.model_kwargs}, {preset.train_subset or 'all'} training images "
        f"(class-balanced), natural pre-training {preset.natural_epochs} epochs (lr {preset.natural_lr}), then "
        f"{preset.epochs} epochs of each method from that model (SGD, lr {preset.lr}, cosine, batch {preset.batch_size}, "
        f"{preset.attack_steps}-step PGD at 8/255). TRADES and MART beta 6, CURE beta {preset.beta_cure}; CURE's revision "
        f"settings scaled to the run's length (r {preset.revision_rate}, d {preset.revision_decay}: the revision model "
        f"averages over about 1/((1-d) r) = {1 / ((1 - preset.revision_decay) * preset.revision_rate):.0f} steps). "
        f"Evaluation: the same {preset.eval_examples} class-balanced test examples for every model (clean, PGD-20, "
        f"C&W-inf 30 steps)" + (f", AutoAttack (standard) on the first {preset.autoattack_examples} of them" if preset.autoattack_examples else "")
        + f". Seeds {seeds}: each cell is the mean ± standard deviation over seeds (every seed trains its own natural "
        f"model and every method from it), and in brackets the 95 % Wilson interval of one run's accuracy at that "
        f"mean on these examples. "
        + (f"The second table pairs runs of one seed (same natural model, same examples): {args.reference} minus each "
           f"row, mean and 95 % t-interval over seeds, * where the interval excludes 0 (a difference these seeds "
           f"resolve). " if len(seeds) > 1 else "")
        + f"Total {total / 60:.1f} min on {platform.machine()}, {jobs} job(s) at a time of {threads} thread(s) each, "
        f"{datetime.date.today().isoformat()}."
    )
    print(table)
    print(note)
    plot(rows, curve, out / "tradeoff.png")
    (out / "tradeoff.md").write_text(table + "\n\n" + note + "\n")
    (out / "tradeoff.json").write_text(json.dumps({"preset": args.preset, "settings": settings, "seeds": seeds,
                                                   "total_seconds": total, "rows": rows, "curve": curve, "note": note,
                                                   "reference": args.reference,
                                                   "paired_differences": paired_differences(rows, args.reference)
                                                   if len(seeds) > 1 else None}, indent=2))
    return 0


def run_jobs(preset: Preset, args, chosen: dict[str, dict], seeds: list[int], out: Path, jobs: int,
             threads: int) -> tuple[dict, dict | None]:
    """Trains and evaluates every row of every seed, ``jobs`` at a time in worker processes of
    ``threads`` threads each: first each seed's natural model, then, as each is done, that seed's
    rows, and the interpolation curve of the first seed's cure run. Returns the runs by
    ``(row, seed)``, and the curve. A run's numbers depend on its thread count (float summation
    order), not on how many run beside it."""
    runs, curve, pending = {}, None, {}
    with worker_pool(jobs, threads) as pool:

        def submit(name: str, seed: int, method: dict | None, folder: Path, natural: Path) -> None:
            future = pool.submit(train_and_evaluate, preset, args.dataset, folder, method, seed, natural, args.reuse_runs,
                                 args.device)
            pending[future] = (name, seed, folder)

        for seed in seeds:
            natural = out / f"seed{seed}" / "natural"
            submit("natural (start)", seed, None, Path(args.natural_run) if args.natural_run else natural, natural)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, seed, folder = pending.pop(future)
                if name == "curve":
                    curve = future.result()
                    continue
                runs[name, seed] = future.result()
                print(f"seed {seed} {name}: {runs[name, seed]['eval']['accuracy']} in "
                      f"{runs[name, seed]['train_seconds'] / 60:.1f} min", flush=True)
                if name == "natural (start)":
                    for row, method in chosen.items():
                        submit(row, seed, method, out / f"seed{seed}" / row.replace(" ", "_").replace("(", "").replace(")", ""),
                               folder)
                elif name == "cure" and seed == seeds[0] and args.curve_points > 1:
                    future = pool.submit(interpolation_curve, folder, args.dataset, preset, args.curve_points, args.device)
                    pending[future] = ("curve", seed, folder)
    return runs, curve


def worker_pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    """``jobs`` worker processes of ``threads`` threads each, pinned to disjoint cores where there
    are enough (and the system can pin)."""
    context = multiprocessing.get_context("spawn")
    cores = usable_cpu_cores() if hasattr(os, "sched_setaffinity") else []  # pinning needs the call
    core_sets = context.Queue()
    for index in range(jobs):
        core_sets.put(cores[index::jobs] if jobs <= len(cores) else [])
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(core_sets, threads))


def _start_worker(core_sets, threads: int) -> None:
    if cores := core_sets.get():
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def train_and_evaluate(preset: Preset, dataset: str, folder: Path, method: dict | None, seed: int, natural: Path,
                       reuse: bool, device: str) -> dict:
    """One run of the table, trained into ``folder`` and evaluated: a method fine-tuned from
    ``natural``, or (``method`` None) the natural model itself, trained unless it is a --natural-run."""
    if method is not None:
        seconds = train(preset, dataset, folder, method, preset.epochs, preset.lr, seed, init_from=str(natural), reuse=reuse)
    elif folder == natural:
        seconds = train(preset, dataset, folder, {"method": "standard"}, preset.natural_epochs, preset.natural_lr, seed, reuse=reuse)
    else:
        seconds = 0.0
    return {"seed": seed, "train_seconds": seconds, "eval": evaluate(folder, dataset, preset, device)}


def interpolation_curve(run: Path, dataset: str, preset: Preset, points: int, device: str) -> dict:
    """The dial of a cure run (``cure-hub tradeoff``) on the benchmark's examples."""
    examples = load_eval_split(DataConfig(dataset=dataset), preset.eval_examples).dataset
    batches = DataLoader(examples, batch_size=250, collate_fn=collate)
    return tradeoff_curve(run, "last", points, batches, ["clean", "cw"], epsilon=8 / 255, norm="linf", device=device,
                          progress=False)


if __name__ == "__main__":
    sys.exit(main())
