"""Mixture-of-experts LoRA: MoELoRA (Luo et al., 2024), SiRA (Zhu et al., 2023), MoLA (Gao et al., 2024).

Per adapted Linear, E LoRA experts (A_e: r×in, B_e: out×r) and a router R: E×in (no bias) over
each token x; the token uses its top k experts, their softmax probabilities renormalised over the k:

    p = softmax(R x),   g_e = p_e / Σ_{j∈topk} p_j  (e ∈ topk, else 0),   y = W x + s Σ_e g_e B_e A_e x

with s = alpha / r. The experts are held as one LoRA of rank E·r (expert e owns rows e·r … e·r+r−1
of A and those columns of B) whose rank groups are scaled by the gates, so every expert runs densely:
cheap at these ranks, and every expert gets a (possibly zero) gradient each step. B = 0 at init, so
the model starts unchanged. Not mergeable: the experts a token uses depend on the token.

Training-time options: a Switch-style load-balancing loss E · Σ_e f_e P_e (f_e: the share of the
layer's top-k choices that went to e, P_e: e's mean router probability; averaged over layers, added
to the training loss through `Method.aux_loss`); SiRA's capacity (each expert takes at most
ceil(capacity_factor · tokens · k / E) tokens per layer and batch, the first in batch order; the
rest lose that expert) and expert dropout (torch's dropout on the gate vector). Both act in
training only, so an example's output never depends on its batch or on the KV cache's steps. MoLA:
`num_experts` may list one count per transformer layer.

Which tokens are real comes from the `attention_mask` the model is called with (a model-level
hook); padding then takes no capacity and counts in no statistic. Packed causal-LM rows have no
mask: there the few padding tokens at a row's end count as tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import Method, register, replace_module
from peftkit.methods.lora import LoraLinear


class MoeLoraLinear(LoraLinear):
    """E LoRA experts of rank r held as one LoRA of rank E·r, whose rank groups each token's gates scale."""

    def __init__(self, base_layer: nn.Linear, num_experts: int, top_k: int, r: int, alpha: float, dropout: float,
                 capacity_factor: float | None = None, expert_dropout: float = 0.0):
        # LoRA's kaiming init of an (E·r)×in A is each expert's r×in init: the bound depends on in alone
        super().__init__(base_layer, num_experts * r, alpha, dropout, rslora=False, init="kaiming")
        self.scaling = alpha / r  # per expert, as each were a LoRA of rank r
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.capacity_factor, self.expert_dropout = capacity_factor, expert_dropout
        w = base_layer.weight
        self.router = nn.Linear(self.in_features, num_experts, bias=False, dtype=w.dtype, device=w.device)
        self.token_mask: torch.Tensor | None = None  # the model call's attention mask (set by `start_forward`)
        self.balance: torch.Tensor | None = None  # this forward's E·Σ f_e P_e, with its graph (training only)
        self.window: dict[str, torch.Tensor] = {}  # routing sums since `MoeLoRA.stats` last read them

    def delta_weight(self) -> torch.Tensor:
        raise UserError("moe_lora cannot be merged into the base weights: each token's router picks its experts, "
                        "so the update is no fixed weight")

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """One flag per token of x (flattened): from the attention mask when it has x's token layout
        (not the pooler's [CLS] batch, nor a cached decoding step), else every token."""
        m = self.token_mask
        if m is not None and m.dim() == 2 and tuple(m.shape) == tuple(x.shape[:-1]):
            return m.reshape(-1).to(device=x.device, dtype=torch.bool)
        return torch.ones(x.shape[:-1].numel(), dtype=torch.bool, device=x.device)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g: (..., E), each token's top-k softmax probabilities renormalised to sum to 1, zero elsewhere;
        in training also capped by capacity and dropped by expert dropout."""
        probs = self.router(x).float().softmax(-1).reshape(-1, self.num_experts)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        self.balance = None
        if self.training:
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
            real = self.real_tokens(x)
            kept = chosen
            if self.capacity_factor is not None:
                kept = within_capacity(chosen, real, self.capacity_factor, self.top_k)
                gates = gates * kept
            if self.expert_dropout > 0:
                gates = F.dropout(gates, self.expert_dropout, training=True)
            self.record(probs, chosen & real[:, None], kept & real[:, None], real)
        return gates.reshape(*x.shape[:-1], self.num_experts)

    def record(self, probs: torch.Tensor, chosen: torch.Tensor, kept: torch.Tensor, real: torch.Tensor) -> None:
        """This forward's balance loss (for the trainer's backward) and the log window's sums."""
        n = real.sum().clamp_min(1)
        share = chosen.sum(0) / (n * self.top_k)  # f_e: the router's choices, before capacity and dropout
        mean_p = (probs * real[:, None]).sum(0) / n  # P_e, differentiable: the loss trains the router
        self.balance = self.num_experts * (share * mean_p).sum()
        with torch.no_grad():
            sums = {"chosen": chosen.sum(0).double(), "dropped": (chosen & ~kept).sum().double(),
                    "entropy": (torch.special.entr(probs).sum(-1) * real).sum().double(),
                    "tokens": n.double(), "balance": self.balance.detach().double(), "forwards": torch.ones((), dtype=torch.float64, device=probs.device)}
            for k, v in sums.items():
                self.window[k] = self.window[k] + v if k in self.window else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = F.linear(self.dropout(x), self.lora_A)  # (..., E·r): every expert's A_e x
        g = self.gates(x).to(h.dtype)
        h = (h.unflatten(-1, (self.num_experts, self.r)) * g.unsqueeze(-1)).flatten(-2)
        return y + F.linear(h, self.lora_B) * self.scaling


def within_capacity(chosen: torch.Tensor, real: torch.Tensor, capacity_factor: float, top_k: int) -> torch.Tensor:
    """Which (token, expert) choices each expert takes: its first ceil(capacity_factor · T · k / E) real
    tokens in batch order, T the number of real tokens (SiRA's capacity; padding takes no place)."""
    chosen = chosen & real[:, None]
    capacity = torch.ceil(real.sum().double() * (capacity_factor * top_k / chosen.shape[1]))
    return chosen & (chosen.long().cumsum(0) <= capacity)


def start_forward(module, args, kwargs, layers: list[MoeLoraLinear]):
    """Model-level pre-hook: hand each MoE layer the call's attention mask, and clear the last
    forward's balance terms so `aux_loss` sees only this forward's."""
    mask = kwargs.get("attention_mask")
    for m in layers:
        m.token_mask, m.balance = mask, None


def end_forward(module, args, kwargs, output, layers: list[MoeLoraLinear]):
    for m in layers:
        m.token_mask = None


def layer_index(name: str) -> int | None:
    """The transformer layer a module sits in: the first number in its name (`encoder.layer.3.…`, `model.layers.3.…`)."""
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


@register
class MoeLoRA(Method):
    name = "moe_lora"
    positionwise = False  # the balance loss and routing statistics count every position
    mergeable = False
    default_roles = ("query", "value", "pooler")  # as lora

    @dataclasses.dataclass
    class Config:
        num_experts: int | list[int] = 4  # a list: one count per transformer layer (MoLA)
        top_k: int = 2
        r: int = 4
        alpha: float = 8
        dropout: float = 0.0
        aux_loss_weight: float = 0.01
        capacity_factor: float | None = None
        expert_dropout: float = 0.0
        target_modules: list[str] | None = None

        def __post_init__(self):
            counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
            if not counts or min(counts) < 1:
                raise UserError(f"method.num_experts must be a count of at least 1, or a list of them (one per layer), "
                                f"got {self.num_experts}")
            _checks.at_least("top_k", self.top_k)
            if self.top_k > min(counts):
                raise UserError(f"method.top_k must be at most num_experts ({min(counts)} in the smallest layer), got {self.top_k}")
            _checks.at_least("r", self.r)
            _checks.positive("alpha", self.alpha)
            _checks.dropout(self.dropout)
            _checks.non_negative("aux_loss_weight", self.aux_loss_weight)
            if self.capacity_factor is not None:
                _checks.positive("capacity_factor", self.capacity_factor)
            _checks.dropout(self.expert_dropout, "expert_dropout")

    def apply(self, model, exclude):
        c = self.cfg
        targets = self.targets(model, exclude)
        counts = self.expert_counts(model, [n for n, _ in targets])
        layers = []
        for name, linear in targets:
            layers.append(MoeLoraLinear(linear, counts[name], c.top_k, c.r, c.alpha, c.dropout, c.capacity_factor, c.expert_dropout))
            replace_module(model, name, layers[-1])
        model.register_forward_pre_hook(functools.partial(start_forward, layers=layers), with_kwargs=True)
        model.register_forward_hook(functools.partial(end_forward, layers=layers), with_kwargs=True)

    def expert_counts(self, model: nn.Module, names: list[str]) -> dict[str, int]:
        """E per target: the one count, or (MoLA) the count of the target's layer; a target outside
        the numbered layers (the pooler, above them) takes the last layer's."""
        n = self.cfg.num_experts
        if not isinstance(n, list):
            return dict.fromkeys(names, n)
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if layers is None:
            raise UserError("method.num_experts as a list needs the model's layer count (config.num_hidden_layers), "
                            "which this model does not give; set one number")
        if len(n) != layers:
            raise UserError(f"method.num_experts lists {len(n)} counts but this model has {layers} layers: "
                            f"give one count per layer, or one number for all")
        at = {name: layer_index(name) for name in names}
        return {name: n[-1 if i is None else i] for name, i in at.items()}

    def aux_loss(self, model):
        w = self.cfg.aux_loss_weight
        terms = [m.balance for m in moe_layers(model) if m.balance is not None]
        return w * torch.stack(terms).mean() if w > 0 and terms else None

    def stats(self, model):
        """Over the training forwards since the last call, averaged over layers: the busiest and the
        idlest expert's share of the top-k choices times E (1 = even), the router's entropy over
        log E (1 = uniform), the balance loss (unweighted) and, with a capacity, the share of choices
        it dropped."""
        windows = [(m.num_experts, m.window) for m in moe_layers(model) if m.window]
        for m in moe_layers(model):
            m.window = {}
        if not windows:
            return {}
        rows = []
        for e, w in windows:
            load = w["chosen"] / w["chosen"].sum().clamp_min(1) * e
            entropy = w["entropy"] / w["tokens"] / math.log(e) if e > 1 else torch.zeros_like(w["tokens"])
            rows.append(torch.stack([load.max(), load.min(), entropy, w["balance"] / w["forwards"],
                                     w["dropped"] / w["chosen"].sum().clamp_min(1)]))
        means = torch.stack(rows).mean(0).tolist()
        out = dict(zip(("moe_load_max", "moe_load_min", "moe_router_entropy", "moe_balance_loss"), means))
        if self.cfg.capacity_factor is not None:
            out["moe_capacity_dropped"] = means[4]
        return out


def moe_layers(model: nn.Module) -> list[MoeLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MoeLoraLinear)]
