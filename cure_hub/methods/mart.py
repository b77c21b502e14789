"""MART (Wang et al. 2020): boosted CE on x_adv plus a KL term weighted towards misclassified
examples, with x_adv from the cross-entropy attack started at x + 0.001 N(0, I) as in its code."""

from ..losses import mart_terms
from .base import CleanAndAdversarialMethod


class MART(CleanAndAdversarialMethod):
    name = "mart"
    title = "MART"
    attack_loss = "ce"
    terms = staticmethod(mart_terms)
