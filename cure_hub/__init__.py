"""cure-hub: adversarially robust fine-tuning (CURE) for timm and Hugging Face vision models."""

from . import methods  # noqa: F401  (registers the training methods that configs name)
from .config import AttackConfig, DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .hub import export_run, push_to_hub
from .hub_results import RobustResult, ThreatModel, robust_results
from .models import ModelSpec, RobustClassifier, create_model, load_robust_model

__version__ = "0.1.0"

__all__ = [
    "AttackConfig",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "RobustClassifier",
    "RobustResult",
    "RunConfig",
    "ThreatModel",
    "TrainConfig",
    "__version__",
    "create_model",
    "export_run",
    "load_robust_model",
    "push_to_hub",
    "robust_results",
]
