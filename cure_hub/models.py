"""Model factory: any timm architecture, any transformers image classifier, the paper's CIFAR nets.

Every model is returned as a :class:`RobustClassifier`: it takes images in [0, 1], shape
(N, C, H, W), normalises them with the mean and std that belong to the architecture, and returns
logits. Attacks therefore work in pixel space (epsilon = 8/255 is 8/255 of a pixel), and the
normalisation is part of the model's saved description (:class:`ModelSpec`), not of the data.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from . import architectures  # noqa: F401  (registers the CIFAR architectures with timm)
from .config import InputError
from .preprocessing import PixelMap, UnsupportedProcessorError, pixel_map

logger = logging.getLogger(__name__)

#: How timm names a timm-layout Hub repository: ``hf-hub:owner/name``.
TIMM_HUB_PREFIX = "hf-hub:"
#: Short names users type, mapped onto timm architectures. None is the name of a timm architecture
#: or a transformers model type (``convnext`` is transformers' ConvNeXt; timm's is ``convnext_tiny``).
MODEL_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "wrn34_10": "cifar_wrn34_10",
    "preactresnet18": "cifar_preactresnet18",
}

#: The fewest patches per side a ViT keeps when built for images smaller than its default.
MIN_PATCH_GRID = 8


class UnknownModelError(InputError):
    """The model name is neither a timm architecture, an alias, a transformers model nor a path."""


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

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

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
        """Write the model in its library's Hub layout (see :func:`cure_hub.hub.save_pretrained`)."""
        from .hub import save_pretrained

        save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, location: str | os.PathLike, revision: str | None = None) -> "RobustClassifier":
        """Load from an export folder, a training run or a Hub id (:func:`cure_hub.load_robust_model`)."""
        from .hub import load_robust_model

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


def known_model_names() -> list[str]:
    """timm architectures, aliases and transformers image-classification model types."""
    return sorted(set(timm.list_models()) | set(MODEL_ALIASES) | set(_transformers_model_types()))


def describe_model_name(name: str) -> str:
    """``name``'s library (and what an alias stands for) and its parameter count, counted on the
    meta device (no memory): ``vit_small: timm, alias of vit_small_patch16_224, 22.1M parameters``."""
    if name in MODEL_ALIASES:
        library, built = f"timm, alias of {MODEL_ALIASES[name]}", MODEL_ALIASES[name]
    else:
        library, built = ("timm" if timm.is_model(name) else "transformers"), name
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if timm.is_model(built):
                model = timm.create_model(built)
            else:
                from transformers import AutoModelForImageClassification

                model = AutoModelForImageClassification.from_config(_transformers_config(built, None, None, {}))
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    except Exception:  # a model type that needs an extra package; the name is still worth listing
        size = "parameters unknown (cannot be built here)"
    return f"{name}: {library}, {size}"


def _transformers_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return [t for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if t != "timm_wrapper"]


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
    if (path := Path(name)).exists():
        model = _create_from_path(path, num_classes, image_size, pretrained, **kwargs)
    elif _is_timm_name(name):
        model = _create_timm(MODEL_ALIASES.get(name, name), num_classes, image_size, pretrained, **kwargs)
    elif name in _transformers_model_types():
        model = _create_transformers_from_config(_transformers_config(name, num_classes, image_size, kwargs), image_size=image_size)
    elif "/" in name and not name.startswith((".", "/")):
        model = from_transformers_pretrained(name, num_classes)
    else:
        suggestions = difflib.get_close_matches(name, known_model_names(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        raise UnknownModelError(
            f"Unknown model {name!r}: not a timm architecture, alias, transformers model type, "
            f"local path or Hub id.{hint}"
        )
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


def pretrained_preprocessing(name: str) -> tuple[int | None, float]:
    """The image size a pretrained checkpoint was trained at (``None`` when it does not say) and
    the share of the shortest edge its evaluation centre crop keeps (1.0 when it does not say):
    from timm's pretrained config (an architecture, an alias, an ``hf-hub:`` repository) or a
    transformers checkpoint's config and image processor (a Hub id or folder)."""
    if _is_timm_name(name):
        cfg = _timm_pretrained_config(MODEL_ALIASES.get(name, name))[0]
        return (cfg["input_size"][-1] if cfg else None), cfg.get("crop_pct", 1.0)
    if name in _transformers_model_types():
        return None, 1.0
    from transformers import AutoConfig, AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    size = _config_image_size(AutoConfig.from_pretrained(name))
    if size is None and processor is not None:
        size = processor.size.get("height") or processor.size.get("shortest_edge")
    return size, _processor_crop_pct(processor)


def _processor_crop_pct(processor) -> float:
    """The share of the shortest edge a transformers processor's evaluation crop keeps: its
    ``crop_pct`` (ConvNeXt's), or its crop size over the edge it resizes to (BiT's, CLIP's)."""
    if processor is None:
        return 1.0
    if getattr(processor, "crop_pct", None):
        return float(processor.crop_pct)
    crop, size = getattr(processor, "crop_size", None) or {}, processor.size or {}
    if getattr(processor, "do_center_crop", False) and crop.get("height") and size.get("shortest_edge"):
        return min(1.0, crop["height"] / size["shortest_edge"])
    return 1.0


def loads_pretrained_weights(name: str, pretrained: bool) -> bool:
    """Whether ``create_model(name, pretrained=pretrained)`` starts from trained weights: with
    ``pretrained``, or from a transformers checkpoint (a Hub id or a folder with weights)."""
    if pretrained:
        return True
    path = Path(name)
    if path.exists():
        return path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    return not (_is_timm_name(name) or name in _transformers_model_types()) and "/" in name


def has_pretrained_weights(name: str) -> bool:
    """Whether ``--pretrained`` has weights to load for ``name``: a timm architecture (or alias)
    whose default pretrained config names a file, or a timm-layout Hub repository."""
    arch = MODEL_ALIASES.get(name, name)
    if arch.startswith(TIMM_HUB_PREFIX):
        return True
    cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    return bool(cfg and (cfg.hf_hub_id or cfg.url or cfg.file))


def _is_timm_name(name: str) -> bool:
    """A timm architecture, an alias of one, or a timm-layout Hub repository."""
    return name in MODEL_ALIASES or timm.is_model(name) or name.startswith(TIMM_HUB_PREFIX)


def _timm_pretrained_config(arch: str) -> tuple[dict, str, dict]:
    """For a timm architecture or ``hf-hub:`` repository: its pretrained config (``{}`` when it has
    none: input size, crop_pct, mean, std...), the architecture's name, and the repository's arguments."""
    if arch.startswith(TIMM_HUB_PREFIX):
        from timm.models import load_model_config_from_hf

        cfg, base_arch, hub_args = load_model_config_from_hf(arch.removeprefix(TIMM_HUB_PREFIX))
        return cfg, base_arch, hub_args or {}
    cfg = timm.models.get_pretrained_cfg(arch)
    return (cfg.to_dict() if cfg else {}), arch, {}


def choose_patch_size(image_size: int, default_patch: int) -> int:
    """The largest patch no bigger than ``default_patch`` that tiles ``image_size`` into a grid of
    at least :data:`MIN_PATCH_GRID` patches per side (32x32 images: patch 4, an 8x8 grid)."""
    if image_size % default_patch == 0 and image_size // default_patch >= MIN_PATCH_GRID:
        return default_patch
    candidates = [p for p in range(1, default_patch + 1) if image_size % p == 0 and image_size // p >= MIN_PATCH_GRID]
    return max(candidates) if candidates else 1


def _create_timm(arch: str, num_classes, image_size, pretrained: bool, **kwargs) -> RobustClassifier:
    """A timm architecture, or a timm-layout Hub repository (``hf-hub:owner/name``: its architecture
    and arguments, with its weights when ``pretrained``)."""
    pretrained_cfg, base_arch, hub_args = _timm_pretrained_config(arch)
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
        model_args = _sized_timm_arguments(arch, image_size, model_args)
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


def _sized_timm_arguments(arch: str, image_size: int, model_args: dict) -> dict:
    """``model_args`` plus what builds ``arch`` for ``image_size`` inputs, as far as the model takes
    it: a smaller patch (:func:`choose_patch_size`) and ``img_size`` for a ViT-like model,
    ``img_size`` alone when the patch cannot change, nothing for a model that takes no image size
    (most convolutional networks take any). The first of these that builds and classifies such
    images on the meta device (no memory, no arithmetic) wins; when none does, a one-line error.
    Trying beats reading signatures: many timm classes take ``**kwargs`` and pass them on."""
    with torch.device("meta"):
        probe = timm.create_model(arch, **model_args)
    patch_embed = next((module for name, module in probe.named_modules() if name.rpartition(".")[2] == "patch_embed"), None)
    patch_size = getattr(patch_embed, "patch_size", None)  # also where a wrapper keeps it (DeepSeek's encoder)
    default_patch = patch_size if isinstance(patch_size, int) else (patch_size[0] if patch_size else None)
    candidates = []  # (arguments, what the log says about them); one the constructor does not take fails to build
    if default_patch is not None:
        patch = model_args.get("patch_size", choose_patch_size(image_size, default_patch))
        if not (isinstance(patch, int) and 0 < patch <= image_size and image_size % patch == 0):
            raise InputError(
                f"patch_size={patch!r} does not tile {image_size}x{image_size} images: pass --model-kwargs patch_size=N "
                f"with N dividing {image_size}, or leave it out to get {choose_patch_size(image_size, default_patch)}"
            )
        grid = image_size // patch
        candidates.append(({**model_args, "img_size": image_size, "patch_size": patch},
                           f"patch size {patch}, {grid * grid} tokens, position embeddings for a {grid}x{grid} grid"))
    if "patch_size" not in model_args:
        candidates.append(({**model_args, "img_size": image_size}, "its own patch size"))
    candidates.append((model_args, "as timm builds it"))
    for sized, description in candidates:
        build = (lambda: probe) if sized is model_args else (lambda: timm.create_model(arch, **sized))  # timm's own: built above
        if (failure := _meta_failure(build, nn.Module.__call__, image_size)) is None:
            logger.info("%s built for %dx%d images: %s", arch, image_size, image_size, description)
            return sized
    raise InputError(  # the failure of timm's own build, the last candidate, which says most
        f"{arch} cannot classify {image_size}x{image_size} images ({failure}): train it at a size it takes "
        "(--image-size, e.g. its default), or set its size with --model-kwargs (img_size=..., patch_size=...)"
    )


def _meta_failure(build, forward, image_size: int) -> str | None:
    """Why the model ``build()`` returns fails on a batch of ``image_size`` images (``forward(model,
    images)`` gives its logits), tried on the meta device; ``None`` when it does not, or when an
    operation has no meta kernel to tell."""
    try:
        with torch.device("meta"):
            logits = forward(build().eval(), torch.zeros(1, 3, image_size, image_size))
    except NotImplementedError:
        return None
    except ImportError as err:  # transformers names the missing package over several lines
        return f"{type(err).__name__}: {' '.join(str(err).split())}"
    except Exception as err:  # each architecture fails in its own way: shapes, asserts, even a raised string
        if "meta tensor" in str(err):  # a value-dependent operation (.item()): the meta device cannot tell
            return None
        first_line = next((line for line in str(err).splitlines() if line.strip()), "no message")
        return f"{type(err).__name__}: {first_line}"
    return None if logits.dim() == 2 else f"its output has shape {tuple(logits.shape)}"


def _transformers_config(model_type: str, num_classes, image_size, fields: dict):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.for_model(model_type, **fields)
    if num_classes is not None:
        config.num_labels = num_classes
    if not config.architectures:  # the Auto class reads it to choose between DeiT's (LeViT's...) two classifiers
        classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
        config.architectures = [classes if isinstance(classes, str) else classes[0]]
    vision = _vision_config(config)
    if image_size is not None and hasattr(vision, "image_size"):
        if isinstance(getattr(vision, "patch_size", None), int) and "patch_size" not in fields:
            vision.patch_size = choose_patch_size(image_size, vision.patch_size)
            logger.info("%s built for %dx%d images: patch size %d", model_type, image_size, image_size, vision.patch_size)
        vision.image_size = image_size if isinstance(vision.image_size, int) else [image_size, image_size]  # Hiera: a pair
    return config


def _config_image_size(config) -> int | None:
    """A transformers config's image size (an int or a (height, width) pair) as one side, from its
    vision config where it has one; ``None`` when it has none (most convolutional networks)."""
    size = getattr(_vision_config(config), "image_size", None)
    return size if size is None or isinstance(size, int) else size[-1]


def _vision_config(config):
    """Where a transformers config keeps its image fields: its ``vision_config`` (CLIP, SigLIP) or itself."""
    return getattr(config, "vision_config", None) or config


#: transformers config fields that decide which image sizes a model takes.
SIZE_FIELDS = ("image_size", "patch_size", "window_size", "patch_stride", "mask_unit_size")


def _create_transformers_from_config(config, image_size: int | None = None) -> RobustClassifier:
    """Built once on the meta device and fed a batch first: a model type that cannot be built here,
    or not for this size, is a one-line error rather than a crash at the first training step."""
    from transformers import AutoModelForImageClassification

    size = image_size or _config_image_size(config) or 224
    failure = _meta_failure(lambda: AutoModelForImageClassification.from_config(config),
                            lambda model, images: model(pixel_values=images)[0], size)
    if failure is not None:
        fields = [f"{field}={getattr(_vision_config(config), field)}" for field in SIZE_FIELDS if hasattr(_vision_config(config), field)]
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
    model.spec.crop_pct = _processor_crop_pct(processor)
    return model


def default_image_processor(model_type: str):
    """The model type's image processor with its default settings, if one can be made."""
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    entry = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    names = entry.values() if isinstance(entry, dict) else (entry if isinstance(entry, tuple) else [entry])
    for class_name in filter(None, names):
        processor_cls = get_image_processor_class_from_name(class_name)
        if processor_cls is None:
            continue
        try:
            processor = processor_cls()
        except Exception:  # some processors need extra packages to instantiate
            continue
        if getattr(processor, "image_mean", None) is not None:
            return processor
    return None


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
    image_size = image_size or _config_image_size(config) or 224
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
        from .hub import load_export

        return load_export(str(config_file.parent), config, local=True, num_classes=num_classes)
    if "model_type" not in config:
        raise UnknownModelError(f"{config_file} has neither timm's 'architecture' nor transformers' 'model_type'")
    if path.is_dir() and any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        return from_transformers_pretrained(str(path), num_classes)
    return _create_transformers_from_config(
        _transformers_config(config.pop("model_type"), num_classes, image_size, {**config, **kwargs}), image_size=image_size
    )


# --------------------------------------------------------------------------------------------
# Loading weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth``/``.bin``/``.safetensors`` state dict, unwrapping the usual nesting
    (``state_dict``, ``model``) and prefixes (``module.`` from DDP, ``_orig_mod.`` from compile)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix not in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise InputError(f"unsupported checkpoint format {path.suffix!r} for {str(path)!r}: use .pt, .pth or .safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip each raise their own kind for a damaged file
        raise InputError(f"cannot read the checkpoint {str(path)!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{str(path)!r} does not hold a state dict of tensors")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: RobustClassifier, path: str | os.PathLike) -> None:
    """Load a state dict into ``model.backbone`` (keys of the bare model, or of the wrapper)."""
    state = read_state_dict(path)
    check_finite(state, f"checkpoint {str(path)!r}")
    if state and all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()}
    own = model.backbone.state_dict()
    reshaped = [key for key in state if key in own and state[key].shape != own[key].shape]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if reshaped:
        key = reshaped[0]
        problem = (f"{len(reshaped)} tensors differ in shape, e.g. {key}: {tuple(state[key].shape)} in the checkpoint, "
                   f"{tuple(own[key].shape)} in the model (another width or depth?)")
    elif missing or unexpected:
        problem = f"missing keys ({len(missing)}): {missing[:5]}; unexpected keys ({len(unexpected)}): {unexpected[:5]}"
    else:
        model.backbone.load_state_dict(state)
        return
    raise CheckpointMismatchError(f"checkpoint {str(path)!r} does not fit {model.spec.architecture} {model.spec.model_args}: {problem}")


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
