"""The benchmarks' smoke runs: the trade-off preset over two seeds (mean ± sd, intervals, plot), the data
pipeline, the collapse study and the engines' memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]


def tradeoff(*args, threads: int):
    command = [sys.executable, str(REPO / "benchmarks" / "tradeoff.py"), "--preset", "smoke", "--dataset", "digits", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_tradeoff_smoke_preset_over_two_seeds(tmp_path):
    """Two runs at a time, of one thread each; their numbers are those of one run at a time."""
    tradeoff("--seeds", "0,1", "--methods", "trades,cure", "--cure-grid", "gamma=0", "--curve-points", "3",
             "--output-dir", str(tmp_path), "--jobs", "2", threads=2)
    header = "| model | Nat | PGD-20 | C&W | AA | NRR (C&W) | NRR (AA) | training time |"
    table = (tmp_path / "tradeoff.md").read_text()
    assert header in table
    rows = [line for line in table.split("\n\n")[0].splitlines() if line.startswith(("| natural", "| trades", "| cure"))]
    assert len(rows) == 4 and all(row.count(" ± ") == 4 for row in rows)  # Nat, PGD-20, C&W, NRR (C&W); no AA here
    result = json.loads((tmp_path / "tradeoff.json").read_text())
    assert result["seeds"] == [0, 1] and list(result["rows"]) == ["natural (start)", "trades", "cure", "cure (gamma=0)"]
    assert result["rows"]["cure (gamma=0)"]["method"] == {**result["rows"]["cure"]["method"], "gamma": 0}
    for row in result["rows"].values():
        nat = row["summary"]["Nat"]
        assert [run["seed"] for run in row["runs"]] == [0, 1] and len(nat["values"]) == 2
        assert nat["mean"] == pytest.approx(sum(nat["values"]) / 2) and nat["sd"] >= 0
        assert nat["interval"][0] <= nat["mean"] <= nat["interval"][1]
    assert [p["lambda"] for p in result["curve"]["points"]] == [0.0, 0.5, 1.0]
    differences = result["paired_differences"]["trades"]["Nat"]  # cure minus trades, seed by seed
    cure, trades = (result["rows"][name]["summary"]["Nat"]["values"] for name in ("cure", "trades"))
    assert differences["values"] == pytest.approx([a - b for a, b in zip(cure, trades)])
    assert differences["interval"][0] <= differences["mean"] <= differences["interval"][1]
    assert "| cure minus |" in table
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert "2 job(s) at a time of 1 thread(s) each" in result["note"]
    tradeoff("--seeds", "1", "--methods", "trades", "--reference", "trades", "--curve-points", "0",
             "--output-dir", str(tmp_path / "one_at_a_time"), "--jobs", "1", threads=1)
    alone = json.loads((tmp_path / "one_at_a_time" / "tradeoff.json").read_text())
    for name in ("natural (start)", "trades"):  # the second seed's runs, which ran beside the first's above
        assert [run["eval"] for run in alone["rows"][name]["runs"]] == [result["rows"][name]["runs"][1]["eval"]]


@pytest.mark.parametrize("streaming", [[], ["--streaming"]])
def test_data_pipeline_benchmark_reports_both_rates(streaming, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_pipeline import main

    output = tmp_path / "pipeline.json"
    assert main(["--dataset", "digits", "--image-size", "16", "--batch-size", "4", "--batches", "2", "--num-workers", "0",
                 "--model", "cifar_resnet18", "--width", "4", "--attack-steps", "1", "--steps", "1", "--json", str(output),
                 *streaming]) == 0
    result = json.loads(output.read_text())
    assert result["streaming"] == bool(streaming)
    assert set(result["pipeline_images_per_second"]) == {"0"} and result["pipeline_images_per_second"]["0"] > 0
    assert result["step_images_per_second"] > 0 and result["step"] == "cure on cifar_resnet18, 1 attack steps"


def test_cure_grid_adds_a_row_per_combination_on_top_of_the_preset_cure_row():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tradeoff import PRESETS, grid_rows, runs_for

    preset = PRESETS["cpu-small"]
    rows = grid_rows(preset, "beta=5,8; percentile=10,30")
    assert list(rows) == ["cure (beta=5, percentile=10)", "cure (beta=5, percentile=30)",
                          "cure (beta=8, percentile=10)", "cure (beta=8, percentile=30)"]
    assert rows["cure (beta=8, percentile=10)"] == {**runs_for(preset)["cure"], "beta": 8, "percentile": 10}
    with pytest.raises(SystemExit, match="'betta=5'"):
        grid_rows(preset, "betta=5")


def test_methods_name_rows_whose_names_hold_commas():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tradeoff import PRESETS, runs_for, select_rows

    rows = runs_for(PRESETS["cpu-small"])
    assert list(select_rows(rows, "cure (paper's r, d),pgd_at")) == ["pgd_at", "cure (paper's r, d)"]
    with pytest.raises(SystemExit, match=r"no row named .cure \(paper's r\)."):
        select_rows(rows, "pgd_at,cure (paper's r)")


@pytest.mark.slow
def test_collapse_benchmark_smoke(tmp_path):
    """benchmarks/collapse.py on the smoke preset: TRADES and CURE at the paper's r, d with and
    without the warm-up, their training curves plotted and summarised, the start shared by a second
    schedule."""
    command = [sys.executable, str(REPO / "benchmarks" / "collapse.py"), "--preset", "smoke", "--dataset", "digits",
               "--seeds", "0", "--epochs", "1", "--lrs", "0.1", "--eval-examples", "20", "--jobs", "1",
               "--output-dir", str(tmp_path)]
    for schedule in ("cosine", "piecewise"):
        done = subprocess.run([*command, "--lr-schedule", schedule], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "collapse.md").read_text()
    for row in ("| 0.1 | trades | 0 |", "| 0.1 | cure (paper's r, d) | 0 |", "| 0.1 | cure (paper's r, d, warm-up) | 0 |"):
        assert row in table
    assert (tmp_path / "collapse.png").stat().st_size > 1000 and (tmp_path / "collapse-piecewise.md").is_file()
    assert "kept the finished run" in done.stdout  # the natural start, trained once
    runs = json.loads((tmp_path / "collapse-piecewise.json").read_text())["curves"]
    assert all(len(curve) == 5 for curve in runs.values())  # 10 steps logged every 2


@pytest.mark.slow
def test_engine_memory_benchmark_smoke(tmp_path):
    """benchmarks/engine_memory.py --quick on 2 processes: each engine's and method's peak, where a
    process under FSDP2 holds half of what it holds under DDP, and CURE a revision model more."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "benchmarks" / "engine_memory.py"), "--quick", "--json", str(tmp_path / "memory.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 / DDP peak: trades " in done.stdout
    report = json.loads((tmp_path / "memory.json").read_text())
    held = {engine: {name: report["results"][engine][name]["held_mib"] for name in ("trades", "cure")} for engine in ("ddp", "fsdp2")}
    parameters = report["parameters_mib"]
    assert held["ddp"]["trades"] == pytest.approx(2 * parameters, rel=0.01)  # weights and momentum
    assert held["ddp"]["cure"] == pytest.approx(3 * parameters, rel=0.01)  # and the revision model
    for name in ("trades", "cure"):
        assert held["fsdp2"][name] == pytest.approx(held["ddp"][name] / 2, rel=0.02)  # a shard each (rows padded)
        assert report["results"]["fsdp2"][name]["step_mib"] > 0
