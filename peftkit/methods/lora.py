"""LoRA (Hu et al., 2021): y = W x + s · B A x, with A: r×in, B: out×r, B = 0 at init.

s = alpha / r, or alpha / sqrt(r) with `rslora` (Kalajdzievski, 2023), which keeps the update's
scale stable as r grows; `rslora` is also its own method name. `init: pissa` (Meng et al., 2024)
starts A and B on W's top-r singular directions and freezes the residual instead of W.
Merges exactly: W' = W + s · B A.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, PackedLinear, compute_dtype, hooked, linear_rows, packed_weights, register

INITS = ("kaiming", "gaussian", "pissa")


def check_options(c, method: str, inits: tuple[str, ...]) -> None:
    """LoRA's options that need no model (also DoRA's, with its own inits); r ≤ min(out, in) for
    PiSSA needs the layer and is checked there."""
    _checks.at_least("r", c.r)
    _checks.one_of(f"{method} init", c.init, inits)
    _checks.positive("alpha", c.alpha)
    _checks.dropout(c.dropout)


class LoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__(base_layer)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init_factors(init)

    @torch.no_grad()
    def init_factors(self, init: str) -> None:
        if init == "kaiming":  # as torch's nn.Linear, and peft's default
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.lora_A.shape[0])
        else:
            raise UserError(f"unknown lora init '{init}'; choose one of: kaiming, gaussian")

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if type(self.dropout) is nn.Identity and fusable(self.base_layer):
            return low_rank_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling)
        y = self.base_layer(x)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def fusable(base: nn.Module) -> bool:
    """Whether `low_rank_linear` may stand in for this base layer's call: a plain frozen Linear that
    no hook watches."""
    return (type(base) in (nn.Linear, PackedLinear) and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad) and not hooked(base))


def low_rank_linear(x: torch.Tensor, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x Wᵀ + b + s · (x Aᵀ) Bᵀ for a frozen W, as one autograd node: the low-rank product is added into
    the base output by `addmm` and, in the gradient, x's two parts are summed the same way, so no
    pass over (tokens × features) scales or adds them (1.04x a bf16 SST-2 step on CPU,
    `scripts/bench_lever.py low_rank`). Under autocast everything runs in its dtype, as `F.linear` would."""
    dtype = compute_dtype(x)
    bias = None if base.bias is None else base.bias.to(dtype)
    packs = packed_weights(base, x)  # a PackedLinear's W and Wᵀ, packed once (methods.base.PackedLinear)
    with torch.autocast(x.device.type, enabled=False):
        return _LowRankLinear.apply(x.to(dtype), base.weight.to(dtype), bias, A.to(dtype), B.to(dtype), scaling, packs)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, packs=None):
        rows = x.reshape(-1, x.shape[-1])
        if packs is not None:
            y = linear_rows(rows, packs.w(), bias)
        else:
            y = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        h = rows @ A.t()
        y.addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(rows, weight, A, B, h)
        ctx.scaling, ctx.shape, ctx.packs = scaling, x.shape, packs
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight, A, B, h = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1])
            gh = (g @ B).mul_(ctx.scaling)  # the gradient at h = x Aᵀ
            if ctx.needs_input_grad[0]:
                base = g @ weight if ctx.packs is None else linear_rows(g, ctx.packs.t())
                grad_x = base.addmm_(gh, A).view(ctx.shape)
            else:
                grad_x = None
            grad_A = gh.t() @ rows if ctx.needs_input_grad[3] else None
            grad_B = (g.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_A, grad_B, None, None


class LoraEmbedding(AdapterLinear):
    """LoRA on an embedding table, as peft's: E' = E + s · (B A)ᵀ with A: r×vocab at zero and B: dim×r
    normal, so the model starts unchanged; a token looks up its column of A. (The layer's `init` and
    dropout are for Linears; peft's embedding LoRA has neither.) An embedding that scales its output
    (Gemma's `embed_scale`) scales the update too, so merging is exact."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, rslora: bool):
        super().__init__(base_layer)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base_layer.weight
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings, dtype=w.dtype, device=w.device))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r, dtype=w.dtype, device=w.device))
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        e = self.base_layer
        rows = F.embedding(x, self.lora_embedding_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return y + (rows @ self.lora_embedding_B.T) * (self.scaling * getattr(e, "embed_scale", 1.0))


class PissaLinear(LoraLinear):
    """LoRA started on W's principal part (PiSSA): the frozen base holds the residual W − s · B₀ A₀.

    With W = U S Vᵀ: A₀ = √(S_r/s) V_rᵀ and B₀ = U_r √(S_r/s), so s · B₀ A₀ = U_r S_r V_rᵀ, W's best
    rank-r approximation, and the model starts as W. A₀ and B₀ are saved with the adapter, and the
    residual is formed from them on first use (forward or merge) rather than at construction:
    reloading rebuilds the model (a fresh SVD, whose last bits may differ) and then copies in the
    saved factors, so the residual formed afterwards is bit for bit the one the adapter trained on.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__(base_layer, r, alpha, dropout, rslora, init="pissa")

    @torch.no_grad()
    def init_factors(self, init: str) -> None:
        w = self.base_layer.weight
        r = self.lora_A.shape[0]
        if r > min(w.shape):
            raise UserError(f"pissa needs r ≤ min(out, in) = {min(w.shape)} for every target, got r={r}")
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        root = (s[:r] / self.scaling).sqrt()
        self.register_buffer("lora_A_initial", (root[:, None] * vh[:r]).to(w.dtype))
        self.register_buffer("lora_B_initial", (u[:, :r] * root).to(w.dtype))
        self.lora_A.copy_(self.lora_A_initial)
        self.lora_B.copy_(self.lora_B_initial)
        self.residual_formed = False

    @torch.no_grad()
    def form_residual(self) -> None:
        if self.residual_formed:
            return
        w = self.base_layer.weight
        with torch.autocast(w.device.type, enabled=False):
            principal = (self.lora_B_initial.float() @ self.lora_A_initial.float()) * self.scaling
        w.copy_((w.float() - principal).to(w.dtype))
        self.residual_formed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.form_residual()
        return super().forward(x)

    def merge(self) -> None:
        self.form_residual()
        super().merge()


def change_factors(m: LoraLinear) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B', A') pairs, scaling in B', whose Σ B'A' is the layer's change from the original W: s·BA for
    LoRA; for PiSSA, whose base holds W − s·B₀A₀, also (−s·B₀, A₀). Merges, concat and serving read these."""
    pairs = [(m.scaling * m.lora_B.detach(), m.lora_A.detach())]
    if isinstance(m, PissaLinear):
        pairs.append((-m.scaling * m.lora_B_initial, m.lora_A_initial))
    return pairs


@register
class LoRA(Method):
    name = "lora"
    mergeable = True
    # The pooler (dense + tanh on [CLS]) is pretrained for a task the backbone may never have used;
    # left frozen it can starve the head (LoRA on q,v of MiniLM scores 8 on STS-B; with the pooler, 80).
    default_roles = ("query", "value", "pooler")

    @dataclasses.dataclass
    class Config:
        r: int = 8
        alpha: float = 16
        dropout: float = 0.0
        rslora: bool = False
        init: str = "kaiming"
        target_modules: list[str] | None = None

        def __post_init__(self):
            check_options(self, "lora", INITS)

    embeddings = True

    def wrap(self, linear):
        c = self.cfg
        if isinstance(linear, nn.Embedding):
            if c.init == "pissa":
                raise UserError("pissa starts from a Linear's singular vectors; drop the embedding from method.target_modules")
            return LoraEmbedding(linear, c.r, c.alpha, c.rslora)
        if c.init == "pissa":
            return PissaLinear(linear, c.r, c.alpha, c.dropout, c.rslora)
        return LoraLinear(linear, c.r, c.alpha, c.dropout, c.rslora, c.init)


@register
class RsLoRA(LoRA):
    """rsLoRA (Kalajdzievski, 2023) under its own name: LoRA scaled by alpha/√r, so a larger r keeps learning."""

    name = "rslora"

    @dataclasses.dataclass
    class Config(LoRA.Config):
        rslora: bool = True
