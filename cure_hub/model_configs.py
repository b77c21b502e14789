"""What a model name stands for, and what builds it at an image size, before any network exists:
aliases, the names timm and transformers know, their pretrained configurations and preprocessing,
and the size arguments (patch, image size) that fit an architecture to small images."""

from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from . import architectures  # noqa: F401  (registers the CIFAR architectures with timm)
from .config import InputError

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


def model_source(name: str) -> str:
    """Where a model name leads, in this order: ``"path"`` (a local file or folder), ``"timm"`` (an
    architecture, an alias or a timm-layout Hub repository), ``"transformers"`` (a model type, built
    from its config) or ``"hub"`` (a transformers Hub id). Any other name is refused, suggesting the
    nearest known names: the trainer asks before anything else is checked or loaded."""
    if Path(name).exists():
        return "path"
    if is_timm_name(name):
        return "timm"
    if name in transformers_model_types():
        return "transformers"
    if "/" in name and not name.startswith((".", "/")):
        return "hub"
    suggestions = difflib.get_close_matches(name, known_model_names(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    raise UnknownModelError(f"Unknown model {name!r}: not a timm architecture, alias, transformers model type, "
                            f"local path or Hub id.{hint}")


def known_model_names() -> list[str]:
    """timm architectures, aliases and transformers image-classification model types."""
    return sorted(set(timm.list_models()) | set(MODEL_ALIASES) | set(transformers_model_types()))


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

                model = AutoModelForImageClassification.from_config(transformers_config(built, None, None, {}))
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    except Exception:  # a model type that needs an extra package; the name is still worth listing
        size = "parameters unknown (cannot be built here)"
    return f"{name}: {library}, {size}"


def transformers_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return [t for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if t != "timm_wrapper"]


def pretrained_preprocessing(name: str) -> tuple[int | None, float]:
    """The image size a pretrained checkpoint was trained at (``None`` when it does not say) and
    the share of the shortest edge its evaluation centre crop keeps (1.0 when it does not say):
    from timm's pretrained config (an architecture, an alias, an ``hf-hub:`` repository) or a
    transformers checkpoint's config and image processor (a Hub id or folder)."""
    if is_timm_name(name):
        cfg = timm_pretrained_config(MODEL_ALIASES.get(name, name))[0]
        return (cfg["input_size"][-1] if cfg else None), cfg.get("crop_pct", 1.0)
    if name in transformers_model_types():
        return None, 1.0
    from transformers import AutoConfig, AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    size = config_image_size(AutoConfig.from_pretrained(name))
    if size is None and processor is not None:
        size = processor.size.get("height") or processor.size.get("shortest_edge")
    return size, processor_crop_pct(processor)


def processor_crop_pct(processor) -> float:
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
    return not (is_timm_name(name) or name in transformers_model_types()) and "/" in name


def has_pretrained_weights(name: str) -> bool:
    """Whether ``--pretrained`` has weights to load for ``name``: a timm architecture (or alias)
    whose default pretrained config names a file, or a timm-layout Hub repository."""
    arch = MODEL_ALIASES.get(name, name)
    if arch.startswith(TIMM_HUB_PREFIX):
        return True
    cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    return bool(cfg and (cfg.hf_hub_id or cfg.url or cfg.file))


def is_timm_name(name: str) -> bool:
    """A timm architecture, an alias of one, or a timm-layout Hub repository."""
    return name in MODEL_ALIASES or timm.is_model(name) or name.startswith(TIMM_HUB_PREFIX)


def timm_pretrained_config(arch: str) -> tuple[dict, str, dict]:
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


def sized_timm_arguments(arch: str, image_size: int, model_args: dict) -> dict:
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
        if (failure := meta_failure(build, nn.Module.__call__, image_size)) is None:
            logger.info("%s built for %dx%d images: %s", arch, image_size, image_size, description)
            return sized
    raise InputError(  # the failure of timm's own build, the last candidate, which says most
        f"{arch} cannot classify {image_size}x{image_size} images ({failure}): train it at a size it takes "
        "(--image-size, e.g. its default), or set its size with --model-kwargs (img_size=..., patch_size=...)"
    )


def meta_failure(build, forward, image_size: int) -> str | None:
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


def transformers_config(model_type: str, num_classes, image_size, fields: dict):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.for_model(model_type, **fields)
    if num_classes is not None:
        config.num_labels = num_classes
    if not config.architectures:  # the Auto class reads it to choose between DeiT's (LeViT's...) two classifiers
        classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
        config.architectures = [classes if isinstance(classes, str) else classes[0]]
    vision = vision_config(config)
    if image_size is not None and hasattr(vision, "image_size"):
        if isinstance(getattr(vision, "patch_size", None), int) and "patch_size" not in fields:
            vision.patch_size = choose_patch_size(image_size, vision.patch_size)
            logger.info("%s built for %dx%d images: patch size %d", model_type, image_size, image_size, vision.patch_size)
        vision.image_size = image_size if isinstance(vision.image_size, int) else [image_size, image_size]  # Hiera: a pair
    return config


def config_image_size(config) -> int | None:
    """A transformers config's image size (an int or a (height, width) pair) as one side, from its
    vision config where it has one; ``None`` when it has none (most convolutional networks)."""
    size = getattr(vision_config(config), "image_size", None)
    return size if size is None or isinstance(size, int) else size[-1]


def vision_config(config):
    """Where a transformers config keeps its image fields: its ``vision_config`` (CLIP, SigLIP) or itself."""
    return getattr(config, "vision_config", None) or config


#: transformers config fields that decide which image sizes a model takes.
SIZE_FIELDS = ("image_size", "patch_size", "window_size", "patch_stride", "mask_unit_size")


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
