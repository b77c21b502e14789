"""--streaming: a training split read as a stream, never whole, trains like a loaded one and
resumes bitwise exactly, across an epoch boundary and under two processes whose shards differ in
size (which end every epoch together); each process reads its own examples."""

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cure_hub.config import DataConfig, InputError
from cure_hub.data import PACKAGED_DATASETS
from cure_hub.streaming import load_streamed_data
from test_resume import FAULT_RUN, TRAIN, assert_same_run, run, torchrun

#: Uneven shards, as real datasets have: under two processes each process gets two of them (which
#: two, the epoch's shuffle decides), so one gets more batches of 64 than the other.
SHARD_SIZES = (60, 120, 200, 340)


@pytest.fixture(scope="module")
def streamed_digits(tmp_path_factory) -> Path:
    """720 of scikit-learn's digits as a local parquet dataset in shards, with a card that
    declares the splits' sizes (as `push_to_hub` writes it)."""
    root = tmp_path_factory.mktemp("streamed") / "digits"
    (root / "data").mkdir(parents=True)
    splits = PACKAGED_DATASETS["digits"]()
    splits["train"] = splits["train"].select(range(sum(SHARD_SIZES)))
    card = ["---", "dataset_info:", "  splits:"]
    for split, part in splits.items():
        sizes = SHARD_SIZES if split == "train" else (len(part),)
        bounds = np.cumsum((0, *sizes))
        for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            part.select(range(start, stop)).to_parquet(root / "data" / f"{split}-{i:05d}-of-{len(sizes):05d}.parquet")
        card += [f"  - name: {split}", "    num_bytes: 0", f"    num_examples: {len(part)}"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def flags(dataset: Path, *extra: str) -> list[str]:
    # 720 examples, batch 64: 11 steps an epoch planned in one process; the first epoch natural
    # (CURE-Eff); two loader workers, which read two shards each.
    return ["--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", str(dataset), "--streaming",
            "--shuffle-buffer", "300", "--eval-subset", "20", "--batch-size", "64", "--epochs", "2", "--warmup-epochs", "1",
            "--steps", "2", "--eval-attack-steps", "2", "--checkpoint-every-steps", "3", "--log-every-steps", "1",
            "--revision-rate", "0.7", "--revision-decay", "0.9", "--lr", "0.05", "--seed", "3", "--num-workers", "2", *extra]


@pytest.fixture(scope="module")
def streamed_reference(streamed_digits, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("streamed_reference") / "run"
    result = run([FAULT_RUN, "none", *flags(streamed_digits), "--output-dir", str(output)])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_killed_streamed_run_resumes_bitwise_equal(streamed_digits, streamed_reference, tmp_path):
    """Killed in the second epoch, after the checkpoint of step 12 (the first epoch has 10 or 11
    steps): resumed, it replays the second epoch's stream and skips exactly the batches it trained
    on. A change of loader workers, which would reorder the stream, is refused."""
    output = tmp_path / "run"
    killed = run([FAULT_RUN, "step:14", *flags(streamed_digits), "--output-dir", str(output)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    other_workers = run([TRAIN, "--resume-from", str(output), "--num-workers", "1"])
    assert other_workers.returncode == 2 and "run.num_workers (2 -> 1)" in other_workers.stderr, other_workers.stderr[-2000:]
    resumed = run([TRAIN, "--resume-from", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(output, streamed_reference)


def test_streamed_run_counts_epochs_from_the_card(streamed_reference):
    summary = json.loads((streamed_reference / "summary.json").read_text())
    # 720 // 64 = 11 batches planned an epoch; each of the two workers drops its last partial batch
    assert summary["epochs"] == 2 and 18 <= summary["steps"] <= 22


@pytest.mark.slow
def test_two_process_streamed_run_on_uneven_shards_resumes_bitwise_equal(streamed_digits, streams, tmp_path):
    """Each process streams its own two shards, so one has more batches than the other: every
    epoch ends for both when the shorter runs out, not with one waiting for the other in a
    collective (which would hang until the timeout); killed one step before its end and resumed,
    each process replays its own stream and skips its own batches, and the run equals the straight
    one. No loader workers here: each would drop its own last partial batch, which the count below
    leaves out."""
    counts = [[len(streams[rank, epoch]) // 64 for rank in (0, 1)] for epoch in (0, 1)]
    assert all(a != b for a, b in counts)
    steps = sum(min(epoch) for epoch in counts)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    two_processes = [*flags(streamed_digits), "--num-workers", "0"]
    result = torchrun([FAULT_RUN, "none", *two_processes, "--output-dir", str(straight)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((straight / "summary.json").read_text())["steps"] == steps
    result = torchrun([FAULT_RUN, f"step:{steps - 1}", *two_processes, "--output-dir", str(killed)], timeout=240)
    assert result.returncode != 0
    resumed = torchrun([TRAIN, "--resume-from", str(killed)], timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(killed, straight)


@pytest.fixture(scope="module")
def streams(streamed_digits) -> dict[tuple[int, int], list[tuple[bytes, int]]]:
    """``examples_of`` each of two processes in each of two epochs, by (rank, epoch). Read at a
    time: datasets sleeps 5 s at the end of every streamed parquet iteration (apache/arrow#45214)."""
    keys = [(rank, epoch) for rank in (0, 1) for epoch in (0, 1)]
    with ThreadPoolExecutor(len(keys)) as pool:
        return dict(zip(keys, pool.map(lambda key: examples_of(streamed_digits, *key), keys)))


def examples_of(dataset: Path, rank: int, epoch: int) -> list[tuple[bytes, int]]:
    """Process ``rank`` of two's examples in ``epoch``, in order, as (pixels, label)."""
    from torch.utils.data import DataLoader

    data = load_streamed_data(DataConfig(dataset=str(dataset), streaming=True, eval_subset=10), rank, 2)
    data.train.set_epoch(epoch)
    return [(image.numpy().tobytes(), int(label)) for images, labels in DataLoader(data.train, batch_size=100, collate_fn=data.train_collate)
            for image, label in zip(images, labels)]


def test_each_process_streams_its_own_examples(streams):
    """Two processes' streams are disjoint, together the whole split, each two whole shards, in
    an order that changes with the epoch."""
    first, second = streams[0, 0], streams[1, 0]
    pairs = {SHARD_SIZES[a] + SHARD_SIZES[b] for a in range(4) for b in range(4) if a != b}
    assert len(first) in pairs and len(first) + len(second) == sum(SHARD_SIZES)
    loaded = PACKAGED_DATASETS["digits"]()["train"].select(range(sum(SHARD_SIZES)))
    assert sorted(label for _, label in first + second) == sorted(loaded["label"])
    assert len({pixels for pixels, _ in first} & {pixels for pixels, _ in second}) <= 5  # digits has a few duplicate images
    next_epoch = streams[0, 1]
    assert next_epoch[:50] != first[:50]  # reshuffled each epoch


def test_stream_of_undeclared_size_needs_max_steps(tmp_path):
    """The packaged digits streamed declare no size: epochs cannot be counted in steps."""
    base = ["--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits", "--streaming", "--eval-subset", "20",
            "--batch-size", "64", "--method", "standard", "--output-dir"]
    refused = run([TRAIN, *base, str(tmp_path / "refused")])
    assert refused.returncode == 2 and "does not declare its size" in refused.stderr and "--max-steps" in refused.stderr, refused.stderr[-2000:]
    ran = run([TRAIN, *base, str(tmp_path / "ran"), "--max-steps", "30", "--log-every-steps", "30"])
    assert ran.returncode == 0, ran.stderr[-3000:]

    summary = json.loads((tmp_path / "ran" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["epochs"] == 1  # 22 batches of 64 in a pass of digits: the second is cut short


@pytest.mark.parametrize("fields, message", [
    ({"train_subset": 100}, "train_subset draws from the whole split"),
    ({"eval_split_fraction": 0.1}, "name an --eval-split"),
    ({"shuffle_buffer": 0}, "shuffle_buffer must be >= 1"),
])
def test_streaming_refuses_what_needs_the_whole_split(fields, message):
    with pytest.raises(InputError, match=message):
        DataConfig(dataset="digits", streaming=True, **fields)


def test_streamed_labels_outside_the_classes_are_refused(streamed_digits):
    data = load_streamed_data(DataConfig(dataset=str(streamed_digits), streaming=True, eval_subset=10))
    example = next(iter(data.train))
    with pytest.raises(InputError, match="label 12, outside the 10 classes"):
        data.train_collate([example, {**example, "label": 12}])
