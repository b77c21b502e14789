"""cure-hub: adversarially robust fine-tuning (CURE) for timm and Hugging Face vision models."""

from .models import ModelSpec, RobustClassifier, create_model

__version__ = "0.1.0"

__all__ = ["ModelSpec", "RobustClassifier", "create_model", "__version__"]
