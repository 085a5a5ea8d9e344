"""Full fine-tuning: every weight trains. The baseline every PEFT method is measured against."""

import dataclasses

from peftkit.methods.base import Method, register


@register
class Full(Method):
    name = "full"
    mergeable = True  # nothing to fold: the trained model is already a plain model

    @dataclasses.dataclass
    class Config:
        pass

    def apply(self, model, exclude):
        model.requires_grad_(True)
