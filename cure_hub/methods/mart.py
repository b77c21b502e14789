"""MART (Wang et al. 2020): boosted CE on x_adv plus a KL term weighted towards misclassified
examples, with x_adv from the cross-entropy attack started at x + 0.001 N(0, I) as in its code."""

from ..losses import mart_loss
from .base import Method, StepOutput, accuracy


class MART(Method):
    name = "mart"

    def compute_loss(self, model, images, labels) -> StepOutput:
        adversarial = self.adversarial_examples(model, images, labels, loss="ce")
        logits, adv_logits = model(images), model(adversarial)
        loss = mart_loss(logits, adv_logits, labels, self.config.beta)
        metrics = {"loss": loss.detach(), "clean_acc": accuracy(logits, labels), "adv_acc": accuracy(adv_logits, labels)}
        return StepOutput(loss, metrics)
