"""The robustness suite: clean, PGD-20/100, C&W, AutoAttack, NRR, an epsilon sweep, and checks
against gradient masking. Every attack runs on the same examples in fp32, model in eval mode."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .attacks import pgd_attack
from .config import AttackConfig, InputError

logger = logging.getLogger(__name__)

#: How AutoAttack, RobustBench and model cards name the norms.
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
#: ε values of the sweep, in units of 1/255 (the paper's Figure 5b).
EPS_SWEEP = (0.25, 0.5, 1, 2, 4, 8)
#: A radius at which an honest l-inf attack leaves (almost) nothing standing: every pixel may move
#: a quarter of its range.
LARGE_EPSILON = 64 / 255


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One named evaluation attack: a PGD variant or an AutoAttack version."""

    name: str
    description: str
    pgd_loss: str | None = None
    pgd_steps: int = 0
    autoattack_version: str | None = None
    autoattack_attacks: tuple[str, ...] | None = None


ATTACKS = {
    spec.name: spec
    for spec in (
        AttackSpec("clean", "no attack"),
        AttackSpec("pgd20", "PGD-20 on cross-entropy, uniform start, step eps/4", "ce", 20),
        AttackSpec("pgd100", "PGD-100 on cross-entropy, uniform start, step eps/4", "ce", 100),
        AttackSpec("cw", "PGD-30 on the Carlini-Wagner margin (CW-inf), uniform start, step eps/4", "cw", 30),
        AttackSpec("apgd-ce", "AutoAttack's APGD-CE alone", autoattack_version="custom", autoattack_attacks=("apgd-ce",)),
        AttackSpec("aa", "AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square)", autoattack_version="standard"),
        AttackSpec("aa-rand", "AutoAttack, rand version (for randomised defences)", autoattack_version="rand"),
    )
}

#: Each attack and the weaker attacks it contains or dominates: its accuracy must not be higher.
AT_LEAST_AS_STRONG_AS = {
    "pgd100": ("pgd20",),
    "apgd-ce": ("pgd20", "pgd100"),
    "aa": ("pgd20", "pgd100", "cw", "apgd-ce"),
    "aa-rand": ("pgd20", "pgd100", "cw", "apgd-ce"),
}


def natural_robustness_ratio(natural: float, robust: float) -> float:
    """NRR = 2 · Nat · Rob / (Nat + Rob), the harmonic mean of clean and robust accuracy."""
    return 0.0 if natural + robust == 0 else 2 * natural * robust / (natural + robust)


#: How every accuracy's 95 % confidence interval is computed (results.json, model cards).
INTERVAL_METHOD = "Wilson score interval, 95 %"


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of ``correct`` out of ``n``: unlike the normal
    approximation it stays inside [0, 1] and is sound at 0 % and 100 % and for small ``n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def check_model_fits_data(spec, image_size: int, class_names: list[str]) -> None:
    """Refuse to evaluate a model on images of another size or with another number of classes
    (the accuracy would be a meaningless number); warn when only the class names differ."""
    if spec.image_size != image_size:
        raise InputError(
            f"the model was trained on {spec.image_size} px images, the evaluation data has {image_size} px images: "
            f"evaluate it on the data it was trained for, or pass --image-size {spec.image_size} to resize"
        )
    if spec.num_classes != len(class_names):
        raise InputError(
            f"the model has {spec.num_classes} classes, the evaluation data {len(class_names)} ({class_names[:5]}...): "
            "evaluate it on the data it was trained for"
        )
    if spec.label_names and list(spec.label_names) != list(class_names):
        logger.warning("the model's classes %s are not the data's %s; accuracy compares label indices",
                       list(spec.label_names)[:5], list(class_names)[:5])


def parse_attacks(names: str | list[str]) -> list[str]:
    names = names.split(",") if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    return names


def _pgd(spec: AttackSpec, epsilon: float, norm: str) -> Callable:
    config = AttackConfig(epsilon=epsilon, step_size=epsilon / 4, steps=spec.pgd_steps, norm=norm, random_start="uniform")
    return lambda model, images, labels: pgd_attack(model, images, labels, config, loss=spec.pgd_loss)


def _autoattack(spec: AttackSpec, epsilon: float, norm: str, device, seed: int) -> Callable:
    from pyautoattack import AutoAttack

    def run(model, images, labels):
        kwargs = {"attacks": list(spec.autoattack_attacks)} if spec.autoattack_attacks else {}
        adversary = AutoAttack(model, device=device, eps=epsilon, norm=NORM_NAMES[norm],
                               seed=seed, version=spec.autoattack_version, **kwargs)
        adversary.verbose = False
        adversarial, _ = adversary.run_standard_evaluation(images, labels, batch_size=len(images))
        return adversarial

    return run


@torch.no_grad()
def _correct(model, images, labels) -> torch.Tensor:
    return model(images).argmax(1) == labels


def evaluate_robustness(
    model: torch.nn.Module,
    batches,
    attacks: list[str],
    epsilon: float = 8 / 255,
    norm: str = "linf",
    eps_sweep: bool = False,
    sanity_checks: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    n_examples: int | None = None,
    progress: bool = True,
) -> dict:
    """Run ``attacks`` on every batch of ``batches`` (pairs of [0, 1] images and labels).

    Returns the accuracies (the ``results.json`` shape of ``cure-hub eval``, without the model
    and dataset names): per attack, the worst case per example over the attacks run, NRR against
    C&W and AutoAttack, the ε sweep, and warnings from the gradient-masking checks.
    """
    model = model.to(device).eval()
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes < 4 and {"aa", "aa-rand"} & set(attacks):
        raise ValueError(
            f"AutoAttack's standard and rand versions need at least 4 classes (APGD-T and FAB-T target the 3 "
            f"runner-up classes); this model has {num_classes}. Use apgd-ce instead."
        )
    torch.manual_seed(seed)
    runners = {}
    for name in attacks:
        spec = ATTACKS[name]
        if spec.pgd_loss:
            runners[name] = _pgd(spec, epsilon, norm)
        elif spec.autoattack_version:
            runners[name] = _autoattack(spec, epsilon, norm, device, seed)
    sweep = [e / 255 for e in EPS_SWEEP] if eps_sweep and norm == "linf" else []
    extra = {f"eps_sweep/{e:.6f}": _pgd(ATTACKS["pgd20"], e, norm) for e in sweep}
    if sanity_checks and norm == "linf" and any(ATTACKS[a].pgd_loss for a in attacks):
        extra["large_epsilon"] = _pgd(ATTACKS["pgd20"], LARGE_EPSILON, norm)

    correct = {name: [] for name in ["clean", *runners, *extra]}
    bar = tqdm(total=n_examples, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        correct["clean"].append(_correct(model, images, labels).cpu())
        for name, run in {**runners, **extra}.items():
            bar.set_description(f"eval [{name.split('/')[0]}]")  # AutoAttack takes minutes a batch: say what runs
            correct[name].append(_correct(model, run(model, images, labels), labels).cpu())
        bar.update(len(labels))
        robust = [n for n in runners if n != "clean"]
        if robust:
            worst = torch.stack([torch.cat(correct[n]) for n in robust]).all(0)
            bar.set_postfix(clean=f"{torch.cat(correct['clean']).float().mean():.3f}", robust=f"{worst.float().mean():.3f}")
    bar.close()
    flags = {name: torch.cat(values) for name, values in correct.items()}
    accuracy = {name: flags[name].float().mean().item() for name in ["clean", *runners] if name in attacks or name == "clean"}
    robust_names = [n for n in attacks if n != "clean"]
    results = {
        "n_examples": len(flags["clean"]),
        "norm": norm,
        "epsilon": epsilon,
        "accuracy": accuracy,
        "intervals": {name: list(wilson_interval(int(flags[name].sum()), len(flags[name]))) for name in accuracy},
        "interval_method": INTERVAL_METHOD,
        "worst_case": torch.stack([flags[n] for n in robust_names]).all(0).float().mean().item() if robust_names else None,
        "nrr": {},
        "eps_sweep": {f"{e * 255:g}/255": flags[f"eps_sweep/{e:.6f}"].float().mean().item() for e in sweep},
        "attacks": {n: ATTACKS[n].description for n in attacks},
        "warnings": [],
    }
    for robust_name, key in (("cw", "cw"), ("aa", "aa"), ("aa-rand", "aa")):
        if robust_name in accuracy:
            results["nrr"][key] = natural_robustness_ratio(accuracy["clean"], accuracy[robust_name])
    if sanity_checks:
        large = flags["large_epsilon"].float().mean().item() if "large_epsilon" in flags else None
        results["warnings"] = gradient_masking_warnings(accuracy, large)
        for warning in results["warnings"]:
            logger.warning(warning)
    return results


def gradient_masking_warnings(accuracy: dict[str, float], large_epsilon_accuracy: float | None = None) -> list[str]:
    """Signs that an evaluation is not to be trusted: a stronger attack of a family doing worse
    than a weaker one, AutoAttack doing worse than PGD, or accuracy that survives a huge ε."""
    warnings = []
    for strong, weaker in AT_LEAST_AS_STRONG_AS.items():
        for weak in weaker:
            if strong in accuracy and weak in accuracy and accuracy[strong] > accuracy[weak] + 1e-9:
                warnings.append(
                    f"{strong} ({accuracy[strong]:.4f}) is weaker than {weak} ({accuracy[weak]:.4f}): "
                    "a stronger attack should not leave more examples standing; gradient masking?"
                )
    if large_epsilon_accuracy is not None and large_epsilon_accuracy > 0.2:
        warnings.append(
            f"PGD-20 at eps = {LARGE_EPSILON * 255:.0f}/255 still leaves {large_epsilon_accuracy:.4f} accuracy: "
            "robust accuracy should fall towards zero as eps grows; gradient masking?"
        )
    for name, value in accuracy.items():
        if name != "clean" and value > accuracy["clean"] + 1e-9:
            warnings.append(f"{name} accuracy ({value:.4f}) is above clean accuracy ({accuracy['clean']:.4f})")
    return warnings

