"""Linear probe: only the task head (the classifier) trains."""

import dataclasses

from peftkit.methods.base import Method, register


@register
class Head(Method):
    name = "head"
    mergeable = True  # nothing to fold: only the head changed

    @dataclasses.dataclass
    class Config:
        pass

    def apply(self, model, exclude):
        pass  # `prepare` unfreezes the head for every method
