"""Signs that a robustness evaluation is not to be trusted.

Two families. The gradient-masking checks compare attacks: a stronger attack of a family must not
leave more examples standing than a weaker one, and accuracy must fall towards zero as ε grows.
The reliability checks are AutoAttack's own (Croce & Hein 2020, ``autoattack/checks.py`` and its
``flags_doc.md``), with its thresholds: a model whose outputs change between forward passes is
randomised (evaluate it with ``aa-rand``); outputs that are probabilities rather than logits
flatten the losses the attacks climb; input gradients that are exactly zero stall every
gradient-based attack; and the black-box Square attack breaking examples that all white-box
attacks left standing means the white-box attacks were misled.
"""

from __future__ import annotations

import torch

from .losses import cw_margin

#: Each attack and the weaker attacks it contains or dominates: its accuracy must not be higher.
AT_LEAST_AS_STRONG_AS = {
    "pgd100": ("pgd20",),
    "apgd-ce": ("pgd20", "pgd100"),
    "aa": ("pgd20", "pgd100", "cw", "apgd-ce"),
    "aa-rand": ("pgd20", "pgd100", "cw", "apgd-ce"),
}
#: AutoAttack's thresholds: max. L2 distance between normalised outputs of two passes
#: (``check_randomized``), slack of the probability test (``check_range_output``), share of examples
#: only Square broke (``check_square_sr``).
RANDOMNESS_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
SQUARE_TOLERANCE = 0.002
#: Forward passes compared by the randomness check (AutoAttack's ``n``).
RANDOMNESS_PASSES = 5
#: A radius at which an honest l-inf attack leaves (almost) nothing standing: every pixel may move
#: a quarter of its range.
LARGE_EPSILON = 64 / 255
#: A large-ε PGD accuracy above this means the attack cannot move the prediction at all.
LARGE_EPSILON_TOLERANCE = 0.2


def gradient_masking_warnings(accuracy: dict[str, float], large_epsilon_accuracy: float | None = None) -> list[str]:
    """A stronger attack of a family doing worse than a weaker one, AutoAttack doing worse than
    PGD, or accuracy that survives a huge ε."""
    warnings = []
    for strong, weaker in AT_LEAST_AS_STRONG_AS.items():
        for weak in weaker:
            if strong in accuracy and weak in accuracy and accuracy[strong] > accuracy[weak] + 1e-9:
                warnings.append(
                    f"{strong} ({accuracy[strong]:.4f}) is weaker than {weak} ({accuracy[weak]:.4f}): "
                    "a stronger attack should not leave more examples standing; gradient masking?"
                )
    if large_epsilon_accuracy is not None and large_epsilon_accuracy > LARGE_EPSILON_TOLERANCE:
        warnings.append(
            f"PGD-20 at eps = {LARGE_EPSILON * 255:.0f}/255 still leaves {large_epsilon_accuracy:.4f} accuracy: "
            "robust accuracy should fall towards zero as eps grows; gradient masking?"
        )
    for name, value in accuracy.items():
        if name != "clean" and value > accuracy["clean"] + 1e-9:
            warnings.append(f"{name} accuracy ({value:.4f}) is above clean accuracy ({accuracy['clean']:.4f})")
    return warnings


@torch.no_grad()
def outputs_are_random(model: torch.nn.Module, images: torch.Tensor, logits: torch.Tensor) -> bool:
    """AutoAttack's ``check_randomized``: do the predictions, or the L2-normalised outputs, of
    ``RANDOMNESS_PASSES`` forward passes of the same images differ?"""
    outputs = [logits] + [model(images) for _ in range(RANDOMNESS_PASSES - 1)]
    predictions = [o.argmax(1) for o in outputs]
    normalised = [o.float() / (o.float().norm(dim=1, keepdim=True) + 1e-10) for o in outputs]
    differ = max((a - b).norm(dim=1).max().item() for i, a in enumerate(normalised) for b in normalised[i + 1:])
    return differ > RANDOMNESS_TOLERANCE or any(not torch.equal(p, predictions[0]) for p in predictions)


def outputs_are_probabilities(logits: torch.Tensor) -> bool:
    """AutoAttack's ``check_range_output``: every output in [0, 1] and every row summing to 1."""
    logits = logits.float()
    return bool(logits.max() < 1 + PROBABILITY_TOLERANCE and logits.min() > -PROBABILITY_TOLERANCE
                and ((logits.sum(1) - 1).abs() < PROBABILITY_TOLERANCE).all())


def zero_input_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AutoAttack's ``check_zero_gradients``, per example: is the input gradient exactly zero at the
    clean image? AutoAttack takes the gradient of its DLR loss at APGD-DLR's start; this takes the
    margin loss (DLR's numerator), whose gradient does not vanish through a saturated softmax as
    cross-entropy's does, and exists for two classes too."""
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(cw_margin(model(images), labels).sum(), images)
    return grad.flatten(1).abs().sum(1) == 0


def reliability_warnings(checks: dict, attacks: tuple[str, ...]) -> list[str]:
    """The warnings of AutoAttack's checks, from the summary in ``results["checks"]``."""
    warnings = []
    if checks.get("randomized") and "aa-rand" not in attacks:
        warnings.append("the model's outputs change between two forward passes of the same images: a randomised "
                        "defence; evaluate it with --attacks clean,aa-rand (AutoAttack's EOT version)")
    if checks.get("probabilities"):
        warnings.append("the model outputs probabilities (in [0, 1], summing to 1), not logits: the attacks' losses "
                        "saturate; evaluate the logits (remove the final softmax)")
    if checks.get("zero_gradient_share"):
        warnings.append(f"{checks['zero_gradient_share']:.1%} of the correctly classified examples have an input "
                        "gradient of exactly zero: gradient-based attacks cannot start from them; gradient masking?")
    if checks.get("square_share", 0) > SQUARE_TOLERANCE:
        warnings.append(f"the black-box Square attack broke {checks['square_share']:.2%} of the examples that every "
                        "white-box attack of AutoAttack left standing: the white-box attacks were misled; consider "
                        "an adaptive attack or Square with more queries and restarts")
    return warnings
