"""TRADES (Zhang et al. 2019): CE on clean images plus beta times KL(p(x) || p(x_adv)), with x_adv
from the KL attack."""

from ..losses import trades_terms
from .base import CleanAndAdversarialMethod


class TRADES(CleanAndAdversarialMethod):
    name = "trades"
    title = "TRADES"
    attack_loss = "kl"
    terms = staticmethod(trades_terms)
