"""What every command line of the package shares: its logging, and how a user error ends a
command (one line, exit status 2) rather than a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def setup_logging() -> None:
    """Our own progress at INFO; other libraries' at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cure_hub").setLevel(logging.INFO)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that describe bad input rather than a bug: reported in one line, no traceback."""
    from .alarms import TrainingCollapsedError
    from .checkpoints import TrainingDivergedError
    from .config import InputError
    from .data import DatasetUnavailableError
    from .hub import HubPushError
    from .models import CheckpointMismatchError, ExportError
    from .system import DiskFullError

    return (InputError, DatasetUnavailableError, ExportError, HubPushError, CheckpointMismatchError,
            TrainingDivergedError, TrainingCollapsedError, DiskFullError, FileExistsError, FileNotFoundError)


def exit_code_of(command: str, run: Callable[[], int]) -> int:
    """``run()``, with a user error printed as ``COMMAND: error: ...`` and exit status 2 (as
    argparse's for a bad flag)."""
    try:
        return run()
    except user_errors() as err:  # evaluated only when something is raised: imports stay lazy
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its own message is the last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2
