import os
from pathlib import Path

import pytest
import torch

from cure_hub.config import TrainConfig
from cure_hub.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (pytest -n N) the N workers share the cores: each takes its share of threads,
# and so do the processes its tests start, or N pools of all-core threads slow each other down
# several times over. OMP_NUM_THREADS, when set, is left as it is.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def cifar10_dir() -> str:
    """The offline CIFAR-10 copy: $CURE_HUB_CIFAR10, else ../shared/data/cifar10 beside the repo."""
    path = Path(os.environ.get("CURE_HUB_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
    if not path.is_dir():
        pytest.skip(f"no offline CIFAR-10 copy at {path} (set CURE_HUB_CIFAR10)")
    return str(path)


@pytest.fixture(scope="session")
def natural_run(tmp_path_factory) -> Path:
    """A narrow CIFAR ResNet-18 trained naturally on 8x8 digits for 3 epochs (a few seconds): about
    95 % clean accuracy, and broken by attacks at 24/255."""
    output = tmp_path_factory.mktemp("natural") / "run"
    config = TrainConfig.from_dict({
        "model": {"model": "cifar_resnet18", "model_kwargs": {"width": 8}},
        "data": {"dataset": "digits", "augment": "none", "eval_subset": 50},
        "method": {"method": "standard"},
        "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "lr_schedule": "cosine"},
        "run": {"output_dir": str(output), "eval_attack_steps": 0},
    })
    Trainer(config).train()
    return output
