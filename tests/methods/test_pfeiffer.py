"""Pfeiffer adapters: one per layer after the FFN and one on the pooler, identity at init, only adapters and head train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import set_merged
from peftkit.methods.houlsby import BottleneckAdapter

from ._helpers import assert_gradients_exactly, build, hf_model, logits

PFEIFFER = {"name": "pfeiffer", "bottleneck": 8}
D, L, HEAD = 32, 2, 32 * 2 + 2  # the tiny BERT: hidden 32, 2 layers, a 2-class head


def _adapters(model) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def test_one_adapter_per_layer_after_the_ffn_and_one_on_the_pooler(tiny_bert, tiny_llama):
    adapters = _adapters(build(tiny_bert, PFEIFFER).model)
    assert list(adapters) == [*(f"bert.encoder.layer.{i}.output.dense" for i in range(L)), "bert.pooler.dense"]
    pooler = adapters["bert.pooler.dense"]
    assert (pooler.adapter_down.in_features, pooler.adapter_down.out_features, pooler.adapter_up.out_features) == (D, 8, D)
    # Llama has no pooler: the role is skipped
    assert list(_adapters(build(tiny_llama, PFEIFFER).model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(L)]


def test_identity_at_init(tiny_bert, batch):
    a = build(tiny_bert, PFEIFFER)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    assert torch.equal(a.model(**batch, output_hidden_states=True).hidden_states[-1],
                       plain(**batch, output_hidden_states=True).hidden_states[-1])


def test_forward_by_hand_with_relu():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    a = methods.build(PFEIFFER).wrap(base)
    with torch.no_grad():
        for t in (a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias):
            t.normal_()
        x = torch.randn(5, 64)
        h = x @ base.weight.T + base.bias
        expected = h + torch.relu(h @ a.adapter_down.weight.T + a.adapter_down.bias) @ a.adapter_up.weight.T + a.adapter_up.bias
        torch.testing.assert_close(a(x), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(a(x), h + F.gelu(h @ a.adapter_down.weight.T + a.adapter_down.bias) @ a.adapter_up.weight.T
                                  + a.adapter_up.bias, atol=1e-3)  # the activation is ReLU, not GELU


def test_trainable_set_and_count(tiny_bert):
    a = build(tiny_bert, PFEIFFER)
    m = 8
    expected = {f"{n}.{p}" for n in _adapters(a.model)
                for p in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")}
    assert set(a.trainable) == expected | {"classifier.weight", "classifier.bias"}  # no LayerNorm
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    assert n == (L + 1) * (D * m + m + m * D + D) + HEAD == 1722  # one adapter per layer, one on the pooler


def test_gradients_reach_exactly_adapters_and_head(tiny_bert, batch):
    a = build(tiny_bert, PFEIFFER)
    assert_gradients_exactly(a.model, set(a.trainable), batch, torch.tensor([1, 0, 0]))


def test_train_layernorm_true_adds_the_encoder_layernorms(tiny_bert):
    a = build(tiny_bert, {**PFEIFFER, "train_layernorm": True})
    norms = {n for n in a.trainable if "LayerNorm" in n}
    assert norms == {f"bert.encoder.layer.{i}.{s}.LayerNorm.{p}" for i in range(L)
                     for s in ("attention.output", "output") for p in ("weight", "bias")}


@pytest.mark.parametrize(("option", "message"), [({"activation": "sigmoidish"}, "choose one of: .*relu"),
                                                  ({"bottleneck": 0}, "at least 1")])
def test_bad_options_are_refused_before_any_model_loads(option, message):
    with pytest.raises(UserError, match=message):
        methods.build({**PFEIFFER, **option})


def test_merge_is_refused(tiny_bert):
    a = build(tiny_bert, PFEIFFER)
    assert not a.method.mergeable
    with pytest.raises(UserError, match="cannot be merged"):
        set_merged(a.model, True)
