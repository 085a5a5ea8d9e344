"""What every method shares: finding target modules, wrapping Linears, freezing, merging."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import UserError
from peftkit.methods.targets import as_base_layer, as_linear, find_targets, untie_output_embeddings
from peftkit.schema import check_fields

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


class Method:
    """A PEFT method: a config dataclass and how it changes a frozen model.

    The default `apply` wraps each target Linear with `wrap`; methods that train existing weights
    (full, head, BitFit) override `apply` instead. Everything `apply` leaves with
    `requires_grad=True` is what trains; the adapter file holds that plus the persistent buffers
    the method's modules add (frozen random projections, initial factors, rank masks). To share a
    tensor across layers, put it in one small module that every layer holds: a buffer registered
    directly in several modules becomes separate copies after `.to(device)`.
    """

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False
    default_roles: ClassVar[tuple[str, ...]] = ()  # see methods.targets.ROLE_NAMES
    packs: ClassVar[bool] = True  # trains on packed rows (several examples per row) of a causal LM
    embeddings: ClassVar[bool] = False  # can wrap an nn.Embedding named in target_modules (LoRA, IA³)
    positionwise: ClassVar[bool] = True  # acts on each position alone: a classifier's last layer may run on the one it reads

    @dataclasses.dataclass
    class Config:
        target_modules: list[str] | None = None

    def __init__(self, cfg: dict):
        fields = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise UserError(f"method '{self.name}' has no option {', '.join(unknown)}; options: {', '.join(sorted(fields))}")
        check_fields(self.Config, cfg, "method")
        self.cfg = self.Config(**cfg)  # its __post_init__ checks the values that need no model

    def apply(self, model: nn.Module, exclude: list[str]) -> None:
        for name, linear in self.targets(model, exclude):
            replace_module(model, name, self.wrap(linear))

    def targets(self, model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Linear]]:
        """The layers to wrap (Conv1D ones as Linears), found once: the config then holds their full
        names, so the adapter file records exactly where it attaches and a later change of the
        inference rules never moves a saved adapter."""
        found = find_targets(model, self.cfg.target_modules, self.default_roles, exclude)
        self.cfg.target_modules = [n for n, _ in found]
        for n, m in found:
            if isinstance(m, nn.Embedding):
                if not self.embeddings:
                    raise UserError(f"{self.name} adapts Linear layers; {n} is an embedding (lora and ia3 adapt "
                                    f"embeddings too): drop it from method.target_modules")
                untie_output_embeddings(model, m)
        return [(n, m if isinstance(m, nn.Embedding) else as_linear(m)) for n, m in found]

    def wrap(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """The trainer calls this after each optimizer step, gradients still present (`step` counts
        from 1). For methods that change shape while training: DyLoRA samples the next rank,
        importance-based rank allocation prunes. Most methods do nothing."""

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term the trainer adds to the task's training loss (never to an evaluation loss), from what
        the last forward pass left in the method's modules: MoE LoRA's load-balancing loss. None: none."""
        return None

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Numbers the trainer adds to each train_log.jsonl record at log steps (the last ones go into
        the report's `method_stats`): MoE LoRA's expert load and router entropy. Most methods have none."""
        return {}

    def materialize(self, model: nn.Module, task: int, names: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
        """One task's part of a multi-task adapter as a single-task adapter (`peftkit merge
        mode=materialize`): the method config to rebuild it with and its tensors by name. `names`: the
        adapter's own tensors (the heads are not the method's). Default: this method and those
        tensors as they are; a method whose weights depend on the task (HyperFormer's generated
        adapters) returns another method's config and the task's tensors."""
        tensors = adapter_tensors(model)
        return {"name": self.name, **dataclasses.asdict(self.cfg)}, {n: tensors[n].detach().clone() for n in names}

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What the method tracks while training besides its tensors (AdaLoRA's importance
        averages): resumable checkpoints hold it, adapters do not. Most methods track nothing."""
        return {}

    def load_training_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state` returned, on resume."""


class AdapterLinear(nn.Module):
    """A frozen Linear (`base_layer`) plus a method's trainable part.

    Additive methods (W' = W + ΔW) define `delta_weight` and merge with the `merge`/`unmerge`
    here; multiplicative ones (IA³, OFT, DoRA, ...) override both. Merging folds the trainable
    part into `base_layer` in place; while merged, `forward` is the base layer alone.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        raise UserError(f"{type(self).__name__} cannot be merged into the base weights")

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def hooked(module: nn.Module) -> bool:
    """Whether someone's hook watches this module's calls (and so may change what it takes or gives)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare(model: nn.Module, method: Method, head: list[str]) -> list[str]:
    """Freeze the model, let the method inject and unfreeze, make the head trainable.

    Returns the names of the tensors an adapter file stores: the trainable parameters, then the
    persistent buffers the method added (shared tensors appear once, under their first name).
    """
    before = set(persistent_buffers(model))
    model.requires_grad_(False)
    method.apply(model, exclude=head)
    for h in head:
        model.get_submodule(h).requires_grad_(True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    added = [n for n in persistent_buffers(model) if n not in before and ".base_layer." not in n]
    return trainable + added


def persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers a state dict would hold, each shared tensor once."""
    names, seen = [], set()
    for mod_name, m in model.named_modules():
        for b_name, b in m._buffers.items():
            if b is None or b_name in m._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            names.append(f"{mod_name}.{b_name}" if mod_name else b_name)
    return names


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name: where an adapter's or checkpoint's tensors are read and written."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold every adapter layer into its Linear and drop the wrappers: a plain transformers model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLinear):
            if not module.merged:  # set_merged(model, True) may have folded it in already
                module.merge()
            replace_module(model, name, as_base_layer(module.base_layer))
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@torch.no_grad()
def set_merged(model: nn.Module, merged: bool) -> None:
    for m in model.modules():
        if isinstance(m, AdapterLinear) and m.merged != merged:
            m.merge() if merged else m.unmerge()


# ---- frozen bf16 Linears on weights packed once (CPU) ------------------------------------------------

# A model whose frozen bf16 Linears' two packs would pass this is left as it is. Packing pays on small
# matrices (MiniLM's, 2 x 21 MB: 1.05-1.07x a step); on SmolLM2-135M's (2 x 238 MB) the LM benchmark
# ran 281 tokens/s packed against 317-430 unpacked in eight earlier runs, the peer unchanged, and
# took ~500 MB more (docs/bench/llm_speed_cpu_bf16_session{4,5,6}_*.json).
PACK_LIMIT_BYTES = 256 << 20


@functools.cache
def packs_linears() -> bool:
    """Whether this torch, on this CPU, can run a bf16 Linear on a weight packed in oneDNN's layout:
    the build must have oneDNN and the CPU bf16 conversions (AVX512-BW/VL/DQ or AVX-NE-CONVERT on x86;
    an AVX2-only CPU has neither), so one tiny Linear is tried rather than the flags read."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    w = torch.ones(16, 16, dtype=torch.bfloat16)
    try:
        return bool(linear_rows(w, torch.ops.mkldnn._reorder_linear_weight(w, None)).eq(16).all())
    except RuntimeError:  # "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
        return False


class PackedLinear(nn.Linear):
    """A frozen bf16 Linear that runs on CPU on copies of its weight packed once in oneDNN's blocked
    layout, W for the output and Wᵀ for the gradient, each made at its first use (evaluation never
    makes Wᵀ's): `F.linear` and `mm` repack the plain weight at every call, 1.05-1.07x a bf16 SST-2
    LoRA step (`scripts/bench_lever.py packed`). Its output and gradient are `F.linear`'s, bit for bit
    (tests/methods/test_packed_linear.py). The packs follow the weight: an in-place change (a merge,
    PiSSA's residual) bumps the weight's version and the next call packs again. Elsewhere (a GPU, fp32
    compute, a weight that trains) it is a plain Linear."""

    def __getstate__(self):  # a copy (deepcopy, pickle) packs its own: oneDNN's packs do not copy
        return {k: v for k, v in self.__dict__.items() if k != "_packs"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = packed_weights(self, x)
        if packs is None:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _PackedLinear.apply(x.to(self.weight.dtype), self.bias, packs)


class Packs:
    """A frozen weight W packed for oneDNN as W (for x Wᵀ) and as Wᵀ (for g W), each at its first use."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.key = weight.detach(), (weight._version, weight.data_ptr())
        self._w = self._t = None

    def w(self) -> torch.Tensor:
        if self._w is None:
            self._w = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
        return self._w

    def t(self) -> torch.Tensor:
        if self._t is None:
            self._t = torch.ops.mkldnn._reorder_linear_weight(self.weight.t().contiguous(), None)
        return self._t


def packed_weights(linear: nn.Module, x: torch.Tensor) -> Packs | None:
    """`linear`'s `Packs` for this input, new if the weight changed since; None where the packed path
    does not apply (not a PackedLinear, another device or dtype, a weight that trains, a step that
    torch.compile traces: dynamo cannot trace oneDNN's packed weights)."""
    if type(linear) is not PackedLinear or torch.compiler.is_compiling():  # inductor picks its own kernels
        return None
    w, b = linear.weight, linear.bias
    if (x.device.type != "cpu" or w.device.type != "cpu" or w.requires_grad or w.dtype != torch.bfloat16
            or compute_dtype(x) != w.dtype or (b is not None and (b.requires_grad or b.dtype != w.dtype))):
        return None
    packs = linear.__dict__.get("_packs")
    if packs is None or packs.key != (w._version, w.data_ptr()):
        packs = linear.__dict__["_packs"] = Packs(w)
    return packs


def linear_rows(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows · Wᵀ + b for 2-D rows on a packed W."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


class _PackedLinear(torch.autograd.Function):
    """x Wᵀ + b on the packed W; the gradient reaches x only (W and b are frozen), through the packed Wᵀ."""

    @staticmethod
    def forward(ctx, x, bias, packs):
        ctx.packs, ctx.shape = packs, x.shape
        y = linear_rows(x.reshape(-1, x.shape[-1]), packs.w(), bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return linear_rows(grad.reshape(-1, grad.shape[-1]), ctx.packs.t()).view(ctx.shape), None, None


def pack_frozen_linears(model: nn.Module) -> int:
    """Make each plain frozen bf16 Linear of the model a `PackedLinear` (the class only: the packs are
    made at first use). Returns how many: 0 where this torch cannot pack, or where the packs of W and
    Wᵀ would take more than PACK_LIMIT_BYTES (a model of over 64M such parameters, whose larger
    matrices gained nothing and whose packs cost memory)."""
    frozen = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
              and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)]
    if not packs_linears() or 2 * sum(m.weight.nbytes for m in frozen) > PACK_LIMIT_BYTES:
        return 0
    for m in frozen:
        m.__class__ = PackedLinear
    return len(frozen)
