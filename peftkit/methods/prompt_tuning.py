"""Prompt tuning (Lester et al., 2021): n trainable embeddings prepended to every input.

The prompt lives in the word-embedding space: position (and token-type) embeddings are added to it
as to any token, so BERT's pooler reads the first virtual token, which trains, as peft does. Only
the prompt (and the head) trains. Not mergeable: the prompt is extra input, not a weight change.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, register

INITS = ("random", "text")


def as_kwargs(forward, args: tuple, kwargs: dict) -> dict:
    """A call's positional arguments turned into keywords, so a pre-hook can edit them by name."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    var_kw = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    extra = bound.pop(var_kw, {}) if var_kw else {}
    return {**bound, **extra}


def columns_before(t: torch.Tensor, n: int, value) -> torch.Tensor:
    return torch.cat([t.new_full((t.shape[0], n), value), t], dim=1)


def cached_keys(kwargs: dict) -> int:
    """How many positions the call's KV cache already holds: 0 in training and at generation's first step."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def after_cached(kwargs: dict, n: int) -> dict:
    """A decoding step after the first: the n extra positions are in the cache already, so the mask
    covers them too and the new tokens' positions come after them."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        kwargs["attention_mask"] = columns_before(mask, n, 1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return kwargs


class SoftPrompt(nn.Module):
    """The virtual-token embeddings and the two hooks that put them in front of every input.

    The top-level pre-hook prepends placeholder ids (the pad id) rather than switching the call to
    `inputs_embeds`: models that find the last real token from `input_ids` (Llama's classifier)
    still find it. The embedding layer's hook then swaps the placeholders' embeddings for the prompt.
    """

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.placeholders_pending = False

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def prepend(self, model: nn.Module, args: tuple, kwargs: dict):
        kwargs = as_kwargs(model.forward, args, kwargs)
        n = self.num_tokens
        if cached_keys(kwargs):  # generation past its first step: the prompt is in the cache
            return (), after_cached(kwargs, n)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        inputs = ids if ids is not None else embeds
        if inputs is None:
            return None  # the model raises its own error
        batch, length = inputs.shape[:2]
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and length + n > limit:
            fix = (f"lower backbone.max_length to {limit - n} or fewer, or method.num_virtual_tokens={n} to {limit - length} or fewer"
                   if limit - n >= 2 else f"lower method.num_virtual_tokens={n} to at most {limit - 2}: the prompt leaves no room for the text")
            raise UserError(f"prompt_tuning adds {n} tokens to inputs of {length}, beyond the model's {limit} positions: {fix}")
        if ids is not None:
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            kwargs["input_ids"] = columns_before(ids, n, pad)
            self.placeholders_pending = True
        else:
            kwargs["inputs_embeds"] = torch.cat([self.expand(batch, embeds.dtype), embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.ndim != 2:
                raise UserError("prompt_tuning needs a 2-D attention_mask (batch × tokens)")
            kwargs["attention_mask"] = columns_before(mask, n, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = columns_before(kwargs["token_type_ids"], n, 0)
        if kwargs.get("labels") is not None and kwargs["labels"].ndim == 2:  # a causal LM's labels: none on the prompt
            kwargs["labels"] = columns_before(kwargs["labels"], n, -100)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos + n], dim=1)
        return (), kwargs

    def replace_placeholders(self, embedding_layer: nn.Module, args: tuple, output: torch.Tensor):
        if not self.placeholders_pending:
            return None
        self.placeholders_pending = False
        return torch.cat([self.expand(output.shape[0], output.dtype), output[:, self.num_tokens:]], dim=1)

    def expand(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding.to(dtype).unsqueeze(0).expand(batch, -1, -1)


def text_init_ids(model: nn.Module, text: str, n: int) -> list[int]:
    """The ids of `text` (no special tokens), repeated or cut to n, as the paper's vocabulary init.

    The tokenizer is the backbone's own, loaded from where the model came from.
    """
    from transformers import AutoTokenizer

    source = model.config._name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"prompt_tuning init=text needs the backbone's tokenizer; none loads from '{source}': {e}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"method.init_text {text!r} tokenizes to no tokens")
    return (ids * -(-n // len(ids)))[:n]


@register
class PromptTuning(Method):
    name = "prompt_tuning"
    packs = False  # the prompt comes once per row: packed examples after the first would not see it

    @dataclasses.dataclass
    class Config:
        num_virtual_tokens: int = 20
        init: str = "random"
        init_text: str | None = None

        def __post_init__(self):
            # whether init_text has any tokens needs the tokenizer: text_init_ids
            _checks.at_least("num_virtual_tokens", self.num_virtual_tokens)
            _checks.one_of("prompt_tuning init", self.init, INITS)
            if self.init == "text" and not self.init_text:
                raise UserError("prompt_tuning init=text needs method.init_text (the words whose embeddings start "
                                f"the prompt), got method.init_text={'null' if self.init_text is None else repr(self.init_text)}")

    def apply(self, model, exclude):
        c = self.cfg
        if getattr(model.config, "is_encoder_decoder", False):
            raise UserError(f"prompt_tuning prepends to one input sequence; '{model.config.model_type}' is an encoder-decoder")
        words = model.get_input_embeddings()
        w = words.weight
        if c.init == "text":
            ids = torch.tensor(text_init_ids(model, c.init_text, c.num_virtual_tokens), device=w.device)
            init = w.detach()[ids].clone()
        else:  # uniform in [-0.5, 0.5], as the paper's random init
            init = torch.empty(c.num_virtual_tokens, w.shape[1], dtype=w.dtype, device=w.device).uniform_(-0.5, 0.5)
        model.soft_prompt = SoftPrompt(init)
        model.register_forward_pre_hook(model.soft_prompt.prepend, with_kwargs=True)
        words.register_forward_hook(model.soft_prompt.replace_placeholders)
