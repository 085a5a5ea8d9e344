"""Parallel adapter: f(x) + s·W_up σ(W_down x) by hand, identity at init, gradients, parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import set_merged
from peftkit.methods.parallel_adapter import ParallelAdapterLinear

from ._helpers import assert_gradients_exactly, build, hf_model, logits

PARALLEL = {"name": "parallel_adapter", "bottleneck": 8}
D, FFN, L, HEAD = 32, 64, 2, 32 * 2 + 2  # the tiny BERT: hidden 32, FFN 64, 2 layers, a 2-class head


def _adapters(model) -> dict[str, ParallelAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ParallelAdapterLinear)}


def test_forward_by_hand_reads_the_input_and_scales():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    m = ParallelAdapterLinear(base, bottleneck=4, scaling=4.0, activation="relu")
    assert (m.adapter_down.in_features, m.adapter_up.out_features) == (12, 6)  # beside f: f's input to f's output
    with torch.no_grad():
        for t in (m.adapter_down.bias, m.adapter_up.weight, m.adapter_up.bias):
            t.normal_()
        x = torch.randn(2, 5, 12)
        down, up = m.adapter_down, m.adapter_up
        expected = x @ base.weight.T + base.bias + 4.0 * (torch.relu(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)


def test_init_up_is_zero_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    m = ParallelAdapterLinear(base, bottleneck=4, scaling=4.0, activation="relu")
    assert torch.count_nonzero(m.adapter_down.weight) == 4 * 12
    assert not any(torch.count_nonzero(t) for t in (m.adapter_down.bias, m.adapter_up.weight, m.adapter_up.bias))
    x = torch.randn(3, 12)
    assert torch.equal(m(x), base(x))


def test_identity_at_init_on_the_model(tiny_bert, batch):
    a = build(tiny_bert, PARALLEL)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(a.model(**batch, output_hidden_states=True).hidden_states[-1],
                       plain(**batch, output_hidden_states=True).hidden_states[-1])
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


def test_default_targets_and_scaling(tiny_bert, tiny_llama):
    a = build(tiny_bert, PARALLEL)
    assert list(_adapters(a.model)) == [*(f"bert.encoder.layer.{i}.output.dense" for i in range(L)), "bert.pooler.dense"]
    pooler = _adapters(a.model)["bert.pooler.dense"]
    assert (pooler.adapter_down.in_features, pooler.adapter_up.out_features) == (D, D)  # reads [CLS], width d
    assert {m.scaling for m in _adapters(a.model).values()} == {4.0}  # He et al.'s s
    assert list(_adapters(build(tiny_llama, PARALLEL).model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(L)]  # no pooler


def test_trainable_set_and_count(tiny_bert):
    a = build(tiny_bert, PARALLEL)
    m = 8
    expected = {f"{n}.{p}" for n in _adapters(a.model)
                for p in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")}
    assert set(a.trainable) == expected | {"classifier.weight", "classifier.bias"}
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    # W_down reads the FFN's 64-wide inner activations in each layer, the 32-wide [CLS] on the pooler
    assert n == L * (FFN * m + m + m * D + D) + (D * m + m + m * D + D) + HEAD == 2234


def test_gradients_reach_exactly_adapters_and_head(tiny_bert, batch):
    a = build(tiny_bert, PARALLEL)
    assert_gradients_exactly(a.model, set(a.trainable), batch, torch.tensor([1, 0, 0]))


@pytest.mark.parametrize(("option", "message"), [({"activation": "nope"}, "choose one of: .*relu"),
                                                  ({"bottleneck": 0}, "at least 1")])
def test_bad_options_are_refused_before_any_model_loads(option, message):
    with pytest.raises(UserError, match=message):
        methods.build({**PARALLEL, **option})


def test_merge_is_refused(tiny_bert):
    a = build(tiny_bert, PARALLEL)
    assert not a.method.mergeable
    with pytest.raises(UserError, match="cannot be merged"):
        set_merged(a.model, True)
