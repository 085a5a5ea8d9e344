"""What every method shares: trainable sets and their counts, the adapter file, save → load round trips."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from conftest import minilm_dir, needs_minilm
from peftkit import adapter, model
from peftkit.methods.base import count_params

from ._helpers import LABELS, backbone_cfg, build, hf_model, logits, perturb

METHOD_CFGS = {
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "lora_rs4": {"name": "lora", "r": 4, "alpha": 8, "rslora": True},
    "ia3": {"name": "ia3"},
    "houlsby": {"name": "houlsby", "bottleneck": 64},
    "houlsby_m8": {"name": "houlsby", "bottleneck": 8},
    "full": {"name": "full"},
    "head": {"name": "head"},
}


def expected_trainable(method_cfg: dict, config, plain_total: int) -> int:
    """The trainable parameter count, from the paper formulas and the config alone."""
    h, n_layers, ffn, labels = config.hidden_size, config.num_hidden_layers, config.intermediate_size, len(LABELS)
    head = h * labels + labels
    name = method_cfg["name"]
    if name == "lora":  # Σ r·(in + out) over query, value (h → h) in each layer and the pooler (h → h)
        return method_cfg["r"] * (h + h) * (2 * n_layers + 1) + head
    if name == "ia3":  # Σ out over key, value, pooler + Σ in over the FFN down projections
        return (2 * n_layers + 1) * h + n_layers * ffn + head
    if name == "houlsby":  # two adapters a layer and one on the pooler, 2·d·m + m + d each; two LayerNorms a layer
        m = method_cfg["bottleneck"]
        return (2 * n_layers + 1) * (2 * h * m + m + h) + 2 * n_layers * 2 * h + head
    if name == "full":
        return plain_total + head
    if name == "head":
        return head
    raise AssertionError(name)


def _check_counts(path, method_key):
    cfg = METHOD_CFGS[method_key]
    plain = hf_model(path)
    plain_total = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("classifier."))
    a = build(path, cfg)
    trainable, total = count_params(a.model)
    expected = expected_trainable(cfg, a.model.config, plain_total)
    assert trainable == expected
    h, n_layers = a.model.config.hidden_size, a.model.config.num_hidden_layers
    head = 2 * h + 2
    layernorms = 2 * n_layers * 2 * h if cfg["name"] == "houlsby" else 0  # trainable, but already in the base
    added = 0 if cfg["name"] in ("full", "head") else trainable - head - layernorms
    assert total == plain_total + head + added  # the new tensors are the adapters' and nothing else
    assert sum(dict(a.model.named_parameters())[n].numel() for n in a.trainable) == trainable
    assert f"{trainable:,}" in a.summary()


@pytest.mark.parametrize("method_key", list(METHOD_CFGS))
def test_param_counts_match_formulas_tiny(tiny_bert, method_key):
    _check_counts(tiny_bert, method_key)


@needs_minilm
@pytest.mark.parametrize("method_key", ["lora", "ia3", "houlsby", "full", "head"])
def test_param_counts_match_formulas_minilm(method_key):
    _check_counts(minilm_dir(), method_key)


@needs_minilm
def test_minilm_lora_count_by_hand():
    """The formula itself, spelled out for MiniLM (6 layers, hidden 384) so a wrong formula cannot hide."""
    a = build(minilm_dir(), METHOD_CFGS["lora"])
    assert count_params(a.model)[0] == 8 * 768 * 13 + 384 * 2 + 2 == 80_642


TRAINABLE_SUFFIXES = {
    "lora": (".lora_A", ".lora_B"),
    "lora_rs4": (".lora_A", ".lora_B"),
    "ia3": (".ia3_l",),
    "houlsby": (".adapter_down.weight", ".adapter_down.bias", ".adapter_up.weight", ".adapter_up.bias",
                ".LayerNorm.weight", ".LayerNorm.bias"),
    "houlsby_m8": (".adapter_down.weight", ".adapter_down.bias", ".adapter_up.weight", ".adapter_up.bias",
                   ".LayerNorm.weight", ".LayerNorm.bias"),
    "head": (),
}


@pytest.mark.parametrize("method_key", list(METHOD_CFGS))
def test_trainable_set_is_the_adapter_file(tiny_bert, tmp_path, method_key):
    cfg = METHOD_CFGS[method_key]
    a = build(tiny_bert, cfg)
    params = dict(a.model.named_parameters())
    assert a.trainable == [n for n, p in params.items() if p.requires_grad]
    assert {"classifier.weight", "classifier.bias"} <= set(a.trainable)
    if method_key != "full":
        others = [n for n in a.trainable if not n.startswith("classifier.")]
        assert all(n.endswith(TRAINABLE_SUFFIXES[method_key]) for n in others), others
        assert not any("embeddings" in n for n in others)

    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "test"))
    f = tmp_path / "adapter" / adapter.WEIGHTS
    with safe_open(str(f), "pt") as st:
        assert sorted(st.keys()) == sorted(a.trainable)
        assert all(torch.equal(st.get_tensor(n), params[n]) for n in a.trainable)
    n_params = count_params(a.model)[0]
    header = struct.unpack("<Q", f.read_bytes()[:8])[0]
    assert f.stat().st_size == 8 + header + 4 * n_params  # fp32 tensors and nothing else
    assert header < 16_384
    meta = json.loads((tmp_path / "adapter" / adapter.CONFIG).read_text())
    assert meta["trainable_params"] == n_params and meta["head"] == ["classifier"]


@pytest.mark.parametrize("method_key", ["lora", "lora_rs4", "ia3", "houlsby", "full", "head"])
def test_save_then_from_adapter_gives_the_same_logits(tiny_bert, batch, tmp_path, method_key):
    cfg = METHOD_CFGS[method_key]
    a = build(tiny_bert, cfg)
    perturb(a.model, a.trainable, std=0.2)  # trained-looking weights: B ≠ 0, l ≠ 1, W_up ≠ 0
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "test"))

    fresh = build(tiny_bert, cfg, seed=7)  # what a load that dropped some tensor would look like
    assert not torch.allclose(logits(fresh.model, batch), expected, atol=1e-4, rtol=0)

    b, meta = model.from_adapter(tmp_path / "adapter")
    assert cfg.items() <= meta["method"].items() and b.trainable == a.trainable  # plus defaults, targets resolved
    assert torch.equal(logits(b.model, batch), expected)  # bit-exact


def test_method_buffers_are_saved_and_restored(tiny_bert, batch, tmp_path, monkeypatch):
    """A method's persistent buffers (a frozen random projection, shared by every layer) travel with the
    adapter, once; a fresh build draws other values, so only a real load reproduces the logits."""
    import dataclasses

    from torch import nn

    from peftkit.methods.base import METHODS, AdapterLinear, Method

    class Projected(AdapterLinear):
        def __init__(self, base_layer, shared):
            super().__init__(base_layer)
            if "bank" not in shared:  # one holder module for every layer: survives .to(device)
                shared["bank"] = nn.Module()
                shared["bank"].register_buffer("proj", torch.randn(self.out_features, self.in_features))
            self.bank = shared["bank"]
            self.register_buffer("scratch", torch.zeros(1), persistent=False)  # not state: never saved
            self.scale = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.base_layer(x) + self.scale * nn.functional.linear(x, self.bank.proj)

    class BufferMethod(Method):
        name = "buffer_test"
        default_roles = ("query",)

        @dataclasses.dataclass
        class Config:
            target_modules: list[str] | None = None

        def apply(self, model, exclude):
            self.shared = {}
            super().apply(model, exclude)

        def wrap(self, linear):
            return Projected(linear, self.shared)

    monkeypatch.setitem(METHODS, "buffer_test", BufferMethod)
    cfg = {"name": "buffer_test"}
    a = build(tiny_bert, cfg)
    buffers = [n for n in a.trainable if n.endswith(".proj")]
    assert buffers == ["bert.encoder.layer.0.attention.self.query.bank.proj"]  # shared: stored once
    assert not any(n.endswith("scratch") for n in a.trainable)
    perturb(a.model, [n for n in a.trainable if n not in buffers], std=0.5)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "test"))
    with safe_open(str(tmp_path / "adapter" / adapter.WEIGHTS), "pt") as st:
        assert sorted(st.keys()) == sorted(a.trainable)

    b, _ = model.from_adapter(tmp_path / "adapter")
    layer1 = b.model.get_submodule("bert.encoder.layer.1.attention.self.query")
    assert layer1.bank.proj is b.model.get_submodule("bert.encoder.layer.0.attention.self.query").bank.proj  # still shared
    assert torch.equal(logits(b.model, batch), expected)
    b.model.to(torch.float64)  # a device/dtype move keeps it shared
    assert layer1.bank.proj is b.model.get_submodule("bert.encoder.layer.0.attention.self.query").bank.proj


@pytest.mark.parametrize("cfg", [{"name": "lora", "r": 2}, {"name": "ia3"}])
def test_adapter_config_records_the_default_targets_it_resolved(cfg, tiny_bert, tmp_path, batch, monkeypatch):
    """An adapter saved with the defaults loads where it was trained even after the method's
    default roles change (as they did when the pooler became a default target)."""
    from peftkit.methods import METHODS

    a = build(tiny_bert, cfg)
    perturb(a.model, a.trainable, std=0.5)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "test"))
    saved = adapter.read_config(tmp_path / "adapter")["method"]
    assert saved["target_modules"] and all(isinstance(p, str) for p in saved["target_modules"])
    if cfg["name"] == "ia3":
        assert saved["feedforward_modules"]  # the FFN down projections, by pattern

    monkeypatch.setattr(METHODS[cfg["name"]], "default_roles", ("query",))  # a later version's defaults
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(logits(b.model, batch), expected)
