import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from cure_hub.cli import main as cli_main
from cure_hub.config import TrainConfig
from cure_hub.evaluation import wilson_interval
from cure_hub.hub import export_run, rerender_card
from cure_hub.hub_results import SOURCE_URL, ThreatModel, eval_results, robust_results
from cure_hub.models import ExportError, RobustClassifier, load_robust_model
from cure_hub.trainer import Trainer
from hub_server import LOAD_SCRIPT, LoopbackHub, hub_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "cifar": {"model": "cifar_resnet18", "model_kwargs": {"width": 4}},
    "timm-vit": {"model": "vit_tiny", "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}, "from_scratch": True},
    "transformers-vit": {"model": "vit", "model_kwargs": {"hidden_size": 16, "num_hidden_layers": 1,
                                                          "num_attention_heads": 2, "intermediate_size": 32}},
}


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub() as server:
        yield server


def cli(args, env):
    return subprocess.run([sys.executable, "-m", "cure_hub.cli", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A few training steps of each kind of model; the trainer exports each to RUN_DIR/export."""
    made = {}
    for name, model in MODELS.items():
        output = tmp_path_factory.mktemp(name) / "run"
        config = TrainConfig.from_dict({
            "model": model,
            "data": {"dataset": "digits", "augment": "none", "eval_subset": 20},
            "method": {"method": "cure"},
            "attack": {"steps": 2},
            "optim": {"max_steps": 3, "batch_size": 16, "lr": 0.05},
            "run": {"output_dir": str(output), "eval_attack_steps": 2},
        })
        Trainer(config).train()
        made[name] = output
    return made


@pytest.mark.parametrize("kind", MODELS)
def test_round_trip_through_the_hub(kind, runs, hub, tmp_path):
    run = runs[kind]
    export = run / "export"
    library = "transformers" if kind.startswith("transformers") else "timm"
    # The plots need two evaluations or two logged steps, which these 3-step runs lack (test_trainer.py draws them).
    expected_files = {"README.md", "config.json", "model.safetensors", "eval_results.json", "training_config.json", "robustbench.json"}
    if library == "transformers":
        expected_files.add("preprocessor_config.json")
    assert expected_files <= {p.name for p in export.iterdir()}
    assert not [p for p in export.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if library == "timm":
        config = json.loads((export / "config.json").read_text())
        assert "num_classes" not in config.get("model_args", {}) and config["label_names"] == [str(i) for i in range(10)]

    repo_id = f"tester/{kind}"
    env = hub_env(hub, tmp_path / "home")
    pushed = cli(["push", str(export), "--repo-id", repo_id], env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert "hf_write" not in pushed.stdout + pushed.stderr
    assert set(hub.state.repos[repo_id].files("main")) == {p.name for p in export.iterdir()}

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "input.pt")
    loaded = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, repo_id, library, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = load_robust_model(run).eval()(x)
    for source in ("cure_hub", "transformers", *(["timm"] if library == "timm" else [])):
        torch.testing.assert_close(logits[source], expected, rtol=1e-4, atol=1e-5, msg=source)
    assert logits["transformers_labels"] == [str(i) for i in range(10)]

    card = ModelCard((tmp_path / "README.md").read_text(), ignore_metadata_errors=False)
    evaluated = json.loads((export / "eval_results.json").read_text())
    remote = json.loads((tmp_path / "robust_results.json").read_text())  # read back from the Hub
    assert remote == {"results": evaluated["accuracy"], "threat_model": "Linf-8/255"}
    assert {r.metric_args["attack"]: r.metric_value for r in card.data.eval_results} == evaluated["accuracy"]
    assert all(r.metric_config == "Linf-8/255" for r in card.data.eval_results)
    assert card.data.library_name == library and "adversarial-robustness" in card.data.tags
    assert "hf_write" not in (tmp_path / "README.md").read_text()


def test_offline_mode_loads_from_the_cache(runs, hub, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    assert cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/offline"], env).returncode == 0
    code = "import cure_hub; print(cure_hub.load_robust_model('tester/offline').spec.architecture)"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.stdout.strip() == "cifar_resnet18", first.stderr[-2000:]
    requests_before = len(hub.state.requests)
    offline = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert offline.stdout.strip() == "cifar_resnet18", offline.stderr[-2000:]
    assert len(hub.state.requests) == requests_before


def test_loading_a_missing_repository_is_a_one_line_error(hub, tmp_path):
    result = cli(["eval", "tester/no-such-model", "--dataset", "digits"], hub_env(hub, tmp_path / "home"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cure-hub eval: error: no model at 'tester/no-such-model'" in result.stderr
    result = cli(["train", "--init-from", "tester/no-such-model", "--dataset", "digits", "--output-dir", str(tmp_path / "run")],
                 hub_env(hub, tmp_path / "home"))
    assert result.returncode == 2 and "cure-hub train: error: no model at 'tester/no-such-model'" in result.stderr


def test_push_errors_come_before_any_upload(runs, hub, tmp_path, capsys):
    home = tmp_path / "home"
    no_token = cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/errors"], hub_env(hub, home, token=None))
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr
    read_only = cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/errors"], hub_env(hub, home, token="hf_read"))
    assert read_only.returncode == 2 and "read-only" in read_only.stderr
    assert "tester/errors" not in hub.state.repos

    env = hub_env(hub, home)
    assert cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/errors"], env).returncode == 0
    commits = len(hub.state.repos["tester/errors"].commits)
    other = cli(["push", str(runs["transformers-vit"] / "export"), "--repo-id", "tester/errors"], env)
    assert other.returncode == 2 and "holds a 'cifar_resnet18' model, not 'vit'" in other.stderr and "--force" in other.stderr
    assert len(hub.state.repos["tester/errors"].commits) == commits
    assert cli(["push", str(runs["transformers-vit"] / "export"), "--repo-id", "tester/errors", "--force"], env).returncode == 0
    assert len(hub.state.repos["tester/errors"].commits) == commits + 1

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert cli_main(["push", str(incomplete), "--repo-id", "tester/errors"]) == 2  # refused before any request
    assert "not a complete export" in capsys.readouterr().err


def test_hub_faults_end_in_one_line_that_says_what_to_do(runs, hub, tmp_path):
    """A closed port, an invalid token, a 500 at commit and a server gone mid-commit ended in tracebacks
    of 14-29 frames. Each is one line naming the endpoint and the request, saying whether the commit
    may have been applied, and giving the command that pushes again (which then works)."""
    from helpers import free_port

    export, home = str(runs["cifar"] / "export"), tmp_path / "home"
    push = ["push", export, "--repo-id", "tester/faults", "--revision", "v1"]
    again = f"`cure-hub push {export} --repo-id tester/faults --revision v1`"

    def one_line_error(result):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        *before, last = result.stderr.strip().splitlines()  # before: huggingface_hub's progress bars, if any
        assert last.startswith("cure-hub push: error: ") and not any("rror" in line for line in before), result.stderr
        return last

    closed = f"http://127.0.0.1:{free_port()}"
    error = one_line_error(cli(push, hub_env(hub, home, HF_ENDPOINT=closed)))
    assert f"the connection to the Hub at {closed} failed on GET {closed}/api/whoami-v2" in error and "HF_ENDPOINT" in error
    error = one_line_error(cli(push, hub_env(hub, home, token="hf_revoked")))
    assert f"the Hub at {hub.endpoint} refused the token (401 to GET {hub.endpoint}/api/whoami-v2): set HF_TOKEN" in error
    assert "hf_revoked" not in error
    for fault, what in ((500, f"the Hub answered 500 to POST {hub.endpoint}/api/models/tester/faults/commit/v1"),
                        ("drop", f"the connection to the Hub at {hub.endpoint} failed on POST {hub.endpoint}/api/models/tester/faults/commit/v1")):
        hub.state.faults["commit"] = fault
        error = one_line_error(cli(push, hub_env(hub, home)))
        assert what in error and f"The commit may have been applied: look at {hub.endpoint}/tester/faults/commits/v1 before " \
            f"pushing again ({again})" in error, error
    assert hub.state.repos["tester/faults"].refs["v1"] is None  # the branch, made before the commit, holds none
    assert cli(push, hub_env(hub, home)).returncode == 0 and hub.state.repos["tester/faults"].refs["v1"] is not None


def test_a_push_that_fails_after_training_says_the_export_is_whole_and_how_to_push_it(hub, tmp_path):
    run = tmp_path / "run"
    hub.state.faults["commit"] = 500
    result = cli(["train", "--model", "cifar_resnet18", "--model-kwargs", "width=4", "--dataset", "digits", "--max-steps", "2",
                  "--batch-size", "16", "--eval-subset", "20", "--output-dir", str(run), "--push-to-hub", "--hub-model-id",
                  "tester/after-training"], hub_env(hub, tmp_path / "home"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (f"training finished, and the run and its export {run / 'export'} are whole; the push failed: the Hub answered 500"
            in result.stderr and f"`cure-hub push {run / 'export'} --repo-id tester/after-training`" in result.stderr)
    load_robust_model(run / "export")


def test_private_repo_and_pull_request(runs, hub, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    assert cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/private", "--private"], env).returncode == 0
    repo = hub.state.repos["tester/private"]
    assert repo.private
    main_head = repo.refs["main"]
    pr = cli(["push", str(runs["cifar"] / "export"), "--repo-id", "tester/private", "--create-pr", "--commit-message", "retrained"], env)
    assert pr.returncode == 0, pr.stderr[-2000:]
    assert repo.refs["main"] == main_head and "refs/pr/1" in repo.refs


def test_the_card_says_when_a_model_is_no_classifier_yet_and_how_each_library_loads_it(runs, tmp_path):
    """A 3-step model at chance was headlined "an adversarially robust image classifier"; the
    transformers snippet of a cifar_* export lacked the import its prose asked for."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(runs["cifar"] / "export", export)
    results = json.loads((export / "eval_results.json").read_text())
    for clean, caveat in ((0.15, True), (0.9, False)):
        results["accuracy"]["clean"] = clean
        (tmp_path / "results.json").write_text(json.dumps(results))
        card = (rerender_card(export, tmp_path / "results.json")).read_text()
        words = " ".join(card.replace("\n> ", " ").split())
        assert ("**Not a useful classifier yet**: its clean accuracy, 15.0 %, is within twice chance (10.0 % for 10 "
                "classes)" in words) is caveat, card[:1500]
    assert "adversarially robust image classifier" not in card
    assert "import cure_hub  # registers cifar_resnet18\nfrom transformers import AutoModelForImageClassification" in card


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_partial(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_run(runs["cifar"], out)
    with pytest.raises(ExportError, match="holds other files than an export"):
        export_run(runs["cifar"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="no 'revision' weights|weights"):
        export_run(runs["cifar"], tmp_path / "rev", weights="nonsense")
    leftover = tmp_path / ".export.partial-killed"  # what an export killed half-way leaves
    leftover.mkdir()
    export = tmp_path / "export"
    export_run(runs["cifar"], export)
    export_run(runs["cifar"], export, weights="revision", overwrite=True)  # an earlier export is replaced
    assert json.loads((export / "training_config.json").read_text())["weights"] == "revision"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    umask = os.umask(0)
    os.umask(umask)
    assert export.stat().st_mode & 0o777 == 0o777 & ~umask
    entry = json.loads((export / "robustbench.json").read_text())
    assert entry["eps"] == "8/255" and entry["additional_data"] is False and entry["unreliable"] is False
    assert set(entry) <= set(ROBUSTBENCH_MODEL_INFO) | {"unreliable"}


KILLED_WHILE_REMOVING = """
import os, shutil, signal, sys
from cure_hub.hub import export_run

rmtree = shutil.rmtree

def rmtree_killed_half_way(path, *args, **kwargs):  # kill -9 after the first file of an export is gone
    if os.path.isfile(os.path.join(path, "training_config.json")):
        os.remove(os.path.join(path, "README.md"))
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)

shutil.rmtree = rmtree_killed_half_way
export_run(sys.argv[1], sys.argv[2], weights="revision", overwrite=True)
"""


def test_export_overwrite_killed_while_removing_the_earlier_export_leaves_one_whole_export(runs, tmp_path):
    """The earlier export was deleted in place, so a kill could leave it without its card (which
    load_robust_model and eval accepted). It is renamed aside first: a kill leaves the new export whole."""
    export = tmp_path / "export"
    export_run(runs["cifar"], export)
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_REMOVING, str(runs["cifar"]), str(export)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (export / "README.md").is_file(), sorted(p.name for p in export.iterdir())
    assert json.loads((export / "training_config.json").read_text())["weights"] == "revision"
    load_robust_model(export)
    export_run(runs["cifar"], export, overwrite=True)  # sweeps what the kill left aside
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# The fields of RobustBench's ModelInfo (robustbench/utils.py, RobustBench/robustbench on GitHub);
# the leaderboard's files add "unreliable" (model_info/cifar10/Linf/Xu2023Exploring_WRN-28-10.json).
ROBUSTBENCH_MODEL_INFO = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                          "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                          "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")


def test_export_overwrite_never_replaces_the_run_its_parents_or_the_current_folder(runs, tmp_path, monkeypatch, capsys):
    run = runs["cifar"]
    before = sorted(p.relative_to(run.parent) for p in run.parent.rglob("*"))
    monkeypatch.chdir(run / "weights")
    for target, message in ((run, "is the run being exported"), (run.parent, "or holds it"),
                            (".", "is the current folder"), ("..", "is the run being exported")):
        assert cli_main(["export", str(run), str(target), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error
    (tmp_path / "a-file").write_text("x")
    assert cli_main(["export", str(run), str(tmp_path / "a-file"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.relative_to(run.parent) for p in run.parent.rglob("*")) == before


def test_card_command_rerenders_after_a_new_evaluation(runs, tmp_path):
    out = export_run(runs["cifar"], tmp_path / "export")
    results = json.loads((out / "eval_results.json").read_text())
    results["accuracy"] = {"clean": 0.5, "pgd20": 0.25, "aa": 0.2}
    results["nrr"] = {"aa": 2 * 0.5 * 0.2 / 0.7}
    results.update(n_examples=200, split_examples=10000, split="test", unreliable=True,
                   warnings=["the model outputs probabilities (in [0, 1], summing to 1), not logits"])
    (tmp_path / "new.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "-m", "cure_hub.cli", "card", str(out), "--eval-results", str(tmp_path / "new.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "README.md").read_text()
    card = ModelCard(text, ignore_metadata_errors=False)
    assert {r.metric_args["attack"]: r.metric_value for r in card.data.eval_results} == results["accuracy"]
    assert "**These numbers come from a subset**: 200 class-balanced examples of the\n10000 of the test split" in text
    assert "- the model outputs probabilities" in text
    entry = json.loads((out / "robustbench.json").read_text())
    # AutoAttack on 200 of 10,000 examples is not RobustBench's protocol: its figure goes to the footnote.
    assert entry["autoattack_acc"] == "" and entry["unreliable"] is True
    assert "AutoAttack 20.00 % on 200 examples (95 % interval 15.05-26.09 %)" in entry["footnote"]  # Wilson, by hand
    assert "model_info/digits/Linf/" in text

    results.update(n_examples=10000, unreliable=False, warnings=[])
    (tmp_path / "new.json").write_text(json.dumps(results))
    cli_main(["card", str(out), "--eval-results", str(tmp_path / "new.json")])
    entry = json.loads((out / "robustbench.json").read_text())
    assert entry["autoattack_acc"] == "20.00" and entry["clean_acc"] == "50.00" and entry["unreliable"] is False
    assert "come from a subset" not in (out / "README.md").read_text()


def test_loaders_return_eval_mode_models(runs):
    run = runs["cifar"]
    for model in (load_robust_model(run), load_robust_model(run / "export"), RobustClassifier.from_pretrained(run)):
        assert not model.training and not any(m.training for m in model.modules())
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model(torch.rand(1, 3, 8, 8))  # a single image, under no_grad: no statistics change
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_eval_refuses_data_the_model_was_not_built_for(runs, tmp_path, capsys):
    from test_input_errors import one_line_error, write_dataset

    two_classes = write_dataset(tmp_path / "two", {"train": [0, 1] * 4, "test": [0, 1] * 4})
    capsys.readouterr()
    for flags, message in ((["--dataset", "digits", "--image-size", "16"], "trained on 8 px images, the evaluation data has 16 px"),
                           (["--dataset", two_classes], "the model has 10 classes, the evaluation data 2")):
        error = one_line_error([str(runs["cifar"]), "--attacks", "clean", *flags], capsys, command="eval")
        assert message in error, error
    assert "--plots draws from the results file" in one_line_error(
        [str(runs["cifar"]), "--dataset", "digits", "--plots", str(tmp_path)], capsys, command="eval")


def test_eval_on_data_of_other_class_names_is_refused_unless_asked_and_then_says_so(runs, tmp_path, capsys):
    """Ten classes of other names (a model of digits on CIFAR-10 resized to its size) were evaluated
    with a log warning only, and results.json said "warnings": []."""
    import datasets

    from test_input_errors import one_line_error, write_dataset

    letters = write_dataset(tmp_path / "letters", {"train": list(range(10)), "test": list(range(10))},
                            label_feature=datasets.ClassLabel(names=list("abcdefghij")))
    capsys.readouterr()
    error = one_line_error([str(runs["cifar"]), "--attacks", "clean", "--dataset", letters], capsys, command="eval")
    assert "the model's classes ['0', '1', '2', '3', '4'] are not the data's ['a', 'b', 'c', 'd', 'e']" in error \
        and "--other-classes" in error, error
    output = tmp_path / "results.json"
    assert cli_main(["eval", str(runs["cifar"]), "--attacks", "clean", "--dataset", letters, "--other-classes",
                     "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["unreliable"] and "accuracy compares label indices (--other-classes)" in results["warnings"][0]


def test_exports_name_their_results_weights_and_no_local_path(runs, tmp_path, capsys):
    run = tmp_path / "run"
    config = TrainConfig.from_dict({
        "model": {**MODELS["cifar"], "init_from": str(runs["cifar"].resolve())},
        "data": {"dataset": "digits", "augment": "none", "eval_subset": 20},
        "attack": {"steps": 1}, "optim": {"max_steps": 2, "batch_size": 16},
        "run": {"output_dir": str(run.resolve()), "eval_attack_steps": 1},
    })
    Trainer(config).train()
    results = tmp_path / "results.json"
    assert cli_main(["eval", str(run), "--dataset", "digits", "--attacks", "clean", "--n-examples", "20", "--output", str(results)]) == 0
    assert json.loads(results.read_text())["weights"] == "last"
    capsys.readouterr()
    assert cli_main(["export", str(run), str(tmp_path / "best"), "--weights", "best", "--eval-results", str(results)]) == 2
    assert "holds results of the last weights, not of the best weights" in capsys.readouterr().err
    assert cli_main(["export", str(runs["cifar"]), str(tmp_path / "other"), "--eval-results", str(results)]) == 2
    assert "not of the run" in capsys.readouterr().err
    export = export_run(run, tmp_path / "export", eval_results=results)
    for exported in (export, run / "export"):
        for file in exported.iterdir():
            text = file.read_text(errors="ignore") if file.suffix != ".safetensors" else ""
            assert str(tmp_path) not in text and str(runs["cifar"].parent) not in text, file
    card = (export / "README.md").read_text()
    assert f"`{runs['cifar'].name}`" in card  # the start is named, not located
    clean = json.loads(results.read_text())["accuracy"]["clean"]
    low, high = wilson_interval(round(clean * 20), 20)
    assert f"| Clean | {100 * clean:.2f} % | {100 * low:.1f}–{100 * high:.1f} % |" in card and "Wilson score interval" in card


#: One small configuration per transformers family with processor options of its own.
PROCESSOR_FAMILIES = {
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},  # shortest_edge, crop_pct
    "regnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "groups_width": 8},
    "convnext": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
    "vit": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "mobilevit": {"hidden_sizes": [16, 16, 16], "neck_hidden_sizes": [8, 8, 16, 16, 16, 16, 32],  # BGR, no normalisation
                  "num_attention_heads": 2},
    "efficientnet": {"width_coefficient": 0.1, "depth_coefficient": 0.1, "hidden_dim": 128},  # std applied twice
    "swin": {"embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "window_size": 4},
    "dinov2": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_ratio": 2},
    "beit": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
}


def _sensitive(build):
    """The model ``build()`` makes, from a fixed random initialisation (not whatever the tests
    before it in this process left the global generator at: float rounding of the two pixel paths
    is amplified differently by each), with a head of unit-variance weights, and batch norms with
    unit scales and the statistics of its own activations (transformers starts MobileViT and
    EfficientNet from a zero head, and EfficientNet from batch-norm scales of 0.02, which fade
    activations to 1e-45 and would hide any input), checked to see the channel order and the scale."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in model.classifier_parameter_names():
                parameter.normal_(generator=torch.Generator().manual_seed(0))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()
                module.momentum = None  # a plain average over the batches below
        model.train()(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        model.eval()
        pixels = _image_and_pixels()[1]
        logits = model(pixels)
        assert (logits - model(pixels.flip(1))).abs().max() > 1e-3 and (logits - model(pixels / 2)).abs().max() > 1e-3
    return model


def _image_and_pixels(size=32):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return image, torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]


@pytest.mark.parametrize("model_type", PROCESSOR_FAMILIES)
def test_transformers_exports_give_pipeline_the_pixels_the_model_saw(model_type, tmp_path):
    """AutoImageProcessor + model on a PIL image equal RobustClassifier on its [0, 1] tensor, and
    pipeline() runs: ResNet and RegNet processors take a shortest edge, not a height and width;
    MobileViT's reverses the channels; EfficientNet's divides by the std twice unless told not to."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from cure_hub import create_model
    from cure_hub.models import save_pretrained

    model = _sensitive(lambda: create_model(model_type, num_classes=3, image_size=32, **PROCESSOR_FAMILIES[model_type]))
    assert model.spec.image_size == 32
    save_pretrained(model, tmp_path / "export")
    image, pixels = _image_and_pixels()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "export")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**processor(image, return_tensors="pt")).logits, model(pixels), rtol=1e-4, atol=1e-5)
    predictions = pipeline("image-classification", model=str(tmp_path / "export"))(image)
    assert len(predictions) == 3


@pytest.mark.parametrize("model_type", ["mobilevit", "efficientnet", "pp_lcnet"])
def test_a_checkpoint_is_fine_tuned_on_the_pixels_its_own_processor_gives(model_type, tmp_path):
    """A transformers checkpoint saved with its model type's processor (as on the Hub): the
    RobustClassifier built from it feeds the backbone what that processor would, channel order,
    rescaling and normalisation included."""
    from transformers import AutoModelForImageClassification

    from cure_hub import create_model
    from cure_hub.model_configs import default_image_processor

    fields = PROCESSOR_FAMILIES.get(model_type, {})
    tiny = _sensitive(lambda: create_model(model_type, num_classes=3, image_size=32, **fields))
    tiny.backbone.save_pretrained(tmp_path / "checkpoint")
    processor = default_image_processor(model_type)
    processor.do_resize = processor.do_center_crop = False  # compare on the 32-px image itself
    processor.save_pretrained(tmp_path / "checkpoint")
    model = create_model(str(tmp_path / "checkpoint")).eval()
    backbone = AutoModelForImageClassification.from_pretrained(tmp_path / "checkpoint").eval()
    image, pixels = _image_and_pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), backbone(**processor(image, return_tensors="pt"))[0], rtol=1e-4, atol=1e-5)


def test_an_export_whose_pixels_no_processor_can_give_is_refused(tmp_path):
    import dataclasses

    from cure_hub import RobustClassifier, create_model
    from cure_hub.models import ExportError, save_pretrained

    vit = create_model("vit", num_classes=3, image_size=32, **PROCESSOR_FAMILIES["vit"])
    reversed_vit = RobustClassifier(vit.backbone, dataclasses.replace(vit.spec, channel_order="BGR"))  # ViT's processor cannot flip
    with pytest.raises(ExportError, match="pipeline\\(\\) would feed it the wrong input"):
        save_pretrained(reversed_vit, tmp_path / "export")


def test_timm_export_keeps_every_build_argument_and_none_of_the_base_checkpoints_metadata(tmp_path):
    from cure_hub import create_model, load_robust_model
    from cure_hub.models import save_pretrained

    model = create_model("vit_tiny", num_classes=3, image_size=32, depth=2, drop_path_rate=0.1)
    save_pretrained(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_args"]["drop_path_rate"] == 0.1 and "num_classes" not in config["model_args"]
    assert not {"license", "tag", "hf_hub_id"} & set(config["pretrained_cfg"])  # vit_tiny's are augreg's, Apache-2.0
    assert load_robust_model(tmp_path / "export").spec.model_args.items() >= model.spec.model_args.items()


def test_the_card_names_the_split_a_run_held_out_for_its_evaluation(tmp_path):
    """With --eval-split-fraction the run evaluates on examples held out of train: the card and its
    model-index say so, not "test"."""
    from test_trainer import tiny_config

    config = tiny_config(tmp_path / "run", data={"dataset": "digits", "eval_split_fraction": 0.05, "eval_subset": 9},
                         method={"method": "pgd_at"}, optim={"max_steps": 1})
    Trainer(config).train()
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "Evaluated on 9 examples of the held_out split of digits" in card
    assert "split: held_out" in card and "split: test" not in card


def test_a_card_we_write_round_trips_through_model_card_and_our_reader(runs, tmp_path):
    """docs/hub-results.md: every field of the results reaches the card's model-index and comes back
    through huggingface_hub's ModelCard and robust_results (from the Hub: test_round_trip_through_the_hub)."""
    out = export_run(runs["cifar"], tmp_path / "export")
    results = json.loads((out / "eval_results.json").read_text())
    results.update(accuracy={"clean": 0.5, "pgd20": 0.25, "aa": 0.2}, n_examples=200, split_examples=10000, split="test", seed=3,
                   intervals={"clean": [0.43, 0.57], "pgd20": [0.2, 0.31], "aa": [0.15, 0.26]},
                   interval_method="Wilson score interval, 95 %")
    (tmp_path / "new.json").write_text(json.dumps(results))
    cli_main(["card", str(out), "--eval-results", str(tmp_path / "new.json")])
    ModelCard.load(out / "README.md").save(tmp_path / "again.md")
    read = robust_results(out)
    assert robust_results(tmp_path / "again.md") == read
    assert [r.attack for r in read] == ["clean", "pgd20", "aa"]
    for result in read:
        assert result.accuracy == results["accuracy"][result.attack]
        assert result.interval == tuple(results["intervals"][result.attack])
        assert result.threat_model == ThreatModel("linf", 8 / 255) and result.dataset_config == "Linf-8/255"
        assert (result.n_examples, result.split_examples, result.sampling, result.seed) == (200, 10000, "class-balanced subset", 3)
        assert result.is_subset and result.split == "test" and result.source_name.startswith("cure-hub ")
        assert result.autoattack_version == ("standard" if result.attack == "aa" else None)
    assert read[2].metric_name == "Robust accuracy (AutoAttack standard, Linf, eps=8/255; 200 of the 10000 test examples)"
    assert "verified" not in (out / "README.md").read_text()
    assert load_robust_model(out).threat_model == ThreatModel("linf", 8 / 255)



def test_results_of_two_threat_models_or_sources_keep_their_own_group_and_source():
    """huggingface_hub merges results sharing task, dataset, config and split, keeping the first
    one's source: a config per threat model, and per source, keeps them apart."""
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    base = {"dataset": "uoft-cs/cifar10", "split": "test", "n_examples": 100, "accuracy": {"clean": 0.8, "aa": 0.4}}
    written = (eval_results({**base, "norm": "linf", "epsilon": 8 / 255})
               + eval_results({**base, "norm": "l2", "epsilon": 0.5})
               + eval_results({**base, "norm": "linf", "epsilon": 8 / 255, "reported_by": {"name": "a paper", "url": "https://arxiv.org"}}))
    index = eval_results_to_model_index("m", written)
    assert [group["dataset"]["config"] for group in index[0]["results"]] == ["Linf-8/255", "L2-0.5", "Linf-8/255 (reported by a paper)"]
    _, back = model_index_to_eval_results(index)
    assert [(r.dataset_config, r.source_name.split()[0], r.source_url, r.metric_args["norm"]) for r in back] == [
        *[("Linf-8/255", "cure-hub", SOURCE_URL, "linf")] * 2, *[("L2-0.5", "cure-hub", SOURCE_URL, "l2")] * 2,
        *[("Linf-8/255 (reported by a paper)", "a", "https://arxiv.org", "linf")] * 2]


THEIR_CARD = """---
license: mit
tags:
- their-tag
model-index:
- name: their-model
  results:
  - task:
      type: image-classification
    dataset:
      name: ImageNet
      type: imagenet-1k
      split: validation
    metrics:
    - type: accuracy
      value: 0.81
      name: Top-1 accuracy
    source:
      name: Their paper
      url: https://example.org/paper
---

# Their model

Their words, which a proposal keeps.
"""


def test_eval_proposes_results_to_any_cards_pull_request_and_updates_its_own(runs, hub, tmp_path):
    """--propose-to-card: one pull request whose card keeps the metadata, prose and other results,
    updated rather than duplicated when run again; a result of the same protocol on main is
    replaced only with --overwrite-results; a read-only token stops before evaluating."""
    import shutil

    theirs = tmp_path / "theirs"
    shutil.copytree(runs["cifar"] / "export", theirs)
    (theirs / "README.md").write_text(THEIR_CARD)
    env = hub_env(hub, tmp_path / "home")
    assert cli(["push", str(theirs), "--repo-id", "tester/theirs"], env).returncode == 0
    repo = hub.state.repos["tester/theirs"]
    main_before = repo.refs["main"]
    evaluate = ["eval", "tester/theirs", "--dataset", "digits", "--attacks", "clean,pgd20", "--n-examples", "40", "--propose-to-card"]

    def card_at(revision):
        entry = repo.files(revision)["README.md"]
        return ModelCard((hub.state.lfs[entry["lfs_oid"]] if "lfs_oid" in entry else entry["data"]).decode())

    first = cli(evaluate, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "proposed the results to the card of tester/theirs:" in first.stdout and "/discussions/1" in first.stdout
    assert repo.refs["main"] == main_before and repo.pull_requests == 1
    card = card_at("refs/pr/1")
    assert card.data.license == "mit" and card.data.tags == ["their-tag"] and "Their words, which a proposal keeps." in card.text
    assert [(r.metric_name, r.source_name) for r in card.data.eval_results][0] == ("Top-1 accuracy", "Their paper")
    ours = {r.metric_args["attack"]: r for r in card.data.eval_results[1:]}
    assert set(ours) == {"clean", "pgd20"} and all(r.dataset_config == "Linf-8/255" for r in ours.values())
    assert ours["pgd20"].metric_name == "Robust accuracy (PGD-20, Linf, eps=8/255; 40 of the 360 test examples)"
    description = repo.discussions[0]["description"]
    assert "cure-hub eval tester/theirs --dataset digits --attacks clean,pgd20 --norm linf --epsilon 8/255 --n-examples 40 --seed 0" in description

    again = cli(evaluate, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert repo.pull_requests == 1 and len(card_at("refs/pr/1").data.eval_results) == 3  # its own pull request, updated

    repo.refs["main"], repo.discussions[0]["status"] = repo.refs["refs/pr/1"], "merged"  # the owner merges it
    clash = cli(evaluate, env)
    assert clash.returncode == 2 and "Traceback" not in clash.stderr and "evaluate:" not in clash.stderr  # before evaluating
    assert "card already has results of this protocol" in clash.stderr and "--overwrite-results" in clash.stderr
    replaced = cli([*evaluate, "--overwrite-results"], env)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert repo.pull_requests == 2 and len(card_at("refs/pr/2").data.eval_results) == 3

    read_only = cli(evaluate, hub_env(hub, tmp_path / "home", token="hf_read"))
    assert read_only.returncode == 2 and "read-only" in read_only.stderr and "evaluating" not in read_only.stderr
    assert repo.pull_requests == 2
