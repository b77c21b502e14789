"""PNG plots of evaluation results and training runs (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .run_folder import LAYER_STATISTICS, METRICS, RunFolder


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(results: dict, path: Path) -> str:
    """The model's short name, with the weights of a run that were evaluated (several weights of
    one run get several labels)."""
    name = Path(str(results["model"])).name if results.get("model") else path.stem
    return f"{name} ({results['weights']})" if results.get("weights") else name


def plot_eps_sweep(results_files: list[Path], output: Path) -> Path | None:
    """PGD-20 accuracy against ε, one line per results file that has a sweep."""
    runs = [(p, json.loads(p.read_text())) for p in results_files]
    runs = [(p, r) for p, r in runs if r.get("eps_sweep")]
    if not runs:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    ticks = set()
    for path, results in runs:
        eps = [float(k.split("/")[0]) for k in results["eps_sweep"]]
        ticks.update(eps)
        axes.plot(eps, list(results["eps_sweep"].values()), marker="o", label=_label(results, path))
    axes.set(xscale="log", xlabel="ε (× 1/255)", ylabel="PGD-20 accuracy", ylim=(0, 1), title="Accuracy against ε")
    # One label per ε evaluated, none of the log axis's own (which overprint at these values).
    axes.minorticks_off()
    axes.set_xticks(sorted(ticks), [f"{e:g}" for e in sorted(ticks)])
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_tradeoff(results_files: list[Path], output: Path, robust: str = "pgd20") -> Path | None:
    """Clean against robust accuracy, one point per results file."""
    points = []
    for path in results_files:
        results = json.loads(path.read_text())
        accuracy = results["accuracy"]
        name = robust if robust in accuracy else next((a for a in ("aa", "cw", "pgd100", "pgd20") if a in accuracy), None)
        if name:
            points.append((accuracy["clean"], accuracy[name], _label(results, path), name))
    if len(points) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4))
    markers = "osD^vP*X"
    for index, (clean, rob, label, name) in enumerate(points):  # a legend: labels of close points would overprint
        axes.scatter(clean, rob, marker=markers[index % len(markers)], s=40, label=f"{label}: {name}")
    axes.set(xlabel="clean accuracy", ylabel="robust accuracy", xlim=(0, 1), ylim=(0, 1), title="Clean–robust trade-off")
    axes.set_aspect("equal")
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_training(run_dir: Path, output: Path) -> Path | None:
    """Clean and PGD accuracy of the evaluations during a run: robust overfitting shows here. A
    run evaluated once has no curve to draw."""
    records = RunFolder(run_dir).read_log(METRICS)
    evals = [r for r in records if "eval/clean_acc" in r]
    if len(evals) < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    steps = [r["step"] for r in evals]
    for key in [k for k in evals[-1] if k.startswith("eval/")]:
        axes.plot(steps, [r.get(key) for r in evals], marker="o", label=key.removeprefix("eval/"))
    axes.set(xlabel="optimiser step", ylabel="accuracy", ylim=(0, 1), title=f"Training: {run_dir.name}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_layer_statistics(run_dir: Path, output: Path) -> Path | None:
    """CURE's Figure 6: per masked weight tensor, the share of entries updated and the mean
    gradient magnitude, at the first and the last logged step of a run (from two logged steps
    on). A dashed line marks the share the mask keeps, 1 - p/100: a bar below it counts entries
    whose gradient was exactly zero (a 3x3 kernel on a 1x1 feature map sees padding at all but its
    centre tap, so 1/9 of it moves)."""
    folder = RunFolder(run_dir)
    records = folder.read_log(LAYER_STATISTICS)
    if len(records) < 2:  # nothing to set the last step against
        return None
    percentile = folder.read_config()["method"].get("percentile")
    first, last = records[0], records[-1]
    # Weight matrices and kernels only: normalisation weights and biases would crowd the axis.
    names = [n for n, layer in last["layers"].items() if layer["ndim"] >= 2]
    plt = _pyplot()
    figure, (share_axes, magnitude_axes) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(names)), 6), sharex=True)
    positions = range(len(names))
    for record, offset in ((first, -0.2), (last, 0.2)):
        layers = record["layers"]
        label = f"step {record['step']}"
        share_axes.bar([i + offset for i in positions], [layers[n]["updated_share"] for n in names], width=0.4, label=label)
        magnitude_axes.bar([i + offset for i in positions], [layers[n]["grad_magnitude"] for n in names], width=0.4, label=label)
    if percentile is not None:
        share_axes.axhline(1 - percentile / 100, color="black", linestyle="--", linewidth=1, label=f"kept by the mask (p = {percentile:g})")
    share_axes.set(ylabel="share updated (non-zero)", ylim=(0, 1.25), yticks=[0, 0.25, 0.5, 0.75, 1],
                   title=f"CURE masks: {run_dir.name}")
    magnitude_axes.set(ylabel="mean |gradient|", yscale="log")
    magnitude_axes.set_xticks(list(positions), [n.removeprefix("backbone.") for n in names], rotation=90, fontsize="x-small")
    share_axes.legend(fontsize="small", ncols=3, loc="upper left")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_corruptions(results_files: list[Path], output: Path) -> Path | None:
    """Accuracy under each natural corruption (mean over the severities evaluated), one group of
    bars per corruption and a bar per results file, with the clean accuracy as a line."""
    runs = [(p, json.loads(p.read_text())) for p in results_files]
    runs = [(p, r) for p, r in runs if r.get("corruptions")]
    if not runs:
        return None
    plt = _pyplot()
    names = list(dict.fromkeys(key.split("/")[0] for _, r in runs for key in r["corruptions"]))
    figure, axes = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 3.8))
    width = 0.8 / len(runs)
    for i, (path, results) in enumerate(runs):
        means = [sum(v for k, v in results["corruptions"].items() if k.split("/")[0] == name)
                 / max(1, sum(k.split("/")[0] == name for k in results["corruptions"])) for name in names]
        bars = axes.bar([j + i * width for j in range(len(names))], means, width,
                        label=f"{_label(results, path)} (mean {results['corruption_mean']:.3f})")
        axes.axhline(results["accuracy"]["clean"], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    severities = sorted({k.split("/")[1] for _, r in runs for k in r["corruptions"]})
    axes.set(ylabel="accuracy", ylim=(0, 1), title=f"Natural corruptions (severity {', '.join(severities)}; dashed: clean)")
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.replace("_", " ") for n in names],
                    rotation=45, ha="right", fontsize="small")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def plot_interpolation(curve_file: Path, output: Path) -> Path:
    """The clean/robust curve of θ(λ) (``cure-hub tradeoff``), λ written at each point and the
    best NRR starred."""
    curve = json.loads(Path(curve_file).read_text())
    robust = curve["nrr_attack"]
    clean = [row["accuracy"]["clean"] for row in curve["points"]]
    attacked = [row["accuracy"][robust] for row in curve["points"]]
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot(clean, attacked, marker="o", label=f"θ(λ), start → {curve['weights']}")
    for row, x, y in zip(curve["points"], clean, attacked):
        axes.annotate(f"{row['lambda']:.2g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    best = next(i for i, row in enumerate(curve["points"]) if row["lambda"] == curve["best_lambda"])
    axes.scatter([clean[best]], [attacked[best]], marker="*", s=200, color="tab:red", zorder=3,
                 label=f"best NRR (λ = {curve['best_lambda']:.2g})")
    axes.set(xlabel="clean accuracy", ylabel=f"{robust} accuracy", title=f"Interpolation dial ({curve['n_examples']} examples)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def write_plots(inputs: list[str], output_dir: str) -> list[Path]:
    """Every plot the inputs allow: results JSON files and training run folders."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in inputs]
    results_files = [p for p in paths if p.is_file()]
    written = [plot_eps_sweep(results_files, out / "eps_sweep.png"), plot_tradeoff(results_files, out / "tradeoff.png"),
               plot_corruptions(results_files, out / "corruptions.png")]
    for run in (p for p in paths if p.is_dir()):
        written.append(plot_training(run, out / f"training_{run.name}.png"))
        written.append(plot_layer_statistics(run, out / f"layer_statistics_{run.name}.png"))
    return [p for p in written if p is not None]
