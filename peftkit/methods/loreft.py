"""LoReFT (Wu et al., 2024): edit hidden states, not weights, in an r-dimensional subspace.

At chosen layers, the output h of a token in the chosen positions (the first `prefix_positions` and
last `suffix_positions` real tokens) becomes h + Rᵀ(W h + b − R h): within the span of R's
orthonormal rows, h's coordinates R h are replaced by the learned W h + b. Every other token passes
unchanged. Not mergeable: the edit depends on the token's position.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, register


def select_positions(attention_mask: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor:
    """True at the first `prefix` and last `suffix` real tokens of each row, wherever the padding is."""
    real = attention_mask.bool()
    from_start = real.cumsum(dim=1) - 1
    from_end = real.sum(dim=1, keepdim=True) - 1 - from_start
    return real & ((from_start < prefix) | (from_end < suffix))


class TokenPositions:
    """The tokens edited in the current forward, found by a pre-hook on the transformer from its
    attention mask: the layers below it see only the 4-D mask built from it, or none at all."""

    def __init__(self, prefix: int, suffix: int):
        self.prefix, self.suffix = prefix, suffix
        self.selected: torch.Tensor | None = None

    def record(self, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        call = inspect.signature(transformer.forward).bind_partial(*args, **kwargs).arguments
        call.update(call.pop("kwargs", None) or {})
        inputs = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        past = next((call[k] for k in ("past_key_values", "cache") if call.get(k) is not None), None)  # (transformers ≥ 5.20: cache)
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            # a cached decoding step: generated tokens are not edited, only the prompt's positions (as pyreft)
            self.selected = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
            return
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        elif mask.ndim != 2:
            raise UserError("loreft needs a 2-D attention_mask (batch × tokens) to find the positions it edits")
        self.selected = select_positions(mask, self.prefix, self.suffix)


class LoReFTIntervention(nn.Module):
    """h ← h + Rᵀ(W h + b − R h) at the selected tokens of one layer's output.

    `rotation` is R up to orthonormalisation: R is its QR-orthonormalised rows, recomputed at every
    forward, so any optimizer (weight decay included) keeps R orthonormal and the saved tensor is a
    plain one. torch's `orthogonal` parametrization stores a d×d base per layer, and its Householder
    map (the one it picks for r×d) scales by the integer part of a diagonal: one AdamW step with
    weight decay turns −1 into −0.99…, and R into zeros.
    """

    def __init__(self, d: int, r: int, dropout: float, positions: TokenPositions, like: torch.Tensor):
        super().__init__()
        self.rotation = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d, dtype=like.dtype, device=like.device)))
        self.learned_source = nn.Linear(d, r, dtype=like.dtype, device=like.device)  # W, b
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.positions = positions

    def orthonormal_rotation(self) -> torch.Tensor:
        q, triangle = torch.linalg.qr(self.rotation.float().T)
        return (q * triangle.diagonal().sign()).T.to(self.rotation.dtype)  # signs fixed: R = rotation when already orthonormal

    def forward(self, h: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        R = self.orthonormal_rotation()
        edit = (self.learned_source(h) - h @ R.T) @ R
        return torch.where(selected.unsqueeze(-1), h + self.dropout(edit), h)

    def edit_layer_output(self, layer: nn.Module, args: tuple, output):
        h = output[0] if isinstance(output, tuple) else output
        selected = self.positions.selected
        if selected is None or selected.shape != h.shape[:2]:
            raise RuntimeError("loreft: a layer ran outside its model's forward, so the positions to edit are unknown")
        h = self(h, selected)
        return (h, *output[1:]) if isinstance(output, tuple) else h


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers: the ModuleList with one entry per hidden layer."""
    n = model.config.num_hidden_layers
    for m in model.base_model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise UserError(f"loreft found no list of {n} transformer layers in {type(model).__name__}")


@register
class LoReFT(Method):
    packs = False  # it edits the first and last tokens of each sequence: a packed row is one sequence to it
    positionwise = False  # the edit at the last token needs the last layer at every position
    name = "loreft"

    @dataclasses.dataclass
    class Config:
        r: int = 4
        layers: list[int] | None = None
        prefix_positions: int = 1
        suffix_positions: int = 1
        dropout: float = 0.0

        def __post_init__(self):
            # r against the hidden size and layer indices against the layer count: apply
            _checks.at_least("r", self.r)
            p, s = self.prefix_positions, self.suffix_positions
            if p < 0 or s < 0 or p + s == 0:
                raise UserError(f"method.prefix_positions and suffix_positions must be 0 or more, and not both 0, "
                                f"got prefix_positions={p}, suffix_positions={s}")
            if self.layers is not None and (not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
                raise UserError(f"method.layers must be distinct layer indices, 0 or more (or null for all), got {self.layers}")
            _checks.dropout(self.dropout)

    def apply(self, model, exclude):
        c = self.cfg
        stack = transformer_layers(model)
        layers = list(range(len(stack))) if c.layers is None else list(c.layers)
        d = model.config.hidden_size
        if c.r > d:
            raise UserError(f"method.r must be between 1 and the hidden size {d}, got {c.r}")
        if max(layers) >= len(stack):
            raise UserError(f"method.layers must be distinct layer indices from 0 to {len(stack) - 1} (or null for all), got {c.layers}")
        positions = TokenPositions(c.prefix_positions, c.suffix_positions)
        model.base_model.register_forward_pre_hook(positions.record, with_kwargs=True)
        like = next(stack.parameters())
        for i in sorted(layers):
            stack[i].loreft = LoReFTIntervention(d, c.r, c.dropout, positions, like)
            # first among the layer's hooks, so output_hidden_states records the edited state
            stack[i].register_forward_hook(stack[i].loreft.edit_layer_output, prepend=True)
