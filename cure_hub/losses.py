"""The losses of the training methods and attacks, on logits, computed in float32.

Conventions follow the TRADES / CURE code: a KL divergence is summed over classes and averaged
over the batch; its first argument is the target distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL( softmax(target_logits) || softmax(logits) ), summed over classes, averaged over the batch.

    Gradients flow into both arguments; detach ``target_logits`` for a fixed target.
    """
    target_log_probs = F.log_softmax(target_logits.float(), dim=1)
    log_probs = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_probs, target_log_probs, reduction="batchmean", log_target=True)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin per example: the largest wrong logit minus the true one (positive
    when the example is misclassified)."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return wrong - true


def trades_terms(clean_logits, adv_logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """TRADES's two terms (Zhang et al. 2019; CURE Eq. 5): CE(f(x), y) and KL( p(x) || p(x_adv) )."""
    return F.cross_entropy(clean_logits.float(), labels), kl_divergence(clean_logits, adv_logits)


def trades_loss(clean_logits, adv_logits, labels, beta: float) -> torch.Tensor:
    """TRADES: CE(f(x), y) + beta * KL( p(x) || p(x_adv) )."""
    main, regulariser = trades_terms(clean_logits, adv_logits, labels)
    return main + beta * regulariser


def mart_terms(clean_logits, adv_logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """MART's two terms (Wang et al. 2020): a boosted CE on x_adv, and the KL between clean and
    adversarial predictions weighted per example by (1 - p_y(x)), as in the authors' code."""
    clean_logits, adv_logits = clean_logits.float(), adv_logits.float()
    adv_probs = adv_logits.softmax(1)
    top2 = adv_probs.argsort(1)[:, -2:]
    hardest_wrong = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(adv_logits, labels) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), hardest_wrong)
    clean_probs = clean_logits.softmax(1)
    true_probs = clean_probs.gather(1, labels[:, None]).squeeze(1)
    kl_per_example = (clean_probs * (torch.log(clean_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(1)
    return boosted_ce, (kl_per_example * (1.0000001 - true_probs)).mean()


def mart_loss(clean_logits, adv_logits, labels, beta: float) -> torch.Tensor:
    """MART: its boosted CE plus beta times its weighted KL."""
    main, regulariser = mart_terms(clean_logits, adv_logits, labels)
    return main + beta * regulariser
