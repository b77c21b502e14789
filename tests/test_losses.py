import math

import pytest
import torch

from cure_hub.losses import cw_margin, kl_divergence, mart_loss, trades_loss

CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
ADV = torch.tensor([[1.0, 1.5, -0.5], [0.3, -0.2, 0.0]])
LABELS = torch.tensor([0, 2])


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(p_rows, q_rows):
    return sum(sum(p * math.log(p / q) for p, q in zip(softmax(pr), softmax(qr))) for pr, qr in zip(p_rows, q_rows)) / len(p_rows)


def hand_ce(rows, labels):
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def test_kl_is_summed_over_classes_and_averaged_over_the_batch():
    assert kl_divergence(CLEAN, ADV).item() == pytest.approx(hand_kl(CLEAN.tolist(), ADV.tolist()), rel=1e-6)
    assert kl_divergence(CLEAN, CLEAN).item() == pytest.approx(0.0, abs=1e-7)


def test_trades_is_ce_plus_beta_kl():
    expected = hand_ce(CLEAN.tolist(), LABELS.tolist()) + 6.0 * hand_kl(CLEAN.tolist(), ADV.tolist())
    assert trades_loss(CLEAN, ADV, LABELS, beta=6.0).item() == pytest.approx(expected, rel=1e-6)


def test_cw_margin_is_best_wrong_minus_true_logit():
    assert cw_margin(CLEAN, LABELS).tolist() == pytest.approx([0.5 - 2.0, 0.2 - 0.3])


def test_mart_matches_the_formula_of_its_paper():
    beta, total = 6.0, 0.0
    for clean, adv, y in zip(CLEAN.tolist(), ADV.tolist(), LABELS.tolist()):
        p_adv, p_clean = softmax(adv), softmax(clean)
        wrong = max((p, j) for j, p in enumerate(p_adv) if j != y)[1]
        boosted_ce = -math.log(p_adv[y]) - math.log(1.0001 - p_adv[wrong] + 1e-12)
        kl = sum(pc * (math.log(pc + 1e-12) - math.log(pa + 1e-12)) for pc, pa in zip(p_clean, p_adv))
        total += boosted_ce + beta * kl * (1.0000001 - p_clean[y])
    assert mart_loss(CLEAN, ADV, LABELS, beta).item() == pytest.approx(total / 2, rel=1e-5)


def test_gradients_flow_into_both_kl_arguments():
    clean, adv = CLEAN.clone().requires_grad_(), ADV.clone().requires_grad_()
    kl_divergence(clean, adv).backward()
    assert clean.grad.abs().sum() > 0 and adv.grad.abs().sum() > 0
