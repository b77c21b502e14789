"""Robust fine-tuning of pretrained Hub checkpoints (timm hf-hub:, transformers), served by the
loopback Hub: the weights arrive whole but for the new head, the normalisation is the
checkpoint's, the images are resized to the size it was pretrained at (or --image-size, with
timm's resampling), and the export names its base model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from cure_hub.config import TrainConfig
from cure_hub.models import load_robust_model
from cure_hub.methods.cure import SHARDING_ENGINES
from cure_hub.preflight import check_engine_supports
from hub_server import LoopbackHub, hub_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
TRAIN = ["--dataset", "digits", "--train-subset", "48", "--eval-subset", "16", "--batch-size", "16", "--max-steps", "2",
         "--steps", "1", "--eval-attack-steps", "1", "--method", "cure", "--pretrained"]
RUNS = {  # name: model, extra flags, the head's parameter names, tensors resampled for another size
    "vit": ("hf-hub:tester/tiny-vit", [], ("head.",), ()),
    "vit-64px": ("hf-hub:tester/tiny-vit", ["--image-size", "64", "--augment", "imagenet"], ("head.",), ("pos_embed",)),
    "convnext": ("hf-hub:tester/tiny-convnext", [], ("head.fc.",), ()),
    "hf-vit": ("tester/tiny-hf-vit", [], ("classifier.",), ()),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The served checkpoints' weights, a two-step CURE fine-tune of each, exported, and two of
    the exports pushed and loaded back by every library."""
    root = tmp_path_factory.mktemp("pretrained")
    runs = {name: ["--model", model, *TRAIN, *extra] for name, (model, extra, _, _) in RUNS.items()}
    with LoopbackHub() as hub:
        done = subprocess.run([sys.executable, str(REPO / "tests" / "pretrained_round_trip.py"), str(root), json.dumps(runs),
                               json.dumps({"vit": "timm", "hf-vit": "transformers"})],
                              env=hub_env(hub, root / "home"), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_pretrained_weights_normalisation_and_size(trained, name):
    model, extra, head, resampled = RUNS[name]
    run = trained / name
    served = load_file(trained / f"{model.split('/')[-1]}.safetensors")
    start = load_file(run / "weights" / "start.safetensors")  # the weights CURE started from
    assert start.keys() == served.keys()
    kept = [k for k in served if not k.startswith(head) and k not in resampled]
    assert all(torch.equal(start[k], served[k]) for k in kept), [k for k in kept if not torch.equal(start[k], served[k])]
    assert all(start[k].shape[0] == 10 for k in served if k.startswith(head) and k.endswith("weight"))  # digits' classes
    spec = json.loads((run / "model_spec.json").read_text())
    size = 64 if "--image-size" in extra else 32  # the checkpoint's own 32 px, the digits' 8 px resized to it
    assert spec["image_size"] == size and yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] == size
    assert spec["mean"] == pytest.approx(MEAN) and spec["std"] == pytest.approx(STD)
    crop_pct = 1.0 if name == "hf-vit" else 0.8  # the served timm configs' evaluation crop; ViT's processor has none
    assert spec["crop_pct"] == crop_pct and yaml.safe_load((run / "config.yaml").read_text())["data"]["crop_pct"] == crop_pct
    for key in resampled:  # timm's resampling of the position embeddings to the 16x16 grid of 64 px
        assert start[key].shape[1] == 1 + (64 // 4) ** 2 and served[key].shape[1] == 1 + (32 // 4) ** 2


@pytest.mark.parametrize("name", ["vit", "hf-vit"])
def test_export_names_its_base_model_and_loads_in_every_library(trained, name):
    card = ModelCard((trained / name / "loaded" / "README.md").read_text(), ignore_metadata_errors=False)  # as served
    base = RUNS[name][0].removeprefix("hf-hub:")
    assert card.data.base_model == base and card.data.base_model_relation == "finetune"
    assert json.loads((trained / name / "export" / "training_config.json").read_text())["base_model"] == base
    logits = torch.load(trained / name / "loaded" / "logits.pt")
    with torch.no_grad():
        expected = load_robust_model(trained / name).eval()(torch.load(trained / "input.pt"))
    for library in ("cure_hub", "transformers", *(["timm"] if name == "vit" else [])):
        torch.testing.assert_close(logits[library], expected, rtol=1e-4, atol=1e-5, msg=library)


def test_cure_refuses_engines_that_shard_tensors_otherwise_than_fsdp2():
    config = {"model": {"model": "cifar_resnet18"}, "data": {"dataset": "digits"}}
    cure, trades = (TrainConfig.from_dict({**config, "method": {"method": name}}) for name in ("cure", "trades"))
    for engine in SHARDING_ENGINES:
        with pytest.raises(ValueError, match=f"CURE cannot train under {engine}: .* Shard with FSDP2 "):
            check_engine_supports(cure, engine)
        check_engine_supports(trades, engine)  # whole-tensor masks are CURE's alone
    for engine in ("MULTI_GPU", "MULTI_CPU", "NO", "FSDP2"):
        check_engine_supports(cure, engine)
    accumulating = dataclasses.replace(cure, optim=dataclasses.replace(cure.optim, gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="CURE under FSDP2 takes one micro-batch per step, got --gradient-accumulation-steps 2"):
        check_engine_supports(accumulating, "FSDP2")
    check_engine_supports(accumulating, "MULTI_GPU")
