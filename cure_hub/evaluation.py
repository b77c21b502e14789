"""The robustness suite: clean, PGD-20/100, C&W, AutoAttack, NRR, an epsilon sweep, and the
reliability checks. Every attack runs on the same examples in fp32, model in eval mode.

The unit of work is a batch of the evaluation set, numbered in dataset order. Every random draw
of an attack comes from a seed derived from the run's seed, the batch number and the attack's
name, so an example's result depends only on the model, its batch and :class:`EvaluationSuite`:
batches can be spread over processes (:mod:`cure_hub.sharded_eval`), or resumed after a crash,
and give the same per-example results as one uninterrupted process.

Robust accuracy follows AutoAttack and RobustBench: an example counts as robust under an attack
when it is classified correctly both clean and attacked, and attacks run only on the examples
classified correctly clean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .attacks import pgd_attack
from .config import AttackConfig, InputError
from .corruptions import check_corruptions
from .evaluation_checks import (
    LARGE_EPSILON,
    gradient_masking_warnings,
    outputs_are_probabilities,
    outputs_are_random,
    reliability_warnings,
    zero_input_gradients,
)

logger = logging.getLogger(__name__)

#: How AutoAttack, RobustBench and model cards name the norms.
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
#: ε values of the sweep, in units of 1/255 (the paper's Figure 5b).
EPS_SWEEP = (0.25, 0.5, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One named evaluation attack: a PGD variant or an AutoAttack version. Everything that names
    or ranks attacks (the evaluation, the model card, the dial's NRR, the command line's help)
    reads this entry: a new attack is one entry of :data:`ATTACKS`."""

    name: str
    description: str
    #: how cards and tables name it
    title: str
    #: how strong it is among the attacks (0: no attack): the dial's NRR uses the strongest evaluated
    strength: int
    pgd_loss: str | None = None
    pgd_steps: int = 0
    autoattack_version: str | None = None
    autoattack_attacks: tuple[str, ...] | None = None


ATTACKS = {
    spec.name: spec
    for spec in (
        AttackSpec("clean", "no attack", "Clean", 0),
        AttackSpec("pgd20", "PGD-20 on cross-entropy, uniform start, step eps/4", "PGD-20", 1, "ce", 20),
        AttackSpec("pgd100", "PGD-100 on cross-entropy, uniform start, step eps/4", "PGD-100", 2, "ce", 100),
        AttackSpec("cw", "PGD-30 on the Carlini-Wagner margin (CW-inf), uniform start, step eps/4", "C&W (CW-inf)", 4, "cw", 30),
        AttackSpec("apgd-ce", "AutoAttack's APGD-CE alone", "APGD-CE", 3, autoattack_version="custom",
                   autoattack_attacks=("apgd-ce",)),
        AttackSpec("aa", "AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square)", "AutoAttack", 6,
                   autoattack_version="standard"),
        AttackSpec("aa-rand", "AutoAttack, rand version (for randomised defences)", "AutoAttack (rand)", 5,
                   autoattack_version="rand"),
    )
}


def strongest_attack(names) -> str | None:
    """The strongest attack among ``names`` (none if they hold no attack but clean)."""
    attacks = [ATTACKS[name] for name in names if name in ATTACKS and ATTACKS[name].strength]
    return max(attacks, key=lambda spec: spec.strength).name if attacks else None


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


def check_model_fits_data(spec, image_size: int, class_names: list[str], other_classes: bool = False) -> list[str]:
    """Refuse to evaluate a model on images of another size, with another number of classes or,
    unless ``other_classes``, with other class names (the accuracy would be a meaningless number).
    Returns the warnings the results and the card must carry."""
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
        differ = f"the model's classes {list(spec.label_names)[:5]} are not the data's {list(class_names)[:5]}"
        if not other_classes:
            raise InputError(f"{differ}: evaluate it on the data it was trained for, or pass --other-classes to compare "
                             "label indices anyway")
        return [f"{differ}; accuracy compares label indices (--other-classes)"]
    return []


def parse_attacks(names: str | Iterable[str]) -> list[str]:
    names = names.split(",") if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise InputError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    return names


@dataclasses.dataclass(frozen=True)
class EvaluationSuite:
    """What an evaluation runs. Together with the model and the batches, these settings fix every
    per-example result (a resumed evaluation refuses to continue with other ones).

    Attributes:
        attacks: names from :data:`ATTACKS`; clean accuracy is always measured.
        epsilon: radius of the threat model, in [0, 1] pixel units.
        norm: ``"linf"`` or ``"l2"``.
        eps_sweep: also PGD-20 at the ε of :data:`EPS_SWEEP` (l-inf only).
        sanity_checks: gradient-masking and AutoAttack's reliability checks.
        seed: root of every attack's random draws.
        corruptions, severities: natural corruptions whose accuracy to measure
            (:mod:`cure_hub.corruptions`; the images come with each batch).
    """

    attacks: tuple[str, ...] = ("clean", "pgd20", "pgd100", "cw")
    epsilon: float = 8 / 255
    norm: str = "linf"
    eps_sweep: bool = False
    sanity_checks: bool = True
    seed: int = 0
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (3,)

    def __post_init__(self):
        object.__setattr__(self, "attacks", tuple(parse_attacks(self.attacks)))
        if self.norm not in NORM_NAMES:
            raise InputError(f"unknown norm {self.norm!r}; choose from {', '.join(NORM_NAMES)}")
        if not 0 < self.epsilon <= 1:
            raise InputError(f"epsilon must be in (0, 1] (pixel units; 8/255 = 0.0314), got {self.epsilon}")
        check_corruptions(self.corruptions, self.severities)

    @property
    def robust_attacks(self) -> list[str]:
        return [name for name in self.attacks if name != "clean"]

    def pgd_runs(self) -> dict[str, tuple[AttackSpec, float]]:
        """The PGD attacks to run on each batch, with their radius: the requested ones, the ε
        sweep, and the large-ε check."""
        runs = {name: (ATTACKS[name], self.epsilon) for name in self.attacks if ATTACKS[name].pgd_loss}
        if self.eps_sweep and self.norm == "linf":
            runs |= {f"eps_sweep/{eps:g}/255": (ATTACKS["pgd20"], eps / 255) for eps in EPS_SWEEP}
        if self.sanity_checks and self.norm == "linf" and any(ATTACKS[a].pgd_loss for a in self.attacks):
            runs["large_epsilon"] = (ATTACKS["pgd20"], LARGE_EPSILON)
        return runs

    def check_model(self, model) -> None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None and num_classes < 4 and {"aa", "aa-rand"} & set(self.attacks):
            raise InputError(
                f"AutoAttack's standard and rand versions need at least 4 classes (APGD-T and FAB-T target the 3 "
                f"runner-up classes); this model has {num_classes}. Use apgd-ce instead."
            )

    def attack_seed(self, batch_index: int, attack: str) -> int:
        """The seed of one attack on one batch: independent of which process runs it, and when."""
        digest = hashlib.blake2b(f"{self.seed}/{batch_index}/{attack}".encode(), digest_size=7).digest()
        return int.from_bytes(digest, "little")

    def run_batch(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_index: int,
                  corrupted: dict[str, torch.Tensor] | None = None,
                  announce: Callable[[str], None] = lambda attack: None) -> dict:
        """Every attack and check on one batch: a JSON-ready record of per-example flags
        (``"0"``/``"1"`` strings: correct, or robust, per example) and per-batch checks.
        ``corrupted`` holds the batch's corrupted versions, keyed ``corruption/severity``.
        ``announce`` hears the name of each attack as it starts (AutoAttack takes minutes a batch)."""
        with torch.no_grad():
            logits = model(images)
            flags = {f"corruption/{key}": model(versions.to(images.device)).argmax(1) == labels
                     for key, versions in (corrupted or {}).items()}
        clean = logits.argmax(1) == labels
        flags["clean"] = clean
        checks = {}
        if self.sanity_checks and batch_index == 0:  # AutoAttack's own checks look at the first batch
            checks = {"randomized": outputs_are_random(model, images, logits),
                      "probabilities": outputs_are_probabilities(logits)}
        standing = clean.nonzero().squeeze(1)
        images, labels = images[standing], labels[standing]

        def robust(adversarial: torch.Tensor) -> torch.Tensor:
            flag = torch.zeros_like(clean)
            if len(standing):
                with torch.no_grad():
                    flag[standing] = model(adversarial).argmax(1) == labels
            return flag

        if self.sanity_checks and self.robust_attacks:
            flags["zero_gradient"] = torch.zeros_like(clean)
            if len(standing):
                flags["zero_gradient"][standing] = zero_input_gradients(model, images, labels)
        for name, (spec, epsilon) in self.pgd_runs().items():
            announce(name.split("/")[0])
            config = AttackConfig(epsilon=epsilon, step_size=epsilon / 4, steps=spec.pgd_steps, norm=self.norm,
                                  random_start="uniform")
            # One random start per loss and radius: PGD-100 continues PGD-20's path, so it cannot
            # come out weaker by a luckier start, and the sweep's 8/255 point is PGD-20 itself.
            start_seed = self.attack_seed(batch_index, f"{spec.pgd_loss}@{epsilon!r}")
            generator = torch.Generator(images.device).manual_seed(start_seed)
            flags[name] = robust(pgd_attack(model, images, labels, config, loss=spec.pgd_loss, generator=generator)
                                 if len(standing) else images)
        for name in self.attacks:
            if ATTACKS[name].autoattack_version:
                announce(name)
                adversarial, broken_by_square = self._autoattack(ATTACKS[name], model, images, labels, batch_index)
                flags[name] = robust(adversarial)
                if name == "aa":
                    flags["aa_square"] = torch.zeros_like(clean)
                    flags["aa_square"][standing] = broken_by_square
        return {"batch": batch_index,
                "flags": {name: "".join("1" if f else "0" for f in flag.tolist()) for name, flag in flags.items()},
                "checks": checks}

    def _autoattack(self, spec: AttackSpec, model, images, labels, batch_index: int):
        """AutoAttack's ensemble on the examples standing, one attack at a time as AutoAttack runs
        it, recording which examples only the black-box Square attack broke."""
        broken_by_square = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        if not len(labels):
            return images, broken_by_square
        from pyautoattack import AutoAttack

        kwargs = {"attacks": list(spec.autoattack_attacks)} if spec.autoattack_attacks else {}
        adversary = AutoAttack(model, device=images.device, eps=self.epsilon, norm=NORM_NAMES[self.norm],
                               seed=self.attack_seed(batch_index, spec.name), version=spec.autoattack_version, **kwargs)
        adversary.verbose = False
        adversary.logger.setLevel(logging.ERROR)  # its checks are ours (evaluation_checks), reported once per run
        adversarial, standing = images.clone(), torch.ones_like(broken_by_square)
        for attack in list(adversary.attacks_to_run):
            index = standing.nonzero().squeeze(1)
            if not len(index):
                break
            adversary.attacks_to_run = [attack]
            attacked, _ = adversary.run_standard_evaluation(images[index], labels[index], batch_size=len(index))
            with torch.no_grad():
                fooled = model(attacked).argmax(1) != labels[index]
            adversarial[index[fooled]] = attacked[fooled]
            standing[index[fooled]] = False
            if attack == "square":
                broken_by_square[index[fooled]] = True
        return adversarial, broken_by_square

    def attack_batches(self, model: torch.nn.Module, batches: Iterable[tuple[int, torch.Tensor, torch.Tensor, dict]],
                       device, bar: tqdm | None = None, bar_prefix: str = "eval") -> Iterator[dict]:
        """:meth:`run_batch` on each ``(batch_index, images, labels, corrupted)``, reporting the
        running attack and the clean and worst-case accuracy so far to ``bar``."""
        self.check_model(model)
        model = model.to(device).eval()
        clean, worst = [], []
        announce = (lambda attack: bar.set_description(f"{bar_prefix} [{attack}]")) if bar is not None else (lambda attack: None)
        for batch_index, images, labels, corrupted in batches:
            record = self.run_batch(model, images.to(device), labels.to(device), batch_index, corrupted, announce)
            yield record
            if bar is not None:
                flags = {name: _bits(value) for name, value in record["flags"].items()}
                clean.append(flags["clean"])
                worst.append(np.logical_and.reduce([flags[n] for n in self.robust_attacks or ["clean"]]))
                bar.update(len(labels))
                bar.set_postfix(clean=f"{np.concatenate(clean).mean():.3f}", robust=f"{np.concatenate(worst).mean():.3f}")

    def summarise(self, records: Iterable[dict]) -> dict:
        """The results of the evaluation whose batches gave ``records`` (any order): the
        ``results.json`` shape of ``cure-hub eval``, without the model and dataset names."""
        records = sorted(records, key=lambda r: r["batch"])
        flags = {name: np.concatenate([_bits(r["flags"][name]) for r in records]) for name in records[0]["flags"]}
        n = len(flags["clean"])
        accuracy = {name: float(flags[name].mean()) for name in ("clean", *self.robust_attacks)}
        results = {
            "n_examples": n,
            "norm": self.norm,
            "epsilon": self.epsilon,
            "seed": self.seed,
            "accuracy": accuracy,
            "intervals": {name: list(wilson_interval(int(flags[name].sum()), n)) for name in accuracy},
            "interval_method": INTERVAL_METHOD,
            "worst_case": (float(np.logical_and.reduce([flags[a] for a in self.robust_attacks]).mean())
                           if self.robust_attacks else None),
            "nrr": {},
            "eps_sweep": {name.removeprefix("eps_sweep/"): float(value.mean())
                          for name, value in flags.items() if name.startswith("eps_sweep/")},
            "attacks": {name: ATTACKS[name].description for name in self.attacks},
            "corruptions": {name.removeprefix("corruption/"): float(value.mean())
                            for name, value in flags.items() if name.startswith("corruption/")},
            "checks": {},
            "warnings": [],
            "unreliable": False,
        }
        if results["corruptions"]:
            results["corruption_mean"] = float(np.mean(list(results["corruptions"].values())))
            results["corruption_intervals"] = {
                name.removeprefix("corruption/"): list(wilson_interval(int(value.sum()), n))
                for name, value in flags.items() if name.startswith("corruption/")}
        for robust_name, key in (("cw", "cw"), ("aa", "aa"), ("aa-rand", "aa")):
            if robust_name in accuracy:
                results["nrr"][key] = natural_robustness_ratio(accuracy["clean"], accuracy[robust_name])
        if self.sanity_checks:
            clean_correct = max(int(flags["clean"].sum()), 1)
            checks = {name: any(r["checks"].get(name, False) for r in records) for name in ("randomized", "probabilities")}
            if "zero_gradient" in flags:
                checks["zero_gradient_share"] = float(flags["zero_gradient"].sum()) / clean_correct
            if "aa_square" in flags:
                checks["square_share"] = float(flags["aa_square"].mean())
            if "large_epsilon" in flags:
                checks["large_epsilon_accuracy"] = float(flags["large_epsilon"].mean())
            results["checks"] = checks
            results["warnings"] = (gradient_masking_warnings(accuracy, checks.get("large_epsilon_accuracy"))
                                   + reliability_warnings(checks, self.attacks))
            results["unreliable"] = bool(results["warnings"])
        return results


def _bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


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
    """Run ``attacks`` on every batch of ``batches`` (pairs of [0, 1] images and labels) in this
    process, and summarise (:meth:`EvaluationSuite.summarise`). ``cure-hub eval`` spreads the same
    work over processes and makes it resumable (:func:`cure_hub.sharded_eval.run_evaluation`)."""
    suite = EvaluationSuite(tuple(attacks), epsilon, norm, eps_sweep, sanity_checks, seed)
    with tqdm(total=n_examples, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        records = list(suite.attack_batches(model, ((i, x, y, {}) for i, (x, y) in enumerate(batches)), device, bar))
    results = suite.summarise(records)
    for warning in results["warnings"]:
        logger.warning(warning)
    return results
