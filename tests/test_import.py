"""``cure-hub import``: checkpoints saved the way RobustBench, MadryLab's robustness library, TRADES
and CURE save them (built here with random weights and the keys those code bases write, and one
that nobody here wrote: the natural CIFAR ResNet-18 the pyautoattack wheel ships) become exports
that give the original network's outputs through cure-hub and timm, with the reported numbers
attributed in their card."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import timm
import torch

from cure_hub.architectures import CifarResNet, CifarWideResNet
from cure_hub.cli import main as cli_main
from cure_hub.hub_results import SOURCE_URL, ThreatModel, robust_results
from cure_hub.models import load_robust_model

from hub_server import LOAD_SCRIPT, LoopbackHub, hub_env

MADRYLAB_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
RICE_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
#: A RobustBench model_info entry, as model_info/cifar10/Linf/Zhang2019Theoretically.json reads.
ENTRY = {"link": "https://arxiv.org/abs/1901.08573", "name": "Theoretically Principled Trade-off between Robustness and Accuracy",
         "authors": "Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, Laurent El Ghaoui, Michael I. Jordan",
         "additional_data": False, "number_forward_passes": 1, "dataset": "cifar10", "venue": "ICML 2019",
         "architecture": "WideResNet-10-2", "eps": "0.031", "clean_acc": "84.92", "reported": "56.43", "autoattack_acc": "53.08"}


def random_network(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight and batch-norm statistic random, so that a key loaded into the wrong place shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point():
                low = 0.5 if name.endswith("running_var") else -0.3
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.6 + low)
    return network.eval()


def save_in_layout(layout: str, folder: Path):
    """A checkpoint as ``layout``'s code base saves it; returns its path, the network, its
    normalisation and the flags the import needs."""
    if layout == "trades":  # torch.save(model.state_dict()) under DataParallel, with the unused sub_block1
        network = random_network(CifarWideResNet(depth=10, widen_factor=2), 0)
        unused = CifarWideResNet(depth=10, widen_factor=2).block1.state_dict()
        state = {**network.state_dict(), **{f"sub_block1.{key}": value for key, value in unused.items()}}
        saved, normalisation, flags = {f"module.{key}": value for key, value in state.items()}, None, ["--model", "cifar_wrn34_10"]
    elif layout == "cure":  # {"state": model.state_dict(), "epoch": ..., "precision": ...}
        network = random_network(CifarResNet(width=8), 1)
        saved, normalisation, flags = {"state": network.state_dict(), "epoch": 3, "precision": 51.2}, None, ["--model", "cifar_resnet18"]
    elif layout == "madrylab":  # DataParallel(AttackerModel): the network twice, its dataset's normaliser twice
        network = random_network(CifarResNet(width=8), 2)
        mean, std = (torch.tensor(values)[:, None, None] for values in MADRYLAB_CIFAR)
        state = {"normalizer.new_mean": mean, "normalizer.new_std": std, "attacker.normalizer.new_mean": mean,
                 "attacker.normalizer.new_std": std}
        for key, value in network.state_dict().items():
            state[f"model.{key}"] = state[f"attacker.model.{key}"] = value
        saved = {"model": {f"module.{key}": value for key, value in state.items()}, "optimizer": {"state": {}, "param_groups": []},
                 "schedule": None, "epoch": 150}
        normalisation, flags = MADRYLAB_CIFAR, ["--model", "cifar_resnet18"]
    else:  # RobustBench: {"state_dict": ...} of a model class that normalises with mu and sigma buffers
        network = random_network(CifarWideResNet(depth=10, widen_factor=2), 3)
        mu, sigma = (torch.tensor(values).view(1, 3, 1, 1) for values in RICE_CIFAR)
        # Weights under a wrapper's model. (RobustBench strips it for Chen2020Efficient), mu and sigma beside, under DataParallel.
        weights = {f"model.{key}": value for key, value in network.state_dict().items()}
        saved = {"state_dict": {f"module.{key}": value for key, value in {**weights, "mu": mu, "sigma": sigma}.items()}}
        entry = folder / "Linf" / "Zhang2019Theoretically.json"
        entry.parent.mkdir()
        entry.write_text(json.dumps(ENTRY))
        normalisation, flags = RICE_CIFAR, ["--model-info", str(entry)]
    path = folder / f"{layout}.pt"
    torch.save(saved, path)
    return path, network, normalisation, flags


def outputs(network, images, normalisation):
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalisation or ((0.0,) * 3, (1.0,) * 3))
    with torch.no_grad():
        return network((images - mean) / std)


IMAGES = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layout", ["trades", "cure", "madrylab", "robustbench"])
def test_each_layout_imports_to_the_original_network(layout, tmp_path, cifar10_dir):
    path, network, normalisation, flags = save_in_layout(layout, tmp_path)
    out = tmp_path / "import"
    assert cli_main(["import", str(path), str(out), "--layout", layout, "--dataset", cifar10_dir, *flags]) == 0
    expected = outputs(network, IMAGES, normalisation)
    model = load_robust_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), expected, rtol=0, atol=1e-6)
    assert model.spec.label_names[:2] == ["airplane", "automobile"]  # the dataset's classes, in its label order
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm alone: its own config's mean and std
    assert tuple(backbone.pretrained_cfg["mean"]) == model.spec.mean
    torch.testing.assert_close(outputs(backbone, IMAGES, (backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"])), expected,
                               rtol=0, atol=1e-6)
    record = json.loads((out / "import_config.json").read_text())
    assert record["layout"] == layout and record["checkpoint"] == path.name and len(record["checkpoint_sha256"]) == 64
    assert str(tmp_path) not in (out / "README.md").read_text() + (out / "import_config.json").read_text()


def test_the_natural_resnet_the_pyautoattack_wheel_ships_imports_to_its_own_network(tmp_path, cifar10_dir):
    """A checkpoint nobody here wrote: pyautoattack's examples/model_test.pt, against its own
    examples/resnet.py."""
    try:
        examples = Path(distribution("pyautoattack").locate_file("pyautoattack/examples"))
    except PackageNotFoundError:
        pytest.skip("pyautoattack is not installed")
    spec = importlib.util.spec_from_file_location("pyautoattack_resnet", examples / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = module.ResNet18()
    original.load_state_dict(torch.load(examples / "model_test.pt", map_location="cpu", weights_only=True))
    out = tmp_path / "import"
    assert cli_main(["import", str(examples / "model_test.pt"), str(out), "--layout", "trades", "--model", "cifar_resnet18",
                     "--dataset", cifar10_dir]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_robust_model(out)(IMAGES), original.eval()(IMAGES), rtol=0, atol=1e-5)
    assert json.loads((out / "eval_results.json").read_text()) == {}  # nothing reported, nothing measured
    assert load_robust_model(out).threat_model is None and robust_results(out) == []


def test_a_checkpoint_in_another_layout_or_of_another_network_is_refused_naming_its_keys(tmp_path, cifar10_dir, capsys):
    path, _, _, _ = save_in_layout("cure", tmp_path)
    out = tmp_path / "import"
    base = ["import", str(path), str(out), "--dataset", cifar10_dir]
    assert cli_main([*base, "--layout", "madrylab", "--model", "cifar_resnet18"]) == 2
    assert "where the madrylab layout keeps one (['model', 'state_dict']): found ['state', 'epoch', 'precision']" in capsys.readouterr().err
    torch.save({"model": {"module.conv1.weight": torch.zeros(1)}}, tmp_path / "bare.pt")  # nested as MadryLab's, not its keys
    assert cli_main(["import", str(tmp_path / "bare.pt"), *base[2:], "--layout", "madrylab", "--model", "cifar_resnet18"]) == 2
    assert "keys start with module.model. and module.normalizer.; this one's first keys are ['conv1.weight']" in capsys.readouterr().err
    assert cli_main([*base, "--layout", "cure", "--model", "cifar_preactresnet18"]) == 2  # another ResNet's keys
    error = capsys.readouterr().err
    assert "missing keys" in error and "'bn.bias'" in error and "unexpected keys" in error and "'bn1.bias'" in error
    assert len(error.strip().splitlines()) == 1
    assert cli_main([*base, "--layout", "cure", "--model", "cifar_resnet18", "--mean", "0.5,0.5,0.5"]) == 2  # no --std
    assert "--mean and --std go together" in capsys.readouterr().err
    assert cli_main([*base, "--layout", "cure", "--model", "cifar_resnet18", "--reported", "clean=0.9"]) == 2
    assert "--reported needs --reported-by" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".import.partial-*"))  # nothing half-written
    madrylab, _, _, flags = save_in_layout("madrylab", tmp_path)
    assert cli_main(["import", str(madrylab), str(out), "--dataset", cifar10_dir, "--layout", "madrylab", *flags,
                     "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]) == 2
    assert "saves its normalisation" in capsys.readouterr().err


@pytest.mark.slow
def test_robustbench_import_reported_and_measured_through_the_hub(tmp_path, cifar10_dir):
    """The third journey: an import whose card attributes RobustBench's numbers to RobustBench,
    measured again (--evaluate) beside them, pushed to the loopback Hub and read back there by
    cure-hub, timm and transformers."""
    path, network, normalisation, flags = save_in_layout("robustbench", tmp_path)
    out = tmp_path / "zhang2019"
    assert cli_main(["import", str(path), str(out), "--layout", "robustbench", *flags, "--dataset", cifar10_dir, "--evaluate",
                     "--attacks", "clean", "--n-examples", "20", "--repo-id", "tester/zhang2019"]) == 0
    read = robust_results(out)
    reported = [r for r in read if r.source_name == "RobustBench (Zhang2019Theoretically)"]
    measured = [r for r in read if r.source_name.startswith("cure-hub ")]
    assert [(r.attack, r.accuracy) for r in reported] == [("clean", 0.8492), ("aa", 0.5308)]
    assert {(r.dataset, r.split, r.n_examples, r.source_url, r.dataset_config) for r in reported} == {
        ("uoft-cs/cifar10", "test", 10000, "https://robustbench.github.io", "Linf-0.031 (reported by RobustBench (Zhang2019Theoretically))")}
    assert all(r.threat_model == ThreatModel("linf", 0.031) for r in read)
    assert [(r.attack, r.n_examples, r.dataset_config, r.source_url) for r in measured] == [("clean", 20, "Linf-0.031", SOURCE_URL)]
    assert measured[0].interval is not None
    card = (out / "README.md").read_text()
    assert "Reported by [RobustBench (Zhang2019Theoretically)]" in card and "The paper itself reports 56.43 %" in card
    assert "Measured by cure-hub" in card and "cure-hub import robustbench.pt zhang2019 --layout robustbench" in card

    with LoopbackHub() as hub:
        env = hub_env(hub, tmp_path / "home")
        pushed = subprocess.run([sys.executable, "-m", "cure_hub.cli", "push", str(out), "--repo-id", "tester/zhang2019"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        torch.save(IMAGES, tmp_path / "input.pt")
        loaded = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, "tester/zhang2019", "timm", str(tmp_path)], env=env,
                                capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits, expected = torch.load(tmp_path / "logits.pt"), outputs(network, IMAGES, normalisation)
    for library in ("cure_hub", "timm", "transformers"):
        torch.testing.assert_close(logits[library], expected, rtol=1e-5, atol=1e-5, msg=library)
    assert robust_results(tmp_path / "README.md") == read  # the card read from the Hub loses nothing
    assert json.loads((tmp_path / "robust_results.json").read_text())["threat_model"] == "Linf-0.031"
