"""A run you can trust: killed anywhere, interrupted, resumed, extended, in one process or two, it
ends bitwise equal to a run that was never interrupted; a diverged run publishes nothing."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cure_hub.arguments import parse_train_config
from helpers import free_port
from hub_server import LoopbackHub, hub_env

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAULT_RUN = str(REPO / "tests" / "fault_run.py")
TRAIN = str(REPO / "cure_hub" / "train.py")

# A narrow CIFAR ResNet-18 (batch norm) on 128 digits: 8 steps an epoch, 3 epochs, the first one
# natural (CURE-Eff's warm-up), augmentation and 2 attack steps on, checkpoints every 3 steps.
FLAGS = [
    "--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits", "--train-subset", "128",
    "--eval-subset", "20", "--batch-size", "16", "--epochs", "3", "--warmup-epochs", "1", "--steps", "2",
    "--eval-attack-steps", "2", "--checkpoint-every-steps", "3", "--log-every-steps", "1", "--revision-rate", "0.7",
    "--revision-decay", "0.9", "--lr", "0.05", "--lr-schedule", "cosine", "--seed", "3",
]

def run(args, timeout=300, **popen):
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout, **popen)


def torchrun(args, timeout=300):
    command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *args]
    return run(command, timeout=timeout)


def metrics(run_dir: Path, name="metrics.jsonl") -> list[dict]:
    """The run's log records, without the wall-clock figures that no two runs share."""
    records = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


def assert_same_run(run_dir: Path, reference: Path, layer_statistics_rel: float = 0.0) -> None:
    """Bitwise the same weights, metrics and steps; the layer statistics equal, or to a relative
    ``layer_statistics_rel`` (an FSDP2 run sums them over shards, in another order than DDP's)."""
    for name in ("start", "last", "best", "revision"):
        a, b = load_file(run_dir / "weights" / f"{name}.safetensors"), load_file(reference / "weights" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"{name} weights differ from the uninterrupted run's in {different[:5]}"
    assert metrics(run_dir) == metrics(reference)
    statistics = [[(record["step"], layer, name, value) for record in metrics(folder, "layer_statistics.jsonl")
                   for layer, values in record["layers"].items() for name, value in values.items()]
                  for folder in (run_dir, reference)]
    assert [entry[:3] for entry in statistics[0]] == [entry[:3] for entry in statistics[1]]
    assert [entry[3] for entry in statistics[0]] == pytest.approx([entry[3] for entry in statistics[1]], rel=layer_statistics_rel, abs=0)
    steps = [json.loads((folder / "summary.json").read_text())["steps"] for folder in (run_dir, reference)]
    assert steps[0] == steps[1]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert not list(run_dir.rglob("*.partial*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in its own process as the others."""
    output = tmp_path_factory.mktemp("reference") / "run"
    result = run([FAULT_RUN, "none", *FLAGS, "--output-dir", str(output)])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.parametrize("kill_at", ["step:5", "checkpoint:12", "step:19", "finish"])
def test_killed_run_resumes_bitwise_equal(kill_at, reference, tmp_path):
    """Killed in the natural warm-up, while writing a checkpoint, in the third epoch and while
    writing the final weights; resumed with no flag but --resume-from."""
    output = tmp_path / "run"
    killed = run([FAULT_RUN, kill_at, *FLAGS, "--output-dir", str(output)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run([TRAIN, "--resume-from", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(output, reference)


def test_a_copied_run_resumes_where_it_is_bitwise_equal(reference, tmp_path):
    """docs/runs.md: "to branch a run, copy its folder and resume the copy". A folder copied, moved
    or spelled another way (relative, from another working folder) was refused as a change of
    run.output_dir; resume follows the folder."""
    output, branch = tmp_path / "a" / "run", tmp_path / "b" / "branch"
    killed = run([FAULT_RUN, "step:19", *FLAGS, "--output-dir", str(output)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    shutil.copytree(output, branch)
    resumed = run([TRAIN, "--resume-from", "branch"], cwd=branch.parent)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(branch, reference)
    assert "output_dir: branch" in (branch / "config.yaml").read_text()


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_whole_one_before_it(reference, tmp_path):
    """A checkpoint file cut short (a full disk, a copy cut short) ended resume in a traceback naming
    no file. Resume now finds the damage before loading anything, says which file, and continues
    from the newest whole checkpoint, bitwise equal; named by itself, the damaged one is refused."""
    output = tmp_path / "run"
    killed = run([FAULT_RUN, "step:19", *FLAGS, "--output-dir", str(output)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    newest = output / "checkpoints" / "step_0000018"
    state = newest / "process_state_0.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    named = run([TRAIN, "--resume-from", str(newest)])
    assert named.returncode == 2 and "Traceback" not in named.stderr, named.stderr[-3000:]
    assert f"cannot resume from {newest}: process_state_0.pt is cut short or damaged (not a whole archive)" in named.stderr
    resumed = run([TRAIN, "--resume-from", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"passing over the checkpoint {newest}: process_state_0.pt is cut short or damaged" in resumed.stderr
    assert f"resumed from {output / 'checkpoints' / 'step_0000016'} at step 16" in resumed.stderr
    assert_same_run(output, reference)


def test_the_divergence_message_names_a_checkpoint_whose_weights_are_finite(tmp_path):
    """The message named the newest checkpoint as "the last finite" even when its weights held a NaN."""
    from accelerate import Accelerator

    from cure_hub.checkpoints import Checkpointer

    for step, value in ((3, 1.0), (6, math.nan)):
        folder = tmp_path / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        save_file({"weight": torch.full((2,), value)}, folder / "model.safetensors")
        for name in ("optimizer.bin", "random_states_0.pkl", "process_state_0.pt"):
            torch.save({}, folder / name)
    message = Checkpointer(Accelerator(cpu=True), tmp_path / "checkpoints", keep=2).divergence_message("the loss is", 7, 0.1)
    assert f"the newest checkpoint with finite weights is {tmp_path / 'checkpoints' / 'step_0000003'}." in message


def test_a_sharded_checkpoint_is_whole_only_with_each_part_s_metadata(tmp_path):
    """An FSDP checkpoint holds torch.distributed.checkpoint folders whose .metadata is written
    last: without it (a kill while the shards were written) the checkpoint is damaged."""
    from cure_hub.checkpoints import checkpoint_damage, holds_finite_weights

    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "__0_0.distcp").write_bytes(b"shard")
    for name in ("random_states_0.pkl", "process_state_0.pt"):
        torch.save({}, tmp_path / name)
    assert checkpoint_damage(tmp_path, 0) == (
        "it has no weights (model.safetensors or pytorch_model_fsdp_0.bin or pytorch_model_fsdp_0/.metadata) and no "
        "optimiser state (optimizer.bin or optimizer_0.bin or optimizer_0/.metadata)")
    (tmp_path / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"metadata")
    assert checkpoint_damage(tmp_path, 0).startswith("it has no optimiser state (optimizer.bin or optimizer_0.bin")
    (tmp_path / "optimizer_0" / ".metadata").write_bytes(b"metadata")
    assert checkpoint_damage(tmp_path, 0) is None and holds_finite_weights(tmp_path)


def test_channels_last_run_killed_resumes_bitwise_equal(tmp_path):
    """--channels-last: weights, momentum and revision model in that layout go through a checkpoint
    and come back as they were."""
    flags = [*("width=16" if flag == "width=4" else flag for flag in FLAGS), "--channels-last"]  # width 4: refused (oneDNN#6035)
    uninterrupted, output = tmp_path / "uninterrupted", tmp_path / "run"
    assert (result := run([FAULT_RUN, "none", *flags, "--output-dir", str(uninterrupted)])).returncode == 0, result.stderr[-3000:]
    killed = run([FAULT_RUN, "step:19", *flags, "--output-dir", str(output)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run([TRAIN, "--resume-from", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(output, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_checkpoints_and_resumes_bitwise_equal(signum, reference, tmp_path):
    output = tmp_path / "run"
    process = subprocess.Popen([sys.executable, TRAIN, *FLAGS, "--output-dir", str(output)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = output / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 6):
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert signal.Signals(signum).name in stderr and "--resume-from" in stderr
    stopped_at = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 6 <= stopped_at < 24 and (output / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    resumed = run([TRAIN, "--resume-from", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(output, reference)


def test_finished_run_resumed_or_extended_keeps_its_revision_model(tmp_path):
    """A finished run resumed again changes nothing; extended by an epoch it equals a longer run
    (constant schedules, so the first epochs' trajectory does not depend on the length)."""
    constant = ["--lr-schedule", "constant", "--revision-rate-schedule", "constant"]
    longer, shorter = tmp_path / "longer", tmp_path / "shorter"
    assert run([TRAIN, *FLAGS, *constant, "--output-dir", str(longer)]).returncode == 0
    first = run([TRAIN, *FLAGS, *constant, "--epochs", "2", "--output-dir", str(shorter)])
    assert first.returncode == 0, first.stderr[-3000:]
    revision = load_file(shorter / "weights" / "revision.safetensors")
    again = run([TRAIN, "--resume-from", str(shorter)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(torch.equal(v, load_file(shorter / "weights" / "revision.safetensors")[k]) for k, v in revision.items())
    extended = run([TRAIN, "--resume-from", str(shorter), "--epochs", "3"])
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert_same_run(shorter, longer)
    assert json.loads((shorter / "summary.json").read_text())["train_seconds"] > json.loads(
        (longer / "summary.json").read_text())["train_seconds"] / 3  # the segments add up


@pytest.mark.slow
def test_two_process_run_killed_resumes_bitwise_equal(tmp_path):
    """Under torchrun (gloo), 4 steps an epoch: killed in the second epoch, each process's
    augmentation, attack and batch-norm state survives."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = torchrun([FAULT_RUN, "none", *FLAGS, "--output-dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun([FAULT_RUN, "step:7", *FLAGS, "--output-dir", str(killed)])
    assert result.returncode != 0
    assert sorted(p.name for p in (killed / "checkpoints" / "step_0000006").glob("process_state_*")) == [
        "process_state_0.pt", "process_state_1.pt"]
    resumed = torchrun([TRAIN, "--resume-from", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resumed from") == 1 and resumed.stderr.count("saved the run to") == 1  # main process only
    assert_same_run(killed, straight)
    one_process = run([TRAIN, "--resume-from", str(killed / "checkpoints" / "step_0000012"), "--epochs", "4"])
    assert one_process.returncode == 2 and "written by 2 processes, and this run has 1" in one_process.stderr, one_process.stderr[-2000:]
    assert "epochs: 3" in (killed / "config.yaml").read_text()  # the refused resume changed nothing
    states = [torch.load(killed / "checkpoints" / "step_0000012" / f"process_state_{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(states[0]["augment_generator"], states[1]["augment_generator"])
    revisions = [state["method"]["revision_model"] for state in states]  # batch-norm statistics included
    assert all(torch.equal(value, revisions[1][key]) for key, value in revisions[0].items())
    buffers = [state["model_buffers"] for state in states]  # while each process's own statistics differ
    assert not all(torch.equal(value, buffers[1][key]) for key, value in buffers[0].items())


def test_resume_refuses_flags_that_change_the_trajectory(reference, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(["--resume-from", str(reference), "--lr", "0.3", "--batch-size", "16", "--epochs", "4"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "cannot change optim.lr (0.05 -> 0.3)" in error and "batch_size" not in error  # 16 is the run's own
    config = parse_train_config(["--resume-from", str(reference / "checkpoints" / "step_0000024"), "--epochs", "4"])
    assert config.run.output_dir == str(reference) and config.optim.epochs == 4 and config.optim.lr == 0.05
    with pytest.raises(SystemExit):
        parse_train_config(["--resume-from", str(reference), "--output-dir", str(reference.parent / "elsewhere")])
    assert "continues in its own folder" in capsys.readouterr().err


def test_push_to_hub_is_checked_before_training(tmp_path):
    with LoopbackHub() as hub:
        for token, message in ((None, "no Hugging Face token"), ("hf_read", "token is read-only")):
            flags = [*FLAGS, "--output-dir", str(tmp_path / "run"), "--push-to-hub", "--hub-model-id", "tester/early"]
            result = subprocess.run([sys.executable, TRAIN, *flags], env=hub_env(hub, tmp_path / "home", token, ACCELERATE_USE_CPU="true"),
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert not (tmp_path / "run").exists()


def test_diverged_run_stops_and_publishes_nothing(tmp_path):
    output = tmp_path / "run"
    with LoopbackHub() as hub:
        env = hub_env(hub, tmp_path / "home", ACCELERATE_USE_CPU="true")
        flags = [*FLAGS, "--lr", "1e6", "--output-dir", str(output), "--push-to-hub", "--hub-model-id", "tester/diverged"]
        result = subprocess.run([sys.executable, TRAIN, *flags], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "diverged at step" in result.stderr and "--lr, now 1e+06" in result.stderr
        assert "tester/diverged" not in hub.state.repos
    assert not (output / "export").exists() and not (output / "weights" / "last.safetensors").exists()
    for checkpoint in output.glob("checkpoints/step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_non_finite_weights_are_refused_everywhere(reference, tmp_path, capsys):
    from cure_hub.cli import main as cli_main

    run_dir = tmp_path / "nan-run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    weights = load_file(run_dir / "weights" / "last.safetensors")
    weights["conv1.weight"][0, 0, 0, 0] = math.nan
    save_file(weights, run_dir / "weights" / "last.safetensors")
    for command in (["export", str(run_dir), str(tmp_path / "out")],
                    ["eval", str(run_dir), "--dataset", "digits", "--attacks", "clean", "--n-examples", "20"],
                    ["train", *FLAGS, "--init-from", str(run_dir), "--output-dir", str(tmp_path / "new")]):
        assert cli_main(command) == 2, command
        error = capsys.readouterr().err
        assert "non-finite weights" in error and "conv1.weight" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "new" / "checkpoints").exists()
