"""Every mistake a user makes is one line: exit status 2, the bad value named, no traceback, and
no run folder left behind."""

import logging

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from cure_hub.cli import main as cli_main
from cure_hub.config import DataConfig, InputError, TrainConfig
from cure_hub.data import load_data

TRAIN = ["--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits", "--max-steps", "1",
         "--batch-size", "16", "--eval-subset", "20", "--steps", "1", "--eval-attack-steps", "1"]


def write_dataset(folder, splits: dict, label_feature=None, sizes=None):
    """A local dataset of random images: ``splits`` maps a split name to its labels; ``sizes``
    gives the size of each training image (8 by default, and for every other split)."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=["a", "b"])})
    folder.mkdir()
    for split, labels in splits.items():
        images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))
                  for s in (sizes if split == "train" and sizes else [8] * len(labels))]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(folder / f"{split}.parquet")
    return str(folder)


def one_line_error(argv, capsys, command="train") -> str:
    try:
        code = cli_main([command, *argv])
    except SystemExit as exit_info:  # argparse and configuration errors
        code = exit_info.code
    error = capsys.readouterr().err
    assert code == 2, error
    lines = [line for line in error.split("\n") if line.strip() and "examples/s]" not in line]  # less progress bars
    assert "Traceback" not in error and len(lines) == 1 and f"{command}: error: " in lines[0], error
    return lines[0]
    return lines[0]


@pytest.mark.parametrize("recipe,message", [
    ("data:\n  augment: \"no\"\n", "augment must be one of ('auto', 'cifar', 'imagenet', 'none'), got 'no'"),
    ("optim:\n  batch_size: 3.5\n", "optim.batch_size must be an integer, got 3.5"),
    ("optim:\n  lr: fast\n", "optim.lr must be a number or a fraction like 8/255, got 'fast'"),
    ("optim:\n  lr_milestones: 0.5\n", "optim.lr_milestones must be a list, got 0.5"),
    ("optim: 5\n", "section 'optim' must be a mapping"),
    ("method: [\n", "is not valid YAML"),
])
def test_recipe_values_of_the_wrong_type_are_named(recipe, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert message in one_line_error(["--recipe", str(path)], capsys)


def test_a_mistyped_flag_is_one_line_with_a_suggestion(capsys):
    error = one_line_error(["--percentil", "20"], capsys)
    assert "unrecognized arguments: --percentil 20 (did you mean --percentile?)" in error
    assert "(did you mean --attacks?); see cure-hub eval --help" in one_line_error(["model", "--attaks", "clean"], capsys, command="eval")


def test_recipe_numbers_are_read_as_the_command_line_reads_them(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  epochs: 2\nattack:\n  epsilon: 8/255\n  step_size: 2/255\n")
    config = TrainConfig.from_yaml(str(path))
    assert config.optim.lr == 0.001 and config.attack.epsilon == 8 / 255 and config.attack.step_size == 2 / 255
    from cure_hub.arguments import parse_train_config

    assert parse_train_config(["--epsilon", "8/255", "--lr", "1e-3"]).attack.epsilon == 8 / 255


def test_bad_input_to_train_is_one_line_and_leaves_no_run(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    mixed = write_dataset(tmp_path / "mixed", {"train": [0, 1] * 4, "test": [0, 1]}, sizes=[8, 9] * 4)
    empty = write_dataset(tmp_path / "empty", {"train": [0, 1] * 4, "test": []})
    unlabelled = write_dataset(tmp_path / "unlabelled", {"train": [0, 1] * 16, "test": [-1] * 4})
    cases = [
        (["--init-from", str(corrupt)], f"cannot read the checkpoint '{corrupt}'"),
        (["--eval-split", "dev"], "split 'dev' is not in the dataset; its splits are ['train', 'test']"),
        (["--train-subset", "5000"], "--train-subset 5000 is larger than the train split (1437 examples)"),
        (["--push-to-hub", "--hub-model-id", "not a repo"], "hub_model_id 'not a repo' is not a Hub repository id"),
        (["--dataset", mixed, "--eval-subset", "2"], "the train split has images of different sizes [(8, 8), (9, 9)]: set --image-size"),
        (["--dataset", empty, "--eval-subset", "2"], 'Instruction "test" corresponds to no data'),
        (["--dataset", unlabelled, "--eval-subset", "2"], "the test split has 4 labels outside the 2 training classes: -1 (4x)"),
        (["--model", "resnet_nope"], "Unknown model 'resnet_nope'"),
        (["--model", "vit_tiny", "--model-kwargs", "patch_size=16", "--from-scratch"], "patch_size=16 does not tile 8x8 images"),
        (["--model", "vit_tiny"], "CURE fine-tunes a naturally trained model, and vit_tiny has pretrained weights: add --pretrained"),
    ]
    capsys.readouterr()  # the progress bars of writing the datasets
    for flags, message in cases:
        output = tmp_path / "run"
        error = one_line_error([*TRAIN, *flags, "--output-dir", str(output)], capsys)
        assert message in error, (flags, error)
        assert not output.exists(), flags


def test_unlabelled_eval_split_is_refused_by_eval_too(tmp_path, capsys):
    unlabelled = write_dataset(tmp_path / "unlabelled", {"train": [0, 1] * 4, "test": [-1] * 4})
    capsys.readouterr()
    error = one_line_error(["cifar_resnet18", "--checkpoint", "none.pt", "--dataset", unlabelled], capsys, command="eval")
    assert "the test split has 4 labels outside the 2 training classes" in error and "--split" in error


def test_a_stray_label_is_warned_about(tmp_path, caplog):
    labels = [0, 1] * 200 + [3]
    folder = write_dataset(tmp_path / "stray", {"train": labels, "test": [0, 1]}, label_feature=datasets.Value("int64"))
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        data = load_data(DataConfig(dataset=folder))
    assert data.num_classes == 4
    assert "label(s) [2, 3] have [0, 1] examples against 200" in caplog.text
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        caplog.clear()
        load_data(DataConfig(dataset=write_dataset(tmp_path / "fine", {"train": [0, 1] * 50, "test": [0, 1]},
                                                   label_feature=datasets.Value("int64"))))
    assert "stray" not in caplog.text


def test_input_error_is_a_value_error_for_library_users():
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        TrainConfig.from_dict({"optim": {"batch_size": "16"}})
    assert issubclass(InputError, ValueError)


def test_the_cure_stage_of_a_paper_recipe_says_to_train_its_natural_stage_first(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "cure_cifar10_resnet18.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "cure_hub.cli", "train", "--recipe", str(recipe)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "'runs/natural-cifar10_resnet18'" in result.stderr and "train that run first" in result.stderr
    assert "recipes/natural_<setting>.yaml" in result.stderr and not (tmp_path / "runs").exists()


def test_an_output_dir_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    code = cli_main(["train", "--model", "cifar_resnet18", "--dataset", "digits", "--max-steps", "1",
                     "--output-dir", str(tmp_path / "notes.txt" / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert f"output_dir '{tmp_path / 'notes.txt' / 'run'}' lies under '{tmp_path / 'notes.txt'}', which is a file" in error


def test_an_empty_or_cut_config_at_resume_is_refused_naming_the_missing_sections(tmp_path, capsys):
    """Defaults filled in for an empty or cut config.yaml would resume another run (the error was
    then about output_dir, or worse, none)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("")
    error = one_line_error(["--resume-from", str(run)], capsys)
    assert "lacks the section(s) model, data, method, attack, optim, run (an empty or cut file)" in error
    whole = yaml.safe_dump(TrainConfig().to_dict(), sort_keys=False)
    (run / "config.yaml").write_text(whole[:whole.index("method:")])  # cut after the data section
    error = one_line_error(["--resume-from", str(run)], capsys)
    assert f"{run / 'config.yaml'} lacks the section(s) method, attack, optim, run (an empty or cut file)" in error


def test_eval_output_that_cannot_be_written_is_refused_before_evaluating(natural_run, tmp_path, capsys):
    """An --output naming a folder used to be found out after the whole evaluation, leaving .tmp and
    .partial files beside it."""
    (tmp_path / "results").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    model = [str(natural_run), "--dataset", "digits", "--n-examples", "20", "--attacks", "clean"]
    error = one_line_error([*model, "--output", str(tmp_path / "results")], capsys, command="eval")
    assert f"--output '{tmp_path / 'results'}' is a folder: name the results file" in error
    error = one_line_error([*model, "--output", str(tmp_path / "notes.txt" / "r.json")], capsys, command="eval")
    assert f"lies under '{tmp_path / 'notes.txt'}', which is a file" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]
    assert cli_main(["eval", *model, "--output", str(tmp_path / "new" / "r.json")]) == 0  # its folder is made
    assert (tmp_path / "new" / "r.json").is_file()
