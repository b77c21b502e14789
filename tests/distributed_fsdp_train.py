"""Run by tests/test_trainer.py under torchrun (gloo, 2 processes): the trainer's CURE run under
DDP or FSDP2, or an FSDP2 run resumed from one of its checkpoints.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_fsdp_train.py ENGINE OUTPUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_fsdp_train.py fsdp2 --resume-from CHECKPOINT

ENGINE is ``ddp`` or ``fsdp2``. An FSDP2 run also writes ``OUTPUT_DIR/fsdp2_policies.json``: the
mixed-precision policy of every sharded module, as fully_shard was given it.

Accelerate selects FSDP on GPUs only: on a CPU its launcher's ``--use_fsdp`` leaves the state
MULTI_CPU. For FSDP2 this script builds the Accelerator with Accelerate's FSDP2 plugin (each
transformer block and the root sharded, sharded checkpoints) and does to its shared state what
Accelerate does when it selects FSDP; from there every call is Accelerate's own (``prepare``,
``fsdp2_prepare_model``, ``save_state``/``load_state`` of sharded checkpoints).
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedType, FullyShardedDataParallelPlugin

from cure_hub.config import TrainConfig
from cure_hub.trainer import Trainer

CONFIG = {
    "model": {"model": "vit_tiny", "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "from_scratch": True},
    "data": {"dataset": "digits", "augment": "cifar", "train_subset": 128, "eval_subset": 20},
    "method": {"method": "cure", "revision_rate": 0.7, "revision_rate_schedule": "constant", "revision_decay": 0.5,
               "percentile": 60.0},
    "attack": {"steps": 1},
    "optim": {"max_steps": 4, "batch_size": 8, "lr": 0.05, "seed": 7},
    "run": {"eval_attack_steps": 1, "checkpoint_every_steps": 2, "log_every_steps": 1, "overwrite_output_dir": True},
}


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


def config_of(output_dir: Path, **run) -> TrainConfig:
    return TrainConfig.from_dict({**CONFIG, "run": {**CONFIG["run"], "output_dir": str(output_dir), **run}})


if __name__ == "__main__":
    engine, where = sys.argv[1], sys.argv[2]
    if where == "--resume-from":
        run = Path(sys.argv[3]).parent.parent
        config = config_of(run, resume_from=sys.argv[3], overwrite_output_dir=False)
    else:
        config = config_of(Path(where))
    trainer = Trainer(config, fsdp2_accelerator(config) if engine == "fsdp2" else None)
    trainer.train()
    if engine == "fsdp2" and trainer.accelerator.is_main_process:
        policies = {type(module).__name__: str(module._get_fsdp_state()._fsdp_param_group.mp_policy)
                    for module in trainer.model.modules() if hasattr(module, "_get_fsdp_state")}
        (Path(config.run.output_dir) / "fsdp2_policies.json").write_text(json.dumps(policies))
