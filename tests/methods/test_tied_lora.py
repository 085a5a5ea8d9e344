"""Tied-LoRA: the closed form, one A and B per layer shape (one tensor, stored once), gradients, identity at init."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.tied_lora import TiedFactors, TiedLoraLinear

from ._helpers import assert_gradients_exactly, LABELS, backbone_cfg, build, hf_model, logits

TIED = {"name": "tied_lora", "r": 4, "alpha": 8}


def _layers(m) -> dict[str, TiedLoraLinear]:
    return {n: x for n, x in m.named_modules() if isinstance(x, TiedLoraLinear)}


def _tied_linear(in_f=6, out_f=5, r=3, alpha=6.0, bias=True) -> TiedLoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias)
    m = TiedLoraLinear(base, TiedFactors(in_f, out_f, r, like=base.weight), alpha)
    with torch.no_grad():
        for p in (m.tied.lora_B, m.lora_u, m.lora_v):
            p.normal_()
    return m


def test_init_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = TiedLoraLinear(base, TiedFactors(6, 5, 3, like=base.weight), alpha=6.0)
    assert torch.count_nonzero(m.tied.lora_B) == 0 and torch.count_nonzero(m.tied.lora_A) > 0
    assert torch.equal(m.lora_u, torch.ones(3)) and torch.equal(m.lora_v, torch.ones(5))
    x = torch.randn(4, 6)
    assert torch.equal(m(x), base(x))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_merge_are_the_closed_form(bias):
    m = _tied_linear(bias=bias)
    assert m.scaling == 2.0
    x = torch.randn(2, 7, 6)
    a, b = m.tied.lora_A, m.tied.lora_B
    w = m.base_layer.weight + 2.0 * torch.diag(m.lora_v) @ b @ torch.diag(m.lora_u) @ a
    expected = x @ w.T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-1
        original = m.base_layer.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, original, atol=1e-6, rtol=0)


def test_starts_unchanged(tiny_bert, batch):
    a = build(tiny_bert, TIED)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


def test_one_pair_per_shape(tiny_llama):
    """Tiny Llama: q_proj is 32→32, v_proj 32→16 (2 KV heads), so two tied pairs for four layers."""
    a = build(tiny_llama, TIED)
    layers = _layers(a.model)
    groups: dict[tuple[int, int], set[int]] = {}
    for m in layers.values():
        groups.setdefault((m.in_features, m.out_features), set()).add(id(m.tied))
    assert groups.keys() == {(32, 32), (32, 16)} and all(len(ids) == 1 for ids in groups.values())
    assert len(layers) == 4
    q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"] for i in range(2))
    assert q0.tied.lora_A is q1.tied.lora_A and q0.lora_u is not q1.lora_u
    assert layers["model.layers.0.self_attn.v_proj"].tied.lora_B.shape == (16, 4)


def test_shared_factors_are_stored_once_and_stay_shared_after_loading(tiny_llama, tmp_path):
    a = build(tiny_llama, TIED)
    with torch.no_grad():  # away from init (B = 0, u = v = 1) so the reload has something to prove
        for p in a.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_llama), LABELS, "t"))
    keys = sorted(load_file(str(tmp_path / "adapter" / adapter.WEIGHTS)))
    assert [k for k in keys if ".tied." in k] == [
        "model.layers.0.self_attn.q_proj.tied.lora_A", "model.layers.0.self_attn.q_proj.tied.lora_B",
        "model.layers.0.self_attn.v_proj.tied.lora_A", "model.layers.0.self_attn.v_proj.tied.lora_B",
    ]
    assert sum(k.endswith((".lora_u", ".lora_v")) for k in keys) == 2 * 4

    b, _ = model.from_adapter(tmp_path / "adapter")
    loaded = _layers(b.model)
    q1 = loaded["model.layers.1.self_attn.q_proj"]
    assert q1.tied is loaded["model.layers.0.self_attn.q_proj"].tied
    assert torch.equal(q1.tied.lora_B, _layers(a.model)["model.layers.1.self_attn.q_proj"].tied.lora_B)


def test_sharing_survives_a_dtype_move(tiny_bert):
    a = build(tiny_bert, TIED)
    a.model.to(torch.float64)
    layers = list(_layers(a.model).values())
    assert len({id(m.tied.lora_A) for m in layers}) == 1 and layers[0].tied.lora_A.dtype == torch.float64


def test_gradients_reach_shared_factors_vectors_and_head(tiny_bert, batch):
    a = build(tiny_bert, TIED)
    net = a.model.train()
    layers = _layers(net)
    first = next(iter(layers))
    expected = {f"{n}.lora_{v}" for n in layers for v in "uv"} | {f"{first}.tied.lora_A", f"{first}.tied.lora_B"}
    expected |= {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected  # the shared factors appear once, under the first layer's name
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected

    assert_gradients_exactly(net, expected, batch, torch.tensor([1, 0, 0]))  # step 1: B = 0, so A, u and v get zero gradient


def test_shared_gradient_is_the_sum_over_layers():
    """B's gradient is what each layer sends it, added: the tie is real, not a copy."""
    torch.manual_seed(0)
    bases = [nn.Linear(6, 5) for _ in range(3)]
    tied = TiedFactors(6, 5, 3, like=bases[0].weight)
    layers = [TiedLoraLinear(b, tied, alpha=3.0) for b in bases]
    x = torch.randn(4, 6)
    sum(m(x).square().sum() for m in layers).backward()
    together = tied.lora_B.grad.clone()
    alone = []
    for m in layers:
        tied.lora_B.grad = None
        m(x).square().sum().backward()
        alone.append(tied.lora_B.grad.clone())
    torch.testing.assert_close(together, sum(alone), atol=1e-6, rtol=0)
    assert together.abs().sum() > 0


def test_trainable_count_is_the_formula(tiny_bert, tiny_llama):
    """Per shape r·(in + out), per layer r + out, plus the head."""
    r = TIED["r"]
    trainable, _ = count_params(build(tiny_bert, TIED).model)
    assert trainable == r * (32 + 32) + 5 * (r + 32) + (32 * 2 + 2)  # q, v x 2 layers + pooler: one shape
    trainable, _ = count_params(build(tiny_llama, TIED).model)
    assert trainable == r * (32 + 32) + r * (32 + 16) + 2 * (r + 32) + 2 * (r + 16) + 32 * 2  # score: no bias


def test_rank_below_one_is_a_user_error():
    with pytest.raises(UserError, match="method.r must be at least 1"):
        methods.build({"name": "tied_lora", "r": 0})


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option rank; options: alpha, r, target_modules"):
        methods.build({"name": "tied_lora", "rank": 8})
