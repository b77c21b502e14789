"""Robust checkpoints trained elsewhere, made into cure-hub exports: ``cure-hub import``.

A *layout* is how a code base saves its models: where the state dict sits in the file, the
prefixes on its keys, and whether the normalisation is saved with it. Each layout is one function
that returns the bare network's state dict and the normalisation it found (or ``None``), and one
entry in :data:`LAYOUTS`. The result is the folder ``cure-hub export`` writes, with
``import_config.json`` (where the weights came from) in place of ``training_config.json``: it
loads with timm, transformers and :func:`cure_hub.load_robust_model`, and ``cure-hub push``
publishes it. Numbers that someone else reported go into its card attributed to them
(docs/hub-results.md); ``cure-hub import --evaluate`` measures them again beside.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .architectures import UNUSED_BLOCK, size_of_checkpoint
from .config import InputError, parse_number
from .data import dataset_class_names
from .evaluation import ATTACKS, INTERVAL_METHOD, NORM_NAMES
from .hub import IMPORT_RECORD, card_template, package_versions, replace_folder, usage_section, without_local_paths
from .hub_results import ThreatModel, eval_results, looks_like_hub_id
from .models import CheckpointMismatchError, ModelSpec, RobustClassifier, create_model, load_state, read_checkpoint, read_json, save_pretrained, strip_prefix
from .model_configs import model_source

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


class LayoutMismatchError(InputError):
    """The checkpoint is not in the layout it was imported as."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one code base saves its models."""

    #: who saves checkpoints this way, as the card names them
    title: str
    #: the file's contents -> the bare network's state dict and the saved normalisation, if any
    unpack: Callable[[object], tuple[dict[str, torch.Tensor], Normalisation | None]]


def _nested_state(saved: object, keys: tuple[str, ...], layout: str) -> dict[str, torch.Tensor]:
    """The state dict under the first of ``keys`` that ``saved`` has, or ``saved`` itself, without
    DataParallel's ``module.`` prefix."""
    for key in keys:
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
            break
    if not isinstance(saved, dict) or not saved or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        found = list(saved)[:5] if isinstance(saved, dict) else type(saved).__name__
        raise LayoutMismatchError(f"no state dict of tensors where the {layout} layout keeps one ({list(keys)}): found {found}")
    return strip_prefix(saved, "module.")


def _buffers(state: dict, mean_key: str, std_key: str) -> Normalisation | None:
    """The per-channel mean and std saved as buffers under these keys (removed from ``state``)."""
    if mean_key not in state and std_key not in state:
        return None
    if mean_key not in state or std_key not in state:
        raise LayoutMismatchError(f"the checkpoint has {mean_key if mean_key in state else std_key!r} without "
                                  f"{std_key if mean_key in state else mean_key!r}: its normalisation is incomplete")
    mean, std = state.pop(mean_key).flatten(), state.pop(std_key).flatten()
    return tuple(mean.tolist()), tuple(std.tolist())


def _robustbench(saved: object):
    """RobustBench's model zoo: a state dict, maybe under ``state_dict``, maybe ``module.``-prefixed;
    entries that normalise inside the network save ``mu`` and ``sigma`` (or ``normalize.mean`` /
    ``normalize.std``) beside the weights, others leave them to the model class."""
    state = dict(_nested_state(saved, ("state_dict",), "robustbench"))
    normalisation = _buffers(state, "mu", "sigma") or _buffers(state, "normalize.mean", "normalize.std")
    return strip_prefix(state, "model."), normalisation


def _madrylab(saved: object):
    """MadryLab's ``robustness`` library: ``{"model": AttackerModel.state_dict(), "optimizer": ...}``
    under DataParallel, keys ``module.model.*`` (the network), ``module.attacker.model.*`` (the same
    network again) and ``module.normalizer.new_mean`` / ``new_std`` (its dataset's mean and std)."""
    state = _nested_state(saved, ("model", "state_dict"), "madrylab")
    network = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    if not network or "normalizer.new_mean" not in state:
        raise LayoutMismatchError(f"a MadryLab checkpoint's keys start with module.model. and module.normalizer.; "
                                  f"this one's first keys are {list(state)[:5]}")
    normaliser = {key: state[key] for key in ("normalizer.new_mean", "normalizer.new_std") if key in state}
    return network, _buffers(normaliser, "normalizer.new_mean", "normalizer.new_std")


def _trades(saved: object):
    """The TRADES code: ``torch.save(model.state_dict())``, maybe under DataParallel; its
    WideResNet saves a first-stage block it never calls (``sub_block1``), which is dropped."""
    return _without_unused_block(_nested_state(saved, (), "trades")), None


def _cure(saved: object):
    """The official CURE code: ``{"state": ...}`` or ``{"state_dict": ..., "optimizer": ...}``, its
    WideResNet the TRADES code's."""
    return _without_unused_block(_nested_state(saved, ("state", "state_dict"), "cure")), None


def _without_unused_block(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith(UNUSED_BLOCK)}


LAYOUTS = {
    "robustbench": Layout("the RobustBench model zoo", _robustbench),
    "madrylab": Layout("MadryLab's robustness library", _madrylab),
    "trades": Layout("the TRADES code (Zhang et al., 2019)", _trades),
    "cure": Layout("the official CURE code (Gowda et al., 2024)", _cure),
}

#: RobustBench's dataset names: the Hub dataset, split and examples its evaluations use.
ROBUSTBENCH_DATASETS = {"cifar10": ("uoft-cs/cifar10", "test", 10_000), "cifar100": ("uoft-cs/cifar100", "test", 10_000)}
#: cure-hub's architectures by RobustBench's names for them (its WideResNets: ``WideResNet-D-W``).
ROBUSTBENCH_ARCHITECTURES = {"ResNet-18": "cifar_resnet18", "PreActResNet-18": "cifar_preactresnet18"}


@dataclasses.dataclass
class ImportSettings:
    """What ``cure-hub import`` reads and how; one field per flag."""

    #: the checkpoint file (``.pt``, ``.pth``, ``.ckpt``, ``.tar``, ``.safetensors``)
    checkpoint: str
    #: how it was saved: a key of :data:`LAYOUTS`
    layout: str
    #: the architecture (a timm or CIFAR name); RobustBench's ``model_info`` names common ones
    model: str | None = None
    #: constructor arguments beyond those read off the checkpoint (``width``, ``depth``, ...)
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    #: a RobustBench ``model_info/<dataset>/<threat model>/<name>.json``: the reported numbers
    model_info: str | None = None
    #: the dataset the model classifies (Hub id, folder or packaged name): its class names
    dataset: str | None = None
    #: the normalisation inside the model, where the checkpoint does not save it (default: the
    #: architecture's; raw [0, 1] pixels for the CIFAR architectures, as TRADES and CURE train)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: the threat model of the reported numbers (RobustBench's ``model_info`` gives it)
    norm: str | None = None
    epsilon: float | None = None
    #: accuracies someone else measured, by cure-hub attack name ({"clean": 0.85, "aa": 0.53})
    reported: dict[str, float] = dataclasses.field(default_factory=dict)
    #: who reported them (a paper, a leaderboard) and where to read it
    reported_by: str | None = None
    reported_url: str | None = None
    #: the weights' licence, as the Hub names licences ("unknown" unless you know it)
    license: str = "unknown"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown layout {self.layout!r}: choose from {', '.join(LAYOUTS)}")
        if self.norm is not None and self.norm not in NORM_NAMES:
            raise InputError(f"unknown norm {self.norm!r}: choose from {', '.join(NORM_NAMES)}")
        if unknown := [name for name in self.reported if name not in ATTACKS]:
            raise InputError(f"--reported names unknown attacks {unknown}: choose from {', '.join(ATTACKS)}")
        if outside := {name: value for name, value in self.reported.items() if not 0 <= value <= 1}:
            raise InputError(f"--reported accuracies are fractions in [0, 1]: got {outside}")
        if self.reported and not self.reported_by:
            raise InputError("--reported needs --reported-by: who measured the numbers (a paper, a leaderboard)")
        if self.reported and (self.norm is None or self.epsilon is None):
            raise InputError("--reported needs the threat model they were measured under: pass --norm and --epsilon")
        if self.model_info and self.reported:
            raise InputError("--model-info gives the reported numbers: leave out --reported")
        if (self.mean is None) != (self.std is None):
            raise InputError("--mean and --std go together: pass both")

    @functools.cached_property
    def entry(self) -> dict | None:
        """The RobustBench entry of ``model_info`` (:func:`robustbench_entry`), read once."""
        return robustbench_entry(self.model_info, self.norm) if self.model_info else None


def robustbench_entry(path: str | Path, norm: str | None) -> dict:
    """A RobustBench ``model_info`` entry, with its threat model: the norm is the name of its
    folder (``Linf``, ``L2``), unless given."""
    path = Path(path)
    try:
        info = read_json(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the RobustBench entry {str(path)!r}: {err}") from None
    missing = [field for field in ("dataset", "eps", "clean_acc", "autoattack_acc") if not info.get(field)]
    if missing:
        raise InputError(f"{str(path)!r} is no RobustBench model_info entry: it lacks {missing}")
    if info["dataset"] not in ROBUSTBENCH_DATASETS:
        raise InputError(f"{str(path)!r} is an entry for {info['dataset']!r}; cure-hub imports RobustBench's "
                         f"{', '.join(ROBUSTBENCH_DATASETS)} entries")
    norm = norm or path.parent.name.lower()
    if norm not in NORM_NAMES:
        raise InputError(f"the folder of {str(path)!r} does not name its threat model (Linf or L2): pass --norm")
    return {**info, "name_in_robustbench": path.stem, "norm": norm}


def _robustbench_architecture(info: dict) -> str:
    """cure-hub's architecture and size for RobustBench's "WideResNet-28-10", "ResNet-18", ..."""
    name = info.get("architecture", "")
    if name in ROBUSTBENCH_ARCHITECTURES:
        return ROBUSTBENCH_ARCHITECTURES[name]
    if name.startswith("WideResNet-"):
        return "cifar_wrn34_10"
    raise InputError(f"RobustBench names the architecture {name!r}, which cure-hub does not build by that name: "
                     "pass --model (a timm or CIFAR architecture) and --model-kwargs")


def model_dataset(settings: ImportSettings) -> str:
    """The dataset the model classifies: given, or the one its RobustBench entry names."""
    if settings.dataset:
        return settings.dataset
    if settings.entry is None:
        raise InputError("name the dataset the model classifies with --dataset (its class names go into the export)")
    return ROBUSTBENCH_DATASETS[settings.entry["dataset"]][0]


def threat_model_of(settings: ImportSettings) -> ThreatModel | None:
    """The threat model the checkpoint's numbers were reported under, where known."""
    if (info := settings.entry) is not None:
        return ThreatModel(info["norm"], parse_number(str(info["eps"])))
    return ThreatModel(settings.norm, settings.epsilon) if settings.norm and settings.epsilon else None


def reported_results(settings: ImportSettings) -> dict | None:
    """The reported numbers in the shape of ``cure-hub eval``'s results, with their source."""
    if (info := settings.entry) is not None:
        dataset, split, n = ROBUSTBENCH_DATASETS[info["dataset"]]
        threat_model = threat_model_of(settings)
        return {"dataset": dataset, "split": split, "n_examples": n, "split_examples": n, "norm": threat_model.norm,
                "epsilon": threat_model.epsilon,
                # percentages with two decimals: as fractions without the division's rounding error
                "accuracy": {"clean": round(float(info["clean_acc"]) / 100, 8), "aa": round(float(info["autoattack_acc"]) / 100, 8)},
                "reported_by": {"name": f"RobustBench ({info['name_in_robustbench']})", "url": "https://robustbench.github.io"}}
    if not settings.reported:
        return None
    return {"dataset": settings.dataset, "split": None, "n_examples": None, "split_examples": None, "norm": settings.norm,
            "epsilon": settings.epsilon, "accuracy": dict(settings.reported),
            "reported_by": {"name": settings.reported_by, "url": settings.reported_url}}


def build_model(settings: ImportSettings, class_names: list[str]) -> RobustClassifier:
    """The network the checkpoint holds, in a :class:`RobustClassifier` with its normalisation."""
    layout = LAYOUTS[settings.layout]
    state, saved_normalisation = layout.unpack(read_checkpoint(settings.checkpoint))
    if saved_normalisation and settings.mean is not None:
        raise InputError(f"the checkpoint saves its normalisation (mean {list(saved_normalisation[0])}, std "
                         f"{list(saved_normalisation[1])}): leave out --mean and --std")
    architecture = settings.model or (_robustbench_architecture(settings.entry) if settings.entry else None)
    if architecture is None:
        raise InputError(f"name the architecture of {settings.checkpoint!r} with --model (e.g. cifar_wrn34_10, resnet50)")
    if model_source(architecture) != "timm":
        raise InputError(f"--model {architecture!r}: imports build timm and cure-hub's CIFAR architectures")
    mean, std = saved_normalisation or (settings.mean, settings.std)
    model = create_model(architecture, num_classes=len(class_names), label_names=class_names, mean=mean, std=std,
                         **{**size_of_checkpoint(architecture, state), **settings.model_kwargs})
    try:
        load_state(model, state, f"{settings.checkpoint!r} read as {layout.title}")
    except CheckpointMismatchError as err:
        raise LayoutMismatchError(str(err)) from None
    return model.eval()


def import_checkpoint(settings: ImportSettings, out: str | Path, overwrite: bool = False, repo_id: str | None = None,
                      command: str | None = None) -> Path:
    """Write the import of ``settings.checkpoint`` to ``out``, whole or not at all (as an export).
    ``command`` is what the card says it was imported with."""
    out = Path(out)
    info = settings.entry
    model = build_model(settings, dataset_class_names(model_dataset(settings)))
    reported = reported_results(settings)
    checkpoint = Path(settings.checkpoint)
    record = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "layout": settings.layout,
        "settings": without_local_paths(dataclasses.asdict(settings)),
        "model_spec": model.spec.to_dict(),
        "reported": reported,
        "origin": {field: info.get(field) for field in ("name", "authors", "venue", "link", "reported", "footnote")} if info else None,
        "command": command,
        "versions": package_versions(),
    }
    with replace_folder(out, overwrite) as staging:
        save_pretrained(model, staging)
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
        # The results whose threat model load_robust_model reports: the reported ones until measured.
        (staging / "eval_results.json").write_text(json.dumps(reported or {}, indent=2))
        import_card(staging, repo_id, name=out.name).save(staging / "README.md")
    return out


def is_import(folder: str | Path) -> bool:
    return (Path(folder) / IMPORT_RECORD).is_file()


def rerender_import_card(folder: str | Path, results: dict | None = None, repo_id: str | None = None) -> Path:
    """Render an import's card again, after putting ``cure-hub eval``'s ``results`` of it beside
    the reported ones when given."""
    folder = Path(folder)
    if results is not None:
        (folder / "eval_results.json").write_text(json.dumps(without_local_paths(results), indent=2))
    card = folder / "README.md"
    import_card(folder, repo_id).save(card)
    return card


def _measured(folder: Path) -> dict | None:
    """The import's own evaluation, when it has one (``eval_results.json`` holds the reported
    numbers until then)."""
    results = read_json(folder / "eval_results.json")
    return results if results and "reported_by" not in results else None


def import_card(folder: str | Path, repo_id: str | None = None, name: str | None = None):
    """The model card of an import folder, from ``model_cards/imported_model.md``: the reported
    numbers attributed to who reported them, and cure-hub's measurements where there are some."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    name = repo_id or name or folder.name
    record = read_json(folder / IMPORT_RECORD)
    spec = ModelSpec.from_dict(record["model_spec"])
    reported, measured = record["reported"], _measured(folder)
    results = [r for r in (reported, measured) if r]
    datasets = list(dict.fromkeys(r["dataset"] for r in results if r.get("dataset") and looks_like_hub_id(r["dataset"])))
    index = [record for r in results for record in eval_results(r)]
    card_data = ModelCardData(
        library_name=spec.library, pipeline_tag="image-classification", license=record["settings"]["license"],
        tags=["adversarial-robustness", spec.library, "image-classification"], datasets=datasets or None,
        model_name=name, eval_results=index or None,
    )
    repo_id = repo_id or f"<your-username>/{name}"
    return ModelCard.from_template(
        card_data, template_path=str(card_template("imported_model.md")),
        model_name=name, layout_title=LAYOUTS[record["layout"]].title, checkpoint=record["checkpoint"],
        checkpoint_sha256=record["checkpoint_sha256"], origin=record["origin"], command=record["command"],
        architecture_description=f"`{spec.architecture}` ({spec.library}, {spec.num_classes} classes"
                                 + (f", {', '.join(f'{k}={v}' for k, v in spec.model_args.items())}" if spec.model_args else "") + ")",
        image_size=spec.image_size, mean=list(spec.mean), std=list(spec.std),
        reported=_table(reported), measured=_table(measured), interval_method=INTERVAL_METHOD,
        usage=usage_section(spec, repo_id),
    )


def _table(results: dict | None) -> dict | None:
    """What the card's tables show of ``results``: threat model, scope, and a row per attack."""
    if not results:
        return None
    intervals = results.get("intervals") or {}
    return {
        "threat_model": str(ThreatModel(results["norm"], results["epsilon"])), "dataset": results.get("dataset"),
        "split": results.get("split"), "n_examples": results.get("n_examples"), "split_examples": results.get("split_examples"),
        "reported_by": results.get("reported_by"), "warnings": results.get("warnings", []),
        "rows": [(ATTACKS[attack].title if attack in ATTACKS else attack, value, intervals.get(attack))
                 for attack, value in results["accuracy"].items()],
    }
