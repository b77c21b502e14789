"""Robust results in a model card's ``model-index``, written and read by one convention
(docs/hub-results.md), so that a program can read back what a result measured.

Every accuracy is one metric of ``type: accuracy`` with a name a person can read ("Robust
accuracy (AutoAttack standard, Linf, eps=8/255)") and the protocol in ``args``. Results are
grouped by a ``dataset.config`` per threat model and source: ``huggingface_hub`` merges results
that share task, dataset, config, split and revision, and keeps only the first one's dataset
args and source, so two threat models or two sources must never share a config. ``verified`` is
never set: it is reserved for the Hub's own evaluation service.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .evaluation import ATTACKS, INTERVAL_METHOD, NORM_NAMES

#: Where cure-hub's own measurements say they come from.
SOURCE_URL = "https://github.com/cure-hub/cure-hub"
TASK = {"task_type": "image-classification", "task_name": "Image Classification"}


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """The perturbations an accuracy is robust to: an ``norm`` ball ("linf" or "l2") of radius
    ``epsilon`` in [0, 1] pixel units."""

    norm: str
    epsilon: float

    @property
    def epsilon_text(self) -> str:
        """An l-inf ε as a fraction of 255 where it is one ("8/255"), else (and an l2 one, "0.5") as a number."""
        in_255 = self.epsilon * 255
        return f"{in_255:g}/255" if self.norm == "linf" and abs(in_255 - round(in_255, 2)) < 1e-6 else f"{self.epsilon:g}"

    def __str__(self) -> str:  # "Linf-8/255": the dataset config of the results under it
        return f"{NORM_NAMES[self.norm]}-{self.epsilon_text}"


@dataclasses.dataclass(frozen=True)
class RobustResult:
    """One accuracy of a card's ``model-index``, as :func:`robust_results` reads it back.

    Fields a card does not give (one written by another convention) are ``None``.
    """

    #: cure-hub's name of the attack ("clean", "pgd20", "aa", ...; :data:`~cure_hub.evaluation.ATTACKS`)
    attack: str | None
    #: the accuracy, in [0, 1]
    accuracy: float
    #: the threat model of the evaluation the result belongs to (clean accuracy: its robust results')
    threat_model: ThreatModel | None
    metric_name: str
    #: the dataset's Hub id where it has one, else its name; and its split and config as written
    dataset: str
    split: str | None
    dataset_config: str | None
    #: the examples evaluated, the split's size, and how they were drawn
    n_examples: int | None = None
    split_examples: int | None = None
    sampling: str | None = None
    #: the root of the attacks' random draws (and of the subset's)
    seed: int | None = None
    #: the AutoAttack version ("standard", "rand", "custom"), for AutoAttack results
    autoattack_version: str | None = None
    #: the 95 % interval of the accuracy over the examples, and how it was computed
    interval: tuple[float, float] | None = None
    interval_method: str | None = None
    #: who measured or reported it
    source_name: str | None = None
    source_url: str | None = None

    @property
    def is_subset(self) -> bool:
        return self.n_examples is not None and self.split_examples is not None and self.n_examples < self.split_examples


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repository id ("owner/name") rather than a local path."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/")) and not Path(text).exists()


def eval_results(results: dict) -> list:
    """``huggingface_hub.EvalResult`` objects for the accuracies of ``results`` (the shape of
    ``cure-hub eval``'s results.json), by the convention. Their source is cure-hub and its version,
    or, for numbers someone else measured, ``results["reported_by"]`` (``name`` and ``url``), whose
    results keep a config of their own: ``Linf-8/255 (reported by NAME)``."""
    from huggingface_hub import EvalResult

    threat_model = ThreatModel(results["norm"], results["epsilon"])
    reporter = results.get("reported_by")
    n, split_examples = results.get("n_examples"), results.get("split_examples")
    subset = n is not None and split_examples is not None and n < split_examples
    sampling = None if n is None or split_examples is None else "class-balanced subset" if subset else "whole split"
    scope = f"; {n} of the {split_examples} {results['split']} examples" if subset else ""
    dataset = results["dataset"]
    common = {
        **TASK,
        "dataset_type": dataset if looks_like_hub_id(dataset) else Path(dataset).name, "dataset_name": Path(dataset).name,
        # A config per source too: huggingface_hub keeps one source per config.
        "dataset_split": results["split"], "dataset_config": str(threat_model) + (f" (reported by {reporter['name']})" if reporter else ""),
        "source_name": reporter["name"] if reporter else f"cure-hub {_version()}",
        "source_url": reporter.get("url") if reporter else SOURCE_URL,
    }
    records = []
    for attack, accuracy in results["accuracy"].items():
        spec = ATTACKS.get(attack)
        args = {"attack": attack, "norm": threat_model.norm, "eps": threat_model.epsilon_text, "epsilon": threat_model.epsilon,
                "n_examples": n, "split_examples": split_examples, "sampling": sampling, "seed": results.get("seed")}
        if spec is not None and spec.autoattack_version:
            args["autoattack_version"] = spec.autoattack_version
        if interval := results.get("intervals", {}).get(attack):
            args.update(interval=list(interval), interval_method=results.get("interval_method", INTERVAL_METHOD))
        title = _attack_title(attack)
        name = (f"Clean accuracy{f' ({scope[2:]})' if scope else ''}" if attack == "clean" else
                f"Robust accuracy ({title}, {NORM_NAMES[threat_model.norm]}, eps={threat_model.epsilon_text}{scope})")
        records.append(EvalResult(**common, metric_type="accuracy", metric_name=name, metric_value=accuracy,
                                  metric_config=str(threat_model), metric_args={k: v for k, v in args.items() if v is not None}))
    return records


def robust_results(location: str | os.PathLike, revision: str | None = None) -> list[RobustResult]:
    """The accuracies of the model card at ``location`` (an export folder, a README.md, or a Hub
    repository id, at ``revision``), as typed records. Accuracies of cards written by another
    convention are read as far as they go; other metrics are left out."""
    from huggingface_hub import ModelCard, hf_hub_download

    path = Path(location)
    if path.is_dir():
        path = path / "README.md"
    card = ModelCard.load(path if path.exists() else hf_hub_download(str(location), "README.md", revision=revision))
    return [_read(result) for result in (card.data.eval_results or []) if result.metric_type == "accuracy"]


def _read(result) -> RobustResult:
    args = result.metric_args or {}
    threat_model = ThreatModel(args["norm"], float(args["epsilon"])) if "norm" in args and "epsilon" in args else None
    interval = args.get("interval")
    return RobustResult(
        attack=args.get("attack"), accuracy=float(result.metric_value), threat_model=threat_model,
        metric_name=result.metric_name, dataset=result.dataset_type, split=result.dataset_split,
        dataset_config=result.dataset_config, n_examples=args.get("n_examples"), split_examples=args.get("split_examples"),
        sampling=args.get("sampling"), seed=args.get("seed"), autoattack_version=args.get("autoattack_version"),
        interval=tuple(interval) if interval else None, interval_method=args.get("interval_method"),
        source_name=result.source_name, source_url=result.source_url,
    )


def _attack_title(attack: str) -> str:
    spec = ATTACKS.get(attack)
    if spec is None:
        return attack
    return f"{spec.title} standard" if spec.autoattack_version == "standard" else spec.title


def _version() -> str:
    try:
        return version("cure-hub")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(source)"
