"""Training methods behind one interface (:class:`Method`); :func:`build_method` picks one by name."""

import torch
from torch import nn

from ..config import AttackConfig, MethodConfig
from ..method_registry import METHOD_CLASSES, register_method
from .base import Method, StepOutput
from .cure import CURE
from .mart import MART
from .pgd_at import PGDAdversarialTraining
from .standard import StandardTraining
from .trades import TRADES

# The one registration of each method (a new method: its file, and its class here).
for method_class in (StandardTraining, PGDAdversarialTraining, TRADES, MART, CURE):
    register_method(method_class)


def build_method(config: MethodConfig, attack: AttackConfig) -> Method:
    return METHOD_CLASSES[config.method](config, attack)


def build_natural_method(attack: AttackConfig) -> Method:
    """Natural training, for the warm-up before a method that starts from a naturally trained model (CURE-Eff)."""
    return StandardTraining(MethodConfig(method=StandardTraining.name), attack)


def compile_for_training(model: nn.Module, method: Method) -> None:
    """``--compile``: compiles ``model`` in place, so that its state dict, its wrappers and its
    exports stay as they are, and has ``method`` compile the models it makes of it (CURE's revision
    model). A method that takes gradients through a retained graph (CURE's RGP) needs compiled
    backwards that keep their saved buffers rather than donate them ("non-empty donated
    buffers"); Inductor reads that switch when it compiles, so it is set here, before the first
    compiled step, which can come before the method starts (``--warmup-epochs``)."""
    model.compile()
    method.compile_models = True
    if method.retains_graph:
        torch._functorch.config.donated_buffer = False


__all__ = ["CURE", "MART", "METHOD_CLASSES", "Method", "PGDAdversarialTraining", "StandardTraining", "StepOutput", "TRADES", "build_method", "build_natural_method", "compile_for_training"]
