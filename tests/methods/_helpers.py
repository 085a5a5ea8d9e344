"""Helpers for the method and merge tests: peftkit models on a local folder, plain HF models, logits."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = ["a gripping, funny and warm film", "dull", "the plot never quite comes together, sadly"]
LABELS = ["rotten", "fresh"]


@functools.cache
def _shipped_yaml(relative: str) -> dict:
    """A shipped config file as plain data, read once (parsing YAML took 8% of the method matrices' time)."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / relative))


def shipped_yaml(relative: str) -> OmegaConf:
    """configs/<relative> as a fresh OmegaConf object: the caller may change it."""
    return OmegaConf.create(_shipped_yaml(relative))


def backbone_cfg(path) -> OmegaConf:
    """configs/backbone/minilm.yaml pointed at a local model folder."""
    cfg = shipped_yaml("backbone/minilm.yaml")
    cfg.path = str(path)
    return cfg


def build(path, method_cfg: dict, seed: int = 0):
    """peftkit.model.build with a fixed seed (the head and adapter inits are random)."""
    from peftkit import model

    torch.manual_seed(seed)
    return model.build(backbone_cfg(path), dict(method_cfg), list(LABELS))


def hf_model(path, seed: int = 0):
    """A plain AutoModelForSequenceClassification (2 labels, fp32, eval mode) with a seeded head."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


@torch.no_grad()
def perturb(model, names, std: float = 0.1, seed: int = 1) -> None:
    """Add noise to the named parameters so adapters, LayerNorms and heads are far from their init."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@torch.no_grad()
def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state): the random tiny model's logits barely move, its hidden states do."""
    model.eval()
    out = model(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@torch.no_grad()
def randomize_biases(model, std: float = 0.1, seed: int = 5) -> None:
    """Random biases in the backbone's Linears: the tiny BERT's are all zero, which would hide bias bugs.

    Seeded by name (a wrapped layer's `.base_layer` counts as the layer), so a plain and an adapted
    model of the same backbone get the same biases. The task head and adapters' own Linears are left alone.
    """
    from torch import nn

    linears = {n.replace(".base_layer", ""): m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.bias is not None and "adapter_" not in n
               and not n.startswith(("classifier", "score"))}
    g = torch.Generator().manual_seed(seed)
    for _, m in sorted(linears.items()):
        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * std)


def assert_gradients_exactly(model, trainable, batch, labels, steps: int = 2, after_first_backward=None) -> None:
    """Backward passes with an AdamW step between (two by default: a zero-initialised half wakes its
    partner after one; one where the update is not zero at init): after the last, every tensor in
    `trainable` has a nonzero gradient, every other parameter none. `after_first_backward()` may
    check the first step's gradients."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, labels=labels).loss.backward()
    if after_first_backward is not None:
        after_first_backward()
    for _ in range(steps - 1):
        opt.step()
        opt.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


COMPOSITIONS = ("adapter_fusion", "scalearn")  # methods that compose adapters of earlier runs


def with_sources(name: str, cfg: dict, bb, out: Path, labels=LABELS, task: str | None = None) -> dict:
    """A composition method's config given two source adapters to compose: pfeiffer adapters made on
    the backbone `bb` (seeded, every trained tensor noised, as if trained) and saved under `out`.
    Other methods' configs come back unchanged."""
    if name not in COMPOSITIONS:
        return cfg
    from peftkit import adapter, model

    paths = []
    for i in range(2):
        torch.manual_seed(100 + i)
        a = model.build(bb, {"name": "pfeiffer", "bottleneck": 4}, labels, task)
        perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], seed=100 + i)
        adapter.save(out / f"source{i}", a.model, a.trainable, model.meta(a, bb, labels, "t", task))
        paths.append(str(out / f"source{i}"))
    return {**cfg, "adapters": paths}


def shipped_config(name: str) -> dict:
    """configs/method/<name>.yaml as shipped, fitted where a tiny model cannot take it (each refusal is tested)."""
    cfg = OmegaConf.to_container(shipped_yaml(f"method/{name}.yaml"))
    if name == "llama_adapter":
        cfg["adapter_layers"] = 2  # the tiny models have 2 layers; the shipped 8 is refused
    if name == "lora_xs":
        cfg["r"], cfg["alpha"] = 8, 16  # the tiny decoders' narrowest target is 16 wide; the shipped r=32 is refused (s stays 2)
    return cfg
