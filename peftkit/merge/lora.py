"""LoRA adapters out of other adapters: exact concatenation, or an SVD truncated to a rank.

- concat: LoRA-family adapters (lora, rslora; PiSSA-initialised too) side by side. With
  ΔWᵢ = sᵢ BᵢAᵢ, Σ wᵢ ΔWᵢ = [w₁s₁B₁ | w₂s₂B₂ | ...] [A₁; A₂; ...]: one LoRA of rank Σrᵢ and
  scaling 1, exactly. A PiSSA adapter's update, relative to the original W, is s(BA − B₀A₀), so it
  brings rank 2r.
- svd: Σ wᵢ τᵢ over any mergeable adapters (their task vectors, as in `combine`), and per Linear
  the best rank-r approximation U_r S_r V_rᵀ (Eckart–Young), as B = U_r √S_r, A = √S_r V_rᵀ. The
  relative Frobenius error ‖ΔW − ΔW_r‖ / ‖ΔW‖ is reported per layer and overall. Changes a LoRA
  cannot hold (biases, norms, embeddings: full fine-tuning, BitFit) are dropped and reported.
Both write a run-shaped folder whose adapter is a plain `lora` (init kaiming, alpha = r).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from peftkit import model
from peftkit.errors import UserError
from peftkit.merge import sources
from peftkit.merge.combine import TaskVector, check_knobs, combine_heads, describe, task_vectors
from peftkit.methods.base import AdapterLinear, adapter_tensors
from peftkit.methods.lora import LoraLinear, PissaLinear, change_factors
from peftkit.methods.targets import Conv1D, features, is_layer


def lora_factors(a: model.Adapted, weight: float) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per wrapped Linear, (B', A') pairs with Σ B'A' = weight · ΔW relative to the original W."""
    out = {}
    for name, m in a.model.named_modules():
        if not isinstance(m, AdapterLinear):
            continue
        if type(m) not in (LoraLinear, PissaLinear):
            raise UserError(f"concat joins LoRA adapters (lora, rslora); this one has {type(m).__name__} layers "
                            f"({a.method.name}); use mode=svd, which takes any mergeable method")
        out[name] = [(weight * b, a_) for b, a_ in change_factors(m)]
    return out


def lora_adapter(bb: dict, labels, rank: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 head: dict[str, torch.Tensor], task: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and meta of a `lora` adapter (alpha = r: scaling 1) holding B, A per module, plus the head.

    Built and loaded into a real model first, so what is written is known to load.
    """
    method = {"name": "lora", "r": rank, "alpha": float(rank), "dropout": 0.0, "rslora": False, "init": "kaiming",
              "target_modules": sorted(factors)}
    a = model.build(OmegaConf.create(bb), method, labels, task)
    tensors = adapter_tensors(a.model)
    out = {}
    for name, (b, a_) in factors.items():
        out[f"{name}.lora_B"], out[f"{name}.lora_A"] = b, a_
    for n, t in head.items():
        out[n] = t
    missing = sorted(set(a.trainable) - set(out))
    if missing:
        raise UserError(f"the combined LoRA lacks {missing[:3]}; the head or targets differ between the adapters")
    with torch.no_grad():
        for n in a.trainable:
            tensors[n].copy_(out[n])
    return {n: out[n] for n in a.trainable}, model.meta(a, OmegaConf.create(bb), labels, None, task)


def concat(cfg: DictConfig, paths: list[str], weights: list[float]):
    loaded, per_module = [], {}
    for path, w in zip(paths, weights):
        a, meta = sources.load(path, cfg.get("backbone_path"))
        if loaded:
            sources.check_same_base([paths[0], path], [loaded[0].meta, meta])
        for name, pairs in lora_factors(a, w).items():
            per_module.setdefault(name, []).extend(pairs)
        head = {n: t.detach().clone() for n, t in a.model.state_dict().items() if any(n.startswith(h + ".") for h in meta["head"])}
        loaded.append(TaskVector(str(path), meta, {}, head))
    rank = max(sum(b.shape[1] for b, _ in pairs) for pairs in per_module.values())
    factors = {}
    for name, pairs in per_module.items():
        b, a_ = torch.cat([b for b, _ in pairs], 1), torch.cat([a_ for _, a_ in pairs], 0)
        pad = rank - b.shape[1]  # a module some adapters leave alone: zero columns / rows
        factors[name] = (torch.cat([b, b.new_zeros(b.shape[0], pad)], 1), torch.cat([a_, a_.new_zeros(pad, a_.shape[1])], 0))
    return loaded, rank, factors, {}


def svd(cfg: DictConfig, paths: list[str], weights: list[float]):
    rank = int(cfg.rank)
    vectors, base, _ = task_vectors(paths, cfg.get("backbone_path"))
    layers = {n: m for n, m in base.named_modules() if is_layer(m)}
    names = sorted({n for v in vectors for n in v.delta})
    most = max((min(features(layers[n.removesuffix(".weight")])) for n in names
                if n.endswith(".weight") and n.removesuffix(".weight") in layers), default=0)
    if rank > most > 0:  # the zero-padded factors of a rank past every layer's size only take memory
        raise UserError(f"rank={rank} is more than a LoRA of these layers can hold: a layer's rank is at most "
                        f"its smaller side, {most} at the largest here; pick rank between 1 and {most}")
    factors, errors, dropped = {}, {}, {}
    total_err = total_norm = 0.0
    for n in names:
        delta = sum(w * v.delta[n] for w, v in zip(weights, vectors) if n in v.delta)
        module = n.removesuffix(".weight")
        if not (n.endswith(".weight") and module in layers):
            dropped[n] = delta.norm().item()
            continue
        if isinstance(layers[module], Conv1D):  # stored in×out; a LoRA's B A is out×in
            delta = delta.t()
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
        a_ = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
        b[:, :k], a_[:k] = (u[:, :k] * root).to(delta.dtype), (root[:, None] * vh[:k]).to(delta.dtype)
        factors[module] = (b, a_)
        tail, norm = (s[k:] ** 2).sum().item(), (s**2).sum().item()
        errors[module] = math.sqrt(tail / norm) if norm else 0.0
        total_err, total_norm = total_err + tail, total_norm + norm
    if not factors:
        raise UserError("the adapters change no Linear weight, so there is nothing for a LoRA to hold")
    info = {"rank": rank, "relative_frobenius_error": math.sqrt(total_err / total_norm) if total_norm else 0.0,
            "relative_frobenius_error_per_layer": errors}
    if dropped:
        info["dropped"] = {"tensors": len(dropped), "norm": math.sqrt(sum(v * v for v in dropped.values())),
                           "note": "changes to non-Linear tensors (biases, norms, embeddings) a LoRA cannot hold"}
    return vectors, rank, factors, info


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    paths = list(cfg.adapters)
    if not paths:
        raise UserError("adapters=[...] is empty; give the adapter folders or run directories to combine")
    weights = check_knobs(cfg, len(paths))
    vectors, rank, factors, info = (concat if cfg.mode == "concat" else svd)(cfg, paths, weights)
    head, labels = combine_heads(vectors, weights, cfg.head)
    head_source = next((v for v in vectors if v.meta["label_names"] == labels), vectors[0])
    bb = dict(head_source.meta["backbone"])
    if cfg.get("backbone_path"):
        bb["path"] = cfg.backbone_path
    tensors, meta = lora_adapter(bb, labels, rank, factors, head, head_source.meta.get("task_type"))
    info = {"mode": cfg.mode, "head": str(cfg.head), "adapters": describe(vectors, weights), **info}
    meta = {**meta, "backbone": head_source.meta["backbone"], "dataset": head_source.meta.get("dataset"),
            "seed": head_source.meta.get("seed"), "merge": info}
    sources.write_adapter_run(Path(cfg.out), tensors, meta, sources.run_dir(head_source.path))
    show(cfg, rank, info)
    return info


def show(cfg: DictConfig, rank: int, info: dict) -> None:
    msg = f"{cfg.mode}: a rank-{rank} LoRA from {len(info['adapters'])} adapters → {cfg.out}"
    if cfg.mode == "svd":
        per = info["relative_frobenius_error_per_layer"]
        table = Table(title=f"rank {rank}: relative Frobenius error of ΔW", title_justify="left")
        table.add_column("layer")
        table.add_column("‖ΔW − ΔW_r‖ / ‖ΔW‖", justify="right")
        for name, e in per.items():
            table.add_row(name, f"{e:.4f}")
        table.add_row("[bold]all layers[/]", f"[bold]{info['relative_frobenius_error']:.4f}[/]")
        sources.console.print(table)
        if "dropped" in info:
            d = info["dropped"]
            sources.console.print(f"[yellow]dropped {d['tensors']} changed tensors a LoRA cannot hold (norm {d['norm']:.3g})[/]")
    sources.console.print(msg)
