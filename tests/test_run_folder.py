"""The run folder, its one owner: what a full disk or a kill leaves in it is handled where it is read."""

import logging

import pytest

from cure_hub.run_folder import LAYER_STATISTICS, METRICS, RunFolder


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
