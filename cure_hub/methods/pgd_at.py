"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD examples from a uniform start."""

import torch.nn.functional as F

from .base import Method, StepOutput, accuracy


class PGDAdversarialTraining(Method):
    name = "pgd_at"
    title = "PGD adversarial training"
    default_random_start = "uniform"

    def compute_loss(self, model, images, labels) -> StepOutput:
        adversarial = self.adversarial_examples(model, images, labels, loss="ce")
        adv_logits = model(adversarial)
        loss = F.cross_entropy(adv_logits.float(), labels)
        return StepOutput(loss, {"loss": loss.detach(), "adv_acc": accuracy(adv_logits, labels)})
