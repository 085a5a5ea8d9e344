"""Houlsby adapters: identity at init, gradients only where they belong, never merged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import UserError
from peftkit.methods.base import merge_into_base, set_merged
from peftkit.methods.houlsby import BottleneckAdapter

from ._helpers import assert_gradients_exactly, build, hf_model, logits

HOULSBY = {"name": "houlsby", "bottleneck": 8}


def _expected_trainable(model) -> set[str]:
    adapters = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)
                for p in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")}
    norms = {n for n, _ in model.named_parameters() if ".encoder." in n and "LayerNorm" in n}
    return adapters | norms | {"classifier.weight", "classifier.bias"}


def test_identity_at_init(tiny_bert, batch):
    a = build(tiny_bert, HOULSBY)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert sum(isinstance(m, BottleneckAdapter) for m in a.model.modules()) == 2 * 2 + 1  # two per layer, one on the pooler
    assert torch.count_nonzero(next(m for m in a.model.modules() if isinstance(m, BottleneckAdapter)).adapter_down.weight) > 0
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    assert torch.equal(a.model(**batch, output_hidden_states=True).hidden_states[-1],
                       plain(**batch, output_hidden_states=True).hidden_states[-1])


def test_init_and_forward_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(48, 48)
    m = BottleneckAdapter(base, bottleneck=40, activation="gelu", init_std=0.5)
    assert m.adapter_down.weight.std().item() == pytest.approx(0.5, rel=0.1)
    assert not any(torch.count_nonzero(t) for t in (m.adapter_down.bias, m.adapter_up.weight, m.adapter_up.bias))
    with torch.no_grad():
        for t in (m.adapter_down.bias, m.adapter_up.weight, m.adapter_up.bias):
            t.normal_()
        x = torch.randn(5, 48)
        h = x @ base.weight.T + base.bias  # the adapter sees the sublayer's output, not its input
        expected = h + F.gelu(h @ m.adapter_down.weight.T + m.adapter_down.bias) @ m.adapter_up.weight.T + m.adapter_up.bias
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)


def test_targets_attention_and_ffn_outputs_and_the_pooler(tiny_bert):
    a = build(tiny_bert, HOULSBY)
    wrapped = [n for n, m in a.model.named_modules() if isinstance(m, BottleneckAdapter)]
    layers = [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense")]
    assert wrapped == [*layers, "bert.pooler.dense"]
    m = a.model.get_submodule(wrapped[0])
    assert (m.adapter_down.in_features, m.adapter_down.out_features, m.adapter_up.out_features) == (32, 8, 32)


def test_gradients_reach_exactly_adapters_layernorms_and_head(tiny_bert, batch):
    a = build(tiny_bert, HOULSBY)
    model = a.model.train()
    expected = _expected_trainable(model)
    assert set(a.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]))


def test_a_step_changes_only_trainable_weights(tiny_bert, batch):
    a = build(tiny_bert, HOULSBY)
    model = a.model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(a.trainable)
    assert {"classifier.weight", "bert.encoder.layer.1.output.dense.adapter_up.weight"} <= changed


def test_train_layernorm_false_freezes_them(tiny_bert):
    a = build(tiny_bert, {**HOULSBY, "train_layernorm": False})
    assert not any("LayerNorm" in n for n in a.trainable)
    assert any("adapter_up" in n for n in a.trainable)


def test_merge_is_refused(tiny_bert, batch):
    a = build(tiny_bert, HOULSBY)
    assert not a.method.mergeable
    expected = logits(a.model, batch)
    with pytest.raises(UserError, match="cannot be merged"):
        merge_into_base(a.model)
    with pytest.raises(UserError, match="cannot be merged"):
        set_merged(a.model, True)
    assert sum(isinstance(m, BottleneckAdapter) for m in a.model.modules()) == 2 * 2 + 1  # nothing dropped
    assert torch.equal(logits(a.model, batch), expected)
