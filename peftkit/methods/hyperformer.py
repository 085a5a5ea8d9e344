"""HyperFormer++ (Karimi Mahabadi et al., 2021, "Parameter-efficient Multi-task Fine-tuning for
Transformers via Shared Hypernetworks"): Houlsby adapters whose weights one hypernetwork, shared by
every layer, generates for each task.

The adapters sit where Houlsby's do (attention output, FFN output, the pooler); each turns its
layer's output h into h + W_up σ(W_down h + b_down) + b_up. Their weights are not trained: for task
τ, layer i (each transformer block has an id, the pooler its own) and position p (each adapted
place in a block: attention output, FFN output, pooler),

    z = LayerNorm(W₂ ReLU(W₁ [e_τ; l_i; p_p] + c₁) + c₂)       (the task projector)
    W_down = (G_down z + g_down)/√P,  b_down = (B_down z + β_down)/√P,
    W_up = (G_up z + g_up)/√P,  b_up = (B_up z + β_up)/√P            (P = projected_dim, z's size)

with the embeddings e, l, p and everything else learned and shared: one set of generators maps z
to the (bottleneck × d, bottleneck, d × bottleneck, d) weights of any adapter. The LayerNorm on z
is the paper code's (`unique_hyper_net_layer_norm`); it keeps z's entries at unit scale. The fixed
1/√P is ours (as attention's 1/√d): Adam moves each generator entry by about lr a step, and a
generated weight sums P of them times z's entries, so a step moves it √P to 0.8·P times lr
(random to aligned signs), 8 to 50 times a Houlsby weight's step at the same lr; the factor
brings that to 1 to 0.8·√P times. On MiniLM (rte+mrpc+stsb, 240 steps at lr 1e-3) it reached
STS-B 88.1 where Houlsby (m = 64) reached 86.3; 70.3 with 1/P instead, and without a factor the
model collapsed (−6.0). G_down starts
N(0, init_std²), so W_down's entries start at about init_std, as Houlsby's; G_up, g_up, B_up and
β_up start at zero: every adapter starts as the identity, for every task.

The task is set by `set_task(index)` on the hypernetwork, which `multitask.active` calls; a
single-task run has one task embedding. Weights are generated in every forward pass (nothing is
cached that an optimizer step would leave stale). Unlike the paper, the LayerNorms are not
generated: `train_layernorm` trains the model's own, shared by the tasks, as Houlsby's.
Not mergeable (σ sits between the projections); `peftkit merge mode=materialize` writes each
task's generated adapters as a plain Houlsby adapter.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from peftkit.errors import UserError
from peftkit.methods import _checks
from peftkit.methods.base import AdapterLinear, Method, adapter_tensors, register, replace_module
from peftkit.methods.houlsby import check_bottleneck, train_layernorms
from peftkit.methods.moe_lora import layer_index

ADAPTER_TENSORS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class HyperNetwork(nn.Module):
    """The embeddings, the task projector and the generators; one instance, held by every adapted layer."""

    def __init__(self, num_tasks: int, num_layers: int, num_positions: int, width: int, bottleneck: int,
                 embedding_dim: int, hidden_dim: int, projected_dim: int, init_std: float, like: torch.Tensor):
        super().__init__()
        kw = dict(dtype=like.dtype, device=like.device)
        self.width, self.bottleneck = width, bottleneck
        self.task_embedding = nn.Embedding(num_tasks, embedding_dim, **kw)  # N(0, 1), as the paper's
        self.layer_embedding = nn.Embedding(num_layers, embedding_dim, **kw)
        self.position_embedding = nn.Embedding(num_positions, embedding_dim, **kw)
        self.projector = nn.Sequential(nn.Linear(3 * embedding_dim, hidden_dim, **kw), nn.ReLU(),
                                       nn.Linear(hidden_dim, projected_dim, **kw), nn.LayerNorm(projected_dim, **kw))
        self.down_weight = nn.Linear(projected_dim, bottleneck * width, **kw)
        self.down_bias = nn.Linear(projected_dim, bottleneck, **kw)
        self.up_weight = nn.Linear(projected_dim, width * bottleneck, **kw)
        self.up_bias = nn.Linear(projected_dim, width, **kw)
        self.scale = 1.0 / math.sqrt(projected_dim)  # on every generated tensor (see the module docstring)
        with torch.no_grad():
            nn.init.normal_(self.down_weight.weight, std=init_std)  # z's entries have unit scale: W_down's ≈ init_std
            for lin in (self.down_bias, self.up_weight, self.up_bias):
                nn.init.zeros_(lin.weight)
            for lin in (self.down_weight, self.down_bias, self.up_weight, self.up_bias):
                nn.init.zeros_(lin.bias)
        self.task = 0

    def set_task(self, index: int) -> None:
        if not 0 <= index < self.task_embedding.num_embeddings:
            raise IndexError(f"task {index} of {self.task_embedding.num_embeddings}")
        self.task = index

    def condition(self, layer: int, position: int, task: int | None = None) -> torch.Tensor:
        """z for (task, layer, position); the task set by `set_task` unless given."""
        e = torch.cat([self.task_embedding.weight[self.task if task is None else task],
                       self.layer_embedding.weight[layer], self.position_embedding.weight[position]])
        return self.projector(e)

    def generate(self, layer: int, position: int, task: int | None = None) -> tuple[torch.Tensor, ...]:
        """(W_down (b, d), b_down (b,), W_up (d, b), b_up (d,)) of one adapter."""
        z = self.condition(layer, position, task)
        s, b, d = self.scale, self.bottleneck, self.width
        return s * self.down_weight(z).view(b, d), s * self.down_bias(z), s * self.up_weight(z).view(d, b), s * self.up_bias(z)


class HyperAdapter(AdapterLinear):
    """A frozen layer followed by a bottleneck adapter whose weights the shared hypernetwork generates."""

    def __init__(self, base_layer: nn.Linear, hypernet: HyperNetwork, layer: int, position: int, activation: str):
        super().__init__(base_layer)
        self.hypernet = hypernet  # shared: a submodule of every adapted layer, stored once under the first one's name
        self.layer, self.position = layer, position
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        down_w, down_b, up_w, up_b = self.hypernet.generate(self.layer, self.position)
        return h + F.linear(self.act(F.linear(h, down_w, down_b)), up_w, up_b)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, position={self.position}"


def layer_and_position_ids(names: list[str]) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Each target's (layer id, position id), and how many of each. A layer id per transformer block
    adapted (the first number in a name), in order, and one more for what sits outside the blocks
    (the pooler); a position id per adapted place, a name with its numbers folded
    (`encoder.layer.N.output.dense`), in the order first met."""
    blocks = sorted({i for i in map(layer_index, names) if i is not None})
    outside = len(blocks)
    places: dict[str, int] = {}
    ids = {}
    for n in names:
        i = layer_index(n)
        place = places.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", n), len(places))
        ids[n] = (outside if i is None else blocks.index(i), place)
    return ids, outside + any(layer_index(n) is None for n in names), len(places)


@register
class HyperFormer(Method):
    name = "hyperformer"
    default_roles = ("attn_out", "ffn_out", "pooler")  # as houlsby

    @dataclasses.dataclass
    class Config:
        bottleneck: int = 24
        task_embedding_dim: int = 64  # the task, layer-id and position embeddings each
        projector_hidden_dim: int = 128
        projected_dim: int = 64  # z, the generators' input
        activation: str = "gelu"
        init_std: float = 0.01  # of the generated W_down's entries at init
        train_layernorm: bool = True
        target_modules: list[str] | None = None

        def __post_init__(self):
            check_bottleneck(self.bottleneck, self.activation)
            for key in ("task_embedding_dim", "projector_hidden_dim", "projected_dim"):
                _checks.at_least(key, getattr(self, key))
            _checks.positive("init_std", self.init_std)  # 0: neither half of the adapters ever gets a gradient

    def apply(self, model, exclude):
        c = self.cfg
        if c.train_layernorm:
            train_layernorms(model)
        targets = self.targets(model, exclude)
        (first, first_layer), width = targets[0], targets[0][1].out_features
        other = next(((n, m.out_features) for n, m in targets if m.out_features != width), None)
        if other:
            raise UserError(f"hyperformer generates adapters of one width; {first} has {width} outputs, {other[0]} {other[1]}: "
                            f"choose method.target_modules of one output width (the default: attention output, FFN output, pooler)")
        ids, num_layers, num_positions = layer_and_position_ids([n for n, _ in targets])
        tasks = len(getattr(model, "task_names", ())) or 1  # a multi-task model names its tasks; one otherwise
        hypernet = HyperNetwork(tasks, num_layers, num_positions, width, c.bottleneck, c.task_embedding_dim,
                                c.projector_hidden_dim, c.projected_dim, c.init_std, first_layer.weight)
        for name, linear in targets:
            replace_module(model, name, HyperAdapter(linear, hypernet, *ids[name], c.activation))

    @torch.no_grad()
    def materialize(self, model, task, names):
        """Houlsby adapters with the weights generated for `task`, the LayerNorms as trained."""
        c = self.cfg
        layers = {n: m for n, m in model.named_modules() if isinstance(m, HyperAdapter)}
        hyper = {id(p) for p in next(iter(layers.values())).hypernet.parameters()}
        tensors = adapter_tensors(model)
        out = {n: tensors[n].detach().clone() for n in names if id(tensors[n]) not in hyper}
        for name, layer in layers.items():
            generated = layer.hypernet.generate(layer.layer, layer.position, task)
            out.update({f"{name}.{t}": g.detach().clone().contiguous() for t, g in zip(ADAPTER_TENSORS, generated)})
        houlsby = {"name": "houlsby", "bottleneck": c.bottleneck, "activation": c.activation, "init_std": c.init_std,
                   "train_layernorm": c.train_layernorm, "target_modules": list(c.target_modules)}
        return houlsby, out
