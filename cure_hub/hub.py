"""Loading, exporting and publishing robust checkpoints.

Two published layouts, each readable by its own library without cure-hub:

* timm architectures (the CIFAR ones included): timm's Hub layout, ``config.json`` (architecture,
  num_classes, label_names, pretrained_cfg with input size, mean and std, model_args without
  num_classes) and ``model.safetensors`` with the bare timm model's keys. Loads with
  ``timm.create_model("hf-hub:owner/name", pretrained=True)`` and with transformers'
  ``AutoModelForImageClassification`` (through its timm wrapper).
* transformers architectures: ``save_pretrained``'s layout plus ``preprocessor_config.json``.

Beside the weights: ``README.md`` (the model card), ``eval_results.json``,
``training_config.json`` and ``robustbench.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .models import ModelSpec, RobustClassifier, from_transformers_pretrained, model_from_spec


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_robust_model(location: str | os.PathLike, revision: str | None = None, weights: str = "last") -> RobustClassifier:
    """The [0, 1]-input classifier stored at ``location``.

    ``location`` is a training run folder (``weights`` picks ``last``, ``best`` or ``revision``),
    an export folder, or a Hub repository id (``revision``: a branch, tag or commit).
    """
    path = Path(location)
    if (path / "model_spec.json").is_file():  # a training run
        weights_file = path / "weights" / f"{weights}.safetensors"
        if not weights_file.is_file():
            available = sorted(p.stem for p in (path / "weights").glob("*.safetensors"))
            raise FileNotFoundError(f"run {path} has no {weights!r} weights; it has {available}")
        return model_from_spec(ModelSpec.from_dict(_read_json(path / "model_spec.json")), weights_file)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is neither a run folder (model_spec.json) nor an export (config.json)")
        return _load_export(str(path), _read_json(config_file), local=True)
    if path.suffix or str(location).startswith((".", "/")):
        raise FileNotFoundError(f"no model at {location!r}")
    from huggingface_hub import hf_hub_download

    config_file = hf_hub_download(str(location), "config.json", revision=revision)
    return _load_export(str(location), _read_json(Path(config_file)), local=False, revision=revision)


def _load_export(location: str, config: dict, local: bool, revision: str | None = None) -> RobustClassifier:
    if "architecture" in config:  # timm layout
        import timm

        from . import architectures  # noqa: F401  (the CIFAR architectures must be registered)

        name = f"local-dir:{location}" if local else f"hf-hub:{location}" + (f"@{revision}" if revision else "")
        backbone = timm.create_model(name, pretrained=True)
        cfg = backbone.pretrained_cfg
        spec = ModelSpec(
            library="timm",
            architecture=config["architecture"],
            num_classes=backbone.num_classes,
            image_size=int(cfg["input_size"][-1]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            model_args=dict(config.get("model_args", {})),
            label_names=config.get("label_names"),
            source=None if local else location,
        )
        return RobustClassifier(backbone, spec)
    return from_transformers_pretrained(location, num_classes=None, revision=revision)
