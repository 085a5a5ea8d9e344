"""LoRA-XS: the closed form W + s·U_r R Σ_r V_rᵀ on W's own SVD, identity at init, r² parameters
per target (peft has no LoRA-XS to compare against)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.lora_xs import PAPER_INIT_STD, LoraXSLinear

from ._helpers import assert_gradients_exactly, build, hf_model, logits


def _layer(in_f=12, out_f=10, r=4, init="zero", bias=True) -> LoraXSLinear:
    torch.manual_seed(0)
    return LoraXSLinear(nn.Linear(in_f, out_f, bias=bias).requires_grad_(False), r=r, alpha=8.0, dropout=0.0, init=init)


def test_frozen_factors_are_ws_top_singular_triplets_with_sigma_on_the_input_side():
    m = _layer()
    u, s, vh = torch.linalg.svd(m.base_layer.weight, full_matrices=False)
    torch.testing.assert_close(m.lora_xs_A, torch.diag(s[:4]) @ vh[:4], atol=1e-6, rtol=0)  # Σ_r V_rᵀ
    torch.testing.assert_close(m.lora_xs_B, u[:, :4], atol=1e-6, rtol=0)  # U_r
    assert m.scaling == 8.0 / 4
    # R = I/s gives ΔW = U_r Σ_r V_rᵀ, W's best rank-r approximation
    with torch.no_grad():
        m.lora_xs_R.copy_(torch.eye(4) / m.scaling)
    torch.testing.assert_close(m.delta_weight(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_closed_form(bias):
    m = _layer(bias=bias)
    with torch.no_grad():
        m.lora_xs_R.normal_()
    x = torch.randn(2, 5, 12)
    u, s, vh = torch.linalg.svd(m.base_layer.weight, full_matrices=False)
    w = m.base_layer.weight + m.scaling * u[:, :4] @ m.lora_xs_R @ torch.diag(s[:4]) @ vh[:4]
    expected = x @ w.T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-1


def test_zero_init_is_the_identity_and_gaussian_init_is_the_papers():
    x = torch.randn(4, 12)
    m = _layer(init="zero")
    assert torch.count_nonzero(m.lora_xs_R) == 0
    assert torch.equal(m(x), m.base_layer(x))
    torch.manual_seed(0)
    g = LoraXSLinear(nn.Linear(256, 256), r=64, alpha=64, dropout=0.0, init="gaussian")
    assert g.lora_xs_R.std().item() == pytest.approx(PAPER_INIT_STD, rel=0.05)
    torch.testing.assert_close(g(x.new_ones(1, 256)), g.base_layer(x.new_ones(1, 256)), atol=1e-3, rtol=0)


def test_merge_and_unmerge():
    m = _layer()
    with torch.no_grad():
        m.lora_xs_R.normal_()
        x = torch.randn(4, 12)
        expected, weight = m(x), m.base_layer.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, weight, atol=1e-6, rtol=0)


def test_gradients_reach_only_r_and_the_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "lora_xs", "r": 4, "init": "zero"})
    model = a.model.train()
    names = [n for n, m in model.named_modules() if isinstance(m, LoraXSLinear)]
    trained = {f"{n}.lora_xs_R" for n in names} | {"classifier.weight", "classifier.bias"}
    saved_buffers = {f"{n}.lora_xs_{x}" for n in names for x in ("A", "B")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert set(a.trainable) == trained | saved_buffers
    assert_gradients_exactly(model, trained, batch, torch.tensor([1, 0, 0]), steps=1)  # R = 0 still gets a gradient: U_r and Σ_r V_rᵀ are not 0


def test_zero_init_model_starts_as_the_base(tiny_bert, batch):
    a = build(tiny_bert, {"name": "lora_xs", "init": "zero"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


@pytest.mark.parametrize("r", [1, 4, 8])
def test_trainable_count_is_r_squared_per_target_plus_head(tiny_bert, r):
    a = build(tiny_bert, {"name": "lora_xs", "r": r})
    wrapped = [n for n, m in a.model.named_modules() if isinstance(m, LoraXSLinear)]
    per_layer = ("attention.self.query", "attention.self.value", "attention.output.dense", "output.dense")
    assert wrapped == [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in per_layer] + ["bert.pooler.dense"]
    assert count_params(a.model)[0] == 9 * r * r + 32 * 2 + 2


def test_bad_options_are_user_errors(tiny_bert):
    with pytest.raises(UserError, match="zero, gaussian"):
        methods.build({"name": "lora_xs", "init": "kaiming"})
    with pytest.raises(UserError, match="at least 1"):
        methods.build({"name": "lora_xs", "r": 0})
    with pytest.raises(UserError, match=r"r ≤ min\(out, in\) = 32"):  # needs the layers: at prepare
        methods.prepare(hf_model(tiny_bert), methods.build({"name": "lora_xs", "r": 33}), head=["classifier"])
