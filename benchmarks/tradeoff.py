"""Does CURE beat PGD-AT, TRADES and MART here, and at what cost?

One command reproduces the paper's comparison at a chosen scale: train a natural model (or take one
with --natural-run), fine-tune a copy of it with every method under the same budget, plus CURE's
ablations (RGP only, revision only), and evaluate every result with the same attacks on the same
test examples. Prints a markdown table and writes it, with the raw numbers, to
OUTPUT_DIR/tradeoff.json and OUTPUT_DIR/tradeoff.md.

    python benchmarks/tradeoff.py --preset cpu-small --dataset ../shared/data/cifar10
    python benchmarks/tradeoff.py --preset paper-resnet18          # a GPU machine, days
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cure_hub.config import DataConfig, TrainConfig
from cure_hub.data import collate, load_eval_split
from cure_hub.evaluation import evaluate_robustness, natural_robustness_ratio
from cure_hub.hub import load_robust_model
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


PRESETS = {
    # About 40 minutes on 2 CPU cores: a quarter-width ResNet-18 on 4,000 CIFAR-10 images.
    "cpu-small": Preset(
        model="cifar_resnet18", model_kwargs={"width": 16}, train_subset=4000, eval_examples=500,
        autoattack_examples=100, natural_epochs=15, natural_lr=0.1, epochs=4, lr=0.02, batch_size=128,
        attack_steps=10, weight_decay=5e-4, revision_rate=0.5, revision_decay=0.95,
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
    """Row name -> the method section of its config (CURE with the paper's Table 9 p, alpha, gamma)."""
    wide = preset.model == "cifar_wrn34_10"
    cure = {"method": "cure", "beta": preset.beta_cure, "percentile": 50.0 if wide else 30.0, "alpha": 0.3 if wide else 0.1,
            "gamma": 0.5 if wide else 1.0, "revision_rate": preset.revision_rate, "revision_decay": preset.revision_decay}
    return {
        "pgd_at": {"method": "pgd_at"},
        "trades": {"method": "trades", "beta": 6.0},
        "mart": {"method": "mart", "beta": 6.0},
        "cure": cure,
        "cure (RGP only)": {**cure, "use_revision": False},
        "cure (revision only)": {**cure, "use_rgp": False},
        # The official code's revision mode: batch statistics in L_CR, so L_CR is zero when theta_rev = theta
        # (the default eval mode adds a train/eval batch-norm term; docs/cure.md).
        "cure (revision in train mode)": {**cure, "revision_mode": "train"},
    }


def train(preset: Preset, dataset: str, output: Path, method: dict, epochs: int, lr: float, seed: int, init_from=None) -> float:
    config = TrainConfig.from_dict({
        "model": {"model": preset.model, "model_kwargs": preset.model_kwargs, "init_from": init_from},
        "data": {"dataset": dataset, "train_subset": preset.train_subset, "eval_subset": min(preset.eval_examples, 500)},
        "method": method,
        "attack": {"steps": preset.attack_steps},
        "optim": {"epochs": epochs, "batch_size": preset.batch_size, "lr": lr, "lr_schedule": "cosine",
                  "weight_decay": preset.weight_decay, "seed": seed, "mixed_precision": preset.mixed_precision},
        "run": {"output_dir": str(output), "overwrite_output_dir": True, "eval_every_epochs": max(epochs, 1),
                "eval_attack_steps": 10, "log_every_steps": 50},
    })
    start = time.perf_counter()
    Trainer(config).train()
    return time.perf_counter() - start


def evaluate(run: Path, dataset: str, preset: Preset, device: str) -> dict:
    model = load_robust_model(run)
    examples = load_eval_split(DataConfig(dataset=dataset), preset.eval_examples).dataset
    batches = DataLoader(examples, batch_size=250, collate_fn=collate)
    results = evaluate_robustness(model, batches, ["clean", "pgd20", "cw"], device=device, progress=False)
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


def markdown_table(rows: dict[str, dict]) -> str:
    header = "| model | Nat | PGD-20 | C&W | AA | NRR (C&W) | NRR (AA) | training time |\n|---|---|---|---|---|---|---|---|"
    lines = [header]
    for name, row in rows.items():
        acc, nrr = row["eval"]["accuracy"], row["eval"]["nrr"]

        def pct(value):
            return "—" if value is None else f"{100 * value:.2f}"

        lines.append(f"| {name} | {pct(acc['clean'])} | {pct(acc['pgd20'])} | {pct(acc['cw'])} | {pct(acc.get('aa'))} | "
                     f"{pct(nrr.get('cw'))} | {pct(nrr.get('aa'))} | {row['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="CIFAR-10: Hub id or local copy.")
    parser.add_argument("--output-dir", default="runs/tradeoff")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--natural-run", help="Start from this natural run folder instead of training one.")
    parser.add_argument("--methods", help="Comma-separated subset of the rows to run.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply data sizes and epochs (a smoke test: 0.1).")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.scale != 1.0:
        scaled = lambda n: max(1, int(n * args.scale))  # noqa: E731
        preset = dataclasses.replace(
            preset, train_subset=scaled(preset.train_subset) if preset.train_subset else None,
            eval_examples=max(10, scaled(preset.eval_examples)), autoattack_examples=max(10, scaled(preset.autoattack_examples)),
            natural_epochs=scaled(preset.natural_epochs), epochs=scaled(preset.epochs),
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = {}
    natural = Path(args.natural_run) if args.natural_run else out / "natural"
    natural_seconds = 0.0
    if not args.natural_run:
        natural_seconds = train(preset, args.dataset, natural, {"method": "standard"}, preset.natural_epochs, preset.natural_lr, args.seed)
    rows["natural (start)"] = {"train_seconds": natural_seconds, "eval": evaluate(natural, args.dataset, preset, args.device)}
    print(f"natural: {rows['natural (start)']['eval']['accuracy']}", flush=True)
    chosen = runs_for(preset)
    if args.methods:
        chosen = {k: v for k, v in chosen.items() if k in args.methods.split(",")}
    for name, method in chosen.items():
        run = out / name.replace(" ", "_").replace("(", "").replace(")", "")
        seconds = train(preset, args.dataset, run, method, preset.epochs, preset.lr, args.seed, init_from=str(natural))
        rows[name] = {"train_seconds": seconds, "method": method, "eval": evaluate(run, args.dataset, preset, args.device)}
        print(f"{name}: {rows[name]['eval']['accuracy']} in {seconds / 60:.1f} min", flush=True)
    table = markdown_table(rows)
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
        f"C&W-inf 30 steps), AutoAttack (standard) on the first {preset.autoattack_examples} of them. "
        f"One seed ({args.seed}): no run-to-run spread measured. "
        f"Total {total / 60:.1f} min on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"{datetime.date.today().isoformat()}."
    )
    print(table)
    print(note)
    (out / "tradeoff.md").write_text(table + "\n\n" + note + "\n")
    (out / "tradeoff.json").write_text(json.dumps({"preset": args.preset, "settings": settings, "seed": args.seed,
                                                   "total_seconds": total, "rows": rows, "note": note}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
