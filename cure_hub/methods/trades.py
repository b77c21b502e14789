"""TRADES (Zhang et al. 2019): CE on clean images plus beta times KL(p(x) || p(x_adv)), with x_adv
from the KL attack."""

from ..losses import trades_loss
from .base import Method, StepOutput, accuracy


class TRADES(Method):
    name = "trades"

    def compute_loss(self, model, images, labels) -> StepOutput:
        adversarial = self.adversarial_examples(model, images, labels, loss="kl")
        logits, adv_logits = model(images), model(adversarial)
        loss = trades_loss(logits, adv_logits, labels, self.config.beta)
        metrics = {"loss": loss.detach(), "clean_acc": accuracy(logits, labels), "adv_acc": accuracy(adv_logits, labels)}
        return StepOutput(loss, metrics)
