"""``cure-hub eval`` across processes and after a crash: two processes give the results of one,
and an evaluation killed anywhere (in two processes, mid-write) and resumed (in one) gives the
results of an uninterrupted one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cure_hub.cli import main
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
FAULT_EVAL = str(REPO / "tests" / "fault_eval.py")
# One thread in every process: the results must not depend on how many a process has.
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# 40 examples in 5 batches of 8: two processes take batches 0, 2, 4 and 1, 3.
ARGS = ["--dataset", "digits", "--n-examples", "40", "--attacks", "clean,pgd20,cw", "--epsilon", "24/255",
        "--batch-size", "8"]


def evaluate(natural_run: Path, output: Path, kill_at="none", processes=1, extra=()):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())] if processes == 2 else []
    command = [sys.executable, *launcher, FAULT_EVAL, kill_at, str(natural_run), *ARGS, "--output", str(output), *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(natural_run, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("reference") / "results.json"
    result = evaluate(natural_run, output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (output.parent / "results.json.partial").exists()
    return json.loads(output.read_text())


def test_two_processes_give_the_results_of_one(natural_run, reference, tmp_path):
    result = evaluate(natural_run, tmp_path / "results.json", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text()) == reference
    assert 0.8 < reference["accuracy"]["clean"] and reference["accuracy"]["pgd20"] < reference["accuracy"]["clean"] - 0.2
    assert result.stdout.count("examples, linf") == 1  # one process prints the table


def test_killed_evaluation_resumes_to_the_results_of_an_uninterrupted_one(natural_run, reference, tmp_path, capsys):
    output, state = tmp_path / "results.json", tmp_path / "results.json.partial"
    killed = evaluate(natural_run, output, kill_at="torn:2", processes=2)  # each process dies writing its 2nd batch
    assert killed.returncode != 0
    assert not output.exists()
    records = [line for path in state.glob("records-*.jsonl") for line in path.read_text().splitlines()]
    assert len(records) == 4 and sum(not line.endswith("}") for line in records) == 2  # 2 whole, 2 torn

    # Not continued by accident, nor with other settings.
    assert main(["eval", str(natural_run), *ARGS, "--output", str(output)]) == 2
    assert "unfinished evaluation" in capsys.readouterr().err
    assert main(["eval", str(natural_run), *ARGS[:-1], "4", "--output", str(output), "--resume"]) == 2
    assert "batch_size: 8 then, 4 now" in capsys.readouterr().err

    resumed = evaluate(natural_run, output, extra=["--resume"])  # one process finishes what two began
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 of 5 batches already evaluated" in resumed.stderr
    assert json.loads(output.read_text()) == reference
    assert not state.exists()


def test_resume_needs_the_output_it_continues(natural_run, capsys):
    assert main(["eval", str(natural_run), *ARGS, "--resume"]) == 2
    assert "--resume continues the evaluation that writes --output" in capsys.readouterr().err
