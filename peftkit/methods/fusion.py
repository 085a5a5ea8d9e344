"""Composing adapters already trained, two-stage: AdapterFusion (Pfeiffer et al., 2021) and ScaLearn
(Frohmann et al., 2023). Stage one trains a bottleneck adapter (`pfeiffer` or `houlsby`) per source
task; stage two, this method, freezes them on one base and learns only how to combine them for a
target task, plus its head: `method=adapter_fusion method.adapters=[RUN1,RUN2,...]`.

At every layer the sources adapted, with h the layer's output and uᵢ = W_upᵢ σ(W_downᵢ h) source i's
change (its adapter computes h + uᵢ):
- adapter_fusion: attention over the sources, queried by h (AdapterHub's dynamic fusion):
  h' = h + Σᵢ softmax_i((W_q h + b_q)·(W_k uᵢ + b_k) / T) · W_v uᵢ. W_q, W_k start N(0, 0.02), W_v
  at the identity (off-diagonal 1e-6), so the start is about the sources' mean change; the loss adds
  λ‖I − W_v‖² over layers (`regularization`), as the paper.
- scalearn: learned scales of the sources' changes, h' = h + Σᵢ ωᵢ ⊙ uᵢ, with ωᵢ a vector of the
  layer's width (`scaling: vector`, ScaLearn) or one number (`scalar`, ScaLearnUniform), per layer
  or one set shared by all layers (`share_layers`, the ++ variants); ωᵢ starts at 1/N.

The sources' weights are copied into the new adapter as frozen buffers, so it reloads (bit-exactly)
without the source runs, whose paths and shapes it records. Sources must share this base (its
fingerprint), one method family and one set of adapted layers, and train nothing else but their
heads (Houlsby's LayerNorms cannot be composed). Not mergeable: the combination depends on the input.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from peftkit import adapter
from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, register, replace_module
from peftkit.methods.targets import as_linear, is_layer

SOURCE_METHODS = ("pfeiffer", "houlsby")
TENSORS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class FrozenBottleneck(nn.Module):
    """One source adapter's change u = W_up σ(W_down h + b_down) + b_up, its weights frozen buffers."""

    def __init__(self, width: int, bottleneck: int, activation: str, like: torch.Tensor):
        super().__init__()
        kw = dict(dtype=like.dtype, device=like.device)
        self.register_buffer("down_weight", torch.zeros(bottleneck, width, **kw))
        self.register_buffer("down_bias", torch.zeros(bottleneck, **kw))
        self.register_buffer("up_weight", torch.zeros(width, bottleneck, **kw))
        self.register_buffer("up_bias", torch.zeros(width, **kw))
        self.act = ACT2FN[activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(h, self.down_weight, self.down_bias)), self.up_weight, self.up_bias)


class ComposedLayer(AdapterLinear):
    """A frozen layer followed by its frozen source adapters, combined by `combine(h, changes)`."""

    def __init__(self, base_layer: nn.Linear, specs: list[dict]):
        super().__init__(base_layer)
        w = base_layer.weight
        self.sources = nn.ModuleList(FrozenBottleneck(self.out_features, s["bottleneck"], s["activation"], w) for s in specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.combine(h, torch.stack([s(h) for s in self.sources], dim=-2))  # changes: (..., N, d)

    def combine(self, h: torch.Tensor, changes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FusionLayer(ComposedLayer):
    def __init__(self, base_layer: nn.Linear, specs: list[dict], temperature: float, dropout: float):
        super().__init__(base_layer, specs)
        d, w = self.out_features, base_layer.weight
        self.fusion_query = nn.Linear(d, d, dtype=w.dtype, device=w.device)
        self.fusion_key = nn.Linear(d, d, dtype=w.dtype, device=w.device)
        self.fusion_value = nn.Linear(d, d, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for lin in (self.fusion_query, self.fusion_key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.fusion_value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.temperature = temperature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def combine(self, h, changes):
        scores = (self.fusion_key(changes) @ self.fusion_query(h).unsqueeze(-1)).squeeze(-1)  # (..., N)
        weights = torch.softmax(self.dropout(scores) / self.temperature, dim=-1)
        return (weights.unsqueeze(-1) * self.fusion_value(changes)).sum(-2)


class Scales(nn.Module):
    """The ω of every source: (N, d) vectors or (N, 1) numbers; held by one layer or shared by all."""

    def __init__(self, n: int, width: int, like: torch.Tensor):
        super().__init__()
        self.omega = nn.Parameter(torch.full((n, width), 1.0 / n, dtype=like.dtype, device=like.device))


class ScaledLayer(ComposedLayer):
    def __init__(self, base_layer: nn.Linear, specs: list[dict], scales: Scales):
        super().__init__(base_layer, specs)
        self.scales = scales

    def combine(self, h, changes):
        return (self.scales.omega * changes).sum(-2)


class Composition(Method):
    """What both methods share: finding, checking and copying in the source adapters."""

    mergeable = False
    layer_kind: ClassVar[type]

    @dataclasses.dataclass
    class Config:
        adapters: list[str] | None = None  # runs (or adapter folders) of pfeiffer/houlsby adapters on this base
        sources: list[dict] | None = None  # recorded at the first build: each source's path, method and shapes
        target_modules: list[str] | None = None  # recorded: the layers the sources adapted

        def __post_init__(self):
            if not self.adapters or len(self.adapters) < 2:
                raise UserError(f"method.adapters={self.adapters}: give two or more runs of pfeiffer or houlsby adapters "
                                f"on this base, e.g. method.adapters=[outputs/rte,outputs/mrpc]")

    def apply(self, model, exclude):
        # the first build reads the sources; a reload rebuilds from the record and the adapter file fills the buffers
        tensors = self.read_sources(model, exclude) if self.cfg.sources is None else None
        layers = {}
        for name in self.cfg.target_modules:
            if not is_layer(model.get_submodule(name)):
                raise UserError(f"the source adapters wrap {name}, which this model does not have as a Linear layer")
            layers[name] = as_linear(model.get_submodule(name))  # GPT-2's Conv1D as the Linear it computes
        self.build_layers(model, layers)
        if tensors is None:
            return
        with torch.no_grad():
            for name in self.cfg.target_modules:
                for found, source in zip(tensors, model.get_submodule(name).sources):
                    for t in TENSORS:  # adapter_down.weight → down_weight
                        getattr(source, t.removeprefix("adapter_").replace(".", "_")).copy_(found[f"{name}.{t}"])

    def build_layers(self, model, layers: dict[str, nn.Linear]) -> None:
        """Replace each named layer by its composed wrapper."""
        raise NotImplementedError

    def read_sources(self, model, exclude) -> list[dict[str, torch.Tensor]]:
        """Each source's tensors, after checking that it is a bottleneck adapter of this very base with
        the same layers as the others; records paths, shapes and layers in the config."""
        from peftkit import backbone

        base_names = [n for n, _ in model.named_parameters() if not any(n.startswith(e + ".") for e in exclude)]
        fingerprint = backbone.fingerprint(model, base_names)
        specs, tensors, layers = [], [], None
        for path in self.cfg.adapters:
            folder = adapter.folder(path)
            meta = adapter.read_config(folder)
            method = meta["method"]
            if method["name"] not in SOURCE_METHODS:
                raise UserError(f"{path} is a {method['name']} adapter; {self.name} composes bottleneck adapters "
                                f"({', '.join(SOURCE_METHODS)}): train the sources with method=pfeiffer")
            if meta.get("base_fingerprint") != fingerprint:
                raise UserError(f"{path} was trained on another base than this backbone ({meta['backbone'].get('name')}, "
                                f"fingerprint {meta.get('base_fingerprint')}); compose adapters of one base")
            found = adapter.read_tensors(folder / adapter.WEIGHTS, "adapter file", "retrain or restore it")
            head = tuple(h + "." for h in meta.get("head") or ())
            mine = sorted({n.rsplit(".", 2)[0] for n in found if n.endswith(TENSORS)})
            other = [n for n in found if not n.endswith(TENSORS) and not n.startswith(head)]
            if other:
                raise UserError(f"{path} trains {other[0]} besides its adapters, which {self.name} cannot compose "
                                f"(Houlsby's LayerNorms): train the sources with method=pfeiffer or "
                                f"method.train_layernorm=false")
            if layers is not None and mine != layers:
                raise UserError(f"{path} adapts other layers than {self.cfg.adapters[0]}; compose adapters with the same "
                                f"target_modules")
            layers = mine
            specs.append({"path": str(folder.resolve()), "method": method["name"],
                          "bottleneck": found[f"{mine[0]}.adapter_down.weight"].shape[0],
                          "activation": method.get("activation", "relu")})
            tensors.append(found)
        self.cfg.sources, self.cfg.target_modules = specs, layers
        return tensors


@register
class AdapterFusion(Composition):
    name = "adapter_fusion"

    @dataclasses.dataclass
    class Config(Composition.Config):
        temperature: float = 1.0
        dropout: float = 0.0  # on the attention scores
        regularization: float = 0.01  # λ in λ Σ_layers ‖I − W_v‖²

        def __post_init__(self):
            super().__post_init__()
            _checks.positive("temperature", self.temperature)
            _checks.dropout(self.dropout)
            _checks.non_negative("regularization", self.regularization)

    def build_layers(self, model, layers):
        c = self.cfg
        for name, layer in layers.items():
            replace_module(model, name, FusionLayer(layer, c.sources, c.temperature, c.dropout))

    def aux_loss(self, model):
        if not self.cfg.regularization:
            return None
        values = [m.fusion_value.weight for m in model.modules() if isinstance(m, FusionLayer)]
        eye = torch.eye(values[0].shape[0], dtype=values[0].dtype, device=values[0].device)
        return self.cfg.regularization * sum(((eye - v) ** 2).sum() for v in values)


@register
class ScaLearn(Composition):
    name = "scalearn"

    @dataclasses.dataclass
    class Config(Composition.Config):
        scaling: str = "vector"  # vector: ω of the layer's width per source (ScaLearn); scalar: one number (Uniform)
        share_layers: bool = False  # one set of ω for every layer (ScaLearn++ / Uniform++)

        def __post_init__(self):
            super().__post_init__()
            _checks.one_of("scaling", self.scaling, ("vector", "scalar"))

    def build_layers(self, model, layers):
        c, shared = self.cfg, None
        for name, layer in layers.items():
            width = layer.out_features if c.scaling == "vector" else 1
            scales = shared or Scales(len(c.sources), width, layer.weight)
            if c.share_layers:
                shared = scales
            replace_module(model, name, ScaledLayer(layer, c.sources, scales))
