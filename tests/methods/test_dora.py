"""DoRA: the same numbers as peft's use_dora=True on the same weights, and the closed form
W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ (norm per output row)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.dora import DoraLinear

from ._helpers import assert_gradients_exactly, build, hf_model, outputs, randomize_biases

# Both compute base(x) + (g - 1)·(base(x) - b) + g·s·B(A(x)) in fp32 (peft builds BA as B(A(I))ᵀ, a
# different summation order for the norm): they agree to rounding. 1e-6 on logits and 1e-5 on hidden
# states, both O(1).
ATOL_LOGITS, ATOL_HIDDEN = 1e-6, 1e-5
TARGETS = ["query", "value", "pooler.dense"]


def _dora_vs_peft(path, batch, r: int, alpha: float, rslora: bool):
    from peft import LoraConfig, get_peft_model

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, batch)
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                          use_rslora=rslora, use_dora=True)).eval()
    methods.prepare(ours, methods.build({"name": "dora", "r": r, "alpha": alpha, "rslora": rslora,
                                         "target_modules": TARGETS}), head=["classifier"])
    with torch.no_grad():
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    return ref, ours, before


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_forward_equals_peft_at_init_and_after_perturbing(tiny_bert, batch, rslora):
    ref, ours, before = _dora_vs_peft(tiny_bert, batch, r=4, alpha=8, rslora=rslora)
    ref_modules = dict(ref.base_model.model.named_modules())
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, DoraLinear)}
    assert len(wrapped) == 5

    with torch.no_grad():
        for name, m in wrapped.items():  # the same init: m = ‖W‖ per output row, B = 0
            src = ref_modules[name]
            assert m.scaling == pytest.approx(src.scaling["default"])
            torch.testing.assert_close(m.dora_magnitude, src.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=0)
            torch.testing.assert_close(m.dora_magnitude, m.base_layer.weight.norm(dim=1), atol=1e-6, rtol=0)
            assert torch.count_nonzero(m.lora_B) == 0
    assert torch.equal(outputs(ours, batch)[1], before[1])  # exactly the base model at init

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move A, B and m away from init in peft, copy them across
        for name, m in wrapped.items():
            src = ref_modules[name]
            pairs = [(m.lora_A, src.lora_A["default"].weight), (m.lora_B, src.lora_B["default"].weight),
                     (m.dora_magnitude, src.lora_magnitude_vector["default"].weight)]
            for ours_p, ref_p in pairs:
                ref_p.add_(torch.randn(ref_p.shape, generator=g) * 0.3)
                ours_p.copy_(ref_p)
    ref_logits, ref_hidden = outputs(ref, batch)
    ours_logits, ours_hidden = outputs(ours, batch)
    assert (ref_hidden - before[1]).abs().max() > 1e-2, "the adapter must move the outputs, or this comparison proves nothing"
    assert (ref_logits - before[0]).abs().max() > 1e-2
    torch.testing.assert_close(ours_logits, ref_logits, atol=ATOL_LOGITS, rtol=0)
    torch.testing.assert_close(ours_hidden, ref_hidden, atol=ATOL_HIDDEN, rtol=0)


def _dora_linear(in_f=12, out_f=10, r=3, bias=True) -> DoraLinear:
    torch.manual_seed(0)
    m = DoraLinear(nn.Linear(in_f, out_f, bias=bias).requires_grad_(False), r=r, alpha=6.0, dropout=0.0, rslora=False, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
        m.dora_magnitude.mul_(1 + torch.rand(out_f))
    return m


def test_identity_at_init():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    m = DoraLinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False, init="kaiming")
    x = torch.randn(4, 12)
    assert torch.equal(m(x), base(x))
    assert torch.equal(m.dora_magnitude, base.weight.norm(dim=1))
    assert m.dora_magnitude.shape == (10,) and m.lora_A.shape == (3, 12) and m.lora_B.shape == (10, 3)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_closed_form(bias):
    m = _dora_linear(bias=bias)
    x = torch.randn(2, 5, 12)
    v = m.base_layer.weight + m.scaling * m.lora_B @ m.lora_A
    w = m.dora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    expected = x @ w.T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-1
        torch.testing.assert_close(w.norm(dim=1), m.dora_magnitude, atol=1e-5, rtol=0)  # m is each row's length


def test_merge_and_unmerge():
    m = _dora_linear()
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected, weight, bias = m(x), m.base_layer.weight.clone(), m.base_layer.bias.clone()
        m.merge()
        assert m.merged
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.base_layer.weight.norm(dim=1), m.dora_magnitude, atol=1e-5, rtol=0)
        assert torch.equal(m.base_layer.bias, bias)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)


def test_norm_is_a_constant_for_backprop():
    """As the paper's §4.3 and peft: gradients treat ‖W + s·BA‖ as a constant (same values, cheaper backward)."""
    m = _dora_linear()
    x = torch.randn(6, 12)
    m(x).square().sum().backward()
    got = [p.grad.clone() for p in (m.dora_magnitude, m.lora_A, m.lora_B)]

    a, b, mag = (p.detach().clone().requires_grad_(True) for p in (m.lora_A, m.lora_B, m.dora_magnitude))
    v = m.base_layer.weight + m.scaling * b @ a
    w = mag[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    (x @ w.T + m.base_layer.bias).square().sum().backward()
    for g, want in zip(got, (mag.grad, a.grad, b.grad)):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-5)
    assert m.base_layer.weight.grad is None


def test_gradients_reach_exactly_a_b_magnitude_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "dora", "r": 4})
    model = a.model.train()
    names = [n for n, m in model.named_modules() if isinstance(m, DoraLinear)]
    expected = {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B", "dora_magnitude")} | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected  # no buffers: everything else is recomputed from W
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).lora_B.normal_(0, 0.1)  # B = 0 would leave A without a gradient
    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]), steps=1)


def test_trainable_count_is_r_in_plus_out_plus_out_per_target(tiny_bert):
    r = 4
    a = build(tiny_bert, {"name": "dora", "r": r})
    wrapped = [n for n, m in a.model.named_modules() if isinstance(m, DoraLinear)]
    assert wrapped == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")] + ["bert.pooler.dense"]
    assert count_params(a.model)[0] == 5 * (r * (32 + 32) + 32) + 32 * 2 + 2


def test_bad_options_are_refused_before_any_model_loads():
    with pytest.raises(UserError, match="kaiming, gaussian"):
        methods.build({"name": "dora", "init": "pissa"})
    with pytest.raises(UserError, match="at least 1"):
        methods.build({"name": "dora", "r": 0})
