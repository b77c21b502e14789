"""The run folder, its one owner: what a full disk or a kill leaves in it is handled where it is read."""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cure_hub.run_folder import LAYER_STATISTICS, METRICS, RunFolder, write_atomically


def test_a_log_line_cut_short_is_dropped_at_resume_with_a_warning(tmp_path, caplog):
    """A full disk can cut the last record of a log; the next resume drops it and says so, where it
    failed on it before. A damaged line before the last is not guessed at."""
    folder = RunFolder(tmp_path)
    (tmp_path / METRICS).write_text('{"step": 2, "train/loss": 1.0}\n{"step": 4, "eval/clean_acc": 0.5}\n{"step": 6, "tr')
    (tmp_path / LAYER_STATISTICS).write_text('{"step": 2, "layers": {}}\n')
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        folder.truncate_logs(4)
    assert folder.read_log(METRICS) == [{"step": 2, "train/loss": 1.0}]  # the evaluation at the checkpoint's step goes too
    assert "metrics.jsonl: dropped its last line, cut short (15 characters" in caplog.text
    (tmp_path / METRICS).write_text('{"step": 2, "tr\n{"step": 4, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 1 is not a JSON record"):
        folder.truncate_logs(4)


def test_weights_and_exports_are_readable_as_every_other_file_of_a_run(natural_run):
    """safetensors writes through a private temporary file (0o600): another user could not load a
    shared run or export (docs/runs.md)."""
    run = natural_run
    modes = {path.relative_to(run): path.stat().st_mode & 0o777 for path in (*run.glob("weights/*"), *run.glob("export/*"))}
    assert set(modes.values()) == {(run / "config.yaml").stat().st_mode & 0o777}, modes


def test_a_run_folder_has_one_writer_and_a_killed_one_leaves_no_lock(tmp_path):
    """Two runs into one folder used to both exit 0, the second's files over the first's and their
    logs interleaved. While a run trains, a second run (--overwrite-output-dir, or --resume-from)
    is refused in one line naming the first's PID; once the first is killed (-9), the folder is free."""
    train = str(Path(__file__).resolve().parents[1] / "cure_hub" / "train.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    output = tmp_path / "run"
    flags = ["--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits", "--train-subset", "64",
             "--eval-subset", "10", "--batch-size", "16", "--steps", "1", "--eval-attack-steps", "1", "--method", "trades",
             "--output-dir", str(output)]
    first = subprocess.Popen([sys.executable, train, *flags, "--epochs", "1000", "--seed", "3"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (output / METRICS).exists():
            time.sleep(0.1)
        assert first.poll() is None and (output / METRICS).exists()
        for second in ([*flags, "--epochs", "1", "--seed", "4", "--overwrite-output-dir"], ["--resume-from", str(output)]):
            refused = subprocess.run([sys.executable, train, *second], env=env, capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert refused.stderr.strip().splitlines()[-1].startswith(
                f"train.py: error: {output} is being written by another run (PID {first.pid} on "), refused.stderr[-2000:]
        assert first.poll() is None and (output / METRICS).exists()
        assert "seed: 3" in (output / "config.yaml").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    folder = RunFolder(output)
    folder.claim()  # the lock died with its process
    folder.release()
    assert all(json.loads(line)["step"] for line in (output / METRICS).read_text().splitlines())


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path``: a disk that fills. Mounting needs root (CAP_SYS_ADMIN); where
    the tests run without it, the full-disk tests skip."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def cure_hub_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cure_hub.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_full_disk_ends_in_one_line_and_a_run_without_a_checkpoint_starts_again(tmp_path):
    """A disk that filled during the first checkpoint ended in torch's "unexpected pos", naming no
    disk, and the run could neither resume ("no checkpoint") nor start again ("already holds a
    run"). Now: one line naming the folder, its free space and what the checkpoint takes; the same
    --resume-from trains the run from its first step once there is room. An export that does not fit
    is named alike and leaves nothing."""
    with small_disk(tmp_path / "disk", "512k") as disk:
        run = disk / "run"
        full = cure_hub_cli("train", "--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits",
                            "--max-steps", "4", "--checkpoint-every-steps", "2", "--batch-size", "16", "--eval-subset", "20",
                            "--output-dir", str(run))
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cure-hub train: error: the disk of {run / 'checkpoints'} is full (") and \
            "free) writing the checkpoint of step 2, which takes more than the " in last and \
            f"written: free that much there, then continue with `cure-hub train --resume-from {run}`" in last, last
        assert not [p for p in run.rglob("*") if ".partial" in p.name]
        subprocess.run(["mount", "-o", "remount,size=8m", "tmpfs", str(disk)], check=True)
        resumed = cure_hub_cli("train", "--resume-from", str(run))
        assert resumed.returncode == 0 and f"{run} has no checkpoint yet: training it from its first step" in resumed.stderr, \
            resumed.stderr[-3000:]
        steps = [record["step"] for record in RunFolder(run).read_log(METRICS) if "train/loss" in record]
        assert steps == sorted(set(steps)) and steps[-1] == 4, steps
        with small_disk(tmp_path / "small", "64k") as small:
            export = cure_hub_cli("export", str(run), str(small / "export"))
            assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
            assert f"the disk of {small} is full (" in export.stderr and re.search(
                f"writing the export {re.escape(str(small / 'export'))}, which takes about 1[0-9][0-9].[0-9] KiB: free that much "
                "there, then run the command again", export.stderr), export.stderr  # the weights' 176.8 KiB
            assert list(small.iterdir()) == []


def test_a_file_of_a_run_rewritten_on_a_full_disk_stays_whole(tmp_path):
    """config.yaml, summary.json and weights/*.json were written in place: a full disk left a 0-byte
    best.json beside whole weights. Written to a temporary name and renamed, the old file stays."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        best = disk / "best.json"
        write_atomically(best, json.dumps({"step": 2}))
        with pytest.raises(OSError):
            write_atomically(best, json.dumps({"step": 4, "padding": "x" * 200_000}))
        assert json.loads(best.read_text()) == {"step": 2} and [p.name for p in disk.iterdir()] == ["best.json"]
