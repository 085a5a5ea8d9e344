"""Linear probe: only the task head (the classifier) trains."""

import dataclasses

from peftkit.errors import UserError
from peftkit.methods.base import Method, register


@register
class Head(Method):
    name = "head"
    mergeable = True  # nothing to fold: only the head changed

    @dataclasses.dataclass
    class Config:
        pass

    def apply(self, model, exclude):
        if not exclude:
            raise UserError("method=head trains only a new task head, and a causal LM has none (its LM head is "
                            "pretrained); choose a method that adapts the model, e.g. method=lora")
        # `prepare` unfreezes the head for every method
