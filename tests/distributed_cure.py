"""Run by tests/test_trainer.py, alone or under torchrun (gloo): a few CURE steps of the trainer on a
tiny ViT, in one process (``single``), under DDP (``ddp``) or under FSDP2 (``fsdp2``); or an FSDP2
run resumed from one of its checkpoints.

    python tests/distributed_cure.py single OUTPUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_cure.py ENGINE OUTPUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_cure.py fsdp2 --resume-from CHECKPOINT

The run goes to ``OUTPUT_DIR/run``. Each process of a ``single`` or ``ddp`` run then saves its
model and revision parameters to ``OUTPUT_DIR/rank<r>.pt``; an FSDP2 run writes
``OUTPUT_DIR/fsdp2_policies.json``, the mixed-precision policy of each sharded module.

Chosen so that one process with the whole batch computes the same thing up to rounding: no batch
norm (a process's statistics would cover half the batch), no augmentation and no attack steps in
training. The KL attack's random start is drawn per process, so it cannot match one process's
draw; and started without noise, its first gradient is rounding noise that the attack amplifies to
a full step. With x_adv = x the RGP gradients, masks, consistency loss and revision draws are still
exercised in full; the attack works per example and is tested on its own in tests/test_attacks.py
(and the evaluation's PGD runs here under each engine).

Accelerate selects FSDP on GPUs only: on a CPU its launcher's ``--use_fsdp`` leaves the state
MULTI_CPU. For FSDP2 this script builds the Accelerator with Accelerate's FSDP2 plugin (each
transformer block and the root sharded, sharded checkpoints) and does to its shared state what
Accelerate does when it selects FSDP; from there every call is Accelerate's own (``prepare``,
``fsdp2_prepare_model``, ``save_state``/``load_state`` of sharded checkpoints).
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, FullyShardedDataParallelPlugin

from cure_hub.config import TrainConfig
from cure_hub.methods.base import unwrap
from cure_hub.trainer import Trainer

CONFIG = {
    "model": {"model": "vit_tiny", "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "from_scratch": True},
    "data": {"dataset": "digits", "augment": "none", "train_subset": 128, "eval_subset": 20},
    "method": {"method": "cure", "revision_rate": 0.6, "revision_rate_schedule": "constant", "revision_decay": 0.5},
    "attack": {"steps": 0, "random_start": "none"},
    "optim": {"max_steps": 4, "lr": 0.05, "seed": 7},
    "run": {"eval_attack_steps": 1, "checkpoint_every_steps": 2, "log_every_steps": 1, "overwrite_output_dir": True},
}
#: The batch of every step: one process takes all of it, each of two processes half.
BATCH = 16


def fsdp2_accelerator(config: TrainConfig) -> Accelerator:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"], state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, project_dir=config.run.output_dir,
                              dataloader_config=DataLoaderConfiguration(split_batches=False))
    # accelerate/state.py, where it selects FSDP for several GPUs:
    for state in (PartialState, AcceleratorState):
        state._shared_state["distributed_type"] = DistributedType.FSDP
    if config.optim.mixed_precision != "no":
        plugin.set_mixed_precision(config.optim.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert accelerator.is_fsdp2
    return accelerator


def config_of(run: Path, processes: int, **options) -> TrainConfig:
    return TrainConfig.from_dict({**CONFIG, "optim": {**CONFIG["optim"], "batch_size": BATCH // processes},
                                  "run": {**CONFIG["run"], "output_dir": str(run), **options}})


if __name__ == "__main__":
    engine, where = sys.argv[1], sys.argv[2]
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; Accelerate's state is the trainer's to make
    if where == "--resume-from":
        output = Path(sys.argv[3]).parents[2]
        config = config_of(output / "run", processes, resume_from=sys.argv[3], overwrite_output_dir=False)
    else:
        output = Path(where)
        config = config_of(output / "run", processes)
    trainer = Trainer(config, fsdp2_accelerator(config) if engine == "fsdp2" else None)
    trainer.train()
    rank = trainer.accelerator.process_index
    if engine == "fsdp2":
        if rank == 0:
            policies = {type(module).__name__: str(module._get_fsdp_state()._fsdp_param_group.mp_policy)
                        for module in trainer.model.modules() if hasattr(module, "_get_fsdp_state")}
            (output / "fsdp2_policies.json").write_text(json.dumps(policies))
    else:
        torch.save({"model": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()},
                    "revision": trainer.method.revision_model.state_dict(),
                    "revisions_made": trainer.method.revision_generator.get_state()}, output / f"rank{rank}.pt")
