"""Training methods behind one interface (:class:`Method`); :func:`build_method` picks one by name."""

from ..config import AttackConfig, MethodConfig
from .base import Method, StepOutput
from .cure import CURE
from .mart import MART
from .pgd_at import PGDAdversarialTraining
from .standard import StandardTraining
from .trades import TRADES

METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (StandardTraining, PGDAdversarialTraining, TRADES, MART, CURE)}


def build_method(config: MethodConfig, attack: AttackConfig) -> Method:
    return METHOD_CLASSES[config.method](config, attack)


__all__ = ["CURE", "MART", "METHOD_CLASSES", "Method", "PGDAdversarialTraining", "StandardTraining", "StepOutput", "TRADES", "build_method"]
