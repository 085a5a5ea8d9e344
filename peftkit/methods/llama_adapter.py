"""LLaMA-Adapter (Zhang et al., 2023): learnable adaption prompts at the top layers, attended to
through a zero-initialised gate.

In each of the top `adapter_layers` decoder layers, a prompt P (adapter_len × hidden, trained) is
projected by the layer's own frozen key and value projections; the layer's queries (with their
rotary positions) attend to it in a softmax of its own, scaled by a gate g that starts at 0, and
the result goes through the layer's output projection and is added to the attention output:

    attn(x) + o_proj( g · softmax(Q K_Pᵀ / √d) V_P ),   K_P = k_proj(P), V_P = v_proj(P)

With g = 0 the model starts exactly as the base (the paper's zero-init attention). As in peft's
`adaption_prompt`: one scalar gate per layer, P ~ N(0, 1), no rotary angle on the prompt's keys.
Not mergeable (the prompt's softmax is no weight change); the KV cache is untouched, so cached
decoding equals a full recompute.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, register, replace_module


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class AdaptedAttention(nn.Module):
    """A decoder layer's attention (`base`, frozen) plus its adaption prompt and gate."""

    def __init__(self, base: nn.Module, adapter_len: int, hidden: int):
        super().__init__()
        self.base = base
        w = base.q_proj.weight
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden, dtype=w.dtype, device=w.device).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=w.dtype, device=w.device))

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        out, *rest = self.base(hidden_states=hidden_states, position_embeddings=position_embeddings, **kwargs)
        attn = self.base
        bsz, q_len, _ = hidden_states.shape
        head_dim = attn.head_dim
        q = attn.q_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        k = attn.k_proj(self.adaption_prompt).view(1, -1, attn.k_proj.out_features // head_dim, head_dim).transpose(1, 2)
        v = attn.v_proj(self.adaption_prompt).view(1, -1, attn.v_proj.out_features // head_dim, head_dim).transpose(1, 2)
        groups = q.shape[1] // k.shape[1]  # grouped-query attention: each key head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(head_dim)
        scores = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        extra = (scores @ v.to(q.dtype)).transpose(1, 2).reshape(bsz, q_len, -1)
        return (out + attn.o_proj(extra)).to(out.dtype), *rest


@register
class LlamaAdapter(Method):
    name = "llama_adapter"
    positionwise = False  # decoder attention; a decoder classifier reads the last token

    @dataclasses.dataclass
    class Config:
        adapter_len: int = 10
        adapter_layers: int = 8

        def __post_init__(self):
            _checks.at_least("adapter_len", self.adapter_len)
            _checks.at_least("adapter_layers", self.adapter_layers)

    def apply(self, model, exclude):
        c = self.cfg
        layers = [(n, m) for n, m in model.named_modules()
                  if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))]
        if not layers:
            raise UserError(f"llama_adapter adapts decoder attention (q/k/v/o projections, rotary positions); "
                            f"'{model.config.model_type}' has none: use it with Llama, Mistral, Qwen2 or SmolLM2")
        if c.adapter_layers > len(layers):
            raise UserError(f"method.adapter_layers={c.adapter_layers}: this model has {len(layers)} attention layers; "
                            f"choose 1..{len(layers)}")
        for name, attn in layers[-c.adapter_layers:]:
            replace_module(model, name, AdaptedAttention(attn, c.adapter_len, model.config.hidden_size))
