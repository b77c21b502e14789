"""A training run's folder on disk: the one place that knows its layout.

::

    config.yaml              the resolved TrainConfig
    model_spec.json          how to rebuild the network (architecture, arguments, mean/std, labels)
    metrics.jsonl            one JSON object per logged step and per evaluation
    layer_statistics.jsonl   per logged step, the method's per-parameter statistics (CURE: Figure 6)
    weights/last.safetensors       the model at the end (bare backbone state dict)
    weights/best.safetensors       the model with the best PGD accuracy during training
    weights/revision.safetensors   CURE's revision model at the end
    weights/start.safetensors      the weights the robust method started from (for cure-hub tradeoff)
    weights/<name>.json            what each weights file is (step, evaluation)
    checkpoints/step_XXXXXXX/      full training state (cure_hub.checkpoints)
    summary.json             steps, wall time, hardware, final and best evaluation
    export/                  the Hub-ready export of the run (cure_hub.hub)
    .lock                    held by the process writing the run (its PID inside)

A run folder has one writer at a time: training holds an OS lock on ``.lock`` (``flock``), which
the operating system drops when the process ends, so a killed run never leaves a stale lock; a
second writer is refused, naming the first one's PID. Whole files are written under a temporary name and renamed into place, so a killed run never
leaves a half-written one looking whole; what a killed run left half-written is removed when the
run starts again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import torch
import yaml
from huggingface_hub import save_torch_state_dict

from .system import default_file_mode, disk_space_for, readable_size

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
MODEL_SPEC = "model_spec.json"
METRICS = "metrics.jsonl"
LAYER_STATISTICS = "layer_statistics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "weights"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
LOCK = ".lock"
#: What a run folder holds besides its configuration: removed by --overwrite-output-dir.
RUN_OUTPUTS = (CHECKPOINTS, WEIGHTS, EXPORT, METRICS, LAYER_STATISTICS, SUMMARY)


class RunFolderInUseError(FileExistsError):
    """Another process is writing the run folder."""


class RunFolder:
    """Reads and writes one run folder. Only the main process writes; callers see to that, and
    hold the folder (:meth:`claim`) while they write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None
        self._made_from: Path | None = None  # the outermost folder claim() made, if it made any

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    # ---- reading ---------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Whether a run was started here (its configuration is written when it starts)."""
        return (self.path / CONFIG).exists()

    def is_run(self) -> bool:
        """Whether this is a training run's folder (a run describes its network when it starts)."""
        return (self.path / MODEL_SPEC).is_file()

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    def read_config(self) -> dict:
        """config.yaml as written, sections of keys (``TrainConfig.from_yaml`` validates it)."""
        return yaml.safe_load(self.config_file.read_text())

    def read_model_spec(self) -> dict:
        return json.loads((self.path / MODEL_SPEC).read_text())

    def read_summary(self) -> dict:
        """summary.json, or nothing for a run that has not finished."""
        path = self.path / SUMMARY
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_log(self, log: str) -> list[dict]:
        """The records of the log ``log`` (METRICS or LAYER_STATISTICS), none if it was never written."""
        path = self.path / log
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def weights_file(self, name: str) -> Path:
        return self.path / WEIGHTS / f"{name}.safetensors"

    def weights_names(self) -> list[str]:
        return sorted(p.stem for p in (self.path / WEIGHTS).glob("*.safetensors"))

    def weights_metadata(self, name: str) -> dict:
        """What ``weights/<name>.json`` says of those weights (step, evaluation), if anything."""
        path = self.path / WEIGHTS / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- writing ---------------------------------------------------------------------------------

    def claim(self) -> None:
        """Become the folder's one writer until :meth:`release` or the end of the process; refused
        (:class:`RunFolderInUseError`, naming its PID) while another process holds it. Where the
        operating system has no ``flock`` (Windows) nothing is held."""
        if self._lock is not None:
            return
        self._made_from = next((folder for folder in [*reversed(self.path.parents), self.path] if not folder.exists()), None)
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "a process that has not written its PID yet"
                lock.close()
                raise RunFolderInUseError(
                    f"{self.path} is being written by another run ({holder}); wait for it to end, or choose another "
                    "--output-dir (to branch a run, copy its folder once it has stopped)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        """Stop being the folder's writer. The lock file stays (removing it would let two writers
        lock two different files), unless it is all there is in folders that claim() made: a run
        refused before writing anything leaves no folder behind."""
        if self._lock is None:
            return
        if self._made_from is not None and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
            for folder in [self.path, *self.path.parents]:
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: it stays
                    break
                if folder == self._made_from:
                    break
        self._lock.close()
        self._lock = None

    def clear_outputs(self) -> None:
        """Remove an earlier run's outputs, and nothing else in the folder (--overwrite-output-dir)."""
        for name in RUN_OUTPUTS:
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def remove_partial_writes(self) -> None:
        """Remove what a killed run left half-written (never read: complete files are renamed into place)."""
        for leftover in [*self.path.glob(f"{CHECKPOINTS}/*.partial"), *self.path.glob(f"{WEIGHTS}/.*.partial"),
                         *self.path.glob(".*.partial")]:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def write_description(self, config: dict, model_spec: dict) -> None:
        """config.yaml and model_spec.json: what the run is and how to rebuild its network."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_partial_writes()
        write_atomically(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        write_atomically(self.path / MODEL_SPEC, json.dumps(model_spec, indent=2))

    def append(self, log: str, record: dict) -> None:
        """One record at the end of the log ``log`` (METRICS or LAYER_STATISTICS)."""
        with open(self.path / log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_logs(self, step: int) -> None:
        """Drop what was logged after the checkpoint of ``step``: a resumed run logs it again. An
        evaluation at the checkpoint's own step came after it (checkpoints precede evaluations)."""

        def kept(record: dict, log: str) -> bool:
            is_evaluation = any(key.startswith("eval/") for key in record)
            return record["step"] < step or (record["step"] == step and not (log == METRICS and is_evaluation))

        for log in (METRICS, LAYER_STATISTICS):
            path = self.path / log
            if path.is_file():
                lines = self._whole_lines(path)
                write_atomically(path, "".join(line + "\n" for line in lines if kept(json.loads(line), log)))

    @staticmethod
    def _whole_lines(path: Path) -> list[str]:
        """The lines of a log; a last line cut short (a full disk, a kill mid-write) is dropped, with a warning."""
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ValueError(f"{path} line {number} is not a JSON record; the log is damaged") from None
                logger.warning("%s: dropped its last line, cut short (%d characters; a full disk?)", path, len(line))
                return lines[:-1]
        return lines

    def save_weights(self, name: str, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """``weights/<name>.safetensors`` (and, given ``metadata``, ``weights/<name>.json``)."""
        folder = self.path / WEIGHTS
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        partial = folder / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        with disk_space_for(folder, f"the {name} weights", needed=lambda: f"about {readable_size(sum(t.nbytes for t in state.values()))}",
                            then=f"continue with `cure-hub train --resume-from {self.path}`"):
            try:
                save_torch_state_dict(state, partial, filename_pattern=name + "{suffix}.safetensors", max_shard_size="100GB")
            except Exception:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        os.chmod(partial / f"{name}.safetensors", default_file_mode())  # safetensors writes it private (0o600)
        os.replace(partial / f"{name}.safetensors", self.weights_file(name))
        shutil.rmtree(partial, ignore_errors=True)
        if metadata is not None:
            write_atomically(folder / f"{name}.json", json.dumps(metadata, indent=2))

    def write_summary(self, summary: dict) -> None:
        write_atomically(self.path / SUMMARY, json.dumps(summary, indent=2))


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """``path`` or the first of its parents that is a file, where a folder is to be: nothing can be
    written there (the error would otherwise be a NotADirectoryError long after the start)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed into place."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
    except OSError:  # a full disk: the old file stays whole, and the space the partial took is given back
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
