"""The clean/robust dial: θ(λ) between a run's start and its robust weights, exact at the end
points, batch norm recomputed in between, evaluated by `cure-hub tradeoff`, exported by
`cure-hub export --interpolate`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cure_hub.cli import main
from cure_hub.models import load_robust_model
from cure_hub.interpolation import (
    batch_norm_layers,
    interpolate_state,
    interpolated_model,
    recompute_batch_norm,
    training_batches,
)

TRADEOFF = ["--points", "3", "--n-examples", "40", "--attacks", "clean,pgd20", "--epsilon", "24/255", "--bn-batches", "2"]


def test_end_points_are_exact_and_the_middle_is_the_mean(natural_run):
    start = load_file(natural_run / "weights" / "start.safetensors")
    last = load_file(natural_run / "weights" / "last.safetensors")
    assert any(not torch.equal(start[k], last[k]) for k in start)
    for lam, expected in ((0.0, start), (1.0, last)):
        mixed = interpolate_state(start, last, lam)
        assert all(torch.equal(mixed[k], expected[k]) for k in expected)
    middle = interpolate_state(start, last, 0.5)
    for name, value in last.items():
        if value.is_floating_point():
            torch.testing.assert_close(middle[name], (start[name] + value) / 2, rtol=0, atol=1e-6)
        else:  # batch counters come from the robust end
            assert torch.equal(middle[name], value)


def test_batch_norm_statistics_are_recomputed_between_the_ends(natural_run):
    model = interpolated_model(natural_run, "last", 0.5)
    layers = batch_norm_layers(model)
    interpolated = [layer.running_var.clone() for layer in layers]
    assert recompute_batch_norm(model, training_batches(natural_run), max_batches=2) == len(layers) > 0
    ends = [load_file(natural_run / "weights" / f"{w}.safetensors") for w in ("start", "last")]
    names = [name for name, module in model.backbone.named_modules() if module in layers]
    for name, layer, before in zip(names, layers, interpolated):
        assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
        assert not torch.equal(layer.running_var, before)
        assert all(not torch.allclose(layer.running_var, end[f"{name}.running_var"]) for end in ends)
        assert not layer.training and layer.momentum == 0.1  # left as found


def test_tradeoff_command_and_interpolated_export(natural_run, tmp_path, capsys):
    run = natural_run
    assert main(["tradeoff", str(run), *TRADEOFF, "--output-dir", str(run / "tradeoff")]) == 0
    curve = json.loads((run / "tradeoff" / "tradeoff.json").read_text())
    assert [row["lambda"] for row in curve["points"]] == [0.0, 0.5, 1.0]
    assert [row["batch_norm_recomputed"] for row in curve["points"]] == [False, True, False]
    assert curve["best_lambda"] == max(curve["points"], key=lambda row: row["nrr"])["lambda"]
    assert (run / "tradeoff" / "tradeoff.png").stat().st_size > 1000
    # λ = 1 is the run's last weights, evaluated exactly as `cure-hub eval` evaluates them.
    assert main(["eval", str(run), "--dataset", "digits", "--n-examples", "40", "--attacks", "clean,pgd20",
                 "--epsilon", "24/255", "--output", str(tmp_path / "last.json")]) == 0
    assert curve["points"][-1]["accuracy"] == json.loads((tmp_path / "last.json").read_text())["accuracy"]
    assert curve["points"][0]["accuracy"]["clean"] < 0.5 < curve["points"][-1]["accuracy"]["clean"]  # random start

    export = tmp_path / "export"
    assert main(["export", str(run), str(export), "--interpolate", "0.5"]) == 0
    model = interpolated_model(run, "last", 0.5)
    recompute_batch_norm(model, training_batches(run), max_batches=2)
    exported = load_robust_model(export)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(exported.backbone.state_dict()[name], value), name
    card = (export / "README.md").read_text()
    assert "θ(λ = 0.5) = (1 − λ)·start + λ·last" in card and "| 0.5 (this model) |" in card
    training = json.loads((export / "training_config.json").read_text())
    assert training["interpolation"]["lambda"] == 0.5 and len(training["interpolation"]["curve"]) == 3

    assert main(["export", str(run), str(tmp_path / "other"), "--interpolate", "0.3"]) == 2
    assert "no point λ = 0.3 towards the last weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="λ must be in"):
        interpolated_model(run, "last", 1.5)
