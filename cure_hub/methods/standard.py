"""Natural training: cross-entropy on clean images."""

import torch.nn.functional as F

from .base import Method, StepOutput, accuracy


class StandardTraining(Method):
    name = "standard"
    title = "standard (non-adversarial) training"
    adversarial = False

    def compute_loss(self, model, images, labels) -> StepOutput:
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        return StepOutput(loss, {"loss": loss.detach(), "clean_acc": accuracy(logits, labels)})
