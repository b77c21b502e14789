"""What the trainer does differently when Accelerate shards the model with FSDP2.

Under FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``: ``fully_shard``) each process
holds a row shard of every parameter, of its gradient and of its optimiser state. The method sees
shards (CURE selects its masks across them: docs/cure.md); the trainer has four things to do:

* **precision**: weights are gathered and gradients reduced in float32 whatever the mixed
  precision, as under DDP. Accelerate's FSDP2 plugin would otherwise gather bf16 copies, and the
  KL attack's first step (attacks.py says why it must be float32) and CURE's prominence scores
  would silently be computed from bf16 weights; autocast still runs the matmuls in bf16.
* **the method's second model** (CURE's revision model): a sharded module cannot be deep-copied,
  so the architecture is built again and sharded by Accelerate's own function, with the same plan;
* **whole weights** for ``weights/*.safetensors`` and the export, gathered tensor by tensor;
* **checks over shards**: whether the weights are finite is each process's answer for its shards,
  combined across processes.

Checkpoints are Accelerate's (``SHARDED_STATE_DICT`` by default: ``pytorch_model_fsdp_0/`` and
``optimizer_0/``, one file per process; :mod:`cure_hub.checkpoints` knows both layouts).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from .methods.base import Method
from .methods.rgp import is_sharded, local

logger = logging.getLogger(__name__)

#: The engine's name in refusals and logs: Accelerate calls FSDP1 and FSDP2 both "FSDP".
FSDP2 = "FSDP2"


def engine_name(accelerator: Accelerator) -> str:
    """``FSDP2``, or Accelerate's name of the distributed type (``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``, ...)."""
    return FSDP2 if accelerator.is_fsdp2 else accelerator.distributed_type.name


def float32_gathers():
    """FSDP2's mixed-precision policy under which weights are gathered and gradients reduced in
    float32 (this module's docstring says why)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy  # imported when a model is sharded, not at start

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def configure_engine(accelerator: Accelerator, method: Method, build: Callable[[], nn.Module]) -> None:
    """Under FSDP2, gather weights and reduce gradients in float32 (this module's docstring says why;
    autocast chooses the precision of the computation, as it does under DDP), and give ``method``
    its :attr:`~cure_hub.methods.base.Method.sharded_copy` of what ``build`` makes. Warns when FSDP
    was asked for and Accelerate did not select it (on a CPU it never does)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type.name != "FSDP":
        logger.warning("FSDP was asked for (--use_fsdp), but Accelerate selects it on GPUs only: this run trains "
                       "under %s, each process holding the whole model", accelerator.distributed_type.name)
    if not accelerator.is_fsdp2:
        return
    accelerator.state.fsdp_plugin.mixed_precision_policy = float32_gathers()
    logger.info("FSDP2: weights gathered and gradients reduced in float32; mixed precision (%s) only in autocast's "
                "operations, as under DDP", accelerator.mixed_precision)
    method.sharded_copy = sharded_copy_maker(accelerator, build)


def sharded_copy_maker(accelerator: Accelerator, build: Callable[[], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """Under FSDP2, :attr:`~cure_hub.methods.base.Method.sharded_copy`: a module that ``build``
    makes (the model's architecture, its own weights to be overwritten) sharded by Accelerate's
    ``fsdp2_prepare_model``, the plan the model was sharded with. ``build`` runs with the random
    state forked: a run draws the same numbers with and without the copy (and as under DDP)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    def sharded_copy(model: nn.Module) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            module = build()
        return fsdp2_prepare_model(accelerator, module)

    return sharded_copy


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every sharded tensor gathered whole, one tensor at a time. Every
    process must call it (each gather is a collective); those with ``keep`` false get an empty dict
    and hold no more than one whole tensor at a time."""
    state = {}
    for name, tensor in module.state_dict().items():
        if is_sharded(tensor):  # a gathered tensor may view a padded buffer: safetensors wants its own storage
            tensor = tensor.full_tensor().clone()
        if keep:
            state[name] = tensor
    return state


def all_finite(parameters, accelerator: Accelerator) -> bool:
    """Whether every parameter is finite, on every process's shards (one all-reduce when sharded)."""
    parameters = list(parameters)
    finite = torch.stack([torch.isfinite(local(p)).all() for p in parameters]).all()
    if accelerator.num_processes > 1 and any(is_sharded(p) for p in parameters):
        finite = accelerator.reduce(finite.float(), reduction="sum") == accelerator.num_processes
    return bool(finite)
