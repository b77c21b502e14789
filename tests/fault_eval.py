"""Run by tests/test_sharded_eval.py, alone or under torchrun: ``cure-hub eval``, killed with
SIGKILL (as by ``kill -9``) in every process once it has written N batch records.

    python tests/fault_eval.py KILL_AT [cure-hub eval arguments]

KILL_AT is ``none`` (run to the end), ``after:N`` (right after the N-th record) or ``torn:N`` (in
the middle of writing the N-th record: half a line on disk).
"""

import os
import signal
import sys

import torch.distributed as dist

from cure_hub.cli import main
from cure_hub.sharded_eval import EvaluationState


def inject(kill_at: str) -> None:
    kind, _, value = kill_at.partition(":")
    if kind == "none":
        return
    written = 0
    append = EvaluationState.append

    def die():
        # Every process first reaches its point of death: the launcher stops the others as soon as
        # one dies, which would otherwise leave where they stand to chance.
        if dist.is_initialized():
            dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)

    def append_then_die(file, record):
        nonlocal written
        written += 1
        if kind == "torn" and written == int(value):
            line = EvaluationState.line(record)
            file.write(line[: len(line) // 2])
            file.flush()
            die()
        append(file, record)
        if kind == "after" and written == int(value):
            die()

    EvaluationState.append = staticmethod(append_then_die)


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(["eval", *sys.argv[2:]]))
