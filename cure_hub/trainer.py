"""The Accelerate training loop: any method, one CPU or GPU or many, resumable.

The trainer builds the run (model, data, method, optimiser) and runs the loop: epochs, steps,
logging, evaluations and the alarms they feed, stopping, and the end of the run. What a run may
and may not start with is :mod:`cure_hub.preflight`'s; the checkpoints are
:mod:`cure_hub.checkpoints`'; the folder it writes is :mod:`cure_hub.run_folder`'s. A checkpoint
is written before the evaluation at the end of an epoch, and the evaluation draws from its own
generator, so a run killed at any point resumes to the same weights, metrics and logs.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .alarms import (
    PROBE_EXAMPLES,
    TRAINING_COLLAPSE,
    TrainingCollapsedError,
    large_epsilon_accuracy,
    record_evaluation,
    record_training_step,
)
from .attacks import eval_mode, pgd_attack
from .checkpoints import Checkpointer, TrainingDivergedError, TrainingState
from .config import AttackConfig, TrainConfig
from .data import augment, augmentation_for, collate, load_data
from .methods import Method, build_method, build_natural_method, compile_for_training
from .methods.base import MAIN_LOSS, REGULARISER, unwrap
from .models import CheckpointMismatchError, RobustClassifier, create_model, load_weights
from .preflight import (
    check_before_loading,
    check_method_start,
    check_model,
    count_steps,
    resolve_preprocessing,
    resolve_weights_file,
    warn_about_run,
)
from .run_folder import LAYER_STATISTICS, METRICS, RunFolder
from .sharding import configure_engine, full_state_dict
from .streaming import StreamedEpochs, load_streamed_data
from .system import describe_hardware, git_commit, keep_freed_heap_memory

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


@torch.no_grad()
def clean_and_pgd_accuracy(model: torch.nn.Module, batches, config: TrainConfig, accelerator: Accelerator) -> tuple[dict, int]:
    """Clean and PGD accuracy of ``model`` on ``batches`` (PGD-20, step epsilon/4, uniform start),
    and the number of examples. An example counts as robust when it is classified correctly both
    clean and attacked, as in ``cure-hub eval``, AutoAttack and RobustBench."""
    attack = AttackConfig(epsilon=config.attack.epsilon, step_size=config.attack.epsilon / 4, steps=config.run.eval_attack_steps,
                          norm=config.attack.norm, random_start="uniform")
    clean, robust = [], []
    # Its own generator: the evaluation is the same whenever it runs, and leaves training's
    # random streams untouched (evaluating more or less often does not change the run).
    generator = torch.Generator(accelerator.device).manual_seed(config.optim.seed)
    with eval_mode(model), accelerator.autocast():  # a bar: on a CPU a large model's evaluation takes minutes
        for images, labels in tqdm(batches, desc="evaluate", leave=False, disable=not accelerator.is_local_main_process,
                                   dynamic_ncols=True):
            adversarial = pgd_attack(model, images, labels, attack, generator=generator) if attack.steps else images
            correct = torch.stack([model(images).argmax(1) == labels, model(adversarial).argmax(1) == labels])
            correct = accelerator.gather_for_metrics(correct.T).T  # drops the padding of the last batch
            clean.append(correct[0])
            robust.append(correct[0] & correct[1])
    clean, robust = torch.cat(clean), torch.cat(robust)
    return {"eval/clean_acc": clean.float().mean().item(), f"eval/pgd{attack.steps}_acc": robust.float().mean().item()}, len(clean)


def build_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


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
            start = RunFolder(config.model.init_from)
            if not start.is_run():
                raise
            spec = start.read_model_spec()
            arguments = " ".join(f"{k}={v}" for k, v in spec["model_args"].items() if k != "num_classes")
            raise CheckpointMismatchError(
                f"{err}. The run {config.model.init_from} built {spec['architecture']} with {spec['model_args']}: "
                f"pass --model {spec['architecture']}" + (f" --model-kwargs {arguments}" if arguments else "")
            ) from None
        model.spec.source = config.model.init_from
    model.spec.crop_pct = config.data.crop_pct or 1.0  # the crop the run evaluates with, recorded in its exports
    return model


def set_up_model(config: TrainConfig, accelerator: Accelerator, model: RobustClassifier, method: Method,
                 architecture: Callable[[], RobustClassifier]) -> None:
    """The model's memory layout, compilation and engine (:func:`cure_hub.sharding.configure_engine`:
    ``architecture`` builds the model's architecture again, for a method's sharded copy)."""
    if config.optim.channels_last:
        model.to_channels_last()
    if config.optim.compile:
        compile_for_training(model, method)
    configure_engine(accelerator, method, architecture)


class Trainer:
    """Trains ``config.model`` on ``config.data`` with ``config.method`` under Accelerate."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None):
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.run_folder = RunFolder(self.output_dir)
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
        self.config = config = resolve_preprocessing(self.config)
        accelerator = self.accelerator
        clear = check_before_loading(config, accelerator)
        if accelerator.is_main_process:  # before anything is written or removed: one writer per run folder
            self.run_folder.claim()
        if clear:  # an earlier run's outputs, and nothing else in the folder
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self.run_folder.clear_outputs()
            accelerator.wait_for_everyone()
        set_seed(config.optim.seed)
        # Before the data: a missing starting point is found in a second, not after a download.
        init_weights = resolve_weights_file(config.model.init_from) if config.model.init_from else None
        check_method_start(config)
        if config.data.streaming:
            data = load_streamed_data(config.data, accelerator.process_index, accelerator.num_processes)
        else:
            data = load_data(config.data)
        model = build_model(config, data.num_classes, data.image_size, data.class_names, init_weights)
        self.natural = build_natural_method(config.attack)
        self.method = build_method(config.method, config.attack)
        check_model(config, accelerator, model, self.method)
        set_up_model(config, accelerator, model, self.method,
                     architecture=lambda: build_model(config, data.num_classes, data.image_size, data.class_names))
        self.augmentation, self.eval_split = augmentation_for(config.data.augment, data.image_size), data.eval_split
        eval_loader = DataLoader(data.eval, batch_size=config.optim.batch_size, collate_fn=collate, num_workers=config.run.num_workers)
        optimizer = build_optimizer(model, config.optim)
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
        self.steps_per_epoch, self.total_steps, self.warmup_steps = count_steps(config, batches_per_epoch, data.train_examples)
        warn_about_run(accelerator, self.method, self.total_steps - self.warmup_steps)
        # Mixed precision comes from the autocast blocks around the training step and the
        # evaluation only: Accelerate's autocast wrapper around forward would stop the KL attack
        # from taking its first step in float32 (attacks.py says why it must).
        accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        # Stepped once per optimiser step by us, not by Accelerate (which steps a prepared
        # scheduler once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, self.total_steps, config.optim))
        self.state = TrainingState(num_processes=accelerator.num_processes)
        self.checkpointer = Checkpointer(accelerator, self.run_folder.checkpoints, config.run.keep_checkpoints)
        self._restored_method_state: dict = {}
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        device_seed = config.optim.seed + accelerator.process_index
        self.augment_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed)
        self.attack_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed + 10_000)
        if accelerator.device.type == "cpu" and config.run.keep_freed_memory:
            keep_freed_heap_memory()
        self.method.generator, self.method.micro_batches = self.attack_generator, config.optim.gradient_accumulation_steps
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
    def save_checkpoint(self) -> Path:
        """The full training state, unless nothing has changed since the last checkpoint (a resumed or
        stopped run). Weights that are not finite are never written: the run stops instead."""
        state = self.state
        position = (state.step, state.epoch, state.batches_done_in_epoch)
        if self._checkpointed_at != position:
            self.checkpointer.check_finite(self.model, state.step, self.config.optim.lr)
            state.train_seconds = self._train_seconds()
            self.checkpointer.save(state.step, {
                "augment_generator": self.augment_generator.get_state(),
                "attack_generator": self.attack_generator.get_state(),
                "method": self.method.state_dict() if self.method_started else {},
                "model_buffers": dict(unwrap(self.model).named_buffers()),
            })
            self._checkpointed_at = position
        return self.checkpointer.path_of(state.step)

    def _resume(self):
        state, resume_from = self.state, self.config.run.resume_from
        if not self.checkpointer.holds_checkpoint(resume_from):  # stopped before its first (a full disk): from step 0
            logger.warning("%s has no checkpoint yet: training it from its first step", resume_from)
        else:
            location, process_state = self.checkpointer.restore(resume_from, state)
            self.augment_generator.set_state(process_state["augment_generator"])
            self.attack_generator.set_state(process_state["attack_generator"])
            self._restored_method_state = process_state["method"]
            unwrap(self.model).load_state_dict(process_state["model_buffers"], strict=False)
            self._start_method_if_due()
            self._checkpointed_at = (state.step, state.epoch, state.batches_done_in_epoch)
            logger.info("resumed from %s at step %d of %d", location, state.step, self.total_steps)
        if self.accelerator.is_main_process:
            self.run_folder.truncate_logs(state.step)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the evaluation split (:func:`clean_and_pgd_accuracy`)."""
        results, self.eval_examples = clean_and_pgd_accuracy(unwrap(self.model), self.eval_loader, self.config,
                                                             self.accelerator)
        return results

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        """Trains to the last step, a stop signal or an alarm that stops the run; the run's summary."""
        try:
            return self._train()
        finally:  # refused, failed or done: the folder is free for its next writer
            self.run_folder.release()

    def _train(self) -> dict:
        self._prepare()
        self._segment_started = time.perf_counter()
        self._seconds_before_segment = 0.0
        if self.config.run.resume_from:
            self._resume()
            self._seconds_before_segment = self.state.train_seconds
        if self.accelerator.is_main_process:  # once the run is sure to start: a refused resume changes nothing
            self.run_folder.write_description(self.config.to_dict(), unwrap(self.model).spec.to_dict())
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
        logs_now = (state.step + 1) % self.config.run.log_every_steps == 0 or state.step + 1 == self.total_steps
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
            if (statistics := method.layer_statistics()) and self.accelerator.is_main_process:
                self.run_folder.append(LAYER_STATISTICS, {"step": state.step, "layers": statistics})
            if collapse and self.config.run.stop_on_collapse:
                checkpoint = self.save_checkpoint()
                raise TrainingCollapsedError(
                    f"{collapse} (step {state.step}). Likely cause and fix: {method.collapse_advice}. Nothing was "
                    f"exported; the run's state is in {checkpoint}")
        if self.config.run.checkpoint_every_steps and state.step % self.config.run.checkpoint_every_steps == 0:
            self.save_checkpoint()

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
            raise TrainingDivergedError(self.checkpointer.divergence_message("the loss is", self.state.step, self.config.optim.lr))

    def _log(self, metrics: dict, images_per_second: float | None = None, progress=None):
        values = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        values = {f"train/{k}" if "/" not in k else k: v for k, v in values.items()}
        record = {"step": self.state.step, "epoch": self.state.epoch, **values}
        if images_per_second is not None:  # a training step
            record["lr"] = self.step_lr
            record["images_per_second"] = images_per_second
        if self.accelerator.is_main_process:
            self.run_folder.append(METRICS, record)
            if progress is not None:
                progress.set_postfix(**progress_postfix(values, images_per_second, self._alarm_names, self.state.alarms))
        self.accelerator.log(record, step=self.state.step)

    def _watch_collapse(self, metrics: dict) -> str | None:
        """The training-collapse alarm with this step's metrics (cure_hub.alarms), the first time it
        fires: kept in the state for the summary and the card, logged, shown in the progress bar. A
        method without a regulariser is not watched. Every process decides alike, on the metrics
        averaged over the processes."""
        if REGULARISER not in metrics:
            return None
        values = torch.stack([metrics["clean_acc"], metrics[MAIN_LOSS], metrics[REGULARISER]]).float()
        return record_training_step(self.state, self.config.run, self.accelerator.reduce(values, reduction="mean").tolist())

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
        images, labels = next(iter(self.eval_loader))
        images, labels = images[:PROBE_EXAMPLES], labels[:PROBE_EXAMPLES]
        generator = torch.Generator(self.accelerator.device).manual_seed(self.config.optim.seed)
        with eval_mode(unwrap(self.model)):
            standing = large_epsilon_accuracy(unwrap(self.model), images, labels, generator)
        large = self.accelerator.reduce(standing.float().mean(), reduction="mean").item()
        fired = record_evaluation(self.state, self.config.run, self.active_method.adversarial, clean, robust, large)
        self._alarm_names = sorted({message.split(":")[0] for message in fired})
        return fired

    def _save_weights(self, model: RobustClassifier, name: str, metadata: dict | None = None):
        weights = full_state_dict(model.backbone, keep=self.accelerator.is_main_process)  # every process: it gathers
        if self.accelerator.is_main_process:
            self.run_folder.save_weights(name, weights, metadata)

    def _finish(self, last_eval: dict) -> dict:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = unwrap(self.model)
        self._save_weights(model, "last", {**last_eval, "step": self.state.step})
        for name, extra in (self.method.extra_weights() if self.method_started else {}).items():
            self._save_weights(extra, name, {"step": self.state.step})
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
            "eval_split": self.eval_split,
            "git_commit": git_commit(),
        }
        if accelerator.is_main_process:
            self.run_folder.write_summary(summary)
            summary.update(export_and_push(self.run_folder, self.config.run))
            logger.info("saved the run to %s; its Hub-ready export is %s", self.output_dir, summary["export"])
        accelerator.wait_for_everyone()
        return summary

def export_and_push(run_folder: RunFolder, run) -> dict:
    """The Hub-ready export of the run's ``--export-weights`` (``RUN_DIR/export``), pushed if asked:
    where it is, and what the push returned."""
    from .hub import HubPushError, export_run, push_to_hub

    export = export_run(run_folder.path, run_folder.export, weights=run.export_weights, overwrite=True, repo_id=run.hub_model_id)
    if not run.push_to_hub:
        return {"export": str(export)}
    try:
        pushed = push_to_hub(export, run.hub_model_id)
    except HubPushError as err:
        raise HubPushError(f"training finished, and the run and its export {export} are whole; the push failed: {err}") from None
    logger.info("pushed %s to %s", export, run.hub_model_id)
    return {"export": str(export), "pushed": pushed}


def progress_postfix(values: dict, images_per_second: float, evaluation_alarms: list[str], alarms: list[str]) -> dict:
    """What the progress bar shows of a logged step: its loss and accuracies, the speed, and the alarms
    of the last evaluation and a training collapse, once raised."""
    short = {k.split("/")[-1]: f"{v:.3g}" for k, v in values.items() if k.split("/")[-1] in ("loss", "clean_acc", "adv_acc")}
    names = {*evaluation_alarms, *(TRAINING_COLLAPSE for alarm in alarms if alarm.startswith(TRAINING_COLLAPSE))}
    return {**short, "img_s": f"{images_per_second:.0f}", **({"alarm": ",".join(sorted(names))} if names else {})}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flatten(sections: dict) -> dict:
    return {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for s, d in sections.items() for k, v in d.items()}


def train(config: TrainConfig) -> dict:
    """Train a model as ``config`` says; returns the run summary."""
    return Trainer(config).train()
