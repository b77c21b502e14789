"""Run by tests/test_resume.py, alone or under torchrun: cure_hub/train.py's main, killed with
SIGKILL (as by ``kill -9``) at a chosen point of the run, in every process.

    python tests/fault_run.py KILL_AT [train.py flags]

KILL_AT is one of:

* ``none``: run to the end;
* ``step:N``: right after optimiser step N has been logged, before any checkpoint of that step;
* ``checkpoint:N``: in the middle of writing the checkpoint of step N (Accelerate's files are
  written, the per-process state and the rename are not);
* ``finish``: after the final ``weights/last.safetensors``, before the revision weights, the
  summary and the export.
"""

import os
import signal
import sys

from accelerate import Accelerator

from cure_hub.train import main
from cure_hub.trainer import Trainer


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def inject(kill_at: str) -> None:
    kind, _, value = kill_at.partition(":")
    if kind == "step":
        log = Trainer._log

        def log_then_die(self, metrics, images_per_second=None, progress=None):
            log(self, metrics, images_per_second, progress)
            if images_per_second is not None and self.state.step == int(value):
                die()

        Trainer._log = log_then_die
    elif kind == "checkpoint":
        save_state = Accelerator.save_state

        def save_state_then_die(self, output_dir=None, **kwargs):
            location = save_state(self, output_dir, **kwargs)
            if f"step_{int(value):07d}" in str(output_dir):
                die()
            return location

        Accelerator.save_state = save_state_then_die
    elif kind == "finish":
        save_weights = Trainer._save_weights

        def save_weights_then_die(self, model, name, metadata=None):
            save_weights(self, model, name, metadata)
            if name == "last":
                die()

        Trainer._save_weights = save_weights_then_die
    elif kind != "none":
        raise SystemExit(f"unknown kill point {kill_at!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
