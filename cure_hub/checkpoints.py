"""Checkpoints of a training run, in the manner of timm's ``CheckpointSaver``.

A checkpoint holds what every process needs to continue exactly as an uninterrupted run would:
Accelerate's state (model, optimiser, scheduler, each process's global random state), the shared
counters (:class:`TrainingState`, registered with Accelerate by the trainer) and, per process,
``process_state_<rank>.pt``: that process's augmentation and attack generators, its method state
(CURE's revision model) and its model buffers (batch-norm statistics, which each process updates
on its own batches). It is written to ``step_XXXXXXX.partial`` and renamed into place once whole,
and weights that are not finite are never written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import InputError
from .run_folder import RunFolder

CHECKPOINT_PREFIX = "step_"
PROCESS_STATE_FILE = "process_state_{}.pt"


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing of that state is saved or exported."""


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
    #: [training accuracy, the loss's largest other term, regulariser], averaged over the processes, of the method's first step and
    #: of every logged step of a method with a regulariser (the training-collapse alarm reads it).
    training_history: list = dataclasses.field(default_factory=list)
    #: Every training-health alarm raised so far (cure_hub.alarms), and whether one ended the run.
    alarms: list = dataclasses.field(default_factory=list)
    stopped_by_alarm: bool = False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def complete_checkpoints(folder: Path) -> list[Path]:
    """The whole checkpoints in a run's ``checkpoints`` folder, oldest first."""
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}[0-9]*[0-9]"))


class Checkpointer:
    """Saves and restores the training state of every process in ``folder`` (a run's
    ``checkpoints``), keeping the newest ``keep``."""

    def __init__(self, accelerator: Accelerator, folder: Path, keep: int):
        self.accelerator, self.folder, self.keep = accelerator, folder, keep

    def path_of(self, step: int) -> Path:
        return self.folder / f"{CHECKPOINT_PREFIX}{step:07d}"

    def save(self, step: int, process_state: dict) -> Path:
        """Accelerate's state and each process's ``process_state`` as the checkpoint of ``step``."""
        accelerator, final = self.accelerator, self.path_of(step)
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial), safe_serialization=True)
        accelerator.wait_for_everyone()
        torch.save(process_state, partial / PROCESS_STATE_FILE.format(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def restore(self, location: str | os.PathLike, state: TrainingState) -> tuple[Path, dict]:
        """Loads the checkpoint ``location`` (or the newest one of the run folder ``location``) into
        Accelerate's registered objects, ``state`` among them; returns where it was and this
        process's own state."""
        location = Path(location)
        if not (location / "random_states_0.pkl").exists():
            found = complete_checkpoints(RunFolder(location).checkpoints)
            if not found:
                raise FileNotFoundError(f"no checkpoint in {location} (expected checkpoints/{CHECKPOINT_PREFIX}*)")
            location = found[-1]
        accelerator = self.accelerator
        accelerator.load_state(str(location))
        if state.num_processes != accelerator.num_processes:
            raise InputError(
                f"{location} was written by {state.num_processes} processes, and this run has {accelerator.num_processes}: "
                f"each process resumes its own state and data shard, so resume with {state.num_processes} processes"
            )
        process_file = location / PROCESS_STATE_FILE.format(accelerator.process_index)
        return location, torch.load(process_file, map_location="cpu", weights_only=True)

    def check_finite(self, model: torch.nn.Module, step: int, lr: float) -> None:
        """Refuse to go on with weights that are NaN or infinite."""
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if not bool(finite):
            raise TrainingDivergedError(self.divergence_message("the weights are", step, lr))

    def divergence_message(self, what: str, step: int, lr: float) -> str:
        found = complete_checkpoints(self.folder)
        last = f"the last finite checkpoint is {found[-1]}" if found else "no checkpoint was written"
        return (
            f"training diverged at step {step + 1}: {what} not finite (NaN or inf). Nothing was exported; "
            f"{last}. Lower the learning rate (--lr, now {lr:g}) or check the data and the starting weights."
        )
