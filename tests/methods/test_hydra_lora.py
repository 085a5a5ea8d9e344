"""Hydra: y = h + s·B_p A_p x + s·B_s A_s h with h = W x + b. The closed form on square and
non-square layers, identity at init, gradients, the trainable count and an exact merge/unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.hydra_lora import HydraLinear

from ._helpers import assert_gradients_exactly, build, hf_model, logits, outputs

PARAMS = ("hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B")


def _randomized(m: HydraLinear, seed: int = 0, std: float = 1.0) -> HydraLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*(m.get_parameter(n) for n in PARAMS), m.base_layer.bias]:
            if p is not None:  # a layer without bias
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def test_init_b_is_zero_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    m = HydraLinear(base, r=3, alpha=6.0)
    assert m.scaling == 2.0
    assert (m.hydra_par_A.shape, m.hydra_par_B.shape, m.hydra_seq_A.shape, m.hydra_seq_B.shape) == \
        ((3, 12), (20, 3), (3, 20), (20, 3))  # the sequential A reads the 20-dim output
    assert torch.count_nonzero(m.hydra_par_B) == 0 and torch.count_nonzero(m.hydra_seq_B) == 0
    assert torch.count_nonzero(m.hydra_par_A) == 36 and torch.count_nonzero(m.hydra_seq_A) == 60
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


@pytest.mark.parametrize("in_f,out_f", [(8, 8), (12, 20), (20, 12)], ids=["square", "wide", "narrow"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_closed_form(in_f, out_f, bias):
    torch.manual_seed(0)
    m = _randomized(HydraLinear(nn.Linear(in_f, out_f, bias=bias), r=3, alpha=1.5))
    s, w, b = m.scaling, m.base_layer.weight, m.base_layer.bias
    x = torch.randn(2, 5, in_f)
    with torch.no_grad():
        h = x @ w.T + (b if bias else 0)
        parallel = x @ (m.hydra_par_B @ m.hydra_par_A).T
        sequential = h @ (m.hydra_seq_B @ m.hydra_seq_A).T  # on the layer's output, bias included
        torch.testing.assert_close(m(x), h + s * parallel + s * sequential, atol=1e-4, rtol=1e-5)
        assert (m(x) - h).abs().max() > 1e-1


@pytest.mark.parametrize("in_f,out_f", [(8, 8), (12, 20), (20, 12)], ids=["square", "wide", "narrow"])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_is_the_closed_form_and_unmerge_restores(in_f, out_f, bias):
    torch.manual_seed(0)
    m = _randomized(HydraLinear(nn.Linear(in_f, out_f, bias=bias), r=3, alpha=1.5), std=0.5)
    base = m.base_layer
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if bias else None
    s = m.scaling
    seq = m.hydra_seq_B @ m.hydra_seq_A
    x = torch.randn(6, in_f)
    with torch.no_grad():
        expected = m(x)
        m.merge()
        assert m.merged
        torch.testing.assert_close(base.weight, w0 + s * (m.hydra_par_B @ m.hydra_par_A + seq @ w0), atol=1e-5, rtol=0)
        if bias:
            torch.testing.assert_close(base.bias, b0 + s * seq @ b0, atol=1e-5, rtol=0)
        assert torch.equal(m(x), base(x))  # merged: the base layer alone
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
        m.unmerge()
        assert not m.merged
    torch.testing.assert_close(base.weight, w0, atol=1e-5, rtol=0)
    if bias:
        torch.testing.assert_close(base.bias, b0, atol=1e-5, rtol=0)


def test_default_targets_include_non_square_ffn_output(tiny_bert):
    a = build(tiny_bert, {"name": "hydra_lora"})
    wrapped = {n: (m.in_features, m.out_features) for n, m in a.model.named_modules() if isinstance(m, HydraLinear)}
    expected = {"bert.pooler.dense": (32, 32)}
    for i in range(2):
        expected |= {f"bert.encoder.layer.{i}.attention.output.dense": (32, 32), f"bert.encoder.layer.{i}.output.dense": (64, 32)}
    assert wrapped == expected


def test_starts_as_the_base_model(tiny_bert, batch):
    a = build(tiny_bert, {"name": "hydra_lora"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    assert torch.equal(outputs(a.model, batch)[1], outputs(plain, batch)[1])


def test_gradients_reach_exactly_both_branches_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "hydra_lora"})
    model = a.model.train()
    branches = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, HydraLinear) for p in PARAMS}
    expected = branches | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    def step1():  # both B are zero, so only they have a gradient (as LoRA's B)
        for n in branches:
            assert (model.get_parameter(n).grad.abs().sum() > 0) == n.endswith("_B"), n

    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]), after_first_backward=step1)


def test_trainable_parameter_counts(tiny_bert, tiny_llama):
    # Per Linear: r·(in + out) for the parallel branch, r·(out + out) for the sequential one.
    def per_linear(i, o, r=8):
        return r * (i + o) + r * (o + o)

    bert = build(tiny_bert, {"name": "hydra_lora"})  # attention out 32→32, FFN out 64→32, pooler 32→32
    assert count_params(bert.model)[0] == 2 * (per_linear(32, 32) + per_linear(64, 32)) + per_linear(32, 32) + 32 * 2 + 2
    llama = build(tiny_llama, {"name": "hydra_lora", "r": 4})  # o_proj 32→32, down_proj 64→32; no pooler
    assert count_params(llama.model)[0] == 2 * (per_linear(32, 32, 4) + per_linear(64, 32, 4)) + 32 * 2


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="method.r must be at least 1, got 0"):
        methods.build({"name": "hydra_lora", "r": 0})
    with pytest.raises(UserError, match="no option rank; options: alpha, r, target_modules"):
        methods.build({"name": "hydra_lora", "rank": 4})
