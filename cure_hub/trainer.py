"""The Accelerate training loop: any method, one CPU or GPU or many, resumable.

Run folder layout::

    config.yaml              the resolved TrainConfig
    model_spec.json          how to rebuild the network (architecture, arguments, mean/std, labels)
    metrics.jsonl            one JSON object per logged step and per evaluation
    layer_statistics.jsonl   per logged step, the method's per-parameter statistics (CURE: Figure 6)
    weights/last.safetensors       the model at the end (bare backbone state dict)
    weights/best.safetensors       the model with the best PGD accuracy during training
    weights/revision.safetensors   CURE's revision model at the end
    checkpoints/step_XXXXXXX/      full training state (Accelerate's save_state + ours)
    summary.json             steps, wall time, hardware, final and best evaluation
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import platform
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

from .attacks import eval_mode, pgd_attack
from .config import AttackConfig, MethodConfig, TrainConfig
from .data import collate, load_data, random_crop_flip
from .methods import Method, build_method
from .methods.base import unwrap
from .models import RobustClassifier, create_model, load_weights

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_heap_memory() -> bool:
    """Stop glibc from handing freed memory back to the operating system during training.

    By default glibc unmaps every block of 32 MiB or more when it is freed, and gives the top of
    its heap back once more than twice its (self-adjusting) mmap threshold lies free there; every
    page taken again after that is a page fault. A training step that frees and re-allocates that
    much each step (a CURE step does: a retained graph, a revision forward pass on a double batch)
    pays tens to hundreds of thousands of faults a step, 3-8 % of a step on a CPU. With this
    setting, like PyTorch's CUDA caching allocator, the process keeps its peak memory and reuses
    it. Returns whether the setting was applied (Linux with glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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
    """Counters and generators saved with every checkpoint (registered with Accelerate)."""

    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    best_pgd_accuracy: float = -1.0
    method_state: dict = dataclasses.field(default_factory=dict)
    augment_generator_state: torch.Tensor | None = None
    attack_generator_state: torch.Tensor | None = None

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


def build_model(config: TrainConfig, num_classes: int, image_size: int, label_names) -> RobustClassifier:
    model = create_model(
        config.model.model,
        num_classes=num_classes,
        image_size=image_size,
        pretrained=config.model.pretrained,
        label_names=label_names,
        **config.model.model_kwargs,
    )
    if config.model.init_from:
        load_weights(model, resolve_weights_file(config.model.init_from))
        model.spec.source = config.model.init_from
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

    return download_from_hub(location, "model.safetensors")


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
        self._stop_requested = False

    # ---- setup ------------------------------------------------------------------------------
    def _prepare(self):
        config, accelerator = self.config, self.accelerator
        self._check_output_dir()
        set_seed(config.optim.seed)
        data = load_data(config.data)
        model = build_model(config, data.num_classes, data.image_size, data.class_names)
        if config.method.method == "cure" and not (config.model.init_from or config.model.pretrained or config.optim.warmup_epochs):
            logger.warning(
                "CURE from random weights: the method assumes a naturally trained start. Pass "
                "--init-from (a natural model), --pretrained, or --warmup-epochs N (CURE-Eff)."
            )
        self.sampler = EpochShuffleSampler(len(data.train), config.optim.seed)
        # The loader's own generator keeps its per-iterator seed draw off the global RNG, so a run
        # resumed mid-epoch draws the same attack and dropout noise as an uninterrupted one.
        train_loader = DataLoader(
            data.train, batch_size=config.optim.batch_size, sampler=self.sampler, collate_fn=collate,
            drop_last=True, num_workers=config.run.num_workers, generator=torch.Generator().manual_seed(config.optim.seed),
        )
        eval_loader = DataLoader(data.eval, batch_size=config.optim.batch_size, collate_fn=collate, num_workers=config.run.num_workers)
        optimizer = self._optimizer(model)
        batches_per_epoch = len(train_loader) // accelerator.num_processes
        if batches_per_epoch < config.optim.gradient_accumulation_steps:
            raise ValueError(
                f"{len(data.train)} training examples make {batches_per_epoch} batches of {config.optim.batch_size} per "
                f"process, fewer than gradient_accumulation_steps={config.optim.gradient_accumulation_steps}"
            )
        self.steps_per_epoch = math.ceil(batches_per_epoch / config.optim.gradient_accumulation_steps)
        self.total_steps = config.optim.max_steps or self.steps_per_epoch * config.optim.epochs
        self.warmup_steps = min(config.optim.warmup_epochs * self.steps_per_epoch, self.total_steps)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizer, train_loader, eval_loader
        )
        # Mixed precision comes from the autocast blocks around the training step and the
        # evaluation only: Accelerate's autocast wrapper around forward would stop the KL attack
        # from taking its first step in float32 (attacks.py says why it must).
        accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        # Stepped once per optimiser step by us, not by Accelerate (which steps a prepared
        # scheduler once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, self.total_steps, config.optim))
        self.state = TrainingState()
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        device_seed = config.optim.seed + accelerator.process_index
        self.augment_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed)
        self.attack_generator = torch.Generator(device=accelerator.device).manual_seed(device_seed + 10_000)
        if accelerator.device.type == "cpu" and config.run.keep_freed_memory:
            keep_freed_heap_memory()
        self.natural = build_method(MethodConfig(method="standard"), config.attack)
        self.method = build_method(config.method, config.attack)
        self.method.generator = self.attack_generator
        if accelerator.scaler is not None:  # fp16: CURE's own gradients need the loss's scaling
            self.method.scale_loss = accelerator.scaler.scale
        self.method_started = False
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "config.yaml", "w") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            (self.output_dir / "model_spec.json").write_text(json.dumps(model.spec.to_dict(), indent=2))
        if config.run.report_to != "none":
            accelerator.init_trackers(self.output_dir.name, config=_flatten(config.to_dict()))

    def _check_output_dir(self):
        run = self.config.run
        if run.resume_from or run.overwrite_output_dir:
            return
        if (self.output_dir / "config.yaml").exists():
            raise FileExistsError(
                f"{self.output_dir} already holds a run; pass --resume-from {self.output_dir} to continue it, "
                "--overwrite-output-dir to replace it, or another --output-dir"
            )

    def _optimizer(self, model):
        optim = self.config.optim
        if optim.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)

    def _start_method_if_due(self):
        if self.method_started or self.state.step < self.warmup_steps:
            return
        self.method.setup(unwrap(self.model), total_steps=self.total_steps - self.warmup_steps, seed=self.config.optim.seed)
        if self.state.method_state:
            self.method.load_state_dict(self.state.method_state)
        self.method_started = True

    @property
    def active_method(self) -> Method:
        return self.method if self.method_started else self.natural

    # ---- checkpoints ------------------------------------------------------------------------
    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write the full training state to a temporary folder, then rename it into place."""
        accelerator = self.accelerator
        self.state.method_state = self.method.state_dict() if self.method_started else {}
        self.state.augment_generator_state = self.augment_generator.get_state()
        self.state.attack_generator_state = self.attack_generator.get_state()
        final = self._checkpoint_dir() / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in sorted(self._checkpoint_dir().glob(f"{CHECKPOINT_PREFIX}[0-9]*"))[: -self.config.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _resume(self):
        location = Path(self.config.run.resume_from)
        if not (location / "random_states_0.pkl").exists():
            found = sorted((location / "checkpoints").glob(f"{CHECKPOINT_PREFIX}[0-9]*"))
            found = [p for p in found if not p.name.endswith(".partial")]
            if not found:
                raise FileNotFoundError(f"no checkpoint in {location} (expected checkpoints/{CHECKPOINT_PREFIX}*)")
            location = found[-1]
        self.accelerator.load_state(str(location))
        self.augment_generator.set_state(self.state.augment_generator_state)
        self.attack_generator.set_state(self.state.attack_generator_state)
        logger.info("resumed from %s at step %d", location, self.state.step)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the evaluation split (PGD-20, step epsilon/4, uniform start)."""
        model = unwrap(self.model)
        attack = AttackConfig(
            epsilon=self.config.attack.epsilon, step_size=self.config.attack.epsilon / 4,
            steps=self.config.run.eval_attack_steps, norm=self.config.attack.norm, random_start="uniform",
        )
        clean, robust = [], []
        with eval_mode(model), self.accelerator.autocast():
            for images, labels in self.eval_loader:
                adversarial = pgd_attack(model, images, labels, attack) if attack.steps else images
                correct = torch.stack([model(images).argmax(1) == labels, model(adversarial).argmax(1) == labels])
                correct = self.accelerator.gather_for_metrics(correct.T).T  # drops the padding of the last batch
                clean.append(correct[0])
                robust.append(correct[1])
        clean, robust = torch.cat(clean), torch.cat(robust)
        self.eval_examples = len(clean)
        return {"eval/clean_acc": clean.float().mean().item(), f"eval/pgd{attack.steps}_acc": robust.float().mean().item()}

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        self._prepare()
        if self.config.run.resume_from:
            self._resume()
        accelerator, config, state = self.accelerator, self.config, self.state
        previous_handler = signal.signal(signal.SIGINT, self._request_stop) if _in_main_thread() else None
        progress = tqdm(total=self.total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
        started, images_seen = time.perf_counter(), 0
        self.model.train()
        try:
            while state.step < self.total_steps:
                self.sampler.set_epoch(state.epoch)
                loader = accelerator.skip_first_batches(self.train_loader, state.batches_done_in_epoch) if state.batches_done_in_epoch else self.train_loader
                for images, labels in loader:
                    self._start_method_if_due()
                    method = self.active_method
                    if config.data.augment:
                        images = random_crop_flip(images, self.augment_generator)
                    with accelerator.accumulate(self.model), accelerator.autocast():
                        output = method.compute_loss(self.model, images, labels)
                        accelerator.backward(output.loss)
                    state.batches_done_in_epoch += 1
                    images_seen += len(labels) * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
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
                    if logs_now:
                        rate = images_seen / (time.perf_counter() - started)
                        self._log({**output.metrics, **extra}, images_per_second=rate, progress=progress)
                        self._log_layer_statistics(method)
                    if config.run.checkpoint_every_steps and state.step % config.run.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                    if state.step >= self.total_steps or self._should_stop():
                        break
                else:  # the epoch ran out
                    state.epoch += 1
                    state.batches_done_in_epoch = 0
                    if state.epoch % config.run.eval_every_epochs == 0 and state.step < self.total_steps:
                        self._evaluate_and_keep_best()
                    self.save_checkpoint()
                    continue
                break
        finally:
            progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self._stop_requested:
            path = self.save_checkpoint()
            logger.warning("interrupted at step %d; resume with --resume-from %s", state.step, self.output_dir)
            return {"interrupted": True, "step": state.step, "checkpoint": str(path)}
        last_eval = self._evaluate_and_keep_best()
        self.save_checkpoint()
        summary = self._finish(last_eval, time.perf_counter() - started)
        accelerator.end_training()
        return summary

    def _request_stop(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def _should_stop(self) -> bool:
        """Whether any process was interrupted; every process must agree to stop at the same step."""
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.accelerator.device)
        self._stop_requested = bool(self.accelerator.reduce(flag, reduction="sum").item())
        return self._stop_requested

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
                progress.set_postfix(**short, img_s=f"{images_per_second:.0f}")
        self.accelerator.log(record, step=self.state.step)

    def _logs_at(self, step: int) -> bool:
        return step % self.config.run.log_every_steps == 0 or step == self.total_steps

    def _log_layer_statistics(self, method: Method) -> None:
        statistics = method.layer_statistics()
        if statistics and self.accelerator.is_main_process:
            with open(self.output_dir / "layer_statistics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, "layers": statistics}) + "\n")

    def _evaluate_and_keep_best(self) -> dict:
        results = self.evaluate()
        robust = next(v for k, v in results.items() if k.startswith("eval/pgd"))
        self._log(results)
        if robust > self.state.best_pgd_accuracy:
            self.state.best_pgd_accuracy = robust
            self._save_weights(unwrap(self.model), "best", {**results, "step": self.state.step})
        logger.info("step %d: %s", self.state.step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results

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

    def _finish(self, last_eval: dict, seconds: float) -> dict:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = unwrap(self.model)
        self._save_weights(model, "last", {**last_eval, "step": self.state.step})
        revision = getattr(self.method, "revision_model", None) if self.method_started else None
        if revision is not None:
            self._save_weights(revision, "revision", {"step": self.state.step})
        summary = {
            "steps": self.state.step,
            "epochs": self.state.step / max(self.steps_per_epoch, 1),
            "method": self.config.method.method,
            "final_eval": last_eval,
            "best_pgd_accuracy": self.state.best_pgd_accuracy,
            "train_seconds": seconds,
            "hardware": _hardware(accelerator),
            "eval_examples": self.eval_examples,
            "git_commit": _git_commit(),
        }
        if accelerator.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._export_and_push(summary)
        accelerator.wait_for_everyone()
        return summary

    def _export_and_push(self, summary: dict) -> None:
        """The Hub-ready export of the last weights (``RUN_DIR/export``), pushed if asked."""
        from .hub import export_run, push_to_hub

        run = self.config.run
        export = export_run(self.output_dir, self.output_dir / "export", weights="last", overwrite=True, repo_id=run.hub_model_id)
        summary["export"] = str(export)
        if run.push_to_hub:
            summary["pushed"] = push_to_hub(export, run.hub_model_id)
            logger.info("pushed %s to %s", export, run.hub_model_id)


def _git_commit() -> str | None:
    """The commit of the cure-hub checkout that trained the model, if it is one."""
    import subprocess

    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flatten(sections: dict) -> dict:
    return {f"{s}.{k}": (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for s, d in sections.items() for k, v in d.items()}


def _hardware(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{accelerator.num_processes} x {name}"


def train(config: TrainConfig) -> dict:
    """Train a model as ``config`` says; returns the run summary."""
    return Trainer(config).train()
