"""LoHa and ABBA: ΔW = s·(B₁A₁)⊙(B₂A₂). LoHa against Hugging Face peft on the same weights; ABBA by
its closed form and its SVD init; both merge exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.loha import AbbaLinear, HadamardLinear, LohaLinear

from ._helpers import assert_gradients_exactly, build, hf_model, logits, outputs, randomize_biases

# peft forms ΔW and multiplies; we take the Khatri-Rao route, (B₁∗B₂)((A₁∗A₂)x): the same sums in a
# different order, so fp32 rounding differs (seen: 3e-7 on logits, 7e-7 on hidden states, both O(1)).
ATOL_LOGITS, ATOL_HIDDEN = 2e-6, 5e-6
PEFT_TO_OURS = {"hada_w1_a": "hada_B1", "hada_w1_b": "hada_A1", "hada_w2_a": "hada_B2", "hada_w2_b": "hada_A2"}


def _llama_batch(path):
    from transformers import AutoTokenizer

    from ._helpers import SENTENCES

    return dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt", return_token_type_ids=False))


@pytest.mark.parametrize("arch,targets", [
    ("bert", ["query", "value", "pooler.dense", "intermediate.dense", "output.dense"]),  # 32→64 and 64→32 too
    ("llama", ["q_proj", "v_proj", "down_proj"]),  # v_proj is 32→16 (grouped-query attention)
])
def test_loha_forward_equals_peft(tiny_bert, tiny_llama, batch, arch, targets):
    from peft import LoHaConfig, get_peft_model
    from peft.tuners.loha import LoHaLayer

    path, head = (tiny_bert, "classifier") if arch == "bert" else (tiny_llama, "score")
    inputs = batch if arch == "bert" else _llama_batch(tiny_llama)
    r, alpha = 4, 8  # s = alpha/r = 2: a wrong scaling rule shows
    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():
        getattr(base, head).weight.normal_(0, base.config.hidden_size**-0.5)
    h_before = outputs(base, inputs)[1]
    ours = copy.deepcopy(base)
    # init_weights=False: all four factors random (none zero), so the adapter moves the output
    ref = get_peft_model(base, LoHaConfig(r=r, alpha=alpha, target_modules=targets, init_weights=False)).eval()
    methods.prepare(ours, methods.build({"name": "loha", "r": r, "alpha": alpha, "target_modules": targets}), head=[head])

    ref_wrapped = {n: m for n, m in ref.base_model.model.named_modules() if isinstance(m, LoHaLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LohaLinear)}
    assert set(ours_wrapped) == set(ref_wrapped) and ref_wrapped
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name]
            assert m.scaling == pytest.approx(src.scaling["default"]) == alpha / r
            for peft_name, our_name in PEFT_TO_OURS.items():
                p = getattr(src, peft_name)["default"]
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # away from peft's init
                getattr(m, our_name).copy_(p)
            torch.testing.assert_close(m.delta_weight(), src.get_delta_weight("default"), atol=1e-6, rtol=0)
        getattr(ours, head).load_state_dict(getattr(ref.base_model.model, head).state_dict())
    (expected, h_expected), (got, h_got) = outputs(ref, inputs), outputs(ours, inputs)
    assert (h_expected - h_before).abs().max() > 1e-2, "the adapter must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL_LOGITS, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=ATOL_HIDDEN, rtol=0)


def _randomized(m: HadamardLinear, seed: int = 0) -> HadamardLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.hada_A1, m.hada_B1, m.hada_A2, m.hada_B2, m.base_layer.bias):
            p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("make", [
    lambda base: LohaLinear(base, r=3, alpha=6.0),
    lambda base: AbbaLinear(base, r1=2, r2=5, alpha=6.0),
], ids=["loha", "abba_r1_ne_r2"])
def test_forward_is_the_closed_form_on_a_non_square_layer(make):
    torch.manual_seed(0)
    m = _randomized(make(nn.Linear(7, 11)))
    r1, r2 = m.hada_A1.shape[0], m.hada_A2.shape[0]
    delta = torch.zeros(11, 7)
    for i in range(11):  # entry by entry: Σ_j B₁[i,j]A₁[j,k] · Σ_l B₂[i,l]A₂[l,k]
        for k in range(7):
            delta[i, k] = sum(m.hada_B1[i, j] * m.hada_A1[j, k] for j in range(r1)) * \
                sum(m.hada_B2[i, l] * m.hada_A2[l, k] for l in range(r2))
    delta *= m.scaling
    x = torch.randn(2, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(m.delta_weight(), delta, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(m(x), x @ (m.base_layer.weight + delta).T + m.base_layer.bias, atol=1e-4, rtol=1e-5)


def test_loha_init_zeroes_a2_only_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    m = LohaLinear(base, r=4, alpha=8.0)
    assert m.scaling == 2.0
    assert torch.count_nonzero(m.hada_A2) == 0
    assert all(torch.count_nonzero(p) == p.numel() for p in (m.hada_A1, m.hada_B1, m.hada_B2))
    # Kaiming-uniform with a=√5, as peft: bound 1/√fan_in (fan_in = r for B, in for A)
    assert m.hada_B1.abs().max() <= 1 / math.sqrt(4) and m.hada_A1.abs().max() <= 1 / math.sqrt(16)
    assert (m.hada_A1.shape, m.hada_B1.shape, m.hada_A2.shape, m.hada_B2.shape) == ((4, 16), (12, 4), (4, 16), (12, 4))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


def test_abba_init_is_the_truncated_svd_of_w_and_zero_update():
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    m = AbbaLinear(base, r1=5, r2=3, alpha=12.0)
    w = base.weight.detach()
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :5] @ torch.diag(sigma[:5]) @ vh[:5]  # Eckart-Young: the best rank-5 approximation
    with torch.no_grad():
        torch.testing.assert_close(m.hada_B1 @ m.hada_A1, best, atol=1e-5, rtol=0)
        # √Σ on each side: B₁ᵀB₁ = A₁A₁ᵀ = diag(σ₁..σ₅)
        torch.testing.assert_close(m.hada_B1.T @ m.hada_B1, torch.diag(sigma[:5]), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.hada_A1 @ m.hada_A1.T, torch.diag(sigma[:5]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(m.hada_B2) == 0 and torch.count_nonzero(m.hada_A2) == m.hada_A2.numel()
    assert m.hada_A2.shape == (3, 24) and m.hada_B2.shape == (20, 3)
    assert m.scaling == pytest.approx(12.0 / math.sqrt(15))
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


def test_abba_starts_as_the_base_model(tiny_bert, batch):
    a = build(tiny_bert, {"name": "abba"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert sum(isinstance(m, AbbaLinear) for m in a.model.modules()) == 5
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    assert torch.equal(outputs(a.model, batch)[1], outputs(plain, batch)[1])


@pytest.mark.parametrize("name", ["loha", "abba"])
def test_merge_folds_delta_weight_and_unmerge_restores(name):
    torch.manual_seed(0)
    base = nn.Linear(9, 6)
    m = LohaLinear(base, r=2, alpha=4.0) if name == "loha" else AbbaLinear(base, r1=2, r2=3, alpha=4.0)
    _randomized(m)
    x = torch.randn(5, 9)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        expected = m(x)
        m.merge()
        torch.testing.assert_close(base.weight, w0 + m.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x), base(x), atol=0, rtol=0)  # merged: the base layer alone
        m.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["loha", "abba"])
def test_gradients_reach_exactly_the_factors_and_head(tiny_bert, batch, name):
    a = build(tiny_bert, {"name": name})
    model = a.model.train()
    cls = LohaLinear if name == "loha" else AbbaLinear
    factors = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, cls)
               for p in ("hada_A1", "hada_B1", "hada_A2", "hada_B2")}
    expected = factors | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    zero = "hada_A2" if name == "loha" else "hada_B2"

    def step1():  # one factor is zero (LoHa's A₂, ABBA's B₂), so only it has a gradient yet
        for n, p in model.named_parameters():
            if n in factors:
                assert (p.grad.abs().sum() > 0) == n.endswith(zero), n

    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]), after_first_backward=step1)


def test_trainable_parameter_counts(tiny_bert):
    # Defaults target query, value (32×32, two layers) and the pooler (32×32): five 32×32 Linears.
    head = 32 * 2 + 2
    loha = build(tiny_bert, {"name": "loha"})  # 2·r·(in + out) per Linear, r = 8
    assert count_params(loha.model)[0] == 5 * 2 * 8 * (32 + 32) + head
    abba = build(tiny_bert, {"name": "abba", "r1": 3, "r2": 5})  # (r1 + r2)·(in + out) per Linear
    assert count_params(abba.model)[0] == 5 * (3 + 5) * (32 + 32) + head


def test_bad_values_are_user_errors(tiny_bert):
    with pytest.raises(UserError, match="method.r must be at least 1"):
        methods.build({"name": "loha", "r": 0})
    with pytest.raises(UserError, match="method.r2 must be at least 1"):
        methods.build({"name": "abba", "r2": 0})
    with pytest.raises(UserError, match=r"r1=40 exceeds .* min\(out, in\) = 32; choose 1..32"):
        methods.prepare(hf_model(tiny_bert), methods.build({"name": "abba", "r1": 40}), head=["classifier"])
    with pytest.raises(UserError, match="no option r; options: alpha, r1, r2, target_modules"):
        methods.build({"name": "abba", "r": 8})
