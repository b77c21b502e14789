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
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from .config import InputError
from .run_folder import RunFolder
from .sharding import all_finite
from .system import DiskFullError, disk_space_for, folder_size, readable_size

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
PROCESS_STATE_FILE = "process_state_{}.pt"
#: What every checkpoint holds besides its per-process files, in Accelerate's names: the weights and
#: the optimiser's state, in the layout of the engine that wrote them (DDP; FSDP's full state dicts;
#: FSDP's sharded ones, torch.distributed.checkpoint folders whose ``.metadata`` is written last).
SHARED_PARTS = {
    "weights": ("model.safetensors", "pytorch_model_fsdp_0.bin", "pytorch_model_fsdp_0/.metadata"),
    "optimiser state": ("optimizer.bin", "optimizer_0.bin", "optimizer_0/.metadata"),
}


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


def is_checkpoint(location: Path) -> bool:
    """Whether ``location`` names one checkpoint (a ``step_*`` folder, or any folder holding
    Accelerate's state), rather than a run folder."""
    return location.name.startswith(CHECKPOINT_PREFIX) or (location / "random_states_0.pkl").exists()


def checkpoint_damage(location: Path, process_index: int) -> str | None:
    """What is missing or cut short in the checkpoint ``location``, as the process ``process_index``
    needs it (``None``: whole). Structural, without loading a tensor: every file is there, every
    safetensors file as long as its header says, every torch/pickle file a whole zip archive (its
    directory sits at the end, so a file cut short has none)."""
    if missing := [f"{part} ({' or '.join(names)})" for part, names in SHARED_PARTS.items()
                   if not any((location / name).is_file() for name in names)]:
        return f"it has no {' and no '.join(missing)}"
    needed = [f"random_states_{process_index}.pkl", PROCESS_STATE_FILE.format(process_index)]
    if missing := [name for name in needed if not (location / name).is_file()]:
        return f"it has no {', '.join(missing)}"
    for path in sorted(location.iterdir()):
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(header_size))
                except ValueError:
                    return f"{path.name} is cut short (no whole header)"
            length = 8 + header_size + max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                                           default=0)
            if path.stat().st_size != length:
                return f"{path.name} is {path.stat().st_size} bytes where its header says {length}"
        elif path.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(path):
            return f"{path.name} is cut short or damaged (not a whole archive)"
    return None


def holds_finite_weights(location: Path) -> bool:
    """Whether the checkpoint ``location`` is whole and its model's weights and buffers are all finite
    (an FSDP checkpoint's are taken as written: :meth:`Checkpointer.check_finite` runs before every save)."""
    if checkpoint_damage(location, 0) is not None:
        return False
    weights = location / SHARED_PARTS["weights"][0]
    return not weights.is_file() or all(bool(torch.isfinite(tensor).all()) for tensor in load_file(weights).values())


class Checkpointer:
    """Saves and restores the training state of every process in ``folder`` (a run's
    ``checkpoints``), keeping the newest ``keep``."""

    def __init__(self, accelerator: Accelerator, folder: Path, keep: int):
        self.accelerator, self.folder, self.keep = accelerator, folder, keep

    def path_of(self, step: int) -> Path:
        return self.folder / f"{CHECKPOINT_PREFIX}{step:07d}"

    def save(self, step: int, process_state: dict) -> Path:
        """Accelerate's state and each process's ``process_state`` as the checkpoint of ``step``. A
        disk that fills ends in a :class:`DiskFullError` naming the space a checkpoint takes (the
        newest whole one's, else more than what was written), the partial checkpoint removed."""
        accelerator, final = self.accelerator, self.path_of(step)
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        whole = complete_checkpoints(self.folder)
        try:
            with disk_space_for(self.folder, f"the checkpoint of step {step}",
                                needed=lambda: f"about {readable_size(folder_size(whole[-1]))}" if whole
                                else f"more than the {readable_size(folder_size(partial))} written",
                                then=f"continue with `cure-hub train --resume-from {self.folder.parent}`"):
                accelerator.save_state(str(partial), safe_serialization=True)
                accelerator.wait_for_everyone()
                torch.save(process_state, partial / PROCESS_STATE_FILE.format(accelerator.process_index))
        except DiskFullError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def restore(self, location: str | os.PathLike, state: TrainingState) -> tuple[Path, dict]:
        """Loads the checkpoint ``location`` (or the newest whole one of the run folder ``location``)
        into Accelerate's registered objects, ``state`` among them; returns where it was and this
        process's own state. A damaged checkpoint (:func:`checkpoint_damage`, judged by every
        process alike) is passed over for the one before it, with a warning; named, it is refused."""
        location = Path(location)
        if is_checkpoint(location):
            if damage := self._damage(location):
                raise InputError(f"cannot resume from {location}: {damage}. Resume from the run folder to use its newest "
                                 f"whole checkpoint, or name an older one")
        else:
            location = self._newest_whole_checkpoint(location)
        accelerator = self.accelerator
        accelerator.load_state(str(location))
        if state.num_processes != accelerator.num_processes:
            raise InputError(
                f"{location} was written by {state.num_processes} processes, and this run has {accelerator.num_processes}: "
                f"each process resumes its own state and data shard, so resume with {state.num_processes} processes"
            )
        process_file = location / PROCESS_STATE_FILE.format(accelerator.process_index)
        return location, torch.load(process_file, map_location="cpu", weights_only=True)

    @staticmethod
    def holds_checkpoint(location: str | os.PathLike) -> bool:
        """Whether ``location`` is a checkpoint, or a run folder that has written one."""
        location = Path(location)
        return is_checkpoint(location) or bool(complete_checkpoints(RunFolder(location).checkpoints))

    def _damage(self, location: Path) -> str | None:
        """:func:`checkpoint_damage` as every process judges it: a checkpoint damaged for one is damaged for all."""
        damage = checkpoint_damage(location, self.accelerator.process_index)
        if self.accelerator.num_processes > 1:
            damaged = torch.tensor(float(damage is not None), device=self.accelerator.device)
            if self.accelerator.reduce(damaged, reduction="sum").item() and damage is None:
                damage = "another process's part of it is damaged (that process's log says which)"
        return damage

    def _newest_whole_checkpoint(self, run: Path) -> Path:
        found = complete_checkpoints(RunFolder(run).checkpoints)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {run} (expected checkpoints/{CHECKPOINT_PREFIX}*)")
        for location in reversed(found):
            if (damage := self._damage(location)) is None:
                return location
            logger.warning("passing over the checkpoint %s: %s (a full disk, or a copy cut short?)", location, damage)
        raise InputError(f"every checkpoint of {run} is damaged (the oldest, {location.name}: {damage}); "
                         "start the run again with --overwrite-output-dir")

    def check_finite(self, model: torch.nn.Module, step: int, lr: float) -> None:
        """Refuse to go on with weights that are NaN or infinite."""
        if not all_finite(model.parameters(), self.accelerator):
            raise TrainingDivergedError(self.divergence_message("the weights are", step, lr))

    def divergence_message(self, what: str, step: int, lr: float) -> str:
        finite = next((c for c in reversed(complete_checkpoints(self.folder)) if holds_finite_weights(c)), None)
        last = f"the newest checkpoint with finite weights is {finite}" if finite else "no checkpoint with finite weights was written"
        return (
            f"training diverged at step {step + 1}: {what} not finite (NaN or inf). Nothing was exported; "
            f"{last}. Lower the learning rate (--lr, now {lr:g}) or check the data and the starting weights."
        )
