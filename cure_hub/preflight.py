"""Every refusal and warning before training, in the order a run meets them.

The trainer builds; this module judges, in the trainer's order: the preprocessing a pretrained
model implies (:func:`resolve_preprocessing`); what is wrong with the command, before anything is
read or downloaded (:func:`check_before_loading`: the model's name, the output folder, the Hub token, the engine;
then :func:`resolve_weights_file` and the method's start, :func:`check_method_start`); what needs
the model or the data, as soon as they are built (:func:`check_model`, :func:`count_steps`); and
last the warnings about the built run (:func:`warn_about_run`). A new check is one function here,
called from the trainer next to its neighbours in that order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import InputError, OptimConfig, TrainConfig, check_resume_changes, run_folder_of
from .methods import METHOD_CLASSES, Method
from .model_configs import loads_pretrained_weights, model_source, pretrained_preprocessing
from .models import check_channels_last_training_on_cpu, download_from_hub
from .run_folder import RunFolder, file_in_the_way
from .sharding import FSDP2, engine_name
from .system import usable_cpu_cores

logger = logging.getLogger(__name__)


def resolve_preprocessing(config: TrainConfig) -> TrainConfig:
    """A pretrained model is fine-tuned at the size it was pretrained at, unless --image-size says
    otherwise: the images are resized to it (CIFAR's 32 px to a ViT's 224); its evaluation crop is
    the checkpoint's, unless --crop-pct says otherwise."""
    if not loads_pretrained_weights(config.model.model, config.model.pretrained) or (
            config.data.image_size is not None and config.data.crop_pct is not None):
        return config
    native, crop_pct = pretrained_preprocessing(config.model.model)
    data = dataclasses.replace(config.data, crop_pct=config.data.crop_pct or crop_pct)
    if native and config.data.image_size is None:
        logger.info("%s was pretrained on %d px images: the images are resized to %d px (--image-size to choose)",
                    config.model.model, native, native)
        data = dataclasses.replace(data, image_size=native)
    return dataclasses.replace(config, data=data)


def check_before_loading(config: TrainConfig, accelerator: Accelerator) -> bool:
    """The checks that need neither data nor model, fastest first. Returns whether an earlier run's
    outputs are to be cleared from the output folder (``--overwrite-output-dir``)."""
    model_source(config.model.model)  # an unknown model name is refused first, alone
    clear = check_output_folder(config)
    if config.run.push_to_hub and accelerator.is_main_process:  # before hours of training, not after
        from .hub import check_push_access

        check_push_access(config.run.hub_model_id)
    engine = engine_name(accelerator)
    if engine == FSDP2 and config.optim.compile:  # the model is compiled before Accelerate shards it
        raise InputError("--compile under FSDP2 is not supported: train without --compile, or under DDP")
    check_engine_supports(config, engine)
    return clear


def check_method_start(config: TrainConfig) -> None:
    """The method's own refusals and warnings about where it starts (CURE: a naturally trained model)."""
    METHOD_CLASSES[config.method.method].check_start(config)


def check_engine_supports(config: TrainConfig, engine: str) -> None:
    """Refuse an engine (:func:`~cure_hub.sharding.engine_name`) under which the method would silently
    train something else."""
    METHOD_CLASSES[config.method.method].check_engine(engine, config)


def check_output_folder(config: TrainConfig) -> bool:
    """A resumed run continues its own trajectory in its own folder; a new run does not write over
    another unless told to. Returns whether the earlier run's outputs are to be cleared."""
    run = config.run
    if file := file_in_the_way(run.output_dir):
        raise InputError(f"output_dir {run.output_dir!r} lies under {str(file)!r}, which is a file: choose another --output-dir")
    if run.resume_from:
        folder = run_folder_of(run.resume_from)
        check_resume_changes(TrainConfig.of_run(folder), config, folder)
        return False
    if not RunFolder(run.output_dir).holds_run():
        return False
    if not run.overwrite_output_dir:
        raise FileExistsError(
            f"{run.output_dir} already holds a run; pass --resume-from {run.output_dir} to continue it, "
            "--overwrite-output-dir to replace it, or another --output-dir"
        )
    return True


def resolve_weights_file(location: str) -> str:
    """A state-dict file from a file, a run folder (its last weights), an export folder or a Hub id."""
    path = Path(location)
    if path.is_file():
        return str(path)
    for candidate in (RunFolder(path).weights_file("last"), path / "model.safetensors"):
        if candidate.is_file():
            return str(candidate)
    if path.exists():
        raise FileNotFoundError(f"{location!r} holds no weights (weights/last.safetensors or model.safetensors)")
    try:
        return download_from_hub(location, "model.safetensors")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. If {location!r} is the folder of another run, train that run first: the CURE recipes in recipes/ "
            "start from the run of the natural recipe named at their top (cure-hub train --recipe recipes/natural_<setting>.yaml)"
        ) from None


def count_steps(config: TrainConfig, batches_per_epoch: int | None, train_examples: int | None) -> tuple[int | None, int, int]:
    """Optimiser steps per epoch, in all, and of the natural warm-up; ``batches_per_epoch`` is
    ``None`` for a stream of undeclared size, whose epochs end when it does."""
    optim: OptimConfig = config.optim
    if batches_per_epoch is None:
        if not optim.max_steps or optim.warmup_epochs:
            raise InputError(
                f"the streamed dataset {config.data.dataset!r} does not declare its size, so epochs cannot be "
                "counted in steps: set --max-steps (and give the warm-up in steps: no --warmup-epochs)"
            )
        return None, optim.max_steps, 0
    if batches_per_epoch < optim.gradient_accumulation_steps:
        raise ValueError(
            f"{train_examples} training examples make {batches_per_epoch} batches of {optim.batch_size} per "
            f"process, fewer than gradient_accumulation_steps={optim.gradient_accumulation_steps}"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / optim.gradient_accumulation_steps)
    total_steps = optim.max_steps or steps_per_epoch * optim.epochs
    return steps_per_epoch, total_steps, min(optim.warmup_epochs * steps_per_epoch, total_steps)


def check_model(config: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, method: Method) -> None:
    """What the built model must allow: channels-last on a CPU, and the method's own needs."""
    if config.optim.channels_last and accelerator.device.type == "cpu":
        check_channels_last_training_on_cpu(model)
    method.check_model(model)


def warn_about_run(accelerator: Accelerator, method: Method, method_steps: int) -> None:
    """The method's warnings about its settings over ``method_steps``, and a CPU run on one thread of several cores."""
    for warning in method.schedule_warnings(method_steps):
        logger.warning(warning)
    if accelerator.device.type == "cpu":
        cores = len(usable_cpu_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        if torch.get_num_threads() == 1 < cores:
            logger.warning(
                "training on 1 CPU thread while %d cores are free per process: OMP_NUM_THREADS=1 is set (accelerate launch "
                "sets it on a machine without GPU unless given --cpu or --num_cpu_threads_per_process N)", cores,
            )
