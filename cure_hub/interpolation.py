"""A dial between clean and robust accuracy: weight-space interpolation between the weights a
robust fine-tuning started from and the weights it reached,

    θ(λ) = (1 − λ) · θ_start + λ · θ_robust,

which traces a trade-off curve that can dominate single runs (Wortsman et al. 2022, "Robust
fine-tuning of zero-shot models"; for adversarial training, e.g. Croce et al. 2023, "Seasoning
model soups for robustness"). θ_start is ``weights/start.safetensors``, which the trainer writes
when the robust method starts (after the natural warm-up, or at step 0 from ``--init-from`` or
pretrained weights); θ_robust is the run's ``last``, ``best`` or ``revision`` weights.

Interpolated batch-norm statistics are not the statistics of the interpolated network, so they are
recomputed on training images (a cumulative average over a few batches, in eval-time
preprocessing) wherever the architecture has batch norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .config import BATCH_NORM_BATCHES, InputError
from .evaluation import evaluate_robustness, natural_robustness_ratio, strongest_attack
from .run_folder import RunFolder


def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """(1 − λ) · start + λ · end for every floating tensor, the others (batch counters) from
    ``end``; λ = 0 and λ = 1 return the end points themselves, exactly."""
    if start.keys() != end.keys():
        raise InputError(f"the start and robust weights hold different tensors: {sorted(start.keys() ^ end.keys())[:5]}")
    if lam in (0, 1):
        return {name: tensor.clone() for name, tensor in (start if lam == 0 else end).items()}
    return {name: torch.lerp(start[name].to(robust.dtype), robust, lam) if robust.is_floating_point() else robust.clone()
            for name, robust in end.items()}


def interpolated_model(run_dir: str | Path, weights: str, lam: float):
    """The run's model at θ(λ) between its start and its ``weights`` (batch-norm statistics as
    interpolated: see :func:`recompute_batch_norm`)."""
    if not 0 <= lam <= 1:
        raise InputError(f"λ must be in [0, 1] (0: the start, 1: the {weights} weights), got {lam}")
    model, start, end = _end_points(run_dir, weights)
    model.backbone.load_state_dict(interpolate_state(start, end, lam))
    return model


def _end_points(run_dir: str | Path, weights: str):
    """The run's model with its ``weights``, and the state dicts of the start and of those weights."""
    from .models import load_robust_model

    start_file = RunFolder(run_dir).weights_file("start")
    if not start_file.is_file():
        raise InputError(f"{run_dir} has no weights/start.safetensors: it was trained before cure-hub recorded the "
                         "weights a robust fine-tuning starts from; train it again to interpolate")
    model = load_robust_model(run_dir, weights=weights)
    return model, load_file(start_file), {k: v.clone() for k, v in model.backbone.state_dict().items()}


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches, max_batches: int = BATCH_NORM_BATCHES, device="cpu") -> int:
    """Replace the running statistics of every batch-norm layer by the exact average over
    ``max_batches`` batches of [0, 1] images (``(images, labels)`` pairs); every other layer stays
    in eval mode. Returns the number of layers recomputed (0: the model has no batch norm)."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    model.to(device).eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch weighs the same
        layer.train()
    try:
        for index, (images, _) in enumerate(batches):
            if index == max_batches:
                break
            model(images.to(device))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
            layer.eval()
    return len(layers)


def training_batches(run_dir: str | Path, batch_size: int = 128):
    """Batches of the run's own training images (its dataset, split and subset; a streamed
    run's stream, as its first epoch shuffled it), without augmentation."""
    from torch.utils.data import DataLoader

    from .config import TrainConfig
    from .data import load_data
    from .streaming import load_streamed_data

    config = TrainConfig.of_run(run_dir)
    data = load_streamed_data(config.data) if config.data.streaming else load_data(config.data)
    return DataLoader(data.train, batch_size=batch_size, collate_fn=data.train_collate)


TRADEOFF_FILE = "tradeoff.json"


def tradeoff_curve(run_dir: str | Path, weights: str, points: int, eval_batches, attacks: list[str],
                   epsilon: float, norm: str, device="cpu", bn_batches: int = BATCH_NORM_BATCHES, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate θ(λ) at ``points`` evenly spaced λ from 0 (the start) to 1 (the ``weights``):
    batch-norm statistics recomputed in between, each point with the same attacks on the same
    examples (``eval_batches``, a re-iterable of ``(images, labels)``), and the λ of the best NRR."""
    from tqdm.auto import tqdm

    if points < 2:
        raise InputError(f"--points must be at least 2 (the two end points), got {points}")
    robust = strongest_attack(attacks)  # the attack whose accuracy the curve's NRR uses
    if robust is None:
        raise InputError(f"the curve needs a robust attack besides clean (e.g. pgd20); got {attacks}")
    bn_loader = None
    rows = []
    model, start, end = _end_points(run_dir, weights)  # read once; every λ is loaded into the same model
    for index in tqdm(range(points), desc="tradeoff", unit="λ", disable=not progress):
        lam = index / (points - 1)
        model.backbone.load_state_dict(interpolate_state(start, end, lam))
        recomputed = 0
        if 0 < lam < 1 and batch_norm_layers(model):
            bn_loader = bn_loader or training_batches(run_dir)
            recomputed = recompute_batch_norm(model, bn_loader, bn_batches, device)
        results = evaluate_robustness(model, eval_batches, attacks,
                                      epsilon=epsilon, norm=norm, sanity_checks=False, device=device, seed=seed,
                                      progress=False)
        accuracy = results["accuracy"]
        rows.append({"lambda": lam, "accuracy": accuracy, "intervals": results["intervals"],
                     "nrr": natural_robustness_ratio(accuracy["clean"], accuracy[robust]),
                     "batch_norm_recomputed": bool(recomputed)})
    best = max(rows, key=lambda row: row["nrr"])
    return {
        "run": str(run_dir), "weights": weights, "n_examples": results["n_examples"], "norm": norm, "epsilon": epsilon,
        "attacks": attacks, "nrr_attack": robust, "points": rows, "best_lambda": best["lambda"], "bn_batches": bn_batches,
        "batch_norm": (f"recomputed for 0 < λ < 1 on {bn_batches} batches of the run's training images"
                       if any(row["batch_norm_recomputed"] for row in rows) else "none in this architecture"),
    }


def curve_point(curve: dict, lam: float) -> dict | None:
    return next((row for row in curve["points"] if abs(row["lambda"] - lam) < 1e-9), None)
