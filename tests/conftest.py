import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar10_dir() -> str:
    """The offline CIFAR-10 copy: $CURE_HUB_CIFAR10, else ../shared/data/cifar10 beside the repo."""
    path = Path(os.environ.get("CURE_HUB_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
    if not path.is_dir():
        pytest.skip(f"no offline CIFAR-10 copy at {path} (set CURE_HUB_CIFAR10)")
    return str(path)
