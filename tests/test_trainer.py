import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cure_hub.arguments import parse_train_config
from cure_hub.checkpoints import checkpoint_damage
from cure_hub.cli import main as cli_main
from cure_hub.config import InputError, TrainConfig
from cure_hub.method_registry import METHOD_CLASSES
from cure_hub.models import load_robust_model
from cure_hub.methods.base import unwrap
from cure_hub.plots import write_plots
from cure_hub.system import usable_cpu_cores
from cure_hub.trainer import Trainer, lr_multiplier
from helpers import free_port
from test_resume import assert_same_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tiny_config(output_dir, **sections) -> TrainConfig:
    base = {
        "model": {"model": "cifar_resnet18", "model_kwargs": {"width": 4}},
        "data": {"dataset": "digits", "eval_subset": 20},
        "method": {"method": "cure", "revision_rate": 0.7},
        "attack": {"steps": 2},
        "optim": {"max_steps": 4, "batch_size": 16, "lr": 0.05, "seed": 3},
        "run": {"output_dir": str(output_dir), "eval_attack_steps": 2, "log_every_steps": 1},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return TrainConfig.from_dict(base)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cure", "trades"])
def test_accelerate_launch_trains_vit_small_on_cifar10(method, cifar10_dir, tmp_path):
    # The headline command for CURE (from random weights: no network here) and TRADES, on a two-block
    # ViT-S (the launch path does not depend on the depth, nor on the method: methods are objects
    # behind one interface; every one trains in test_methods.py, pgd_at and standard also through
    # the trainer).
    narrow = ["--model-kwargs", "depth=2", *(["--from-scratch"] if method == "cure" else [])]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "cure_hub" / "train.py"),
        "--model", "vit_small", *narrow, "--dataset", cifar10_dir, "--method", method, "--max-steps", "3",
        "--train-subset", "48", "--eval-subset", "10", "--batch-size", "8", "--steps", "1",
        "--eval-attack-steps", "1", "--output-dir", str(tmp_path / "run"),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "model_spec.json", "metrics.jsonl", "summary.json", "weights/last.safetensors"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["method"] == method
    assert (run / "weights/revision.safetensors").is_file() == (method == "cure")
    spec = json.loads((run / "model_spec.json").read_text())
    assert spec["model_args"] == {"patch_size": 4, "img_size": 32, "depth": 2}
    assert spec["label_names"][0] == "airplane"


@pytest.mark.slow
def test_two_processes_agree_with_one_and_fsdp2_gives_the_ddp_run_and_resumes_exactly(tmp_path):
    """tests/distributed_cure.py: under DDP the two processes hold the same weights, revision weights
    and draws, those of one process with the whole batch (to rounding). Under Accelerate's FSDP2
    plugin (the script says how it is selected on a CPU) the run's weights (start, best, last,
    revision) and metrics are bitwise the DDP run's (its layer statistics, sums over shards, to
    rounding), every sharded module gathers and reduces in float32, and resumed from its sharded
    checkpoint of step 2 it ends bitwise where it ended."""
    script = str(REPO / "tests" / "distributed_cure.py")

    def launch(*args, processes=2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), script, *args]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    launch("single", str(tmp_path / "one"), processes=1)
    launch("ddp", str(tmp_path / "two"))
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt")
    for part in ("model", "revision"):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), f"{part} {key} differs between ranks"
            torch.testing.assert_close(value, single[part][key], rtol=1e-4, atol=1e-5, msg=f"{part} {key}")
    assert torch.equal(rank0["revisions_made"], single["revisions_made"])
    assert not all(torch.equal(a, b) for a, b in zip(single["model"].values(), single["revision"].values()))

    launch("fsdp2", str(tmp_path / "fsdp2"))
    policies = json.loads((tmp_path / "fsdp2" / "fsdp2_policies.json").read_text())
    assert set(policies) == {"FSDPRobustClassifier", "FSDPBlock"}  # the root and each transformer block
    assert all("param_dtype=torch.float32, reduce_dtype=torch.float32" in policy for policy in policies.values())
    run = tmp_path / "fsdp2" / "run"
    checkpoint = run / "checkpoints" / "step_0000002"
    assert (checkpoint / "pytorch_model_fsdp_0" / "__1_0.distcp").is_file() and checkpoint_damage(checkpoint, 1) is None
    assert_same_run(run, tmp_path / "two" / "run", layer_statistics_rel=1e-5)
    shutil.copytree(run, tmp_path / "straight")
    launch("fsdp2", "--resume-from", str(checkpoint))
    assert_same_run(run, tmp_path / "straight")


def test_warmup_epochs_train_naturally_then_switch(tmp_path):
    config = tiny_config(tmp_path / "run", optim={"max_steps": None, "epochs": 2, "warmup_epochs": 1, "batch_size": 256})
    summary = Trainer(config).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    steps_per_epoch = 1437 // 256
    assert summary["steps"] == 2 * steps_per_epoch
    assert all("train/consistency" not in r for r in train_records if r["step"] <= steps_per_epoch)
    assert all("train/consistency" in r for r in train_records if r["step"] > steps_per_epoch)
    assert [r["step"] for r in records if "eval/clean_acc" in r] == [steps_per_epoch, 2 * steps_per_epoch]
    export = tmp_path / "run" / "export"  # two evaluations make a curve: the export draws it and its card shows it
    assert (export / "training.png").is_file() and "](training.png)" in (export / "README.md").read_text()


def test_layer_statistics_are_written_on_logged_steps(tmp_path):
    config = tiny_config(tmp_path / "run", run={"log_every_steps": 2})
    Trainer(config).train()
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/updated_share" in r] == [2, 4]
    statistics = [json.loads(line) for line in (run / "layer_statistics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in statistics] == [2, 4]
    layers = statistics[-1]["layers"]
    assert "backbone.conv1.weight" in layers and not any(name.startswith("backbone.fc") for name in layers)
    assert all(0 < layer["updated_share"] < 1 and layer["grad_magnitude"] > 0 for layer in layers.values())
    assert layers["backbone.layer1.0.conv1.weight"]["updated_share"] <= 101 / 144 + 1e-6  # 43 of 144 conserved
    export = run / "export"  # two logged steps: the export draws them, its card shows and explains them
    card = (export / "README.md").read_text()
    assert (export / "layer_statistics.png").is_file() and "](layer_statistics.png)" in card and "1 − p/100" in card
    assert layers["backbone.layer1.0.conv1.weight"]["ndim"] == 4 and layers["backbone.bn1.weight"]["ndim"] == 1
    written = write_plots([str(run)], str(tmp_path / "plots"))
    assert tmp_path / "plots" / "layer_statistics_run.png" in written
    assert (tmp_path / "plots" / "layer_statistics_run.png").stat().st_size > 5000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cure_trains_in_fp16_on_cuda_through_the_loss_scaler(tmp_path):
    """fp16 on a GPU: L's backward and CURE's own RGP gradients are scaled by Accelerate's
    GradScaler; losses stay finite and the masks conserve p % of each tensor as in fp32."""
    trainer = Trainer(tiny_config(tmp_path / "run", optim={"mixed_precision": "fp16"}))
    summary = trainer.train()
    assert trainer.accelerator.device.type == "cuda" and trainer.accelerator.scaler is not None
    assert summary["steps"] == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["train/loss"] for record in logged if "train/loss" in record]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    statistics = [json.loads(line) for line in (tmp_path / "run" / "layer_statistics.jsonl").read_text().splitlines()]
    conv = statistics[-1]["layers"]["backbone.layer1.0.conv1.weight"]
    assert 0 < conv["updated_share"] <= 101 / 144 + 1e-6  # 43 of 144 conserved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerate_launch_with_fsdp2_trains_cure_on_cuda(tmp_path):
    """The real launcher's FSDP2 plugin on one GPU (Accelerate selects FSDP on GPUs only): CURE trains,
    its checkpoints are sharded, its weights are gathered whole into the export, the plugin's bf16
    policy is replaced by float32 gathers, and it starts as the same run without FSDP does."""
    def launch(name, *engine):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", *engine, str(REPO / "cure_hub" / "train.py"),
                   "--model", "vit_tiny", "--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "--from-scratch",
                   "--dataset", "digits", "--train-subset", "64", "--eval-subset", "16", "--batch-size", "8",
                   "--max-steps", "4", "--steps", "1", "--eval-attack-steps", "1", "--checkpoint-every-steps", "2",
                   "--log-every-steps", "1", "--output-dir", str(tmp_path / name)]
        result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "false"}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    log = launch("fsdp2", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_transformer_layer_cls_to_wrap", "Block", "--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    launch("unsharded")
    assert "FSDP2: weights gathered and gradients reduced in float32" in log
    assert (tmp_path / "fsdp2" / "checkpoints" / "step_0000004" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    exported = load_robust_model(tmp_path / "fsdp2" / "export")
    assert all(torch.isfinite(p).all() for p in exported.parameters())
    first = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("fsdp2", "unsharded")]
    assert first[0]["train/loss"] == pytest.approx(first[1]["train/loss"], rel=1e-2)


_HEAP_SCRIPT = """
import re, sys
from pathlib import Path
import torch
from cure_hub.system import keep_freed_heap_memory
def resident_mib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
if sys.argv[1] == "keep":
    assert keep_freed_heap_memory()
blocks = [torch.ones(2_000_000) for _ in range(40)]  # 40 blocks of 8 MB
peak = resident_mib()
del blocks
print(peak - resident_mib())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_keep_freed_heap_memory_keeps_freed_blocks():
    def released_mib(mode):
        result = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout)
    assert released_mib("default") > 250
    assert released_mib("keep") < 30


def test_gradient_accumulation_runs_every_method_step_count(tmp_path):
    config = tiny_config(tmp_path / "run", optim={"gradient_accumulation_steps": 2, "batch_size": 8})
    summary = Trainer(config).train()
    assert summary["steps"] == 4


def test_bf16_mixed_precision_trains(tmp_path):
    """In its own process: Accelerate's mixed-precision setting is fixed once per process."""
    command = [
        sys.executable, str(REPO / "cure_hub" / "train.py"), "--model", "cifar_resnet18", "--model-kwargs", "width=4",
        "--dataset", "digits", "--max-steps", "2", "--batch-size", "16", "--steps", "2", "--eval-subset", "20",
        "--eval-attack-steps", "2", "--log-every-steps", "1", "--mixed-precision", "bf16", "--output-dir", str(tmp_path / "run"),
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["mixed_precision"] == "bf16"


_BF16_FORWARD_SCRIPT = """
import sys
import torch
from test_trainer import tiny_config
from cure_hub.methods.base import unwrap
from cure_hub.trainer import Trainer
trainer = Trainer(tiny_config(sys.argv[1], optim={"mixed_precision": "bf16"}))
trainer._prepare()
model, images = unwrap(trainer.model), torch.rand(2, 3, 8, 8)
convolution = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
computed_in = []
convolution.register_forward_hook(lambda module, args, output: computed_in.append(output.dtype))
with torch.no_grad(), trainer.accelerator.autocast():
    model(images)
with torch.no_grad(), torch.autocast("cpu", enabled=False):
    model(images)
print(*computed_in)
"""


def test_bf16_training_leaves_the_forward_free_of_autocast(tmp_path):
    """The KL attack's first step runs in float32 (attacks.py); Accelerate's autocast wrapper
    around forward would override it, so the trainer removes it and autocasts the step instead."""
    command = [sys.executable, "-c", _BF16_FORWARD_SCRIPT, str(tmp_path / "run")]
    result = subprocess.run(command, env={**ENV, "PYTHONPATH": str(REPO / "tests")}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["torch.bfloat16", "torch.float32"]


def test_channels_last_trains_the_model_and_its_revision_in_that_layout(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", model={"model_kwargs": {"width": 16}}, optim={"channels_last": True}))
    assert trainer.train()["steps"] == 4
    model = unwrap(trainer.model)
    exported = load_robust_model(tmp_path / "run" / "export").backbone.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in model.backbone.state_dict().items())
    for net in (model, trainer.method.revision_model):
        kernels = [p for p in net.parameters() if p.dim() == 4]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert not all(p.is_contiguous() for p in kernels)
        layouts = []
        first_convolution = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        first_convolution.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        net.eval()(torch.rand(2, 3, 8, 8))
        assert layouts == [True]


def test_channels_last_refuses_a_model_whose_weight_gradients_onednn_gets_wrong_on_a_cpu(tmp_path):
    """Width 4: the shortcuts of stages 2 and 3 are strided 1x1 convolutions of 4 and 8 input
    channels, whose channels-last weight gradient crashed this machine (oneDNN#6035)."""
    with pytest.raises(InputError, match=r"backbone\.layer2\.0\.shortcut\.0, backbone\.layer3\.0\.shortcut\.0 wrongly.*oneDNN#6035"):
        Trainer(tiny_config(tmp_path / "run", optim={"channels_last": True})).train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    Trainer(tiny_config(tmp_path / "run", optim={"max_steps": 1})).train()
    with pytest.raises(FileExistsError, match="--resume-from"):
        Trainer(tiny_config(tmp_path / "run", optim={"max_steps": 1})).train()


def test_lr_schedules():
    config = TrainConfig().optim
    assert [lr_multiplier(s, 100, config) for s in (0, 74, 75, 89, 90, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig.from_dict({"optim": {"lr_schedule": "cosine", "lr_warmup_steps": 10}}).optim
    assert lr_multiplier(0, 100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, cosine) == pytest.approx(0.5)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_into_a_valid_config(recipe):
    config = parse_train_config(["--recipe", str(recipe)])
    assert config.method.method in METHOD_CLASSES


def test_cure_hub_train_runs_the_readme_recipe(tmp_path):
    """The README's first command, through the console script's main()."""
    code = cli_main(["train", "--recipe", str(REPO / "recipes" / "quickstart.yaml"), "--max-steps", "2", "--eval-subset", "20",
                     "--eval-attack-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert code == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_cure_hub_train_reports_bad_input_in_one_line(tmp_path, capsys):
    code = cli_main(["train", "--model", "resnet_nope", "--dataset", "digits", "--output-dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert "cure-hub train: error: Unknown model 'resnet_nope'" in error


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  percentile: 20\n  alpha: 0.3\noptim:\n  epochs: 5\n")
    config = parse_train_config(["--recipe", str(recipe), "--alpha", "0.2", "--model", "vit_small"])
    assert (config.method.percentile, config.method.alpha, config.optim.epochs, config.model.model) == (20, 0.2, 5, "vit_small")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--percentile", "100"], "percentile"),
        (["--alpha", "1.5"], "alpha must be in"),
        (["--revision-rate", "2"], "revision_rate must be in"),
        (["--revision-decay", "-0.5"], "revision_decay must be in"),
        (["--epsilon", "0"], "epsilon must be in (0, 1] (pixel units; 8/255 = 0.0314), got 0"),
        (["--epsilon", "8"], "got 8: pass --epsilon 8/255 if that is what you meant"),
        (["--step-size", "2"], "step_size must be in (0, 1] (pixel units; 2/255 = 0.0078), got 2: pass --step-size 2/255"),
        (["--method", "fgsm"], "invalid choice: 'fgsm'"),
        (["--percentil", "20"], "unrecognized arguments: --percentil"),
        (["--push-to-hub"], "push_to_hub needs hub_model_id"),
    ],
)
def test_bad_flags_fail_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_config(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_recipe_keys_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  percentage: 20\n")
    with pytest.raises(SystemExit):
        parse_train_config(["--recipe", str(recipe)])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['percentage'\] in section 'method'"):
        TrainConfig.from_yaml(str(recipe))


def test_bare_headline_command_stops_naming_what_to_add(tmp_path, caplog):
    """`--model vit_small` alone most likely means its pretrained weights: CURE from random ones
    is refused before any data is read, naming the fixes; --from-scratch lets it through, and says
    the user knows (no warning); an unknown name is refused before any of that, alone."""
    config = tiny_config(tmp_path / "run", model={"model": "vit_small"}, data={"dataset": "no/such-dataset"})
    with pytest.raises(InputError, match=r"vit_small has pretrained weights: add --pretrained .*--warmup-epochs N.*--from-scratch"):
        Trainer(config).train()
    assert not (tmp_path / "run").exists()
    config = tiny_config(tmp_path / "run", model={"model": "vit_small", "from_scratch": True, "model_kwargs": {"depth": 1}},
                         optim={"max_steps": 1})
    with caplog.at_level(logging.WARNING, logger="cure_hub"):
        Trainer(config).train()
    assert "CURE from random weights" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cure_hub"), pytest.raises(InputError, match="Unknown model 'vit_smal'"):
        Trainer(tiny_config(tmp_path / "unknown", model={"model": "vit_smal"})).train()
    assert "CURE from random weights" not in caplog.text and not (tmp_path / "unknown").exists()


def test_cure_warns_of_random_weights_only_when_they_are_random(tmp_path, caplog):
    """A transformers folder with weights is a trained start: no "random weights" warning; the
    model type it was built from, from scratch, gets one."""
    from cure_hub import create_model

    folder = tmp_path / "resnet"
    create_model("resnet", num_classes=10, image_size=8, embedding_size=8, hidden_sizes=[8], depths=[1]).backbone.save_pretrained(folder)
    for model, kwargs, warned in ((str(folder), {}, False),
                                  ("resnet", {"embedding_size": 8, "hidden_sizes": [8], "depths": [1]}, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cure_hub"):
            Trainer(tiny_config(tmp_path / f"run-{warned}", model={"model": model, "model_kwargs": kwargs},
                                optim={"max_steps": 1})).train()
        assert ("CURE from random weights" in caplog.text) is warned, model


def test_cure_warns_when_its_revision_model_would_stay_near_the_start(tmp_path, caplog):
    """The paper's r and d over a few steps leave the revision model the starting model (the
    warning says how much, and what to change); a revision rate and decay made for the run's
    length do not."""
    for method, warned in (({"revision_rate": 0.2, "revision_decay": 0.999}, True),
                           ({"revision_rate": 1.0, "revision_decay": 0.4, "revision_rate_schedule": "constant"}, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cure_hub"):
            Trainer(tiny_config(tmp_path / f"run-{warned}", method=method, optim={"max_steps": 1})).train()
        assert ("revision model will still be" in caplog.text) is warned, caplog.text
        if warned:
            assert "about 100% the starting model at the last of 1 steps (r 0.2 (cosine to 0), d 0.999)" in caplog.text


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="the system sets no CPU affinity")
def test_usable_cpu_cores_are_the_process_affinity_not_the_machine():
    everything = os.sched_getaffinity(0)
    one = min(everything)
    try:
        os.sched_setaffinity(0, {one})
        assert usable_cpu_cores() == [one]
    finally:
        os.sched_setaffinity(0, everything)
    assert usable_cpu_cores() == sorted(everything)


@pytest.mark.skipif(len(usable_cpu_cores()) < 2, reason="needs two usable cores")
def test_training_on_one_thread_of_several_usable_cores_is_warned_about(tmp_path, caplog):
    threads = torch.get_num_threads()
    try:
        for count, warned in ((1, True), (2, False)):
            torch.set_num_threads(count)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="cure_hub"):
                Trainer(tiny_config(tmp_path / f"run-{count}", optim={"max_steps": 1})).train()
            assert ("training on 1 CPU thread while" in caplog.text) is warned
    finally:
        torch.set_num_threads(threads)


def test_overwrite_output_dir_starts_the_logs_afresh(tmp_path):
    config = tiny_config(tmp_path / "run", optim={"max_steps": 2}, run={"overwrite_output_dir": True})
    Trainer(config).train()
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    Trainer(config).train()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == first.count("\n")


class RightOnlyOffTheGrid(torch.nn.Module):
    """Class 1 for images off the 8-bit grid (any random start moves them there), class 0 on it, with
    no input gradient: a PGD attack leaves it right where the clean image is wrong."""

    def forward(self, images):
        off_grid = ((images * 255 - (images * 255).round()).abs().mean((1, 2, 3)) > 0.05).float()
        return torch.stack([1 - off_grid, off_grid], 1) + 0 * images.mean((1, 2, 3))[:, None]


def test_training_evaluation_counts_an_example_robust_only_when_it_is_right_clean_too(tmp_path):
    """One robust accuracy everywhere (cure-hub eval, AutoAttack, RobustBench): correct both clean and
    attacked. Every example here is wrong clean and right attacked, so none is robust (1.0 if the
    adversarial predictions were counted alone)."""
    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer._prepare()
    trainer.model = RightOnlyOffTheGrid()
    images = torch.randint(0, 256, (8, 3, 8, 8), generator=torch.Generator().manual_seed(0)) / 255
    trainer.eval_loader = [(images, torch.ones(8, dtype=torch.long))]
    assert trainer.evaluate() == {"eval/clean_acc": 0.0, "eval/pgd2_acc": 0.0}


def test_a_recipe_key_or_section_given_twice_is_refused_naming_it_and_its_lines(tmp_path):
    """YAML lets the second of two keys win silently (epochs 1 -> 10, lr 0.05 -> 0.1)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  epochs: 1\n  lr: 0.05\n  lr: 0.1\n")
    with pytest.raises(InputError, match=r"recipe .*recipe.yaml: 'lr' is given twice, on lines 3 and 4; keep one"):
        TrainConfig.from_yaml(str(recipe))
    recipe.write_text("optim:\n  epochs: 1\nmethod:\n  method: cure\noptim:\n  epochs: 10\n")
    with pytest.raises(InputError, match="'optim' is given twice, on lines 1 and 5"):
        TrainConfig.from_yaml(str(recipe))


def test_help_gives_each_flag_one_default(capsys):
    """--beta's default depends on the method; --help said "(default 6, 6 and 1). (default: 1.0)"."""
    with pytest.raises(SystemExit):
        parse_train_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "KL weight of TRADES, MART and CURE (default 6, 6 and 5). --percentile" in text
    assert "Training epochs. (default: 10)" in text


def test_report_to_tensorboard_writes_every_logged_metric_offline(tmp_path):
    """--report-to goes through Accelerate's trackers; TensorBoard's event files under
    RUN/<run name>/ hold every logged step's metrics, equal to metrics.jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cure_hub.run_folder import METRICS, RunFolder

    run = tmp_path / "run"
    Trainer(tiny_config(run, run={"report_to": "tensorboard"})).train()
    events = EventAccumulator(str(run / "run"))
    events.Reload()
    logged = [record for record in RunFolder(run).read_log(METRICS) if "train/loss" in record]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == \
        [(record["step"], round(record["train/loss"], 5)) for record in logged] and len(logged) == 4
    assert [e.step for e in events.Scalars("eval/pgd2_acc")] == [4]
