import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import cure_hub
from cure_hub.model_configs import choose_patch_size
from cure_hub.models import CheckpointMismatchError, UnknownModelError

TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _tiny_transformers_folder(tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=4, num_labels=10, **TINY_VIT)
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "hf")
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "hf")
    return str(tmp_path / "hf")


MODEL_CASES = {
    "timm-resnet18": lambda tmp: cure_hub.create_model("resnet18", num_classes=10, image_size=32),
    "timm-vit_small": lambda tmp: cure_hub.create_model("vit_small", num_classes=10, image_size=32),
    "cifar_resnet18": lambda tmp: cure_hub.create_model("cifar_resnet18", num_classes=10, width=8),
    "cifar_preactresnet18": lambda tmp: cure_hub.create_model("cifar_preactresnet18", num_classes=10, width=8),
    "cifar_wrn": lambda tmp: cure_hub.create_model("cifar_wrn34_10", num_classes=10, depth=10, widen_factor=1),
    "hf-vit-type": lambda tmp: cure_hub.create_model("vit", num_classes=10, image_size=32, **TINY_VIT),
    "hf-folder": lambda tmp: cure_hub.create_model(_tiny_transformers_folder(tmp)),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_logits_shape_gradients_and_single_normalisation(case, tmp_path):
    torch.manual_seed(0)
    model = MODEL_CASES[case](tmp_path).eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        normalised = (x - mean) / std
        raw = model.backbone(pixel_values=normalised) if model.spec.library == "transformers" else model.backbone(normalised)
        raw = getattr(raw, "logits", raw)
        torch.testing.assert_close(model(x), raw)
        if model.spec.mean != (0.0, 0.0, 0.0) or model.spec.std != (1.0, 1.0, 1.0):
            unnormalised = model.backbone(pixel_values=x) if model.spec.library == "transformers" else model.backbone(x)
            assert not torch.allclose(model(x), getattr(unnormalised, "logits", unnormalised))


@pytest.mark.parametrize("case", ["timm-resnet18", "cifar_wrn", "hf-vit-type"])
def test_channels_last_model_computes_the_same_logits_and_input_gradients(case, tmp_path):
    """--channels-last changes the memory layout of the weights and of the images the backbone
    sees, not what the model computes; an export of it holds the same, contiguous tensors."""
    torch.manual_seed(0)
    model = MODEL_CASES[case](tmp_path).eval()
    channels_last = MODEL_CASES[case](tmp_path).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last.to_channels_last()
    kernels = [p for p in channels_last.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert not all(p.is_contiguous() for p in kernels)
    seen = []
    first_convolution = next(m for m in channels_last.modules() if isinstance(m, nn.Conv2d))
    first_convolution.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    gradients = []
    for net in (model, channels_last):
        x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        logits = net(x)
        F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        gradients.append((logits.detach(), x.grad))
    assert seen == [True]
    torch.testing.assert_close(gradients[1][0], gradients[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gradients[1][1], gradients[0][1], rtol=1e-3, atol=1e-6)
    channels_last.save_pretrained(tmp_path / "export")
    loaded = cure_hub.load_robust_model(tmp_path / "export")
    exported = loaded.backbone.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in channels_last.backbone.state_dict().items())
    assert all(v.is_contiguous() for v in exported.values())


def test_normalisation_comes_from_architecture_or_processor(tmp_path):
    assert cure_hub.create_model("cifar_resnet18", width=8).spec.mean == (0.0, 0.0, 0.0)
    assert cure_hub.create_model("resnet18", num_classes=10).spec.mean == timm.data.IMAGENET_DEFAULT_MEAN
    folder = cure_hub.create_model(_tiny_transformers_folder(tmp_path))
    assert folder.spec.mean == (0.1, 0.2, 0.3) and folder.spec.std == (0.4, 0.5, 0.6)


def test_default_resolution_vit_224():
    model = cure_hub.create_model("vit_tiny", num_classes=5).eval()
    assert model.spec.image_size == 224 and "patch_size" not in model.spec.model_args
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 5)


def test_vit_on_small_images_uses_patch_4_and_an_8x8_grid():
    model = cure_hub.create_model("vit_small", num_classes=10, image_size=32)
    assert model.spec.model_args == {"patch_size": 4, "img_size": 32}
    assert model.backbone.patch_embed.grid_size == (8, 8)
    assert model.backbone.pos_embed.shape[1] == 64 + 1  # 64 patch tokens and the class token
    assert [choose_patch_size(s, 16) for s in (32, 64, 96, 224, 8)] == [4, 8, 12, 16, 1]


def test_other_sizes_are_adapted_as_far_as_each_model_takes_them():
    """A patch and img_size for a ViT; img_size alone for XCiT, whose convolutional patch embedding
    takes only 8 or 16; nothing for a ResNet; a one-line error for Inception, which 32-px images
    do not fit; an explicit img_size as given, and refused when it contradicts the image size."""
    from cure_hub.config import InputError

    assert cure_hub.create_model("xcit_nano_12_p16_224", num_classes=3, image_size=32, depth=1).spec.model_args == {
        "depth": 1, "img_size": 32}
    assert cure_hub.create_model("resnet18", num_classes=3, image_size=32).spec.model_args == {}
    with pytest.raises(InputError, match=r"inception_v3 cannot classify 32x32 images \(RuntimeError: .*--image-size"):
        cure_hub.create_model("inception_v3", num_classes=3, image_size=32)
    explicit = cure_hub.create_model("vit_tiny", num_classes=3, img_size=64, depth=1)
    assert explicit.spec.image_size == 64 and explicit.spec.model_args["img_size"] == 64
    with pytest.raises(InputError, match="img_size=64 contradicts the image size 32"):
        cure_hub.create_model("vit_tiny", num_classes=3, image_size=32, img_size=64)


def test_transformers_config_json_path(tmp_path):
    from transformers import ViTConfig

    ViTConfig(image_size=32, patch_size=8, num_labels=4, **TINY_VIT).to_json_file(tmp_path / "config.json")
    model = cure_hub.create_model(str(tmp_path / "config.json"))
    assert model.spec.library == "transformers" and model.spec.num_classes == 4
    assert model.backbone.config.patch_size == 8
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_aliases_shadow_no_library_name():
    from cure_hub.model_configs import MODEL_ALIASES, transformers_model_types

    assert not [alias for alias in MODEL_ALIASES if timm.is_model(alias) or alias in transformers_model_types()]
    assert cure_hub.create_model("convnext", num_classes=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2).spec.library == "transformers"


def test_model_list_says_library_alias_and_size(capsys):
    from cure_hub.cli import main as cli_main

    assert cli_main(["models", "vit_small*_224"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "vit_small_patch16_224: timm, 22.1M parameters" in lines
    assert cli_main(["models", "vit_small"]) == 0
    assert capsys.readouterr().out == "vit_small: timm, alias of vit_small_patch16_224, 22.1M parameters\n"
    assert cli_main(["models", "convnext"]) == 0
    assert capsys.readouterr().out == "convnext: transformers, 27.8M parameters\n"


def test_cifar_architectures_are_in_timms_registry():
    for name in ("cifar_resnet18", "cifar_preactresnet18", "cifar_wrn34_10"):
        assert timm.is_model(name)
    model = timm.create_model("cifar_resnet18", num_classes=100, width=8)
    assert model.linear.out_features == 100 and model.conv1.out_channels == 8
    assert model.pretrained_cfg["mean"] == (0.0, 0.0, 0.0)


class _ReferenceBlock(nn.Module):
    """The BasicBlock of the CIFAR code shared by TRADES, CURE and AutoAttack (kuangliu layout)."""

    def __init__(self, inp, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ReferenceResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inp, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(_ReferenceBlock(inp, planes, stride), _ReferenceBlock(planes, planes, 1)))
            inp = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).view(x.shape[0], -1))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_common_cifar_resnet18_checkpoint_loads_unchanged(tmp_path, suffix):
    torch.manual_seed(0)
    reference = _ReferenceResNet18()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a mis-mapped buffer would show
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    reference.eval()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":  # as DDP training scripts save it: nested, with the `module.` prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    model = cure_hub.create_model("cifar_resnet18", num_classes=10, checkpoint=path).eval()
    assert set(model.backbone.state_dict()) == set(reference.state_dict())
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    state = cure_hub.create_model("cifar_resnet18", width=8).backbone.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["linear.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): \['linear.bias'\][\s\S]*unexpected keys \(1\): \['extra.weight'\]"):
        cure_hub.create_model("cifar_resnet18", width=8, checkpoint=tmp_path / "bad.pth")
    torch.save(cure_hub.create_model("cifar_resnet18", width=8).backbone.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointMismatchError, match=r"tensors differ in shape, e\.g\. conv1\.weight: \(8, 3, 3, 3\) in the checkpoint, \(16, 3, 3, 3\)"):
        cure_hub.create_model("cifar_resnet18", width=16, checkpoint=tmp_path / "narrow.pth")


def test_init_from_a_run_of_another_width_names_its_arguments(tmp_path, capsys):
    from test_input_errors import one_line_error
    from test_trainer import tiny_config

    from cure_hub.trainer import Trainer

    Trainer(tiny_config(tmp_path / "natural", optim={"max_steps": 1})).train()
    capsys.readouterr()
    error = one_line_error(["--model", "cifar_resnet18", "--dataset", "digits", "--init-from", str(tmp_path / "natural"),
                            "--output-dir", str(tmp_path / "cure")], capsys)
    assert "pass --model cifar_resnet18 --model-kwargs width=4" in error


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        cure_hub.create_model("cifar_resnet18", width=8, checkpoint=tmp_path / "nowhere.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint format '.npz'"):
        cure_hub.create_model("cifar_resnet18", width=8, checkpoint=tmp_path / "weights.npz")


def test_unknown_model_suggests_close_names(tmp_path):
    with pytest.raises(UnknownModelError, match=r"'vit_smal'.*Did you mean: vit_small"):
        cure_hub.create_model("vit_smal")
    with pytest.raises(UnknownModelError, match="cifar_resnet18"):
        cure_hub.create_model("cifar_resnet19")
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UnknownModelError, match="neither timm's 'architecture' nor transformers' 'model_type'"):
        cure_hub.create_model(str(tmp_path))


def test_label_names_are_stored_and_checked():
    model = cure_hub.create_model("vit", num_classes=2, image_size=32, label_names=["cat", "dog"], **TINY_VIT)
    assert model.spec.label_names == ["cat", "dog"] and model.backbone.config.id2label == {0: "cat", 1: "dog"}
    with pytest.raises(ValueError, match="3 label names given for 2 classes"):
        cure_hub.create_model("cifar_resnet18", num_classes=2, width=8, label_names=["a", "b", "c"])


def test_classifier_head_names():
    assert cure_hub.create_model("cifar_resnet18", width=8).classifier_parameter_names() == [
        "backbone.linear.weight", "backbone.linear.bias"]
    assert cure_hub.create_model("vit_tiny", num_classes=10, image_size=32).classifier_parameter_names() == [
        "backbone.head.weight", "backbone.head.bias"]


def test_every_classification_head_is_found_and_left_unmasked():
    from cure_hub.methods.cure import masked_parameter_names
    from cure_hub.models import HeadNotFoundError

    distilled = cure_hub.create_model("deit_tiny_distilled_patch16_224", num_classes=10, image_size=32, depth=1,
                                      embed_dim=16, num_heads=2)
    assert distilled.classifier_parameter_names() == ["backbone.head.weight", "backbone.head.bias",
                                                      "backbone.head_dist.weight", "backbone.head_dist.bias"]
    hgnet = cure_hub.create_model("hgnet_v2", num_classes=7)  # its `classifier` module has no parameters; `fc` is the head
    assert hgnet.classifier_parameter_names() == ["backbone.fc.weight", "backbone.fc.bias"]
    for model in (distilled, hgnet):
        masked = masked_parameter_names(model, "all_but_head")
        assert masked and not set(masked) & set(model.classifier_parameter_names())
    headless = cure_hub.create_model("cifar_resnet18", num_classes=0, width=4)
    with pytest.raises(HeadNotFoundError, match="--mask-exclude"):
        masked_parameter_names(headless, "all_but_head")
    assert "backbone.conv1.weight" not in masked_parameter_names(headless, "all_but_head", exclude=["conv1.*"])


def test_model_list_piped_to_a_reader_that_stopped_ends_quietly():
    """As `cure-hub models | head` once head has exited: the pipe's read end is closed."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "cure_hub.cli", "models"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
