"""Model factory: any timm architecture, any transformers image classifier, the paper's CIFAR nets.

Every model is returned as a :class:`RobustClassifier`: it takes images in [0, 1], shape
(N, C, H, W), normalises them with the mean and std that belong to the architecture, and returns
logits. Attacks therefore work in pixel space (epsilon = 8/255 is 8/255 of a pixel), and the
normalisation is part of the model's saved description (:class:`ModelSpec`), not of the data.

A model's files live here too, so that loading goes down only: :func:`save_pretrained` writes an
export's model files in its library's Hub layout, and :func:`load_robust_model` reads a training
run, an export folder or a Hub id back (``RobustClassifier.save_pretrained`` / ``from_pretrained``).
What a name stands for before a network is built is :mod:`cure_hub.model_configs`'.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .config import InputError
from .model_configs import (
    MODEL_ALIASES,
    SIZE_FIELDS,
    TIMM_HUB_PREFIX,
    UnknownModelError,  # noqa: F401  (raised through model_source; models is where users import it from)
    config_image_size,
    default_image_processor,
    meta_failure,
    model_source,
    processor_crop_pct,
    sized_timm_arguments,
    timm_pretrained_config,
    transformers_config,
    vision_config,
)
from .hub_results import ThreatModel
from .preprocessing import PixelMap, UnsupportedProcessorError, pixel_map, processor_applying
from .run_folder import RunFolder

logger = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model; the message lists the missing and unexpected keys."""


class NonFiniteWeightsError(InputError):
    """Weights hold NaN or infinite values: a diverged run, or a corrupted file."""


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or infinite entries, naming the first tensors that hold them."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()])
    if bool(finite.all()):
        return
    bad = [name for name, ok in zip(floats, finite.tolist()) if not ok]
    raise NonFiniteWeightsError(
        f"{source} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. {bad[:3]}): a diverged run or a "
        "corrupted file; it is not used"
    )


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a model: what is saved beside its weights.

    Attributes:
        library: ``"timm"`` or ``"transformers"``.
        architecture: the timm architecture, or the transformers ``model_type``.
        num_classes: number of output logits.
        image_size: side of the square input images the model was built for.
        mean: per-channel mean subtracted inside the model (inputs are in [0, 1]), in the
            backbone's channel order.
        std: per-channel standard deviation divided inside the model, in that order too.
        model_args: constructor arguments that differ from the architecture's defaults (timm), or
            the full transformers config as a dict.
        label_names: class names, index-aligned with the logits.
        source: where the starting weights came from (a Hub id or path), if anywhere.
        channel_order: ``"RGB"``, or ``"BGR"`` for backbones trained on reversed channels (as
            MobileViT's processor gives them); inputs are always RGB.
        crop_pct: share of the shortest edge the evaluation centre crop keeps when images are
            larger than ``image_size`` (timm's ``crop_pct``; 1.0 keeps the largest centred square).
    """

    library: str
    architecture: str
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    label_names: list[str] | None = None
    source: str | None = None
    channel_order: str = "RGB"
    crop_pct: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def check_channels_last_training_on_cpu(model: nn.Module) -> None:
    """Refuses a model with a convolution whose channels-last weight gradient oneDNN computes
    wrongly on x86 CPUs: 1x1, strided, fewer than 16 input channels per group. It writes past a
    workspace (uxlfoundation/oneDNN#6035), which crashed this project's machine and elsewhere gives
    wrong gradients without a word."""
    hazards = [name for name, module in model.named_modules()
               if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
               and module.in_channels // module.groups < 16]
    if hazards:
        raise InputError(
            f"--channels-last on a CPU would train {', '.join(hazards[:3])} wrongly: oneDNN computes the weight gradient "
            "of a strided 1x1 convolution with fewer than 16 input channels wrongly in that layout "
            "(uxlfoundation/oneDNN#6035). Train without --channels-last, or a wider model."
        )


class RobustClassifier(nn.Module):
    """A classifier on [0, 1] RGB images: ``logits = backbone((x - mean) / std)``, with the
    channels reversed first for a backbone that expects BGR.

    ``backbone`` is the bare timm model or transformers ``*ForImageClassification`` model; its
    state dict is what gets exported. ``mean`` and ``std`` are non-persistent buffers, so they
    follow the module across devices but stay out of checkpoints (they live in :attr:`spec`).
    """

    #: Whether :meth:`forward` hands the backbone channels-last images (:meth:`to_channels_last`).
    channels_last = False
    #: Where :attr:`threat_model` is read from at first use (:func:`load_robust_model` sets it).
    _find_threat_model: Callable[[], ThreatModel | None] | None = None
    _threat_model: ThreatModel | None = None

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def threat_model(self) -> ThreatModel | None:
        """The threat model the weights were evaluated under: from the export's results or the
        run's training attack for a model :func:`load_robust_model` loaded (read at first use: a
        Hub model's costs a download), else None unless set."""
        if self._find_threat_model is not None:
            self._threat_model, self._find_threat_model = self._find_threat_model(), None
        return self._threat_model

    @threat_model.setter
    def threat_model(self, value: ThreatModel | None) -> None:
        self._threat_model, self._find_threat_model = value, None

    def to_channels_last(self) -> "RobustClassifier":
        """Keep weights and images in the channels-last memory layout (timm's ``--channels-last``),
        which oneDNN's CPU convolutions and mixed-precision GPU convolutions run faster in. The
        values are the same, the float rounding is not: a run keeps its layout when resumed."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.spec.channel_order == "BGR":
            images = images.flip(1)
        normalised = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.spec.library == "transformers":
            # The logits come first (no loss without labels), also for PP-LCNet, which names them
            # last_hidden_state.
            return self.backbone(pixel_values=normalised)[0]
        return self.backbone(normalised)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the model in its library's Hub layout (see :func:`save_pretrained`)."""
        save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, location: str | os.PathLike, revision: str | None = None) -> "RobustClassifier":
        """Load from an export folder, a training run or a Hub id (:func:`cure_hub.load_robust_model`)."""
        return load_robust_model(location, revision=revision)

    def classifier_parameter_names(self) -> list[str]:
        """Names (in this module's ``named_parameters``) of the parameters of every classification
        head (two for distilled models), found by the library's own means."""
        ids = {id(p) for head in _classifier_modules(self.backbone, self.spec) for p in head.parameters()}
        return [name for name, p in self.named_parameters() if id(p) in ids]

    def extra_repr(self) -> str:
        return (
            f"library={self.spec.library}, architecture={self.spec.architecture}, "
            f"num_classes={self.spec.num_classes}, image_size={self.spec.image_size}"
        )


class HeadNotFoundError(InputError):
    """No classification head with parameters was found: CURE would mask the classifier silently."""


def _classifier_modules(backbone: nn.Module, spec: "ModelSpec") -> list[nn.Module]:
    """timm: ``get_classifier()`` (a tuple for models with a distillation head); transformers: the
    linear layers that produce the logits (``out_features == num_labels``), wherever the model
    keeps them (``classifier``, ``fc``, ``cls_classifier`` and ``distillation_classifier``...)."""
    if spec.library == "timm":
        heads = backbone.get_classifier()
        heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    else:
        heads = [m for m in backbone.modules() if isinstance(m, nn.Linear) and m.out_features == spec.num_classes]
    heads = [head for head in heads if any(p.numel() for p in head.parameters())]
    if not heads:
        raise HeadNotFoundError(
            f"cannot find the classification head of {type(backbone).__name__} ({spec.architecture}): name the parameters "
            "CURE must not mask with --mask-exclude PATTERN (e.g. 'head.*'), or choose them with --mask-include"
        )
    return heads


def create_model(
    name: str,
    num_classes: int | None = None,
    image_size: int | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    label_names: list[str] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **kwargs: Any,
) -> RobustClassifier:
    """Build a classifier on [0, 1] images.

    Args:
        name: a timm architecture (``resnet50``, ``vit_small_patch16_224``, ``cifar_resnet18``), an
            alias (``vit_small``, see :data:`MODEL_ALIASES`), a transformers model type built from
            scratch (``vit``; size options in ``kwargs``), a transformers ``config.json`` path, or a
            transformers model folder or Hub id (loaded with ``AutoModelForImageClassification``).
        num_classes: number of classes; the architecture's default when ``None``.
        image_size: side of the input images; the architecture's default when ``None``. A ViT
            built for images smaller than its default gets a smaller patch (see
            :func:`choose_patch_size`) and position embeddings for that grid.
        pretrained: load the architecture's pretrained weights (needs the Hub or its cache).
        checkpoint: a local ``.pt``/``.pth``/``.safetensors`` state dict to load afterwards.
        label_names: class names, stored with the model.
        mean, std: override the normalisation that comes with the architecture.
        **kwargs: constructor arguments for timm (``width=16``, ``drop_path_rate=0.1``) or
            config fields for transformers (``hidden_size=192``).
    """
    source = model_source(name)  # an unknown name is refused here
    if source == "path":
        model = _create_from_path(Path(name), num_classes, image_size, pretrained, **kwargs)
    elif source == "timm":
        model = _create_timm(MODEL_ALIASES.get(name, name), num_classes, image_size, pretrained, **kwargs)
    elif source == "transformers":
        model = _create_transformers_from_config(transformers_config(name, num_classes, image_size, kwargs), image_size=image_size)
    else:
        model = from_transformers_pretrained(name, num_classes)
    if label_names is not None:
        if len(label_names) != model.spec.num_classes:
            raise InputError(f"{len(label_names)} label names given for {model.spec.num_classes} classes")
        model.spec.label_names = list(label_names)
        if model.spec.library == "transformers":
            model.backbone.config.id2label = dict(enumerate(label_names))
            model.backbone.config.label2id = {label: i for i, label in enumerate(label_names)}
            model.spec.model_args = model.backbone.config.to_diff_dict()
    if mean is not None or std is not None:
        model = RobustClassifier(model.backbone, dataclasses.replace(
            model.spec, mean=tuple(mean or model.spec.mean), std=tuple(std or model.spec.std)))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def _create_timm(arch: str, num_classes, image_size, pretrained: bool, **kwargs) -> RobustClassifier:
    """A timm architecture, or a timm-layout Hub repository (``hf-hub:owner/name``: its architecture
    and arguments, with its weights when ``pretrained``)."""
    pretrained_cfg, base_arch, hub_args = timm_pretrained_config(arch)
    default_size = pretrained_cfg["input_size"][-1] if pretrained_cfg else 224
    model_args = dict(kwargs)
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    if "img_size" in model_args:
        explicit = model_args["img_size"]
        if image_size is not None and explicit != image_size:
            raise InputError(f"--model-kwargs img_size={explicit} contradicts the image size {image_size}: give one of them")
        image_size = explicit if isinstance(explicit, int) else explicit[-1]
    elif image_size is not None and image_size != default_size:
        model_args = sized_timm_arguments(arch, image_size, model_args)
    backbone = timm.create_model(arch, pretrained=pretrained, **model_args)
    if not hasattr(backbone, "get_classifier"):
        raise UnknownModelError(f"{arch!r} is an image encoder without a classifier in timm: choose a classification architecture")
    cfg = backbone.pretrained_cfg
    spec = ModelSpec(
        library="timm",
        architecture=base_arch,
        num_classes=backbone.num_classes,
        image_size=image_size or default_size,
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        # The Hub repository's arguments too: the run rebuilds the network without the Hub.
        model_args={k: v for k, v in {**hub_args, **model_args}.items() if k != "num_classes"},
        crop_pct=cfg.get("crop_pct", 1.0) if pretrained else 1.0,
        source=(arch.removeprefix(TIMM_HUB_PREFIX) if arch.startswith(TIMM_HUB_PREFIX) else cfg.get("hf_hub_id")) if pretrained else None,
    )
    return RobustClassifier(backbone, spec)


def _create_transformers_from_config(config, image_size: int | None = None) -> RobustClassifier:
    """Built once on the meta device and fed a batch first: a model type that cannot be built here,
    or not for this size, is a one-line error rather than a crash at the first training step."""
    from transformers import AutoModelForImageClassification

    size = image_size or config_image_size(config) or 224
    failure = meta_failure(lambda: AutoModelForImageClassification.from_config(config),
                            lambda model, images: model(pixel_values=images)[0], size)
    if failure is not None:
        fields = [f"{field}={getattr(vision_config(config), field)}" for field in SIZE_FIELDS if hasattr(vision_config(config), field)]
        raise InputError(
            f"transformers {config.model_type} cannot classify {size}x{size} images ({failure})"
            + (f": set its size with --model-kwargs (now {', '.join(fields)})" if fields else "")
        )
    backbone = AutoModelForImageClassification.from_config(config)
    return _wrap_transformers(backbone, None, image_size=image_size)


def from_transformers_pretrained(name_or_path: str, num_classes: int | None, revision: str | None = None) -> RobustClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    extra = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if num_classes is not None else {}
    try:
        backbone = AutoModelForImageClassification.from_pretrained(name_or_path, revision=revision, **extra)
    except OSError as err:
        raise UnknownModelError(
            f"Could not load {name_or_path!r} as a transformers image classifier: {err}. "
            "If it is a Hub id, check the name and your network (or HF_HUB_OFFLINE with a cached copy)."
        ) from err
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError):
        processor = None
    model = _wrap_transformers(backbone, name_or_path, _processor_pixel_map(processor, name_or_path))
    model.spec.crop_pct = processor_crop_pct(processor)
    return model


def _processor_pixel_map(processor, source: str) -> PixelMap:
    """The colour map ``processor`` applies (see :mod:`cure_hub.preprocessing`); ImageNet's
    normalisation when there is no processor, or one that needs more than an image."""
    if processor is not None:
        try:
            return pixel_map(processor)
        except UnsupportedProcessorError as err:
            logger.warning("%s: %s; the model gets ImageNet-normalised RGB pixels", source, err)
    return PixelMap(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))


def _wrap_transformers(backbone: nn.Module, source: str | None, pixels: PixelMap | None = None,
                       image_size: int | None = None) -> RobustClassifier:
    """``pixels``: what the model's processor does to colours (the model type's default processor's
    when ``None``); ``image_size``: the size the model is built for (convolutional configs have no
    field for it)."""
    config = backbone.config
    pixels = pixels or _processor_pixel_map(default_image_processor(config.model_type), config.model_type)
    image_size = image_size or config_image_size(config) or 224
    labels = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else None
    spec = ModelSpec(
        library="transformers",
        architecture=config.model_type,
        num_classes=config.num_labels,
        image_size=image_size,
        mean=pixels.mean,
        std=pixels.std,
        model_args=config.to_diff_dict(),
        label_names=labels,
        source=source,
        channel_order=pixels.channel_order,
    )
    return RobustClassifier(backbone, spec)


def _create_from_path(path: Path, num_classes, image_size, pretrained: bool, **kwargs) -> RobustClassifier:
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.suffix != ".json" or not config_file.is_file():
        raise UnknownModelError(
            f"{str(path)!r} is neither a model folder with a config.json nor a config.json file "
            "(to load a state dict, pass an architecture name and checkpoint=...)"
        )
    config = json.loads(config_file.read_text())
    if "architecture" in config:  # timm's Hub layout, as cure-hub exports it
        return load_export(str(config_file.parent), config, local=True, num_classes=num_classes)
    if "model_type" not in config:
        raise UnknownModelError(f"{config_file} has neither timm's 'architecture' nor transformers' 'model_type'")
    if path.is_dir() and any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        return from_transformers_pretrained(str(path), num_classes)
    return _create_transformers_from_config(
        transformers_config(config.pop("model_type"), num_classes, image_size, {**config, **kwargs}), image_size=image_size
    )


# --------------------------------------------------------------------------------------------
# Loading weights


def read_checkpoint(path: str | os.PathLike):
    """What a ``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors`` file holds, as saved (tensors only:
    no code is run), with a damaged or unknown file refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar"):
        raise InputError(f"unsupported checkpoint format {path.suffix!r} for {str(path)!r}: use .pt, .pth or .safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip each raise their own kind for a damaged file
        raise InputError(f"cannot read the checkpoint {str(path)!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


#: Where training scripts nest the state dict in what they save: Lightning and most scripts
#: (``state_dict``), MadryLab's ``robustness`` (``model``), CURE's official code (``state``).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "state")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict (:func:`read_checkpoint`), unwrapping the usual nesting
    (:data:`STATE_DICT_KEYS`) and prefixes (``module.`` from DDP, ``_orig_mod.`` from compile)."""
    state = read_checkpoint(path)
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{str(path)!r} does not hold a state dict of tensors")
    for prefix in ("module.", "_orig_mod."):
        state = strip_prefix(state, prefix)
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` without ``prefix`` on its keys, when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: RobustClassifier, path: str | os.PathLike) -> None:
    """Load a state dict file into ``model.backbone`` (keys of the bare model, or of the wrapper)."""
    load_state(model, read_state_dict(path), f"checkpoint {str(path)!r}")


def load_state(model: RobustClassifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model.backbone``; non-finite weights, and keys or shapes that do not
    fit (the first ones named), are refused before anything is loaded."""
    check_finite(state, source)
    state = strip_prefix(state, "backbone.")
    own = model.backbone.state_dict()
    reshaped = [key for key in state if key in own and state[key].shape != own[key].shape]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:  # another network, or another layout of its keys: say which keys first
        problem = f"missing keys ({len(missing)}): {missing[:5]}; unexpected keys ({len(unexpected)}): {unexpected[:5]}"
    elif reshaped:
        key = reshaped[0]
        problem = (f"{len(reshaped)} tensors differ in shape, e.g. {key}: {tuple(state[key].shape)} in the checkpoint, "
                   f"{tuple(own[key].shape)} in the model (another width or depth?)")
    else:
        model.backbone.load_state_dict(state)
        return
    raise CheckpointMismatchError(f"{source} does not fit {model.spec.architecture} {model.spec.model_args}: {problem}")


def model_from_spec(spec: ModelSpec, weights: str | os.PathLike | None = None) -> RobustClassifier:
    """Rebuild exactly the network ``spec`` describes (no size or patch decisions are re-made),
    with the state dict in ``weights`` if given."""
    if spec.library == "timm":
        backbone = timm.create_model(spec.architecture, num_classes=spec.num_classes, **spec.model_args)
    else:
        from transformers import AutoConfig, AutoModelForImageClassification

        fields = {k: v for k, v in spec.model_args.items() if k not in ("model_type", "transformers_version")}
        backbone = AutoModelForImageClassification.from_config(AutoConfig.for_model(spec.architecture, **fields))
    model = RobustClassifier(backbone, dataclasses.replace(spec, mean=tuple(spec.mean), std=tuple(spec.std)))
    if weights is not None:
        load_weights(model, weights)
    return model


# --------------------------------------------------------------------------------------------
# Exports and Hub ids: reading and writing a RobustClassifier's files


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def load_robust_model(location: str | os.PathLike, revision: str | None = None, weights: str = "last") -> RobustClassifier:
    """The [0, 1]-input classifier stored at ``location``, in eval mode (as transformers'
    ``from_pretrained`` returns models): ready for inference, batch-norm statistics frozen.

    ``location`` is a training run folder (``weights`` picks ``last``, ``best`` or ``revision``),
    an export folder, or a Hub repository id (``revision``: a branch, tag or commit). Its
    :attr:`~RobustClassifier.threat_model` is the one it was evaluated under.
    """
    model = _load_robust_model(str(location), revision, weights).eval()
    model._find_threat_model = functools.partial(_evaluated_threat_model, str(location), revision)
    return model


def _evaluated_threat_model(location: str, revision: str | None) -> ThreatModel | None:
    """The threat model of an export's ``eval_results.json``, or of a run's training attack."""
    run = RunFolder(location)
    if run.is_run():
        attack = run.read_config()["attack"]
        return ThreatModel(attack["norm"], attack["epsilon"])
    try:
        results_file = Path(location) / "eval_results.json" if Path(location).is_dir() else Path(
            download_from_hub(location, "eval_results.json", revision=revision))
        results = read_json(results_file)
    except FileNotFoundError:  # a repository with no results of ours
        return None
    return ThreatModel(results["norm"], results["epsilon"]) if results else None  # an import with no numbers: {}


def _load_robust_model(location: str, revision: str | None, weights: str) -> RobustClassifier:
    path, run = Path(location), RunFolder(location)
    if run.is_run():
        weights_file = run.weights_file(weights)
        if not weights_file.is_file():
            raise FileNotFoundError(f"run {path} has no {weights!r} weights; it has {run.weights_names()}")
        return model_from_spec(ModelSpec.from_dict(run.read_model_spec()), weights_file)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is neither a run folder (model_spec.json) nor an export (config.json)")
        return load_export(str(path), read_json(config_file), local=True)
    if path.suffix or location.startswith((".", "/")):
        raise FileNotFoundError(f"no model at {location!r}")
    config_file = download_from_hub(location, "config.json", revision=revision)
    return load_export(location, read_json(Path(config_file)), local=False, revision=revision)


def download_from_hub(repo_id: str, filename: str, revision: str | None = None) -> str:
    """``hf_hub_download``, with a missing repository, revision or file, or an unreachable Hub,
    reported as a ``FileNotFoundError`` that names what was asked for."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub could not be reached for it (nor is it in the cache)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"no model at {repo_id!r}: not a local file or folder, nor a Hub repository with a {filename}"
            f"{f' at revision {revision!r}' if revision else ''} ({type(err).__name__})"
        ) from None


def load_export(location: str, config: dict, local: bool, revision: str | None = None,
                num_classes: int | None = None) -> RobustClassifier:
    """An export (folder or Hub id) whose ``config.json`` is ``config``; ``num_classes``, when it
    differs from the export's, gives a new, untrained head. Non-finite weights are refused."""
    model = _load_export(location, config, local, revision, num_classes)
    check_finite(model.state_dict(), f"the model at {location!r}")
    return model


def _load_export(location: str, config: dict, local: bool, revision: str | None, num_classes: int | None) -> RobustClassifier:
    if "architecture" in config:  # timm layout (models.py has registered the CIFAR architectures)
        import timm

        name = f"local-dir:{location}" if local else f"hf-hub:{location}" + (f"@{revision}" if revision else "")
        backbone = timm.create_model(name, pretrained=True, num_classes=num_classes)
        cfg = backbone.pretrained_cfg
        spec = ModelSpec(
            library="timm",
            architecture=config["architecture"],
            num_classes=backbone.num_classes,
            image_size=int(cfg["input_size"][-1]),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
            model_args=dict(config.get("model_args", {})),
            label_names=config.get("label_names"),
            source=None if local else location,
        )
        return RobustClassifier(backbone, spec)
    return from_transformers_pretrained(location, num_classes=num_classes, revision=revision)


class ExportError(RuntimeError):
    """The export cannot be written (a bad run folder, or an output folder in the way)."""


def save_pretrained(model: RobustClassifier, folder: str | os.PathLike) -> None:
    """Write ``model`` in its library's Hub layout (weights and configuration only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    if spec.library == "timm":
        _save_timm(model, folder)
    else:
        model.backbone.save_pretrained(folder, safe_serialization=True)
        _image_processor(spec).save_pretrained(folder)


#: Fields of timm's pretrained config that describe the base checkpoint, not the export.
BASE_CHECKPOINT_FIELDS = ("license", "tag", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids",
                          "paper_name", "notes")


def _save_timm(model: RobustClassifier, folder: Path) -> None:
    from huggingface_hub import save_torch_state_dict
    from timm.models._hub import save_config_for_hf

    spec = model.spec
    data_config = {"input_size": (3, spec.image_size, spec.image_size), "mean": tuple(spec.mean), "std": tuple(spec.std),
                   "crop_pct": spec.crop_pct, "crop_mode": "center"}
    config_file = folder / "config.json"
    save_config_for_hf(model.backbone, config_file, model_config={"label_names": list(spec.label_names or [])}, data_config=data_config)
    config = read_json(config_file)
    # timm keeps only the arguments its model records (drop_path_rate is lost); transformers' timm
    # wrapper passes num_classes itself and fails on a second one in model_args.
    config["model_args"] = {k: v for k, v in {**config.get("model_args", {}), **spec.model_args}.items() if k != "num_classes"}
    for field in BASE_CHECKPOINT_FIELDS:  # the base checkpoint's, not this model's (the card has its own)
        config["pretrained_cfg"].pop(field, None)
    config["label_names"] = list(spec.label_names or [str(i) for i in range(spec.num_classes)])
    config_file.write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    save_torch_state_dict(state, folder, max_shard_size="50GB")


def _image_processor(spec: ModelSpec):
    """The model type's processor (ViT's where it has none, or where its options cannot express
    the model's normalisation), checked to give the export the pixels ``spec`` describes."""
    from transformers import ViTImageProcessor

    target = PixelMap(tuple(spec.mean), tuple(spec.std), spec.channel_order)
    for processor in filter(None, (default_image_processor(spec.architecture), ViTImageProcessor())):
        if (configured := processor_applying(processor, target, spec.image_size)) is not None:
            return configured
    raise ExportError(
        f"no image processor for {spec.architecture} can give the model its pixels ({spec.channel_order}, mean {list(spec.mean)}, "
        f"std {list(spec.std)}): pipeline() would feed it the wrong input"
    )
