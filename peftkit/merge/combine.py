"""Combine adapters of one base through their task vectors: task arithmetic, TIES, DARE.

An adapter's task vector τ is what it changes in the base weights: fold it in (`into_base`) and
subtract the base. That one definition serves every mergeable method, additive (LoRA: τ = s·BA)
or multiplicative (IA³, OFT, DoRA), and full fine-tuning. The result is a plain transformers
folder, base + combined τ, with the heads combined by `head`.

- task arithmetic (Ilharco et al., 2023): τ = Σ wᵢ τᵢ; a negative weight subtracts a behaviour.
- TIES (Yadav et al., 2023): keep each wᵢτᵢ's top-`density` entries by magnitude (per tensor),
  elect each entry's sign as that of the kept values' sum, and average the kept values that
  agree with it (zeros and dissenters do not count).
- DARE (Yu et al., 2024): keep each entry of wᵢτᵢ with probability `density` and divide by
  `density`, so the expected update is unchanged; then add (or, with `elect_sign`, combine as TIES
  does without its trim).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from peftkit import tasks
from peftkit.errors import UserError
from peftkit.merge import sources
from peftkit.merge.into_base import refuse_unmergeable
from peftkit.methods.base import merge_into_base


@dataclass
class TaskVector:
    path: str
    meta: dict  # the adapter's config
    delta: dict[str, torch.Tensor]  # base weight name -> folded − base (only the tensors it changes)
    head: dict[str, torch.Tensor]  # head tensors, as trained


@torch.no_grad()
def task_vectors(paths: list[str], backbone_path: str | None = None):
    """The task vectors of `paths`, the plain base model they share (with a fresh head), and its tokenizer."""
    if not paths:
        raise UserError("adapters=[...] is empty; give the adapter folders or run directories to combine")
    vectors, base, tokenizer = [], None, None
    for path in paths:
        refuse_unmergeable(path)
    for path in paths:
        a, meta = sources.load(path, backbone_path)
        if vectors:
            sources.check_same_base([vectors[0].path, path], [vectors[0].meta, meta])
        folded = merge_into_base(a.model)
        if base is None:
            bb = OmegaConf.create(meta["backbone"])
            if backbone_path:
                bb.path = backbone_path
            base = base_model(meta, backbone_path, meta["label_names"])
            base_state = base.state_dict()
            tokenizer = a.tokenizer
        head = {n: t.clone() for n, t in folded.state_dict().items() if any(n.startswith(h + ".") for h in meta["head"])}
        delta = {}
        for n, t in folded.state_dict().items():
            if n in head or not t.is_floating_point():
                continue
            d = t - base_state[n]
            if d.any():
                delta[n] = d
        vectors.append(TaskVector(str(path), meta, delta, head))
        del a, folded
    return vectors, base, tokenizer


def base_model(meta: dict, backbone_path: str | None, labels: list[str] | None) -> torch.nn.Module:
    """The plain base an adapter was trained on, loaded as its task type loads it (a fresh head for `labels`)."""
    bb = OmegaConf.create(meta["backbone"])
    if backbone_path:
        bb.path = backbone_path
    return tasks.get(meta.get("task_type")).load_model(bb, labels)


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its ceil(density · numel) largest-magnitude entries set to 0."""
    k = max(1, int(-(-density * t.numel() // 1)))
    if k >= t.numel():
        return t.clone()
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[t.abs().flatten().topk(k).indices] = True
    return t * keep.view_as(t)


def elect_and_average(stacked: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean over the first dimension."""
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(deltas: list[torch.Tensor], weights: list[float], mode: str, density: float = 1.0,
            generator: torch.Generator | None = None, elect_sign: bool = False) -> torch.Tensor:
    """One tensor's combined update from each adapter's τ (zeros where an adapter leaves it alone)."""
    scaled = [w * d for w, d in zip(weights, deltas)]
    if mode == "task_arithmetic":
        return torch.stack(scaled).sum(0)
    if mode == "ties":
        return elect_and_average(torch.stack([trim(d, density) for d in scaled]))
    if mode == "dare":
        dropped = [d * (torch.rand(d.shape, generator=generator) < density).to(d.dtype) / density for d in scaled]
        return elect_and_average(torch.stack(dropped)) if elect_sign else torch.stack(dropped).sum(0)
    raise UserError(f"unknown combination '{mode}'; choose one of: task_arithmetic, ties, dare")


def check_knobs(cfg: DictConfig, n: int) -> list[float]:
    """The weights (null: 1.0 each; `average`: 1/n each; or one per adapter; `schema` checked their form)."""
    given = cfg.get("weights")
    if given is None:
        return [1.0] * n
    if given == "average":
        return [1.0 / n] * n
    if len(given) != n:
        raise UserError(f"weights has {len(given)} values for {n} adapters; give one per adapter")
    return [float(w) for w in given]


def combined_deltas(vectors: list[TaskVector], weights: list[float], cfg: DictConfig) -> dict[str, torch.Tensor]:
    mode = cfg.get("combine", cfg.mode)
    generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    names = sorted({n for v in vectors for n in v.delta})
    out = {}
    for n in names:
        like = next(v.delta[n] for v in vectors if n in v.delta)
        deltas = [v.delta.get(n, torch.zeros_like(like)) for v in vectors]
        out[n] = combine(deltas, weights, mode, cfg.get("density", 1.0), generator, bool(cfg.get("elect_sign", False)))
    return out


def combine_heads(vectors: list[TaskVector], weights: list[float], head) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """`head=mean`: the heads' mean weighted by the positive weights (one label set); `head=i`: adapter i's."""
    if str(head) != "mean":
        try:
            i = int(head)
            chosen = vectors[i]
        except (ValueError, IndexError):
            raise UserError(f"head must be mean or an adapter index 0..{len(vectors) - 1}, got '{head}'") from None
        return chosen.head, chosen.meta["label_names"]
    labels = vectors[0].meta["label_names"]
    for v in vectors[1:]:
        if v.meta["label_names"] != labels or v.head.keys() != vectors[0].head.keys():
            raise UserError(
                f"the adapters' heads predict different labels ({vectors[0].path}: {labels}; {v.path}: "
                f"{v.meta['label_names']}), so head=mean cannot average them; pass head=INDEX (0..{len(vectors) - 1}) "
                f"to keep one adapter's head"
            )
    positive = [max(w, 0.0) for w in weights]
    if sum(positive) == 0:
        raise UserError("head=mean averages the heads of adapters with a positive weight, and none has one; pass head=INDEX")
    return {n: sum(p * v.head[n] for p, v in zip(positive, vectors)) / sum(positive) for n in vectors[0].head}, labels


def describe(vectors: list[TaskVector], weights: list[float]) -> list[dict]:
    return [{"adapter": str(Path(v.path).resolve()), "method": v.meta["method"]["name"], "dataset": v.meta.get("dataset"), "weight": w}
            for v, w in zip(vectors, weights)]


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    paths = list(cfg.adapters)
    weights = check_knobs(cfg, len(paths))
    vectors, base, tokenizer = task_vectors(paths, cfg.get("backbone_path"))
    deltas = combined_deltas(vectors, weights, cfg)
    head, labels = combine_heads(vectors, weights, cfg.head)
    if labels != vectors[0].meta["label_names"]:  # the base was loaded with the first adapter's labels
        base = base_model(vectors[0].meta, cfg.get("backbone_path"), labels)
    state = base.state_dict()
    for n, d in deltas.items():
        state[n] += d.to(state[n].dtype)
    for n, t in head.items():
        state[n].copy_(t)
    knobs = {k: cfg[k] for k in ("density", "seed", "elect_sign") if k in cfg and cfg.mode != "task_arithmetic"}
    info = {"mode": cfg.mode, **knobs, "head": str(cfg.head), "adapters": describe(vectors, weights),
            "tensors_changed": len(deltas)}
    head_meta = next((v.meta for v in vectors if v.meta["label_names"] == labels), vectors[0].meta)
    meta = {**head_meta, "method": {"name": cfg.mode},
            "dataset": ", ".join(sorted({str(v.meta.get("dataset")) for v in vectors})), "label_names": labels,
            "metrics": {}, "merge": info}
    sources.write_model(Path(cfg.out), base, tokenizer, meta)
    sources.console.print(f"{cfg.mode}: {len(vectors)} adapters, {len(deltas)} base tensors changed → {cfg.out}")
    return info
