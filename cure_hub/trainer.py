"""The Accelerate training loop: any method, one CPU or GPU or many, resumable.

Run folder layout::

    config.yaml              the resolved TrainConfig
    model_spec.json          how to rebuild the network (architecture, arguments, mean/std, labels)
    metrics.jsonl            one JSON object per logged step and per evaluation
    layer_statistics.jsonl   per logged step, the method's per-parameter statistics (CURE: Figure 6)
    weights/last.safetensors       the model at the end (bare backbone state dict)
    weights/best.safetensors       the model with the best PGD accuracy during training
    weights/revision.safetensors   CURE's revision model at the end
    weights/start.safetensors      the weights the robust method started from (for cure-hub tradeoff)
    checkpoints/step_XXXXXXX/      full training state (Accelerate's save_state + ours)
    summary.json             steps, wall time, hardware, final and best evaluation

A checkpoint holds what every process needs to continue exactly as an uninterrupted run would:
Accelerate's state (model, optimiser, scheduler, each process's global random state), the shared
counters (:class:`TrainingState`) and, per process, ``process_state_<rank>.pt``: that process's
augmentation and attack generators, its method state (CURE's revision model) and its model
buffers (batch-norm statistics, which each process updates on its own batches). A checkpoint is
written before the evaluation at the end of an epoch, and the evaluation draws from its own
generator, so a run killed at any point resumes to the same weights, metrics and logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import save_torch_state_dict
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .alarms import (
    PROBE_EXAMPLES,
    ROBUST_OVERFITTING,
    TRAINING_COLLAPSE,
    gradient_masking,
    large_epsilon_accuracy,
    robust_overfitting,
    training_collapse,
)
from .attacks import eval_mode, pgd_attack
from .config import AttackConfig, InputError, MethodConfig, TrainConfig, check_resume_changes, run_folder_of
from .data import augment, augmentation_for, collate, load_data
from .streaming import StreamedEpochs, load_streamed_data
from .system import describe_hardware, git_commit, keep_freed_heap_memory, usable_cpu_cores
from .methods import Method, build_method, compile_for_training
from .methods.base import MAIN_LOSS, REGULARISER, unwrap
from .methods.cure import masked_parameter_names, start_share_of_revision
from .models import (
    CheckpointMismatchError,
    RobustClassifier,
    check_channels_last_training_on_cpu,
    create_model,
    has_pretrained_weights,
    load_weights,
    loads_pretrained_weights,
    pretrained_preprocessing,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
PROCESS_STATE_FILE = "process_state_{}.pt"
#: What a run folder holds besides its configuration: removed by --overwrite-output-dir.
RUN_OUTPUTS = ("checkpoints", "weights", "export", "metrics.jsonl", "layer_statistics.jsonl", "summary.json")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing of that state is saved or exported."""


class TrainingCollapsedError(RuntimeError):
    """The training-collapse alarm fired under ``--stop-on-collapse``: the run stopped, with a checkpoint and no export."""

class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the data order of any epoch can be replayed."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


@dataclasses.dataclass
class TrainingState:
    """Counters shared by every process, saved with every checkpoint (registered with Accelerate)."""

    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    best_pgd_accuracy: float = -1.0
    #: The step of the last evaluation whose results are kept (-1: none yet).
    evaluated_at_step: int = -1
    #: Training time of every segment of the run up to this checkpoint.
    train_seconds: float = 0.0
    #: The processes that wrote the checkpoint: each restores its own state, and the data is sharded by their number.
    num_processes: int = 1
    #: PGD accuracy of every evaluation of an adversarial method so far (the robust-overfitting alarm reads it).
    robust_history: list = dataclasses.field(default_factory=list)
    #: [training accuracy, main loss, regulariser], averaged over the processes, of every logged step of a
    #: method with a regulariser (the training-collapse alarm reads it).
    training_history: list = dataclasses.field(default_factory=list)
    #: Every training-health alarm raised so far (cure_hub.alarms), and whether one ended the run.
    alarms: list = dataclasses.field(default_factory=list)
    stopped_by_alarm: bool = False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def lr_multiplier(step: int, total_steps: int, config) -> float:
    """Learning-rate factor at optimiser step ``step``: linear warm-up, then the schedule."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    progress = step / max(total_steps, 1)
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.lr_schedule == "piecewise":
        return 0.1 ** sum(progress >= m for m in config.lr_milestones)
    return 1.0


def build_model(config: TrainConfig, num_classes: int, image_size: int, label_names, init_weights: str | None = None) -> RobustClassifier:
    """The network ``config.model`` describes, with the weights of ``init_weights`` (the file that
    ``config.model.init_from`` resolves to) when given."""
    model = create_model(
        config.model.model,
        num_classes=num_classes,
        image_size=image_size,
        pretrained=config.model.pretrained,
        label_names=label_names,
        **config.model.model_kwargs,
    )
    if init_weights:
        try:
            load_weights(model, init_weights)
        except CheckpointMismatchError as err:
            spec_file = Path(config.model.init_from) / "model_spec.json"
            if not spec_file.is_file():
                raise
            spec = json.loads(spec_file.read_text())
            arguments = " ".join(f"{k}={v}" for k, v in spec["model_args"].items() if k != "num_classes")
            raise CheckpointMismatchError(
                f"{err}. The run {config.model.init_from} built {spec['architecture']} with {spec['model_args']}: "
                f"pass --model {spec['architecture']}" + (f" --model-kwargs {arguments}" if arguments else "")
            ) from None
        model.spec.source = config.model.init_from
    model.spec.crop_pct = config.data.crop_pct or 1.0  # the crop the run evaluates with, recorded in its exports
    return model


def resolve_weights_file(location: str) -> str:
    """A state-dict file from a file, a run folder (its last weights), an export folder or a Hub id."""
    path = Path(location)
    if path.is_file():
        return str(path)
    for candidate in (path / "weights" / "last.safetensors", path / "model.safetensors"):
        if candidate.is_file():
            return str(candidate)
    if path.exists():
        raise FileNotFoundError(f"{location!r} holds no weights (weights/last.safetensors or model.safetensors)")
    from .hub import download_from_hub

    try:
        return download_from_hub(location, "model.safetensors")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. If {location!r} is the folder of another run, train that run first: the CURE recipes in recipes/ "
            "start from the run of the natural recipe named at their top (cure-hub train --recipe recipes/natural_<setting>.yaml)"
        ) from None


#: Accelerate's engines that shard parameters or gradients over the processes, or take the
#: optimiser step themselves.
SHARDING_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_engine_supports(method: str, distributed_type) -> None:
    """CURE needs every process to hold whole weight and gradient tensors between backward and the
    optimiser step (DDP): its masks are percentiles over whole tensors, and its revision model is
    a copy of whole weights. Under FSDP, DeepSpeed or Megatron-LM a process holds shards, so the
    masks would silently differ from the method's: refuse, rather than train something else."""
    if method == "cure" and distributed_type.name in SHARDING_ENGINES:
        raise InputError(
            f"CURE needs data-parallel training (DDP): under {distributed_type.name} each process holds shards of the "
            "weights and gradients, and CURE's masks are percentiles over whole tensors. Launch without "
            "FSDP/DeepSpeed (accelerate config: distributed type MULTI_GPU), or train another --method"
        )


class Trainer:
    """Trains ``config.model`` on ``config.data`` with ``config.method`` under Accelerate."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.optim.mixed_precision,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            log_with=None if config.run.report_to == "none" else config.run.report_to,
            project_dir=str(self.output_dir),
            dataloader_config=DataLoaderConfiguration(split_batches=False),
        )
        if not self.accelerator.is_main_process:  # one copy of every log line, as Accelerate's logger
            logging.getLogger("cure_hub").setLevel(logging.ERROR)
        self._stop_signal: int | None = None
        self._checkpointed_at: tuple | None = None
        self._alarm_names: list[str] = []  # of the last evaluation, for the progress bar (with a training collapse)

    # ---- setup ------------------------------------------------------------------------------
    def _prepare(self):
        self._resolve_preprocessing()
        config, accelerator = self.config, self.accelerator
        self._check_output_dir()
        if config.run.push_to_hub and accelerator.is_main_process:  # before hours of training, not after
            from .hub import check_push_access

            check_push_access(config.run.hub_model_id)
        check_engine_supports(config.method.method, accelerator.distributed_type)
        set_seed(config.optim.seed)
        # Before the data: a missing starting point is found in a second, not after a download.
        init_weights = resolve_weights_file(config.model.init_from) if config.model.init_from else None
        self._check_natural_start()
        if config.data.streaming:
            data = load_streamed_data(config.data, accelerator.process_index, accelerator.num_processes)
        else:
            data = load_data(config.data)
        model = build_model(config, data.num_classes, data.image_size, data.class_names, init_weights)
        if config.optim.channels_last:
            if accelerator.device.type == "cpu":
                check_channels_last_training_on_cpu(model)
            model.to_channels_last()
        self.natural = build_method(MethodConfig(method="standard"), config.attack)
        self.method = build_method(config.method, config.attack)
        if config.optim.compile:
            compile_for_training(model, self.method)
        if config.method.method == "cure" and config.method.use_rgp:  # a head that cannot be found fails now, not after the warm-up
            masked_parameter_names(model, config.method.mask_scope, config.method.mask_include, config.method.mask_exclude)
        self.augmentation = augmentation_for(config.data.augment, data.image_size)
        eval_loader = DataLoader(data.eval, batch_size=config.optim.batch_size, collate_fn=collate, num_workers=config.run.num_workers)
        optimizer = self._optimizer(model)
        accumulation = config.optim.gradient_accumulation_steps
        if config.data.streaming:  # split across processes by the stream itself, not by Accelerate
            self.streamed = StreamedEpochs(data, config.optim.batch_size, accumulation, config.run.num_workers,
                                           config.optim.seed, accelerator)
            batches_per_epoch = self.streamed.batches_per_process
            self.model, self.optimizer, self.eval_loader = accelerator.prepare(model, optimizer, eval_loader)
        else:
            self.streamed = None
            self.sampler = EpochShuffleSampler(len(data.train), config.optim.seed)
            # The loader's own generator keeps its per-iterator seed draw off the global RNG, so a run
            # resumed mid-epoch draws the same attack and dropout noise as an uninterrupted one.
            train_loader = DataLoader(
                data.train, batch_size=config.optim.batch_size, sampler=self.sampler, collate_fn=collate,
                drop_last=True, num_workers=config.run.num_workers, generator=torch.Generator().manual_seed(config.optim.seed),
            )
            batches_per_epoch = len(train_loader) // accelerator.num_processes
            self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
                model, optimizer, train_loader, eval_loader
            )
        self._count_steps(batches_per_epoch, data.train_examples)
        self._check_revision_horizon()
        # Mixed precision comes from the autocast blocks around the training step and the
        # evaluation only: Accelerate's autocast wrapper around forward would stop the KL attack
        # from taking its first step in float32 (attacks.py says why it must).
        accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        # Stepped once per optimiser step by us, not by Accelerate (which steps a prepared
        # scheduler once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, self.total_steps, config.optim))
        self.state = TrainingState(num_processes=accelerator.num_processes)
        self._restored_method_state: dict = {}
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        device_seed = config.optim.seed + accelerator.process_index
        self.augment_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed)
        self.attack_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed + 10_000)
        if accelerator.device.type == "cpu":
            if config.run.keep_freed_memory:
                keep_freed_heap_memory()
            cores = len(usable_cpu_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
            if torch.get_num_threads() == 1 < cores:
                logger.warning(
                    "training on 1 CPU thread while %d cores are free per process: OMP_NUM_THREADS=1 is set (accelerate launch "
                    "sets it on a machine without GPU unless given --cpu or --num_cpu_threads_per_process N)", cores,
                )
        self.method.generator = self.attack_generator
        if accelerator.scaler is not None:  # fp16: CURE's own gradients need the loss's scaling
            self.method.scale_loss = accelerator.scaler.scale
        self.method_started = False
        if config.run.report_to != "none":
            accelerator.init_trackers(self.output_dir.name, config=_flatten(config.to_dict()))
        logger.info(
            "training %s (%.2fM parameters) on %s: %s training and %d evaluation examples, %d classes, %d px; %s for "
            "%d steps (%s per epoch) on %s; writing to %s",
            config.model.model, sum(p.numel() for p in model.parameters()) / 1e6, data.name, data.train_examples or "streamed",
            len(data.eval), data.num_classes, data.image_size, config.method.method, self.total_steps,
            self.steps_per_epoch or "as many as the stream has", describe_hardware(accelerator), self.output_dir,
        )

    def _check_natural_start(self) -> None:
        """CURE fine-tunes a naturally trained model. From random weights it is refused where the
        architecture has pretrained ones (the bare ``--model vit_small`` most likely meant them),
        and warned about elsewhere (an architecture with none, or ``--from-scratch``)."""
        model, method, optim = self.config.model, self.config.method, self.config.optim
        if method.method != "cure" or model.init_from or optim.warmup_epochs or loads_pretrained_weights(model.model, model.pretrained):
            return
        fixes = "--init-from (a natural model), --pretrained, or --warmup-epochs N (CURE-Eff)"
        if has_pretrained_weights(model.model) and not model.from_scratch:
            raise InputError(
                f"CURE fine-tunes a naturally trained model, and {model.model} has pretrained weights: add --pretrained "
                f"(its own input size and normalisation; CIFAR images are resized), or --init-from RUN, --warmup-epochs N "
                f"(CURE-Eff), or --from-scratch to start from random weights anyway"
            )
        logger.warning("CURE from random weights: the method assumes a naturally trained start. Pass %s.", fixes)

    def _check_revision_horizon(self) -> None:
        """Warns when CURE's revision model would still be mostly the starting model at the last
        step: its consistency loss then pulls the model back towards natural training all run long
        (the paper's r and d average over the last ~5,000 of its 78,000 steps; docs/cure.md)."""
        method = self.config.method
        if method.method != "cure" or not method.use_revision:
            return
        steps = self.total_steps - self.warmup_steps
        share = start_share_of_revision(method, steps)
        if share >= 0.5:
            rate = f"r {method.revision_rate:g}" + (
                "" if method.revision_rate_schedule == "constant"
                else f" ({method.revision_rate_schedule} to {method.revision_rate_min:g})")
            logger.warning(
                "CURE's revision model will still be about %.0f%% the starting model at the last of %d steps (%s, d %g), "
                "so L_CR keeps pulling the model back to it. For a run this short raise --revision-rate or lower "
                "--revision-decay (the cpu-small benchmark: 0.5 and 0.95), or add --revision-warmup.",
                100 * share, steps, rate, method.revision_decay,
            )

    def _count_steps(self, batches_per_epoch: int | None, train_examples: int | None) -> None:
        """Optimiser steps per epoch, in all, and of the natural warm-up; ``batches_per_epoch`` is
        ``None`` for a stream of undeclared size, whose epochs end when it does."""
        optim = self.config.optim
        if batches_per_epoch is None:
            if not optim.max_steps or optim.warmup_epochs:
                raise InputError(
                    f"the streamed dataset {self.config.data.dataset!r} does not declare its size, so epochs cannot be "
                    "counted in steps: set --max-steps (and give the warm-up in steps: no --warmup-epochs)"
                )
            self.steps_per_epoch, self.total_steps, self.warmup_steps = None, optim.max_steps, 0
            return
        if batches_per_epoch < optim.gradient_accumulation_steps:
            raise ValueError(
                f"{train_examples} training examples make {batches_per_epoch} batches of {optim.batch_size} per "
                f"process, fewer than gradient_accumulation_steps={optim.gradient_accumulation_steps}"
            )
        self.steps_per_epoch = math.ceil(batches_per_epoch / optim.gradient_accumulation_steps)
        self.total_steps = optim.max_steps or self.steps_per_epoch * optim.epochs
        self.warmup_steps = min(optim.warmup_epochs * self.steps_per_epoch, self.total_steps)

    def _check_output_dir(self):
        run = self.config.run
        if run.resume_from:  # the run continues in its own folder, with its own trajectory
            folder = run_folder_of(run.resume_from)
            check_resume_changes(TrainConfig.from_yaml(str(folder / "config.yaml")), self.config, folder)
            return
        if not (self.output_dir / "config.yaml").exists():
            return
        if not run.overwrite_output_dir:
            raise FileExistsError(
                f"{self.output_dir} already holds a run; pass --resume-from {self.output_dir} to continue it, "
                "--overwrite-output-dir to replace it, or another --output-dir"
            )
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:  # the old run's outputs, and nothing else in the folder
            for name in RUN_OUTPUTS:
                path = self.output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _resolve_preprocessing(self) -> None:
        """A pretrained model is fine-tuned at the size it was pretrained at, unless --image-size
        says otherwise: the images are resized to it (CIFAR's 32 px to a ViT's 224); its evaluation
        crop is the checkpoint's, unless --crop-pct says otherwise."""
        config = self.config
        if not loads_pretrained_weights(config.model.model, config.model.pretrained) or (
                config.data.image_size is not None and config.data.crop_pct is not None):
            return
        native, crop_pct = pretrained_preprocessing(config.model.model)
        data = dataclasses.replace(config.data, crop_pct=config.data.crop_pct or crop_pct)
        if native and config.data.image_size is None:
            logger.info("%s was pretrained on %d px images: the images are resized to %d px (--image-size to choose)",
                        config.model.model, native, native)
            data = dataclasses.replace(data, image_size=native)
        self.config = dataclasses.replace(config, data=data)

    def _optimizer(self, model):
        optim = self.config.optim
        if optim.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    def _start_method_if_due(self):
        if self.method_started or self.state.step < self.warmup_steps:
            return
        self.method.setup(unwrap(self.model), total_steps=self.total_steps - self.warmup_steps, seed=self.config.optim.seed)
        if self.state.step == self.warmup_steps:  # the weights the method starts from (rewritten alike on a resume here)
            self._save_weights(unwrap(self.model), "start", {"step": self.state.step})
        if self._restored_method_state:
            self.method.load_state_dict(self._restored_method_state)
        self.method_started = True

    @property
    def active_method(self) -> Method:
        return self.method if self.method_started else self.natural

    # ---- checkpoints ------------------------------------------------------------------------
    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _checkpoints(self, run_dir: Path | None = None) -> list[Path]:
        """The complete checkpoints of a run folder (this run's by default), oldest first."""
        return sorted((run_dir or self.output_dir).glob(f"checkpoints/{CHECKPOINT_PREFIX}[0-9]*[0-9]"))

    def save_checkpoint(self) -> Path:
        """Write the full training state to a temporary folder, then rename it into place. Weights
        that are not finite are never written: the run stops instead."""
        accelerator, state = self.accelerator, self.state
        final = self._checkpoint_dir() / f"{CHECKPOINT_PREFIX}{state.step:07d}"
        position = (state.step, state.epoch, state.batches_done_in_epoch)
        if self._checkpointed_at == position:  # nothing has changed since (a resumed or stopped run)
            return final
        self._check_weights_finite()
        state.train_seconds = self._train_seconds()
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial), safe_serialization=True)
        accelerator.wait_for_everyone()
        process_state = {
            "augment_generator": self.augment_generator.get_state(),
            "attack_generator": self.attack_generator.get_state(),
            "method": self.method.state_dict() if self.method_started else {},
            "model_buffers": dict(unwrap(self.model).named_buffers()),
        }
        torch.save(process_state, partial / PROCESS_STATE_FILE.format(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self._checkpoints()[: -self.config.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self._checkpointed_at = position
        return final

    def _check_weights_finite(self) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise TrainingDivergedError(self._divergence_message("the weights are"))

    def _divergence_message(self, what: str) -> str:
        found = self._checkpoints()
        last = f"the last finite checkpoint is {found[-1]}" if found else "no checkpoint was written"
        return (
            f"training diverged at step {self.state.step + 1}: {what} not finite (NaN or inf). Nothing was exported; "
            f"{last}. Lower the learning rate (--lr, now {self.config.optim.lr:g}) or check the data and the starting weights."
        )

    def _resume(self):
        location = Path(self.config.run.resume_from)
        if not (location / "random_states_0.pkl").exists():
            found = self._checkpoints(location)
            if not found:
                raise FileNotFoundError(f"no checkpoint in {location} (expected checkpoints/{CHECKPOINT_PREFIX}*)")
            location = found[-1]
        accelerator, state = self.accelerator, self.state
        accelerator.load_state(str(location))
        if state.num_processes != accelerator.num_processes:
            raise InputError(
                f"{location} was written by {state.num_processes} processes, and this run has {accelerator.num_processes}: "
                f"each process resumes its own state and data shard, so resume with {state.num_processes} processes"
            )
        process_file = location / PROCESS_STATE_FILE.format(accelerator.process_index)
        process_state = torch.load(process_file, map_location="cpu", weights_only=True)
        self.augment_generator.set_state(process_state["augment_generator"])
        self.attack_generator.set_state(process_state["attack_generator"])
        self._restored_method_state = process_state["method"]
        unwrap(self.model).load_state_dict(process_state["model_buffers"], strict=False)
        self._start_method_if_due()
        self._checkpointed_at = (state.step, state.epoch, state.batches_done_in_epoch)
        if accelerator.is_main_process:
            self._truncate_logs()
        logger.info("resumed from %s at step %d of %d", location, state.step, self.total_steps)

    def _truncate_logs(self) -> None:
        """Drop what was logged after the checkpoint: the resumed run logs it again. An evaluation at
        the checkpoint's own step came after it (checkpoints precede evaluations)."""
        step = self.state.step

        def kept(record: dict, log: str) -> bool:
            is_evaluation = any(key.startswith("eval/") for key in record)
            return record["step"] < step or (record["step"] == step and not (log == "metrics.jsonl" and is_evaluation))

        for log in ("metrics.jsonl", "layer_statistics.jsonl"):
            path = self.output_dir / log
            if path.is_file():
                lines = [line for line in path.read_text().splitlines() if line.strip()]
                _write_atomically(path, "".join(line + "\n" for line in lines if kept(json.loads(line), log)))

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the evaluation split (PGD-20, step epsilon/4, uniform start). An
        example counts as robust when it is classified correctly both clean and attacked, as in
        ``cure-hub eval``, AutoAttack and RobustBench."""
        model = unwrap(self.model)
        attack = AttackConfig(
            epsilon=self.config.attack.epsilon, step_size=self.config.attack.epsilon / 4,
            steps=self.config.run.eval_attack_steps, norm=self.config.attack.norm, random_start="uniform",
        )
        clean, robust = [], []
        # Its own generator: the evaluation is the same whenever it runs, and leaves training's
        # random streams untouched (evaluating more or less often does not change the run).
        generator = torch.Generator(self.accelerator.device).manual_seed(self.config.optim.seed)
        with eval_mode(model), self.accelerator.autocast():
            for images, labels in self.eval_loader:
                adversarial = pgd_attack(model, images, labels, attack, generator=generator) if attack.steps else images
                correct = torch.stack([model(images).argmax(1) == labels, model(adversarial).argmax(1) == labels])
                correct = self.accelerator.gather_for_metrics(correct.T).T  # drops the padding of the last batch
                clean.append(correct[0])
                robust.append(correct[0] & correct[1])
        clean, robust = torch.cat(clean), torch.cat(robust)
        self.eval_examples = len(clean)
        return {"eval/clean_acc": clean.float().mean().item(), f"eval/pgd{attack.steps}_acc": robust.float().mean().item()}

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        self._prepare()
        self._segment_started = time.perf_counter()
        self._seconds_before_segment = 0.0
        if self.config.run.resume_from:
            self._resume()
            self._seconds_before_segment = self.state.train_seconds
        self._write_run_description()
        accelerator, state = self.accelerator, self.state
        previous_handlers = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS} if _in_main_thread() else {}
        progress = tqdm(total=self.total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
        self._images_seen = 0
        self.model.train()
        with logging_redirect_tqdm():  # log lines above the progress bar, not glued onto it
            try:
                if self._epoch_end_evaluation_due():  # stopped between an epoch's checkpoint and its evaluation
                    self._evaluate_and_keep_best()
                while not self._training_done() and self._stop_signal is None and not state.stopped_by_alarm:
                    if self._train_rest_of_epoch(progress):  # it ran out: checkpoint first, so a failing evaluation loses nothing
                        state.epoch += 1
                        state.batches_done_in_epoch = 0
                        self.save_checkpoint()
                        if self._epoch_end_evaluation_due():
                            self._evaluate_and_keep_best()
            finally:
                progress.close()
                for signum, handler in previous_handlers.items():
                    signal.signal(signum, handler)
        if self._stop_signal is not None:
            path = self.save_checkpoint()
            logger.warning("stopped by %s at step %d; resume with --resume-from %s", signal.Signals(self._stop_signal).name,
                           state.step, self.output_dir)
            return {"interrupted": True, "signal": self._stop_signal, "step": state.step, "checkpoint": str(path)}
        self.save_checkpoint()
        last_eval = self._evaluate_and_keep_best()
        summary = self._finish(last_eval)
        accelerator.end_training()
        return summary

    def _train_rest_of_epoch(self, progress) -> bool:
        """Train on the current epoch's remaining batches, or until the last step or a stop signal;
        whether the epoch ran out."""
        accelerator, state = self.accelerator, self.state
        finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        for images, labels in self._rest_of_epoch_batches():
            self._start_method_if_due()
            method = self.active_method
            images = augment(images, self.augmentation, self.augment_generator)
            with accelerator.accumulate(self.model), accelerator.autocast():
                output = method.compute_loss(self.model, images, labels)
                accelerator.backward(output.loss)
            finite &= torch.isfinite(output.loss.detach())
            state.batches_done_in_epoch += 1
            self._images_seen += len(labels) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            self._agree_on_divergence_and_stop(finite)
            finite.fill_(True)
            self._optimizer_step(method, output, progress)
            if self._training_done() or self._stop_signal is not None:
                return False
        return True

    def _rest_of_epoch_batches(self):
        """The current epoch's batches that this process has not trained on yet."""
        accelerator, state = self.accelerator, self.state
        if self.streamed is not None:
            return self.streamed.epoch(state.epoch, skip=state.batches_done_in_epoch)
        loader = self.train_loader
        if state.batches_done_in_epoch:
            loader = accelerator.skip_first_batches(self.train_loader, state.batches_done_in_epoch)
        # The prepared loader sets its sampler's epoch from its own counter, which starts at 0 in
        # every process: a resumed run must set it, or it replays epoch 0's order. Under several
        # processes the skipping loader's set_epoch does not reach the sampler (wrapped twice), so
        # the sampler is set too, to the same epoch.
        loader.set_epoch(state.epoch)
        self.sampler.set_epoch(state.epoch)
        return loader

    def _optimizer_step(self, method, output, progress) -> None:
        """The step after the gradients of a batch (or of accumulated batches): the method's own
        parts around the optimiser's, the schedule, logs and a checkpoint when due."""
        state = self.state
        logs_now = self._logs_at(state.step + 1)
        method.record_statistics = logs_now
        extra = method.before_optimizer_step(self.model)
        self.step_lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(self.model, state.step - (self.warmup_steps if method is self.method else 0))
        state.step += 1
        progress.update(1)
        if method is self.method and state.step == self.warmup_steps + 1 and not logs_now:  # where the collapse alarm starts
            self._watch_collapse(output.metrics)
        if logs_now:
            rate = self._images_seen / (time.perf_counter() - self._segment_started)
            collapse = self._watch_collapse(output.metrics)
            self._log({**output.metrics, **extra, **({"health/alarms": collapse} if collapse else {})},
                      images_per_second=rate, progress=progress)
            self._log_layer_statistics(method)
            if collapse and self.config.run.stop_on_collapse:
                checkpoint = self.save_checkpoint()
                raise TrainingCollapsedError(
                    f"{collapse} (step {state.step}). Likely cause and fix: {method.collapse_advice}. Nothing was "
                    f"exported; the run's state is in {checkpoint}")
        if self.config.run.checkpoint_every_steps and state.step % self.config.run.checkpoint_every_steps == 0:
            self.save_checkpoint()

    def _write_run_description(self) -> None:
        """config.yaml and model_spec.json, once the run is sure to start (a refused resume changes nothing)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _remove_partial_writes(self.output_dir)
            with open(self.output_dir / "config.yaml", "w") as f:
                yaml.safe_dump(self.config.to_dict(), f, sort_keys=False)
            (self.output_dir / "model_spec.json").write_text(json.dumps(unwrap(self.model).spec.to_dict(), indent=2))

    def _epoch_end_evaluation_due(self) -> bool:
        state = self.state
        return (state.batches_done_in_epoch == 0 and state.epoch > 0 and state.epoch % self.config.run.eval_every_epochs == 0
                and not self._training_done() and state.evaluated_at_step != state.step)

    def _ends_after_passes(self) -> bool:
        """A stream trained for ``epochs`` ends after that many passes: uneven shards and loader
        workers (each drops its last partial batch) make them shorter than its declared size plans.
        ``max_steps`` counts steps alone."""
        return self.streamed is not None and not self.config.optim.max_steps

    def _training_done(self) -> bool:
        if self._ends_after_passes():
            return self.state.epoch >= self.config.optim.epochs
        return self.state.step >= self.total_steps

    def _train_seconds(self) -> float:
        """Training time of all the run's segments so far (a resumed run adds its own)."""
        return self._seconds_before_segment + time.perf_counter() - self._segment_started

    def _request_stop(self, signum, frame):
        if self._stop_signal is not None:  # a second signal stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        logger.warning("%s: stopping after this step and saving a checkpoint (again to abort)", signal.Signals(signum).name)

    def _agree_on_divergence_and_stop(self, finite: torch.Tensor) -> None:
        """Before the optimiser step: stop with an error if any process's loss is not finite (the
        weights are still those of the last step), and make every process stop at the same step if
        any was asked to. One host synchronisation (one all-reduce on several processes)."""
        if self.accelerator.num_processes == 1:
            diverged = not bool(finite)
        else:
            flags = torch.stack([(~finite).float(), torch.tensor(float(self._stop_signal is not None), device=finite.device)])
            diverged, stop = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()
            if stop and self._stop_signal is None:
                self._stop_signal = signal.SIGINT  # another process was interrupted
        if diverged:
            raise TrainingDivergedError(self._divergence_message("the loss is"))

    def _log(self, metrics: dict, images_per_second: float | None = None, progress=None):
        values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        values = {f"train/{k}" if "/" not in k else k: v for k, v in values.items()}
        record = {"step": self.state.step, "epoch": self.state.epoch, **values}
        if images_per_second is not None:  # a training step
            record["lr"] = self.step_lr
            record["images_per_second"] = images_per_second
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if progress is not None:
                short = {k.split("/")[-1]: f"{v:.3g}" for k, v in values.items() if k.split("/")[-1] in ("loss", "clean_acc", "adv_acc")}
                names = {*self._alarm_names, *(TRAINING_COLLAPSE for a in self.state.alarms if a.startswith(TRAINING_COLLAPSE))}
                alarm = {"alarm": ",".join(sorted(names))} if names else {}
                progress.set_postfix(**short, img_s=f"{images_per_second:.0f}", **alarm)
        self.accelerator.log(record, step=self.state.step)

    def _logs_at(self, step: int) -> bool:
        return step % self.config.run.log_every_steps == 0 or step == self.total_steps

    def _log_layer_statistics(self, method: Method) -> None:
        statistics = method.layer_statistics()
        if statistics and self.accelerator.is_main_process:
            with open(self.output_dir / "layer_statistics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, "layers": statistics}) + "\n")

    def _watch_collapse(self, metrics: dict) -> str | None:
        """The training-collapse alarm with this step's metrics (cure_hub.alarms), the first time it
        fires: kept in the state for the summary and the card, logged, shown in the progress bar. A
        method without a regulariser is not watched. Every process decides alike, on the metrics
        averaged over the processes."""
        if REGULARISER not in metrics:
            return None
        state, run = self.state, self.config.run
        values = torch.stack([metrics["clean_acc"], metrics[MAIN_LOSS], metrics[REGULARISER]]).float()
        state.training_history.append(self.accelerator.reduce(values, reduction="mean").tolist())
        message = training_collapse(state.training_history, run.collapse_drop, run.collapse_patience)
        if message is None or any(alarm.startswith(TRAINING_COLLAPSE) for alarm in state.alarms):
            return None
        logger.warning("step %d: %s", state.step, message)
        state.alarms.append(message)
        return message

    def _evaluate_and_keep_best(self) -> dict:
        results = self.evaluate()
        robust = next(v for k, v in results.items() if k.startswith("eval/pgd"))
        state = self.state
        state.evaluated_at_step = state.step
        fired = self._health_alarms(results["eval/clean_acc"], robust) if self.config.run.eval_attack_steps else []
        self._log({**results, **({"health/alarms": "; ".join(fired)} if fired else {})})
        if robust > state.best_pgd_accuracy:
            state.best_pgd_accuracy = robust
            self._save_weights(unwrap(self.model), "best", {**results, "step": state.step})
        logger.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

    def _health_alarms(self, clean: float, robust: float) -> list[str]:
        """The alarms of this evaluation (cure_hub.alarms): logged, kept in the state for the
        summary and the card, shown in the progress bar, and, for robust overfitting with
        --stop-on-robust-overfitting, the end of the run. Every process decides alike."""
        run, state = self.config.run, self.state
        adversarial = self.active_method.adversarial  # robust overfitting means nothing in natural training
        if adversarial:
            state.robust_history.append(robust)
        images, labels = next(iter(self.eval_loader))
        images, labels = images[:PROBE_EXAMPLES], labels[:PROBE_EXAMPLES]
        generator = torch.Generator(self.accelerator.device).manual_seed(self.config.optim.seed)
        with eval_mode(unwrap(self.model)):
            standing = large_epsilon_accuracy(unwrap(self.model), images, labels, generator)
        large = self.accelerator.reduce(standing.float().mean(), reduction="mean").item()
        overfitting = robust_overfitting(state.robust_history, run.overfitting_margin, run.overfitting_patience) if adversarial else None
        fired = [message for message in (overfitting, gradient_masking(clean, robust, large)) if message]
        for message in fired:
            logger.warning("step %d: %s", state.step, message)
            if message not in state.alarms:
                state.alarms.append(message)
            if message.startswith(ROBUST_OVERFITTING) and run.stop_on_robust_overfitting:
                state.stopped_by_alarm = True
        self._alarm_names = sorted({message.split(":")[0] for message in fired})
        return fired

    def _save_weights(self, model: RobustClassifier, name: str, metadata: dict | None = None):
        if not self.accelerator.is_main_process:
            return
        folder = self.output_dir / "weights"
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
        partial = folder / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_torch_state_dict(state, partial, filename_pattern=name + "{suffix}.safetensors", max_shard_size="100GB")
        os.replace(partial / f"{name}.safetensors", folder / f"{name}.safetensors")
        shutil.rmtree(partial, ignore_errors=True)
        if metadata is not None:
            (folder / f"{name}.json").write_text(json.dumps(metadata, indent=2))

    def _finish(self, last_eval: dict) -> dict:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = unwrap(self.model)
        self._save_weights(model, "last", {**last_eval, "step": self.state.step})
        revision = getattr(self.method, "revision_model", None) if self.method_started else None
        if revision is not None:
            self._save_weights(revision, "revision", {"step": self.state.step})
        summary = {
            "steps": self.state.step,
            "epochs": self.state.epoch if self._ends_after_passes() or not self.steps_per_epoch
            else self.state.step / self.steps_per_epoch,
            "method": self.config.method.method,
            "final_eval": last_eval,
            "best_pgd_accuracy": self.state.best_pgd_accuracy,
            "alarms": self.state.alarms,
            "stopped_by_alarm": self.state.stopped_by_alarm,
            "export_weights": self.config.run.export_weights,
            "train_seconds": self._train_seconds(),
            "hardware": describe_hardware(accelerator),
            "eval_examples": self.eval_examples,
            "git_commit": git_commit(),
        }
        if accelerator.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._export_and_push(summary)
            logger.info("saved the run to %s; its Hub-ready export is %s", self.output_dir, summary["export"])
        accelerator.wait_for_everyone()
        return summary

    def _export_and_push(self, summary: dict) -> None:
        """The Hub-ready export of the ``--export-weights`` (``RUN_DIR/export``), pushed if asked."""
        from .hub import export_run, push_to_hub

        run = self.config.run
        export = export_run(self.output_dir, self.output_dir / "export", weights=run.export_weights, overwrite=True,
                            repo_id=run.hub_model_id)
        summary["export"] = str(export)
        if run.push_to_hub:
            summary["pushed"] = push_to_hub(export, run.hub_model_id)
            logger.info("pushed %s to %s", export, run.hub_model_id)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _remove_partial_writes(output_dir: Path) -> None:
    """Remove what a killed run left half-written (never read: the complete versions are renamed into place)."""
    for leftover in [*output_dir.glob(f"checkpoints/{CHECKPOINT_PREFIX}*.partial"), *output_dir.glob("weights/.*.partial"),
                     *output_dir.glob(".*.partial")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flatten(sections: dict) -> dict:
    return {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for s, d in sections.items() for k, v in d.items()}


def train(config: TrainConfig) -> dict:
    """Train a model as ``config`` says; returns the run summary."""
    return Trainer(config).train()
