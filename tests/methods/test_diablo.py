"""DiaBlo: ΔW is block-diagonal (built by hand), the layer starts as W, merges exactly, counts add up."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import merge_into_base, set_merged
from peftkit.methods.diablo import DiaBloLinear

from ._helpers import build, hf_model, logits, outputs, perturb, randomize_biases

D, FFN, L, HEAD = 32, 64, 2, 32 * 2 + 2  # the tiny BERT: hidden 32, FFN 64, 2 layers, a 2-class head
SHAPES = [(32, 32, 4), (64, 32, 4), (32, 64, 8), (10, 10, 4), (10, 7, 3), (32, 16, 64), (6, 6, 1)]  # (in, out, N)


def _layer(in_f: int, out_f: int, n: int) -> DiaBloLinear:
    torch.manual_seed(0)
    m = DiaBloLinear(nn.Linear(in_f, out_f), n, dropout=0.0)
    with torch.no_grad():
        m.diablo_blocks.normal_()
    return m


def _block_diagonal_by_hand(m: DiaBloLinear) -> torch.Tensor:
    dw = torch.zeros(m.out_features, m.in_features)
    bo, bi = m.block_out, m.block_in
    for k, block in enumerate(m.diablo_blocks):
        for r in range(bo):
            for c in range(bi):
                if k * bo + r < m.out_features and k * bi + c < m.in_features:
                    dw[k * bo + r, k * bi + c] = block[r, c]
    return dw


@pytest.mark.parametrize(("in_f", "out_f", "n"), SHAPES)
def test_delta_weight_is_block_diagonal_and_the_forward_applies_it(in_f, out_f, n):
    m = _layer(in_f, out_f, n)
    assert (m.block_out, m.block_in) == (math.ceil(out_f / n), math.ceil(in_f / n))
    dw = _block_diagonal_by_hand(m)
    torch.testing.assert_close(m.delta_weight(), dw, atol=0, rtol=0)
    x = torch.randn(2, 5, in_f)
    w, b = m.base_layer.weight, m.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ w.T + b + x @ dw.T, atol=1e-5, rtol=0)


def test_blocks_cover_the_diagonal_and_nothing_else():
    m = _layer(64, 32, 4)  # blocks of 8 × 16
    assert m.diablo_blocks.shape == (4, 8, 16)
    nonzero = m.delta_weight() != 0
    for r in range(32):
        for c in range(64):
            assert nonzero[r, c] == (r // 8 == c // 16), (r, c)


def test_more_blocks_than_a_side_gives_one_wide_blocks_on_the_shorter_side():
    m = _layer(32, 16, 64)  # Llama's k_proj in the tiny model, with the default N
    assert m.diablo_blocks.shape == (16, 1, 1)  # every block trains: none falls outside W
    assert torch.equal(m.delta_weight()[:, :16], torch.diag(m.diablo_blocks.flatten()))
    assert torch.count_nonzero(m.delta_weight()[:, 16:]) == 0


def test_zero_blocks_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    m = DiaBloLinear(base, 4, dropout=0.0)
    x = torch.randn(3, 12)
    assert torch.count_nonzero(m.diablo_blocks) == 0
    assert torch.equal(m(x), base(x))


@pytest.mark.parametrize(("in_f", "out_f", "n"), SHAPES)
def test_merge_and_unmerge_are_exact(in_f, out_f, n):
    m = _layer(in_f, out_f, n)
    x = torch.randn(4, in_f)
    w0 = m.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = m(x)
        m.merge()
        assert m.merged
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x), m.base_layer(x), atol=0, rtol=0)  # merged: the base layer alone
        m.unmerge()
    torch.testing.assert_close(m.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_default_targets(tiny_bert, tiny_llama):
    def wrapped(path):
        return [n for n, m in build(path, {"name": "diablo"}).model.named_modules() if isinstance(m, DiaBloLinear)]

    bert = ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense", "output.dense")
    assert wrapped(tiny_bert) == [f"bert.encoder.layer.{i}.{s}" for i in range(L) for s in bert] + ["bert.pooler.dense"]
    llama = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert wrapped(tiny_llama) == [f"model.layers.{i}.{s}" for i in range(L) for s in llama]


@pytest.mark.parametrize(("n", "expected"), [
    # N = 4: q, k, v and the pooler have 4 blocks of 8 × 8; FFN in 4 of 16 × 8, FFN out 4 of 8 × 16
    (4, L * (3 * 4 * 8 * 8 + 2 * 4 * 16 * 8) + 4 * 8 * 8 + HEAD),
    # N = 64 (the default) > 32: 32 one-by-one blocks on every layer's diagonal
    (64, (L * 5 + 1) * 32 + HEAD),
])
def test_trainable_count(tiny_bert, n, expected):
    a = build(tiny_bert, {"name": "diablo", "num_blocks": n})
    assert set(a.trainable) == {f"{m}.diablo_blocks" for m, x in a.model.named_modules() if isinstance(x, DiaBloLinear)} \
        | {"classifier.weight", "classifier.bias"}
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == expected


def test_identity_at_init_and_gradients_reach_exactly_the_blocks(tiny_bert, batch):
    a = build(tiny_bert, {"name": "diablo", "num_blocks": 4})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    a.model.train()
    a.model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
    assert {n for n, p in a.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == set(a.trainable)
    assert all(p.grad is None for n, p in a.model.named_parameters() if n not in a.trainable)


def test_merge_into_base_gives_the_same_logits(tiny_bert, batch):
    a = build(tiny_bert, {"name": "diablo", "num_blocks": 4})
    randomize_biases(a.model)
    before = outputs(a.model, batch)[1]
    perturb(a.model, [n for n in a.trainable if "diablo" in n])
    expected = outputs(a.model, batch)
    assert (expected[1] - before).abs().max() > 1e-2, "the blocks must move the output, or this proves nothing"
    set_merged(a.model, True)
    for got, want in zip(outputs(a.model, batch), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    merged = merge_into_base(a.model)
    assert not any(isinstance(m, DiaBloLinear) for m in merged.modules())
    for got, want in zip(outputs(merged, batch), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("option", "message"), [({"num_blocks": 0}, "num_blocks must be at least 1"),
                                                  ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")])
def test_bad_options_are_refused_before_any_model_loads(option, message):
    with pytest.raises(UserError, match=message):
        methods.build({"name": "diablo", **option})
