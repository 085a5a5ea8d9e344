"""Where a method attaches, on any architecture: the user's names, suffixes, regexes and role names,
or the method's default roles, resolved to the model's own layers with no per-model table.

A layer's role (`query`, `key`, `value`, `attn_out`, `ffn_in`, `ffn_out`, `pooler`) is read from the
model itself: its leaf name where the name says it (`q_proj`, `q_lin`, `query`, fused `c_attn` /
`query_key_value` / `qkv_proj` hold query, key and value at once), its place (inside an attention
block, the output projection is the one projection left), and its shape where names say nothing
(a feed-forward layer that widens is `ffn_in`, one that narrows is `ffn_out`: GPT-2's `mlp.c_proj`,
BERT's `layer.N.output.dense`). Roles live in the numbered blocks (and the pooler), so a head,
a projection or a router outside them is never a role. transformers' `Conv1D` (GPT-2, weight stored
in×out) is a layer like a Linear: methods see it as an `nn.Linear` (`as_linear`), and merging into
the base turns it back (`as_base_layer`).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import UserError

ROLE_NAMES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out", "pooler")
ALL_LINEAR = "all-linear"
FUSED_QKV = {"c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj"}
NAMED = {  # leaf names that say their role in every architecture that uses them
    "query": {"query", "q_proj", "q_lin", "q", "query_proj", "wq"},
    "key": {"key", "k_proj", "k_lin", "k", "key_proj", "wk"},
    "value": {"value", "v_proj", "v_lin", "v", "value_proj", "wv"},
    "ffn_in": {"up_proj", "gate_proj", "gate_up_proj", "fc1", "lin1", "c_fc", "dense_h_to_4h", "wi", "wi_0", "wi_1",
               "fc_in", "w1", "w3"},
    "ffn_out": {"down_proj", "fc2", "lin2", "dense_4h_to_h", "fc_out", "w2"},
}
ATTN_OUT = {"o_proj", "out_proj", "out_lin", "o", "dense", "c_proj", "proj", "out", "wo"}  # inside an attention block
NOT_A_ROLE = {"gate", "router", "shared_expert_gate"}  # mixture-of-experts routers: never adapted by role


def is_layer(m: nn.Module) -> bool:
    """What methods wrap: a Linear, or transformers' Conv1D (the same map with its weight transposed)."""
    return isinstance(m, (nn.Linear, Conv1D))


def features(m: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or Conv1D."""
    return (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.nx, m.nf)


class LinearFromConv1D(nn.Linear):
    """A Conv1D as the `nn.Linear` it computes (weight out×in): every method wraps Linears, and
    `as_base_layer` gives the Conv1D back when an adapter is merged into the base."""

    def as_conv1d(self) -> Conv1D:
        conv = Conv1D(self.out_features, self.in_features).to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight.t())
            conv.bias.copy_(self.bias)
        conv.requires_grad_(self.weight.requires_grad)
        return conv


def as_linear(m: nn.Module) -> nn.Linear:
    """The layer a method wraps: a Linear as it is; a Conv1D converted (its weight transposed)."""
    if isinstance(m, nn.Linear):
        return m
    lin = LinearFromConv1D(m.nx, m.nf, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
    lin.bias = nn.Parameter(m.bias.detach(), requires_grad=m.bias.requires_grad)
    return lin


def as_base_layer(m: nn.Module) -> nn.Module:
    """What a merged wrapper leaves in the model: the original layer type (Conv1D back as Conv1D)."""
    return m.as_conv1d() if isinstance(m, LinearFromConv1D) else m


def layer_roles(name: str, m: nn.Module) -> tuple[str, ...]:
    """The roles of one layer, from its name, its place and its shape (see the module docstring)."""
    parts = name.lower().split(".")
    leaf, parents = parts[-1], parts[:-1]
    if any("pooler" in p for p in parents):
        return ("pooler",)
    if not any(p.isdigit() for p in parents) or leaf in NOT_A_ROLE:
        return ()
    if leaf in FUSED_QKV:
        return ("query", "key", "value")
    for role, names in NAMED.items():
        if leaf in names:
            return (role,)
    block = parents[max(i for i, p in enumerate(parents) if p.isdigit()) + 1:]  # the path inside the layer
    if any("attn" in p or "attention" in p for p in block):
        return ("attn_out",) if leaf in ATTN_OUT or block[-1] == "output" else ()
    fan_in, fan_out = features(m)
    if fan_in != fan_out:
        return ("ffn_in",) if fan_in < fan_out else ("ffn_out",)
    if block and block[-1] == "intermediate":
        return ("ffn_in",)
    if block and block[-1] == "output":
        return ("ffn_out",)
    return ()


def roles_of(layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Each role the model has, with its layers' full names in model order."""
    found: dict[str, list[str]] = {}
    for name, m in layers.items():
        for r in layer_roles(name, m):
            found.setdefault(r, []).append(name)
    return {r: found[r] for r in ROLE_NAMES if r in found}


def matches(name: str, pattern: str) -> bool:
    """A target matches a module by its full name, a dotted suffix, or a full-name regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def candidate_layers(model: nn.Module, exclude: list[str]) -> dict[str, nn.Module]:
    """Every Linear / Conv1D outside the task head, by full name."""
    return {n: m for n, m in model.named_modules()
            if is_layer(m) and not any(n == e or n.startswith(e + ".") for e in exclude)}


def output_layers(model: nn.Module) -> set[str]:
    """The pretrained output layer of a language model (`lm_head`): adapted only when named."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def folded(names) -> str:
    """Layer names with their indices folded (`encoder.layer.N.attention.self.query`), distinct, sorted."""
    return ", ".join(sorted({re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names}))


def find_targets(model: nn.Module, target_modules, default_roles, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """The layers a method wraps, in model order: each `target_modules` entry (a role name, `all-linear`,
    a full name, a dotted suffix or a full-name regex) must match some layer; without entries, the
    method's default roles that the model has. Never the task head."""
    layers = candidate_layers(model, exclude)
    roles = roles_of(layers)
    wanted: set[str] = set()

    def fail(what: str):
        has = f"roles found: {', '.join(roles)}" if roles else "no roles found"
        raise UserError(f"{what} ({has}; or all-linear); this model's Linear and Conv1D layers: {folded(layers)}")

    if not target_modules:
        for r in default_roles:
            wanted.update(roles.get(r, []))
        if not wanted:
            fail(f"method.target_modules is unset and this {model_type(model)} model has none of the default roles "
                 f"{', '.join(default_roles)}: set method.target_modules")
    embeddings = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and not any(n == e or n.startswith(e + ".") for e in exclude)}
    for t in target_modules or []:
        if t == ALL_LINEAR:
            hit = set(layers) - output_layers(model)
        elif t in ROLE_NAMES and t in roles:
            hit = set(roles[t])
        else:  # a name, suffix or regex; one that matches no layer may name an embedding (`embed_tokens`)
            hit = {n for n in layers if matches(n, t)} or {n for n in embeddings if matches(n, t)}
        if not hit:
            fail(f"method.target_modules entry '{t}' matches no Linear layer")
        wanted |= hit
    return [(n, m) for n, m in model.named_modules() if n in wanted]


def untie_output_embeddings(model: nn.Module, embedding: nn.Embedding) -> None:
    """Give the output layer its own copy of a tied input embedding, so that adapting (and merging
    into) the input embedding leaves the LM head as pretrained; the config then says untied, so a
    merged model saves and loads both."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is embedding.weight:
        out.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=out.weight.requires_grad)
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        if text is not None:
            text.tie_word_embeddings = False


def model_type(model: nn.Module) -> str | None:
    """transformers' model type (`bert`, `llama`, ...); None for a plain torch module."""
    return getattr(getattr(model, "config", None), "model_type", None)
