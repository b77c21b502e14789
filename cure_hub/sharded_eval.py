"""``cure-hub eval`` across processes and GPUs, and after a crash.

The batches of the evaluation set (numbered in dataset order; the batch size fixes them) are dealt
round-robin to the processes of the launch (``accelerate launch -m cure_hub.cli eval ...``, or
``torchrun``). Each process appends the record of every batch it finishes
(:meth:`~cure_hub.evaluation.EvaluationSuite.run_batch`) to its own file in the state folder and
flushes it to disk. At the end the records of all processes are gathered and summarised into one
results file, and the state folder is removed. A batch's results depend only on the model, the
batch and the suite, so the results equal those of one process on the same examples, and a killed
evaluation continued with ``--resume``, with any number of processes, equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import InputError
from .evaluation import EvaluationSuite

logger = logging.getLogger(__name__)


def process_state():
    """The processes of this launch (one, without a launcher), as Accelerate sees them; on CPU under
    ``torchrun`` when ``ACCELERATE_USE_CPU`` is set, as ``Accelerator`` reads it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def state_folder_for(output: str | os.PathLike) -> Path:
    """Where the evaluation writing ``output`` keeps its unfinished work: ``results.json.partial/``."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict: a resumed evaluation must attack the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class EvaluationState:
    """The finished batches of an evaluation: ``evaluation.json`` (what is being evaluated, how)
    and one ``records-<process>.jsonl`` per process, one JSON line per finished batch."""

    folder: Path
    fingerprint: dict

    HEADER = "evaluation.json"

    def __post_init__(self):
        self.fingerprint = json.loads(json.dumps(self.fingerprint))  # as it reads back: tuples become lists

    def exists(self) -> bool:
        return (self.folder / self.HEADER).is_file()

    def check_same_evaluation(self) -> None:
        started = json.loads((self.folder / self.HEADER).read_text())
        changed = [f"{key}: {started.get(key)!r} then, {value!r} now" for key, value in self.fingerprint.items()
                   if started.get(key) != value]
        if changed:
            raise InputError(f"the unfinished evaluation in {self.folder} was started with other settings "
                             f"({'; '.join(changed)}): resume it with the same ones, or remove the folder to start over")

    def finished_batches(self) -> dict[int, dict]:
        """Every record written so far. A process killed while writing leaves a torn last line:
        that batch is simply run again."""
        records = {}
        for path in sorted(self.folder.glob("records-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[record["batch"]] = record
        return records

    def create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{self.HEADER}.tmp"
        temporary.write_text(json.dumps(self.fingerprint, indent=2))
        os.replace(temporary, self.folder / self.HEADER)

    def writer(self, process_index: int):
        return open(self.folder / f"records-{process_index}.jsonl", "a")

    @staticmethod
    def line(record: dict) -> str:
        return json.dumps(record) + "\n"

    @staticmethod
    def append(file, record: dict) -> None:
        file.write(EvaluationState.line(record))
        file.flush()
        os.fsync(file.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_evaluation(
    model: torch.nn.Module,
    dataset,
    suite: EvaluationSuite,
    batch_size: int,
    collate,
    device: str | torch.device | None = None,
    state: EvaluationState | None = None,
    resume: bool = False,
    progress: bool = True,
    corrupted_copy=None,
    split_indices: list[int] | None = None,
) -> dict:
    """Evaluate ``model`` on ``dataset`` with ``suite``, this process's share of the batches, and
    return the summary of all processes' (on every process).

    With ``state``, finished batches are written to it as they finish; ``resume`` continues from
    them (refused if the evaluation was started with another fingerprint), and without ``resume``
    an unfinished evaluation in the same place is refused rather than overwritten. With
    ``corrupted_copy`` (a :class:`~cure_hub.corruptions.CorruptedCopy` or
    :class:`~cure_hub.corruptions.GeneratedCorruptions`), each batch's corrupted versions come from
    it, for the examples at ``split_indices``, their positions in the whole split.
    """
    from accelerate.utils import gather_object

    processes = process_state()
    device = device or processes.device
    num_batches = math.ceil(len(dataset) / batch_size)
    finished = {}
    if state is not None and state.exists():
        if not resume:
            raise InputError(f"an unfinished evaluation is in {state.folder}: add --resume to continue it, "
                             "or remove the folder to start over")
        state.check_same_evaluation()
        finished = state.finished_batches()
        logger.info("resuming: %d of %d batches already evaluated", len(finished), num_batches)
    processes.wait_for_everyone()  # everyone has read the state before anyone writes to it
    if state is not None and processes.is_main_process and not state.exists():
        state.create()
    processes.wait_for_everyone()

    mine = [b for b in range(num_batches) if b not in finished][processes.process_index::processes.num_processes]
    batch_indices = [list(range(b * batch_size, min((b + 1) * batch_size, len(dataset)))) for b in mine]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_indices, collate_fn=collate)
    prefix = "eval" if processes.num_processes == 1 else f"eval (process 1 of {processes.num_processes})"
    new = []
    with (state.writer(processes.process_index) if state is not None else contextlib.nullcontext()) as file, \
            tqdm(total=sum(map(len, batch_indices)), unit="img", dynamic_ncols=True,
                 disable=not progress or not processes.is_main_process) as bar:
        batches = ((b, images, labels, corrupted_copy.batch([split_indices[i] for i in positions], images, labels)
                    if corrupted_copy is not None else {})
                   for b, positions, (images, labels) in zip(mine, batch_indices, loader))
        for record in suite.attack_batches(model, batches, device, bar, bar_prefix=prefix):
            new.append(record)
            if state is not None:
                state.append(file, record)
    records = list(finished.values()) + gather_object(new)
    return suite.summarise(records)
