"""AdaLoRA (Zhang et al., 2023): an SVD-shaped update whose rank budget moves to the layers that need it.

ΔW = s · P diag(λ) Q with P: out×r, λ: r, Q: r×in, s = alpha / init_r; λ starts at 0, so the
model starts unchanged. Each triplet (P[:, i], λ_i, Q[i]) has an importance score from the
smoothed sensitivity |θ·∂L/∂θ| of its entries times its uncertainty. After warm-up the total
number of kept triplets falls from init_r to target_r per layer on a cubic schedule; the least
important are pruned by zeroing λ_i and recording them in the `rank_mask` buffer (saved with the
adapter; a pruned triplet may return at a later allocation until the final phase fixes the
mask). A penalty γ·‖PᵀP − I‖² + γ·‖QQᵀ − I‖² keeps P and Q near-orthogonal, so λ behaves like
singular values. Merges exactly: W' = W + s · P diag(λ) Q.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register


class SvdLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base_layer)
        self.scaling = alpha / r
        w = base_layer.weight
        like = {"dtype": w.dtype, "device": w.device}
        self.lora_P = nn.Parameter(nn.init.normal_(torch.empty(self.out_features, r, **like), std=0.02))
        self.lora_lambda = nn.Parameter(torch.zeros(r, **like))
        self.lora_Q = nn.Parameter(nn.init.normal_(torch.empty(r, self.in_features, **like), std=0.02))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # in checkpoints, not in the adapter

    def factors(self) -> dict[str, nn.Parameter]:
        return {"P": self.lora_P, "lambda": self.lora_lambda, "Q": self.lora_Q}

    def delta_weight(self) -> torch.Tensor:
        return self.lora_P @ (self.lora_lambda[:, None] * self.lora_Q) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_lambda[:, None] * self.lora_Q), self.lora_P) * self.scaling

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Smooth each entry's sensitivity |θ·∂L/∂θ| (EMA β1) and its uncertainty |sensitivity − EMA| (EMA β2)."""
        for name, p in self.factors().items():
            if p.grad is None:
                continue
            sensitivity = (p * p.grad).abs()
            if name not in self.importance:
                self.importance[name] = (torch.zeros_like(p), torch.zeros_like(p))
            smoothed, uncertainty = self.importance[name]
            smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """Per triplet: score(λ_i) + mean score(P[:, i]) + mean score(Q[i]), score = smoothed × uncertainty."""
        total = torch.zeros_like(self.lora_lambda)
        for name, dim in (("lambda", None), ("P", 0), ("Q", 1)):
            if name in self.importance:
                s = self.importance[name][0] * self.importance[name][1]
                total += s if dim is None else s.mean(dim)
        return total

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_lambda.masked_fill_(~self.rank_mask, 0.0)

    def orthogonality_penalty(self) -> torch.Tensor:
        p, q = self.lora_P, self.lora_Q
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return ((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum()


def budget_at(step: int, total_steps: int, init_budget: int, target_budget: int, tinit: int, tfinal: int) -> int:
    """Triplets kept after `step`: init_budget through warm-up, then a cubic fall to target_budget
    at `total_steps - tfinal`, where it stays (AdaLoRA's eq. 12)."""
    final_start = total_steps - tfinal
    if step <= tinit:
        return init_budget
    if step >= final_start:
        return target_budget
    remaining = 1 - (step - tinit) / (final_start - tinit)
    return target_budget + int((init_budget - target_budget) * remaining**3)


def as_steps(value: float, total_steps: int) -> int:
    """tinit/tfinal: below 1 a fraction of the run, otherwise a number of steps."""
    return round(value * total_steps) if value < 1 else int(value)


@torch.no_grad()
def allocate(layers: list[SvdLinear], budget: int) -> None:
    """Keep the `budget` highest-scoring triplets across all layers (ties: earlier first), mask the rest."""
    device = layers[0].rank_mask.device
    scores = torch.cat([m.triplet_scores().float().to(device) for m in layers])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:budget]] = True
    for m, mask in zip(layers, keep.split([m.rank_mask.numel() for m in layers])):
        m.rank_mask.copy_(mask)


@register
class AdaLoRA(Method):
    name = "adalora"
    mergeable = True
    default_roles = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

    @dataclasses.dataclass
    class Config:
        init_r: int = 12
        target_r: int = 8  # average over the adapted layers
        alpha: float = 16
        dropout: float = 0.0
        tinit: float = 0.1
        tfinal: float = 0.2
        allocate_every: int = 1
        beta1: float = 0.85
        beta2: float = 0.85
        orth_reg_weight: float = 0.1
        target_modules: list[str] | None = None

        def __post_init__(self):
            # whether tinit and tfinal leave steps to prune in needs the run's length: after_optimizer_step
            _checks.at_least("init_r", self.init_r)
            if not 1 <= self.target_r <= self.init_r:
                raise UserError(f"method.target_r must be between 1 and init_r={self.init_r}, got {self.target_r}")
            _checks.positive("alpha", self.alpha)
            _checks.dropout(self.dropout)
            for key in ("tinit", "tfinal"):
                v = getattr(self, key)
                if v < 0 or (v >= 1 and v != int(v)):
                    raise UserError(f"method.{key} must be a fraction of the run in [0, 1) or a whole number of steps, got {v}")
            _checks.at_least("allocate_every", self.allocate_every)
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise UserError(f"method.beta1 and beta2 must lie in (0, 1), got beta1={self.beta1}, beta2={self.beta2}")
            _checks.non_negative("orth_reg_weight", self.orth_reg_weight)

    def apply(self, model, exclude):
        super().apply(model, exclude)

    def aux_loss(self, model):
        """γ · the mean over adapted layers of ‖PᵀP − I‖² + ‖QQᵀ − I‖², added to the training loss
        (peft adds it too) of any task type; never to an evaluation loss."""
        active = [m for m in svd_layers(model) if not m.merged]
        if self.cfg.orth_reg_weight == 0 or not active:
            return None
        return self.cfg.orth_reg_weight * torch.stack([m.orthogonality_penalty() for m in active]).mean()

    def wrap(self, linear):
        c = self.cfg
        return SvdLinear(linear, c.init_r, c.alpha, c.dropout)

    def after_optimizer_step(self, model, step, total_steps):
        c = self.cfg
        adapted = svd_layers(model)
        tinit, tfinal = as_steps(c.tinit, total_steps), as_steps(c.tfinal, total_steps)
        final_start = total_steps - tfinal
        if tinit >= final_start:
            raise UserError(f"method.tinit ({tinit} steps) and tfinal ({tfinal} steps) leave no steps to "
                            f"allocate ranks in a {total_steps}-step run; lower them")
        target = c.target_r * len(adapted)
        if step < final_start:
            for m in adapted:
                m.update_importance(c.beta1, c.beta2)
            if step > tinit and step % c.allocate_every == 0:
                allocate(adapted, budget_at(step, total_steps, c.init_r * len(adapted), target, tinit, tfinal))
        elif step == final_start:  # the final allocation: fixed from here on
            allocate(adapted, target)
            for m in adapted:
                m.importance.clear()
        for m in adapted:
            m.apply_mask()

    def training_state(self, model):
        return {f"{name}.importance.{factor}.{i}": t for name, m in model.named_modules() if isinstance(m, SvdLinear)
                for factor, pair in m.importance.items() for i, t in enumerate(pair)}

    def load_training_state(self, model, tensors):
        for name, m in model.named_modules():
            if isinstance(m, SvdLinear):
                m.importance = {f: (tensors[f"{name}.importance.{f}.0"].to(m.lora_P.device),
                                    tensors[f"{name}.importance.{f}.1"].to(m.lora_P.device))
                                for f in m.factors() if f"{name}.importance.{f}.0" in tensors}


def svd_layers(model: nn.Module) -> list[SvdLinear]:
    return [m for m in model.modules() if isinstance(m, SvdLinear)]
