"""AutoAttack's reliability checks fire on the models they are meant for, and stay silent on an
honest one: gradient masking (a rounding layer), randomness, probability outputs."""

import torch

from cure_hub.evaluation import evaluate_robustness
from cure_hub.evaluation_checks import outputs_are_probabilities
from helpers import Brightness


def evaluate(model, attacks=("clean", "pgd20")):
    labels = torch.arange(20) % 10
    noise = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    images = ((labels + 0.5) / 10).view(-1, 1, 1, 1) + 0.02 * noise
    # At 16/255 a shift of the mean by 0.05 changes the class: every honest attack wins.
    return evaluate_robustness(model, [(images, labels)], list(attacks), epsilon=16 / 255, progress=False)


def test_an_honest_model_raises_no_warning():
    results = evaluate(Brightness())
    assert results["accuracy"] == {"clean": 1.0, "pgd20": 0.0}
    assert results["warnings"] == [] and results["unreliable"] is False
    assert results["checks"] == {"randomized": False, "probabilities": False, "zero_gradient_share": 0.0,
                                 "large_epsilon_accuracy": 0.0}


def test_gradient_masking_fires_the_zero_gradient_and_square_checks():
    results = evaluate(Brightness(rounding=True), attacks=("clean", "pgd20", "aa"))
    assert results["accuracy"]["pgd20"] == 1.0  # PGD cannot move: every input gradient is zero
    assert results["checks"]["zero_gradient_share"] == 1.0
    assert results["checks"]["square_share"] > 0.2 and results["accuracy"]["aa"] < 0.8  # only Square breaks it
    assert any("gradient of exactly zero" in w for w in results["warnings"])
    assert any("Square attack broke" in w for w in results["warnings"])
    assert results["unreliable"] is True


def test_a_randomised_model_fires_the_randomness_check():
    results = evaluate(Brightness(noise=0.01))
    assert results["checks"]["randomized"] is True
    assert any("aa-rand" in w for w in results["warnings"])


def test_probability_outputs_fire_their_check():
    results = evaluate(Brightness(softmax=True))
    assert results["checks"]["probabilities"] is True
    assert any("outputs probabilities" in w for w in results["warnings"])
    assert not outputs_are_probabilities(torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.6, -0.1]]))
