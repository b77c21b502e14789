"""Run by tests/test_pretrained.py against the loopback Hub, in one process (one start-up instead
of ten): push tiny pretrained checkpoints the way their libraries publish them and save their
weights to OUT; fine-tune each with ``cure-hub train`` (RUNS, a JSON argument); push the exports
named in PUSH and load them back with every library (hub_server.LOAD_SCRIPT).

    python tests/pretrained_round_trip.py OUT RUNS_JSON PUSH_JSON

* ``tester/tiny-vit``: a timm ViT (``push_to_hf_hub``) pretrained at 32 px, 5 classes;
* ``tester/tiny-convnext``: a timm ConvNeXt, the same way, at 32 px;
* ``tester/tiny-hf-vit``: a transformers ViT with its image processor (``push_to_hub``), 32 px.

Every checkpoint has its own normalisation (not ImageNet's), so that a test can tell where the
mean and std a fine-tuned model uses came from.
"""

import json
import os
import shutil
import sys

import timm
import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from cure_hub.cli import main
from hub_server import LOAD_SCRIPT

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
out, runs, push = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
for repo, arch, args in (
    ("tester/tiny-vit", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    ("tester/tiny-convnext", "convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}),
):
    model = timm.create_model(arch, num_classes=5, **args)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "mean": MEAN, "std": STD, "crop_pct": 0.8}
    timm.models.push_to_hf_hub(model, repo, model_args=args, safe_serialization=True)
    save_file(model.state_dict(), f"{out}/{repo.split('/')[1]}.safetensors")

config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=5)
model = ViTForImageClassification(config)
model.push_to_hub("tester/tiny-hf-vit")
ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)).push_to_hub("tester/tiny-hf-vit")
save_file(model.state_dict(), f"{out}/tiny-hf-vit.safetensors")

for name, arguments in runs.items():
    assert main(["train", *arguments, "--output-dir", f"{out}/{name}"]) == 0, name
torch.save(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), f"{out}/input.pt")
for name, library in push.items():
    assert main(["push", f"{out}/{name}/export", "--repo-id", f"tester/robust-{name}"]) == 0, name
    loaded = f"{out}/{name}/loaded"
    os.makedirs(loaded)
    shutil.copy(f"{out}/input.pt", loaded)
    sys.argv = ["load", f"tester/robust-{name}", library, loaded]
    exec(LOAD_SCRIPT, {"__name__": "__main__"})
