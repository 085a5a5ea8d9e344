"""Several LoRA adapters of one base in one forward pass: each row of a batch uses its own adapter.

The serving pattern of S-LoRA (Sheng et al., 2023), Punica and peft's `adapter_names`: the base
weights are shared, and every adapted Linear holds all adapters' factors stacked,
A: (N+1, r_max, in) and B: (N+1, out, r_max), with each adapter's scaling folded into its B and
smaller ranks padded with zero rows / columns (they add nothing). For a batch whose row i uses
adapter idx[i], a layer computes

    y = W x + B[idx] (A[idx] x)

with two batched matmuls (`torch.bmm`) over the gathered factors: its cost grows with the rows and
r_max, never with how many adapters the batch mixes (no loop over adapters). Slot N holds zeros:
index −1 is the base model alone. A layer that some adapters leave alone has their slots at zero.

Classification heads differ per run: each Linear of the head becomes a `StackedLinear` holding every
run's weights (label counts padded with zero rows), gathered per row the same way; row i's logits
are the first `len(label_names[idx[i]])` of its output. A causal LM keeps its one LM head.

The per-row index is set for a batch with `Mixed.use(index)`; every stacked module reads it from
one shared `RowIndex`, so generation with the KV cache keeps each row's adapter for every step.

Loads lora and rslora adapters (PiSSA-initialised ones too: their change from the original W,
s·(BA − B₀A₀), is a LoRA of rank 2r, served on the original base) of one base (same fingerprint)
and one task type. Refused in one line: other methods, LoRA on embeddings, another base, mixed
task types, tensors other than the factors and the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.methods.base import AdapterLinear, replace_module
from peftkit.methods.lora import LoraLinear, PissaLinear, change_factors
from peftkit.methods.targets import as_linear, is_layer

METHODS = ("lora", "rslora")
BASE = -1  # the row index of the base model alone (the all-zero slot)


class RowIndex:
    """The current batch's adapter index per row, shared by every stacked module of one model (a
    plain object, not a module or buffer: one tensor that all layers read, set once per batch)."""

    def __init__(self):
        self.index: torch.Tensor | None = None

    def get(self, rows: int, where: str) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError(f"{where}: no adapter per row is set; run the model inside `with mixed.use(index):`")
        if self.index.shape[0] != rows:
            raise UserError(f"{where} sees {rows} rows but the batch's adapter index has {self.index.shape[0]}: this layer "
                            f"does not see the batch's rows (tokens flattened across rows?), so it cannot serve mixed batches")
        return self.index


def _bmm_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Row i of x (any shape (rows, ..., in)) times weight[i]ᵀ (weight: (rows, out, in)): (rows, ..., out)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.bmm(flat, weight.transpose(1, 2)).reshape(*x.shape[:-1], weight.shape[1])


class MultiLoraLinear(nn.Module):
    """A frozen Linear plus N LoRA adapters stacked: row i of the input gets adapter index[i]."""

    def __init__(self, base_layer: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, rows: RowIndex, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_A", lora_A)  # (N+1, r_max, in), slot N zero
        self.register_buffer("lora_B", lora_B)  # (N+1, out, r_max), scaling folded in, slot N zero
        self.rows = rows
        self.name = name

    def extra_repr(self) -> str:
        return f"adapters={self.lora_A.shape[0] - 1}, r_max={self.lora_A.shape[1]} (+ the base alone at index -1)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.rows.get(x.shape[0], self.name)
        y = self.base_layer(x)
        a, b = self.lora_A[idx], self.lora_B[idx]  # (rows, r, in), (rows, out, r)
        return y + _bmm_rows(_bmm_rows(x.to(a.dtype), a), b).to(y.dtype)


class StackedLinear(nn.Module):
    """One Linear per run (a classification head's), stacked: row i of the input uses run index[i]'s.
    Output sizes (label counts) are padded to the largest with zero rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: RowIndex, name: str = ""):
        super().__init__()
        self.register_buffer("weight", weight)  # (N, out_max, in)
        self.register_buffer("bias", bias)  # (N, out_max) or None
        self.rows = rows
        self.name = name

    def extra_repr(self) -> str:
        n, out, d = self.weight.shape
        return f"runs={n}, in_features={d}, out_features={out} (padded)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.rows.get(x.shape[0], self.name)
        y = _bmm_rows(x.to(self.weight.dtype), self.weight[idx])
        if self.bias is not None:
            y = y + self.bias[idx].reshape(idx.shape[0], *([1] * (y.dim() - 2)), -1)
        return y


@dataclass
class Mixed:
    """One base model serving several runs' adapters; rows pick theirs with `use(index)`."""

    model: nn.Module
    tokenizer: object
    names: list[str]  # the runs as given (paths)
    configs: list[dict]  # their adapter_config.json
    rows: RowIndex
    task_type: str
    heads: bool  # per-run heads are stacked (classification): then no row may ask for the base alone

    @property
    def label_names(self) -> list[list[str] | None]:
        return [c["label_names"] for c in self.configs]

    def outputs(self, k: int) -> int:
        """How many of the model's outputs belong to run k (its label count; 1 for regression)."""
        labels = self.label_names[k]
        return 1 if labels is None else len(labels)

    @contextmanager
    def use(self, index: Sequence[int] | torch.Tensor):
        """Run the model inside this with row i on adapter index[i] (0..N−1, or −1 for the base alone)."""
        device = next(self.model.parameters()).device
        t = torch.as_tensor(index, dtype=torch.long).to(device)
        low = 0 if self.heads else BASE
        if t.dim() != 1 or (t.numel() and (int(t.min()) < low or int(t.max()) >= len(self.names))):
            raise UserError(f"adapter index per row must be in {low}..{len(self.names) - 1}"
                            + ("" if self.heads else " (−1: the base alone)"))
        before, self.rows.index = self.rows.index, t
        try:
            yield
        finally:
            self.rows.index = before


def _factors(a: model.Adapted, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted Linear, (B, A) with B A = ΔW relative to the original W and the scaling in B."""
    out = {}
    for name, m in a.model.named_modules():
        if not isinstance(m, AdapterLinear):
            continue
        if type(m) not in (LoraLinear, PissaLinear):
            raise UserError(f"{where}: {name} is a {type(m).__name__}; mixed batches serve LoRA on Linear layers "
                            f"(drop embeddings from the run's method.target_modules, or merge that adapter into the base)")
        pairs = change_factors(m)  # PiSSA: rank 2r, served on the original W
        out[name] = (torch.cat([b for b, _ in pairs], 1), torch.cat([a_ for _, a_ in pairs], 0))
    return out


def _check_tensors(a: model.Adapted, cfg: dict, where: str) -> None:
    """Only LoRA factors and the head: anything else an adapter trains would be served as nobody's."""
    allowed = (".lora_A", ".lora_B", ".lora_A_initial", ".lora_B_initial")
    other = [n for n in a.trainable if not n.endswith(allowed) and not any(n.startswith(h + ".") for h in cfg["head"])]
    if other:
        raise UserError(f"{where} holds tensors besides LoRA factors and the head ({', '.join(other[:3])}); "
                        f"mixed batches serve plain LoRA adapters")


def _head_tensors(a: model.Adapted, heads: list[str]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in a.model.state_dict().items() if any(n.startswith(h + ".") for h in heads)}


def check_configs(paths: Sequence, configs: list[dict]) -> None:
    """Everything that can be refused from the adapter configs alone, before any model loads."""
    from peftkit.merge.sources import check_same_base

    if not paths:
        raise UserError("runs=[...] is empty; give the run directories whose adapters rows pick from")
    for p, c in zip(paths, configs):
        name = c["method"]["name"]
        if name not in METHODS:
            raise UserError(f"{p} is a {name} adapter; mixed batches serve {' and '.join(METHODS)} adapters "
                            f"(merge a mergeable one into its base and serve it alone)")
    kinds = {c.get("task_type") or "classification" for c in configs}
    if len(kinds) > 1:
        found = ", ".join(f"{p} ({c.get('task_type') or 'classification'})" for p, c in zip(paths, configs))
        raise UserError(f"the runs are of different task types: {found}; serve runs of one task type together")
    heads = {tuple(c["head"]) for c in configs}
    if len(heads) > 1:
        raise UserError(f"the runs' heads differ ({' vs '.join(str(list(h)) for h in heads)}); were they trained on one base?")
    check_same_base([str(p) for p in paths], configs)


@torch.no_grad()
def load(paths: Sequence[str | Path], backbone_path: str | None = None) -> Mixed:
    """One base model with every run's LoRA factors (and heads) stacked in its layers.

    Each run is rebuilt as `peftkit eval` rebuilds it (`model.from_adapter`: its base checked
    against its fingerprint, its tensors against the model), its factors and head kept, its model
    dropped; the first run's base is the one served."""
    folders = [adapter.folder(p) for p in paths]
    configs = [adapter.read_config(f, model=True) for f in folders]
    check_configs(paths, configs)
    rows = RowIndex()
    factors, heads_of, served = [], [], None
    for p, f, cfg in zip(paths, folders, configs):
        a, _ = model.from_adapter(f, backbone_path)
        factors.append(_factors(a, str(p)))  # first: it names a layer it cannot serve (an embedding)
        _check_tensors(a, cfg, str(p))
        heads_of.append(_head_tensors(a, cfg["head"]))
        if served is None:
            served = a
        else:
            del a
    net, n = served.model, len(paths)
    net.eval()
    layers = {name: m for name, m in net.named_modules()}
    for name in sorted({name for f in factors for name in f}):
        m = layers[name]
        base = m.base_layer if isinstance(m, AdapterLinear) else as_linear(m) if is_layer(m) else None
        if base is None:
            raise UserError(f"{paths[0]}'s base has no Linear {name}, which another run adapts; were they trained on one base?")
        r = max(f[name][0].shape[1] for f in factors if name in f)
        w = base.weight
        stack_a = w.new_zeros(n + 1, r, base.in_features)
        stack_b = w.new_zeros(n + 1, base.out_features, r)
        for k, f in enumerate(factors):
            if name in f:
                b, a_ = f[name]
                stack_b[k, :, : b.shape[1]], stack_a[k, : a_.shape[0]] = b, a_
        replace_module(net, name, MultiLoraLinear(base, stack_a, stack_b, rows, name))
    head_names = list(configs[0]["head"])
    if head_names:
        _stack_heads(net, head_names, heads_of, rows, paths)
    for m in net.modules():  # the rest stays as loaded, frozen
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return Mixed(net, served.tokenizer, [str(p) for p in paths], configs, rows,
                 configs[0].get("task_type") or "classification", bool(head_names))


def _stack_heads(net: nn.Module, head_names: list[str], heads_of: list[dict[str, torch.Tensor]], rows: RowIndex, paths) -> None:
    """Each Linear inside the head modules becomes a StackedLinear of every run's weights."""
    for h in head_names:
        root = net.get_submodule(h)
        for sub, m in list(root.named_modules()):
            full = f"{h}.{sub}" if sub else h
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(m, nn.Linear):
                raise UserError(f"the head module {full} is a {type(m).__name__} with weights; mixed batches stack "
                                f"Linear heads only")
            ws = [hd[f"{full}.weight"] for hd in heads_of]
            if len({w.shape[1] for w in ws}) > 1:
                raise UserError(f"the runs' heads take inputs of different sizes at {full}; were they trained on one base?")
            out = max(w.shape[0] for w in ws)
            weight = ws[0].new_zeros(len(ws), out, ws[0].shape[1])
            bias = None if m.bias is None else ws[0].new_zeros(len(ws), out)
            for k, hd in enumerate(heads_of):
                weight[k, : ws[k].shape[0]] = ws[k]
                if bias is not None:
                    bias[k, : ws[k].shape[0]] = hd[f"{full}.bias"]
            replace_module(net, full, StackedLinear(weight, bias, rows, full))
