"""The CIFAR architectures of the CURE paper, registered in timm's model registry.

Parameter names follow the CIFAR code that the official CURE, TRADES and AutoAttack repositories
share (``conv1``, ``bn1``, ``layer1``..``layer4`` with ``shortcut``, ``linear`` for the ResNets;
``block1``..``block3``, ``fc`` for the WideResNet), so their checkpoints load unchanged. The models
take raw [0, 1] pixels, as that code does: their pretrained config has identity mean and std.

Two changes that leave every checkpoint's keys and every 32x32 output unchanged: global average
pooling is adaptive (so other image sizes work), and ``width`` scales the channel counts so that a
narrow model trains on a CPU.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "CifarPreActResNet", "CifarWideResNet", "CIFAR_ARCHITECTURES", "size_of_checkpoint"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _ResNetBase(nn.Module):
    """Shared stem and stages of the two CIFAR ResNet-18 variants; ``width`` is the first stage's
    channel count (64 in the paper). Modules are created in the reference code's order, so that
    parameters are listed in the same order too."""

    block: type[nn.Module]
    pre_activation: bool

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 64, num_blocks=(2, 2, 2, 2)):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        if not self.pre_activation:
            self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        if self.pre_activation:
            self.bn = nn.BatchNorm2d(8 * width)
        self.num_features = 8 * width
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            layers.append(self.block(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def _stages(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class CifarResNet(_ResNetBase):
    block = BasicBlock
    pre_activation = False

    def forward_features(self, x):
        return self._stages(F.relu(self.bn1(self.conv1(x))))


class CifarPreActResNet(_ResNetBase):
    """PreAct ResNet-18 as in the AutoAttack / RobustBench code (final ``bn`` before pooling)."""

    block = PreActBlock
    pre_activation = True

    def forward_features(self, x):
        return F.relu(self.bn(self._stages(self.conv1(x))))


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(num_layers)]
        )

    def forward(self, x):
        return self.layer(x)


#: The TRADES WideResNet's second first-stage block, built and saved but never called.
UNUSED_BLOCK = "sub_block1."


def _drop_sub_block1(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix + UNUSED_BLOCK)]:
        del state_dict[key]


class CifarWideResNet(nn.Module):
    """WideResNet of the TRADES code. Its unused ``sub_block1`` is left out; loading drops its keys."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, depth: int = 34, widen_factor: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = channels[3]
        self.fc = nn.Linear(channels[3], num_classes)
        self.register_load_state_dict_pre_hook(_drop_sub_block1)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        return self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))

    def forward_head(self, x, pre_logits: bool = False):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(classifier: str) -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "conv1",
        "classifier": classifier,
        "license": "apache-2.0",
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet18": _cfg("linear"),
        "cifar_preactresnet18": _cfg("linear"),
        "cifar_wrn34_10": _cfg("fc"),
    }
)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool). ``width`` (default 64) scales it."""
    return build_model_with_cfg(CifarResNet, "cifar_resnet18", pretrained, **kwargs)


@register_model
def cifar_preactresnet18(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation ResNet-18 for 32x32 images. ``width`` (default 64) scales it."""
    return build_model_with_cfg(CifarPreActResNet, "cifar_preactresnet18", pretrained, **kwargs)


@register_model
def cifar_wrn34_10(pretrained: bool = False, **kwargs) -> CifarWideResNet:
    """WideResNet-34-10. ``widen_factor`` (default 10) and ``depth`` (default 34) scale it."""
    return build_model_with_cfg(CifarWideResNet, "cifar_wrn34_10", pretrained, **kwargs)


CIFAR_ARCHITECTURES = ("cifar_resnet18", "cifar_preactresnet18", "cifar_wrn34_10")


def size_of_checkpoint(architecture: str, state: dict) -> dict:
    """The constructor arguments, where they differ from the defaults, of the CIFAR
    ``architecture`` that ``state`` (keys as the reference code names them) was saved from: a
    ResNet's ``width``, a WideResNet's ``depth`` and ``widen_factor`` (a WRN-28-10 is
    ``cifar_wrn34_10`` with ``depth=28``). Empty where the keys do not tell."""
    if architecture == "cifar_wrn34_10" and "block1.layer.0.conv1.weight" in state:
        blocks = {key.split(".")[2] for key in state if key.startswith("block1.layer.")}
        size = {"depth": 6 * len(blocks) + 4, "widen_factor": state["block1.layer.0.conv1.weight"].shape[0] // 16}
        defaults = {"depth": 34, "widen_factor": 10}
    elif architecture in ("cifar_resnet18", "cifar_preactresnet18") and "conv1.weight" in state:
        size, defaults = {"width": state["conv1.weight"].shape[0]}, {"width": 64}
    else:
        return {}
    return {name: value for name, value in size.items() if value != defaults[name]}
