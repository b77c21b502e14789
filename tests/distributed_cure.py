"""Run by tests/test_trainer.py, alone or under torchrun: a few CURE steps on a tiny ViT, then each
process saves its model and revision parameters.

Chosen so that one process with the whole batch computes the same thing up to rounding: no batch
norm (a process's statistics would cover half the batch) and no attack steps. The KL attack's
random start is drawn per process, so it cannot match one process's draw; and started without
noise, its first gradient is rounding noise that the attack amplifies to a full step. With x_adv = x
the RGP gradients, masks, consistency loss and revision draws are still exercised in full; the
attack works per example and is tested on its own in tests/test_attacks.py."""

import sys

import torch

from cure_hub.config import TrainConfig
from cure_hub.methods.base import unwrap
from cure_hub.trainer import Trainer

output, batch_size = sys.argv[1], int(sys.argv[2])
method = sys.argv[3] if len(sys.argv) > 3 else "cure"
config = TrainConfig.from_dict({
    "model": {"model": "vit_tiny", "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "from_scratch": True},
    "data": {"dataset": "digits", "augment": "none", "eval_subset": 20},
    "method": {"method": method, "revision_rate": 0.6, "revision_rate_schedule": "constant", "revision_decay": 0.5},
    "attack": {"steps": 0, "random_start": "none"},
    "optim": {"max_steps": 4, "batch_size": batch_size, "lr": 0.05, "seed": 7},
    "run": {"output_dir": f"{output}/run", "eval_attack_steps": 1, "overwrite_output_dir": True},
})
trainer = Trainer(config)
trainer.train()
state = {
    "model": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()},
    "revision": trainer.method.revision_model.state_dict() if method == "cure" else {},
    "revisions_made": trainer.method.revision_generator.get_state() if method == "cure" else None,
}
torch.save(state, f"{output}/rank{trainer.accelerator.process_index}.pt")
