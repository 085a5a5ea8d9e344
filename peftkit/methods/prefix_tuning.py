"""Prefix tuning (Li & Liang, 2021) and P-Tuning v2 (Liu et al., 2022): trained keys and values
that every attention layer sees before the input's own.

Layer ℓ attends over [P_Kℓ; K] and [P_Vℓ; V]: softmax(Q [P_Kℓ; K]ᵀ/√d + M) [P_Vℓ; V], where the
mask M lets every real token see every prefix (padding and causal masking apply to real keys
only). With `reparameterize`, an embedding and a two-layer MLP produce the prefixes (Li & Liang);
without it the prefixes are trained directly (P-Tuning v2). Not mergeable: the prefixes are extra
keys, not a change to any weight.

The prefixes reach the attention layers as a pre-filled KV cache plus an attention mask widened by
`num_virtual_tokens` ones, passed to the backbone by a forward pre-hook. That is transformers' own
path for cached keys (the one peft uses, and one its mask builders support for encoders too), so
every attention implementation, mask format and grouped-query layout is handled by transformers,
not re-implemented here. As after cached keys, real tokens take positions P … P+L-1: BERT's learned
positions and Llama's rotary angles shift by P, as in P-Tuning v2's code and peft.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, compute_dtype, register
from peftkit.methods.prompt_tuning import after_cached, cached_keys


class Prefixes(nn.Module):
    """Per-layer key and value prefixes, and the hook that hands them to the backbone as its KV cache.

    Stored flat as (P, layers·2·kv_heads·head_dim), the layout peft uses, so its tensors copy across.
    """

    def __init__(self, shape: tuple[int, ...], cache_kwarg: str):
        super().__init__()
        self.shape = shape  # (P, layers, 2, kv_heads, head_dim)
        self.width = math.prod(shape[1:])
        self.cache_kwarg = cache_kwarg  # "cache" from transformers 5.2x, "past_key_values" before

    def layout(self, flat: torch.Tensor) -> torch.Tensor:
        """(P, layers·2·kv_heads·head_dim) → (layers, 2, kv_heads, P, head_dim)."""
        return flat.view(self.shape).permute(1, 2, 3, 0, 4)

    def prepend(self, backbone, args, kwargs):
        if cached_keys(kwargs):  # generation past its first step: the prefixes are in the cache already
            return args, after_cached(kwargs, self.shape[0])
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=tokens.device)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.shape[0]), mask], dim=1)
        if kwargs.get("position_ids") is not None:  # generation's first step: real tokens come after the prefixes
            kwargs["position_ids"] = kwargs["position_ids"] + self.shape[0]
        prefixes = self()
        prefixes = prefixes.to(compute_dtype(prefixes))  # the layers' own keys come out in autocast's dtype
        given = kwargs.get(self.cache_kwarg)
        cache = given if given is not None else DynamicCache()  # generation keeps the cache object it passed
        for layer, (k, v) in enumerate(prefixes):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
        kwargs[self.cache_kwarg] = cache
        return args, kwargs


class PrefixTable(Prefixes):
    """The prefixes themselves, trained directly (P-Tuning v2). N(0, 1) init, as P-Tuning v2 and peft."""

    def __init__(self, shape, cache_kwarg, like: torch.Tensor):
        super().__init__(shape, cache_kwarg)
        self.prefix = nn.Parameter(torch.randn(shape[0], self.width, dtype=like.dtype, device=like.device))

    def forward(self) -> torch.Tensor:
        return self.layout(self.prefix)


class PrefixMLP(Prefixes):
    """Prefixes produced by an embedding and a two-layer tanh MLP (Li & Liang), who found training
    the prefixes directly unstable. The embedding and MLP are what train and what the adapter file
    stores; the prefixes are recomputed from them exactly."""

    def __init__(self, shape, cache_kwarg, like: torch.Tensor, encoder_hidden_size: int):
        super().__init__(shape, cache_kwarg)
        kw = {"dtype": like.dtype, "device": like.device}
        token_dim = shape[3] * shape[4]  # kv_heads·head_dim: the hidden size, or less with grouped-query attention
        self.embedding = nn.Parameter(torch.randn(shape[0], token_dim, **kw))
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, encoder_hidden_size, **kw), nn.Tanh(), nn.Linear(encoder_hidden_size, self.width, **kw)
        )

    def forward(self) -> torch.Tensor:
        return self.layout(self.mlp(self.embedding))


@register
class PrefixTuning(Method):
    name = "prefix_tuning"
    packs = False  # the prefixes come as a KV cache, and transformers builds the packed-rows mask only without one
    positionwise = False  # its KV cache goes through the layer's own forward

    @dataclasses.dataclass
    class Config:
        num_virtual_tokens: int = 20
        reparameterize: bool = False
        encoder_hidden_size: int = 512

        def __post_init__(self):
            _checks.at_least("num_virtual_tokens", self.num_virtual_tokens)
            _checks.at_least("encoder_hidden_size", self.encoder_hidden_size)

    def apply(self, model, exclude):
        c, config = self.cfg, model.config
        backbone = model.base_model
        cache_kwarg = next((k for k in ("cache", "past_key_values") if k in inspect.signature(backbone.forward).parameters), None)
        if cache_kwarg is None or config.is_encoder_decoder:
            raise UserError(
                f"prefix_tuning needs a decoder-only or encoder-only backbone that takes a KV cache "
                f"(BERT, RoBERTa, ELECTRA, Llama, Mistral, Qwen); '{config.model_type}' does not"
            )
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        like = model.get_input_embeddings().weight
        shape = (c.num_virtual_tokens, config.num_hidden_layers, 2, kv_heads, head_dim)
        if c.reparameterize:
            prefixes = PrefixMLP(shape, cache_kwarg, like, c.encoder_hidden_size)
        else:
            prefixes = PrefixTable(shape, cache_kwarg, like)
        model.add_module("prefix_tuning", prefixes)
        backbone.register_forward_pre_hook(prefixes.prepend, with_kwargs=True)
