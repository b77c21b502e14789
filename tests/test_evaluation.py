import json
import logging
import shutil

import numpy as np
import pytest
import torch

import cure_hub
from cure_hub.cli import main
from cure_hub.config import DataConfig
from cure_hub.data import collate, load_eval_split
from cure_hub.evaluation import evaluate_robustness, gradient_masking_warnings, natural_robustness_ratio, wilson_interval
from cure_hub.hub import export_run
from cure_hub.models import load_robust_model

RESULT_KEYS = {"model", "dataset", "split", "split_examples", "n_examples", "norm", "epsilon", "accuracy", "intervals", "nrr",
               "eps_sweep", "checks", "warnings", "unreliable"}


@pytest.fixture(scope="module")
def evaluation(natural_run, tmp_path_factory):
    """8x8 digits resist 8/255 even when trained naturally; 32/255 lets the attacks bite (and leaves
    AutoAttack's slower attacks few examples: half the time of 24/255)."""
    output = tmp_path_factory.mktemp("eval")
    code = main([
        "eval", str(natural_run), "--dataset", "digits", "--n-examples", "20", "--attacks", "clean,pgd20,pgd100,cw,aa",
        "--epsilon", "32/255", "--eps-sweep", "--output", str(output / "results.json"), "--plots", str(output / "plots"),
    ])
    assert code == 0
    return json.loads((output / "results.json").read_text()), output


def test_results_have_the_documented_shape(evaluation):
    results, _ = evaluation
    assert RESULT_KEYS <= set(results)
    assert results["n_examples"] == 20 and results["norm"] == "linf" and results["epsilon"] == pytest.approx(32 / 255)
    assert set(results["accuracy"]) == {"clean", "pgd20", "pgd100", "cw", "aa"}
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
    assert list(results["eps_sweep"]) == ["0.25/255", "0.5/255", "1/255", "2/255", "4/255", "8/255"]
    assert results["interval_method"] == "Wilson score interval, 95 %"
    for name, accuracy in results["accuracy"].items():
        assert results["intervals"][name] == list(wilson_interval(round(accuracy * 20), 20))


def test_wilson_interval_equals_a_hand_computation():
    # 8 of 10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10)
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 50)[0] == 0.0 and 0.07 < wilson_interval(0, 50)[1] < 0.072  # sound at 0 %
    assert wilson_interval(500, 1000) == pytest.approx((0.4691, 0.5309), abs=1e-4)


def test_stronger_attacks_leave_fewer_examples_standing(evaluation):
    accuracy = evaluation[0]["accuracy"]
    assert accuracy["clean"] >= accuracy["pgd20"] >= accuracy["pgd100"]
    assert accuracy["aa"] <= accuracy["pgd20"]
    assert accuracy["clean"] > 0.8 and accuracy["pgd20"] < accuracy["clean"] - 0.2  # the attacks did something
    sweep = list(evaluation[0]["eps_sweep"].values())
    assert sweep == sorted(sweep, reverse=True) and sweep[0] > sweep[-1]
    assert evaluation[0]["worst_case"] <= min(v for k, v in accuracy.items() if k != "clean")


def test_nrr_is_the_harmonic_mean(evaluation):
    results = evaluation[0]
    accuracy = results["accuracy"]
    for key in ("cw", "aa"):
        expected = 2 * accuracy["clean"] * accuracy[key] / (accuracy["clean"] + accuracy[key])
        assert results["nrr"][key] == pytest.approx(expected)
    assert natural_robustness_ratio(0.8, 0.5) == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    assert natural_robustness_ratio(0.0, 0.0) == 0.0


def test_plots_are_written(evaluation, natural_run, tmp_path):
    _, output = evaluation
    assert (output / "plots" / "eps_sweep.png").stat().st_size > 1000
    other = json.loads((output / "results.json").read_text())
    other["model"], other["accuracy"]["clean"] = "other", 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["plot", str(output / "results.json"), str(tmp_path / "other.json"), str(natural_run), "--output-dir", str(tmp_path / "p")]) == 0
    for name in ("eps_sweep.png", "tradeoff.png", "training_run.png"):
        assert (tmp_path / "p" / name).stat().st_size > 1000


def test_subset_is_deterministic(natural_run, tmp_path):
    outputs = []
    for i in range(2):
        main(["eval", str(natural_run), "--dataset", "digits", "--n-examples", "30", "--attacks", "clean",
              "--output", str(tmp_path / f"{i}.json")])
        outputs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    assert outputs[0]["accuracy"] == outputs[1]["accuracy"] and outputs[0]["n_examples"] == 30


def test_eval_in_the_channels_last_layout_gives_the_same_results(natural_run, tmp_path, caplog):
    results = []
    for flags in ([], ["--channels-last"]):
        output = tmp_path / f"{len(flags)}.json"
        with caplog.at_level(logging.INFO, logger="cure_hub"):
            assert main(["eval", str(natural_run), "--dataset", "digits", "--n-examples", "30", "--attacks", "clean,pgd20",
                         "--output", str(output), *flags]) == 0
        results.append(json.loads(output.read_text())["accuracy"])
    assert "pgd20 at eps 0.03137 (linf), channels-last" in caplog.text
    assert results[0]["clean"] == results[1]["clean"]
    assert abs(results[0]["pgd20"] - results[1]["pgd20"]) <= 1 / 30  # float rounding may move one example


def test_checkpoint_with_architecture_name(natural_run, tmp_path):
    model = load_robust_model(natural_run)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.backbone.state_dict().items()}}, tmp_path / "ckpt.pth")
    main(["eval", "cifar_resnet18", "--checkpoint", str(tmp_path / "ckpt.pth"), "--model-kwargs", "width=8",
          "--dataset", "digits", "--n-examples", "30", "--attacks", "clean", "--output", str(tmp_path / "a.json")])
    main(["eval", str(natural_run), "--dataset", "digits", "--n-examples", "30", "--attacks", "clean",
          "--output", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["accuracy"] == b["accuracy"]


def test_gradient_masking_warnings():
    assert gradient_masking_warnings({"clean": 0.9, "pgd20": 0.5, "pgd100": 0.45, "aa": 0.4}) == []
    warnings = gradient_masking_warnings({"clean": 0.9, "pgd20": 0.5, "pgd100": 0.55, "aa": 0.6}, large_epsilon_accuracy=0.4)
    assert any(w.startswith("pgd100") for w in warnings) and any(w.startswith("aa") for w in warnings)
    assert any("64/255" in w for w in warnings)


def test_unknown_attack_and_autoattack_on_two_classes(natural_run, capsys):
    assert main(["eval", str(natural_run), "--dataset", "digits", "--attacks", "clean,fgsm"]) == 2
    assert "unknown attack(s) ['fgsm']" in capsys.readouterr().err
    two_classes = cure_hub.create_model("cifar_resnet18", num_classes=2, width=4)
    batch = [(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="at least 4 classes.*Use apgd-ce"):
        evaluate_robustness(two_classes, batch, ["clean", "aa"], progress=False)


def test_plot_labels_name_the_run_and_its_weights(tmp_path):
    from cure_hub.plots import _label

    assert _label({"model": str(tmp_path / "runs" / "quickstart"), "weights": "best"}, tmp_path / "r.json") == "quickstart (best)"
    assert _label({"model": "you/cure-digits", "weights": None}, tmp_path / "r.json") == "cure-digits"
    assert _label({}, tmp_path / "results_a.json") == "results_a"


@pytest.fixture(scope="module")
def corrupted_digits(tmp_path_factory):
    """A copy of the digits test split in CIFAR-10-C's layout: ``gaussian_noise`` holds the clean
    images at severity 3 and black ones at the others, ``fog`` black images throughout."""
    clean = load_eval_split(DataConfig(dataset="digits")).dataset
    images = np.stack([example["image"].permute(1, 2, 0).numpy() for example in clean])
    labels = np.array([example["label"] for example in clean])
    copy = tmp_path_factory.mktemp("digits-c")
    np.save(copy / "labels.npy", np.tile(labels, 5))
    np.save(copy / "gaussian_noise.npy", np.concatenate([images if s == 3 else 0 * images for s in range(1, 6)]))
    np.save(copy / "fog.npy", np.zeros((5 * len(images), *images.shape[1:]), np.uint8))
    return copy


def test_corruptions_are_read_from_a_copy_of_the_published_data(natural_run, corrupted_digits, tmp_path):
    output = tmp_path / "results.json"
    assert main(["eval", str(natural_run), "--dataset", "digits", "--n-examples", "40", "--attacks", "clean",
                 "--corruptions", "gaussian_noise,fog", "--corruptions-dataset", str(corrupted_digits),
                 "--output", str(output), "--plots", str(tmp_path / "plots")]) == 0
    results = json.loads(output.read_text())
    # The subset's examples are read at their positions in the whole split: severity 3 of
    # gaussian_noise is the clean image itself.
    assert results["corruptions"]["gaussian_noise/3"] == results["accuracy"]["clean"] > 0.8
    subset_labels = np.array([e["label"] for e in load_eval_split(DataConfig(dataset="digits"), 40).dataset])
    black = load_robust_model(natural_run)(torch.zeros(1, 3, 8, 8)).argmax().item()
    assert results["corruptions"]["fog/3"] == pytest.approx(np.mean(subset_labels == black))
    assert results["corruption_mean"] == pytest.approx((results["corruptions"]["gaussian_noise/3"] + results["corruptions"]["fog/3"]) / 2)
    assert results["corruption_intervals"]["fog/3"] == list(wilson_interval(round(40 * results["corruptions"]["fog/3"]), 40))
    assert (tmp_path / "plots" / "corruptions.png").stat().st_size > 1000
    card = (export_run(natural_run, tmp_path / "export", eval_results=output) / "README.md").read_text()
    assert "### Natural corruptions" in card and "| fog (3) |" in card


def imagenet_c_contrast(x, severity=1):
    """hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py (commit 8190fe3), verbatim: the
    published definition that imagecorruptions implements."""
    c = [0.4, .3, .2, .1, .05][severity - 1]

    x = np.array(x) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def test_generated_corruptions_follow_the_published_definition_and_their_own_seeds(cifar10_dir):
    """Contrast at severity 3 of a CIFAR-10 test image is the reference code's output (to the
    uint8 cast imagecorruptions applies); a random corruption depends on the example and the seed,
    not on which batch it is in, and NumPy's global generator is left as it was."""
    from cure_hub.corruptions import GeneratedCorruptions

    images, labels = collate([load_eval_split(DataConfig(dataset=cifar10_dir), 20).dataset[i] for i in range(4)])
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    contrast = GeneratedCorruptions(("contrast",), (3,)).batch([0, 1, 2, 3], images, labels)["contrast/3"]
    expected = np.stack([np.uint8(imagenet_c_contrast(image, 3)) for image in pixels])
    np.testing.assert_array_equal((contrast * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), expected)
    assert contrast.shape == images.shape and contrast.dtype == torch.float32

    noise = GeneratedCorruptions(("gaussian_noise", "glass_blur"), (3,), seed=1)
    state = np.random.get_state()
    whole = noise.batch([10, 11, 12, 13], images, labels)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state) if isinstance(a, np.ndarray))
    halves = [noise.batch([10, 11], images[:2], labels[:2]), noise.batch([12, 13], images[2:], labels[2:])]
    for key in whole:
        assert torch.equal(whole[key], torch.cat([half[key] for half in halves]))
    other_seed = GeneratedCorruptions(("gaussian_noise",), (3,), seed=2).batch([10, 11, 12, 13], images, labels)
    other_examples = noise.batch([20, 21, 22, 23], images, labels)
    assert not torch.equal(other_seed["gaussian_noise/3"], whole["gaussian_noise/3"])
    assert not torch.equal(other_examples["gaussian_noise/3"], whole["gaussian_noise/3"])


def test_generated_corruptions_reach_the_results_and_the_card(cifar10_dir, tmp_path):
    """Without --corruptions-dataset the corruptions are generated, and results.json and the card
    say so (ImageNet-C's parameters, not comparable with CIFAR-10-C)."""
    from cure_hub import create_model

    checkpoint = tmp_path / "model.pth"
    torch.save(create_model("cifar_resnet18", num_classes=10, image_size=32, width=4).backbone.state_dict(), checkpoint)
    output = tmp_path / "results.json"
    assert main(["eval", "cifar_resnet18", "--checkpoint", str(checkpoint), "--model-kwargs", "width=4", "--dataset",
                 cifar10_dir, "--n-examples", "20", "--attacks", "clean", "--corruptions", "contrast,fog",
                 "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert set(results["corruptions"]) == {"contrast/3", "fog/3"}
    assert results["corruptions_source"].startswith("generated by imagecorruptions-imaug")
    assert "not comparable with CIFAR-10-C" in results["corruptions_source"]


def test_corruption_mistakes_are_one_line_errors(natural_run, corrupted_digits, tmp_path, capsys):
    base = ["eval", str(natural_run), "--dataset", "digits", "--n-examples", "20", "--attacks", "clean"]
    for extra, message in (
        (["--corruptions", "fog"], "imagecorruptions needs images of at least 32x32 pixels, and these are 8x8"),
        (["--corruptions", "fogg", "--corruptions-dataset", str(corrupted_digits)], "unknown corruption(s) ['fogg']"),
        (["--corruptions", "fog", "--severities", "6", "--corruptions-dataset", str(corrupted_digits)], "among 1-5"),
        (["--corruptions", "snow", "--corruptions-dataset", str(corrupted_digits)], "lacks snow.npy"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    shuffled = tmp_path / "shuffled"
    shutil.copytree(corrupted_digits, shuffled)
    labels = np.load(shuffled / "labels.npy")
    np.save(shuffled / "labels.npy", np.roll(labels, 1))
    assert main(base + ["--corruptions", "fog", "--corruptions-dataset", str(shuffled)]) == 2
    assert "it is not the corrupted copy of this split" in capsys.readouterr().err


def test_every_attack_is_one_entry_that_cards_and_the_dial_read():
    from cure_hub.evaluation import ATTACKS, strongest_attack
    from cure_hub.hub import ATTACK_NAMES

    assert strongest_attack(["clean", "pgd20", "cw", "pgd100"]) == "cw"
    assert strongest_attack(["pgd20", "aa", "aa-rand"]) == "aa" and strongest_attack(["clean"]) is None
    assert ATTACK_NAMES == {name: spec.title for name, spec in ATTACKS.items()} and ATTACK_NAMES["cw"] == "C&W (CW-inf)"
    assert len({spec.strength for spec in ATTACKS.values()}) == len(ATTACKS)  # a strict order for the NRR
