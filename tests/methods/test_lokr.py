"""LoKr: ΔW = s·(W₁ ⊗ W₂). The same numbers as Hugging Face peft on the same factors, peft's factor
sizes, the closed form entry by entry, and an exact merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.lokr import FullFactor, LokrLinear, LowRankFactor, kron_split

from ._helpers import assert_gradients_exactly, SENTENCES, build, hf_model, outputs, randomize_biases

# peft forms ΔW = s·kron(W₁, W₂) and multiplies; we compute W₁ X W₂ᵀ: the same sums in another
# order, so fp32 rounding differs (seen: ≤ 3e-7 on logits, ≤ 1.2e-6 on hidden states, both O(1)).
ATOL_LOGITS, ATOL_HIDDEN = 2e-6, 5e-6
BERT_TARGETS = ["query", "value", "pooler.dense", "intermediate.dense", "output.dense"]  # 32×32, 32→64, 64→32


def _peft_factors(src) -> dict[str, torch.Tensor]:
    """peft's LoKr tensors by our names (lokr_w1.weight, lokr_w2.B, ...)."""
    ours = {"lokr_w1": "lokr_w1.weight", "lokr_w1_a": "lokr_w1.B", "lokr_w1_b": "lokr_w1.A",
            "lokr_w2": "lokr_w2.weight", "lokr_w2_a": "lokr_w2.B", "lokr_w2_b": "lokr_w2.A"}
    return {ours[k]: getattr(src, k)["default"] for k in ours if "default" in getattr(src, k)}


@pytest.mark.parametrize("arch,options", [
    ("bert", {"r": 8}),  # r ≥ max(8, 8)/2: W₂ whole
    ("bert", {"r": 2}),  # W₂ = B A
    ("bert", {"r": 1, "decompose_both": True}),  # W₁ = B A too
    ("bert", {"r": 2, "decompose_factor": 8}),  # 32 = 8·4, 64 = 8·8: W₁ the larger factor
    ("llama", {"r": 2}),  # q 32×32, v 32→16, down 64→32
], ids=["bert_w2_whole", "bert_w2_low_rank", "bert_both_low_rank", "bert_factor_8", "llama"])
def test_forward_equals_peft(tiny_bert, tiny_llama, batch, arch, options):
    from peft import LoKrConfig, get_peft_model
    from peft.tuners.lokr import LoKrLayer
    from transformers import AutoTokenizer

    if arch == "bert":
        path, head, targets, inputs = tiny_bert, "classifier", BERT_TARGETS, batch
    else:
        path, head, targets = tiny_llama, "score", ["q_proj", "v_proj", "down_proj"]
        inputs = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt",
                                                          return_token_type_ids=False))
    alpha = 6.0  # s = alpha/r ≠ 1: a wrong scaling rule shows
    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():
        getattr(base, head).weight.normal_(0, base.config.hidden_size**-0.5)
    h_before = outputs(base, inputs)[1]
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, LoKrConfig(alpha=alpha, target_modules=targets, init_weights=False, **options)).eval()
    methods.prepare(ours, methods.build({"name": "lokr", "alpha": alpha, "target_modules": targets, **options}), head=[head])

    ref_wrapped = {n: m for n, m in ref.base_model.model.named_modules() if isinstance(m, LoKrLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LokrLinear)}
    assert set(ours_wrapped) == set(ref_wrapped) and ref_wrapped
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name]
            assert m.scaling == pytest.approx(src.scaling["default"]) == alpha / options["r"]
            factors = _peft_factors(src)
            mine = dict(m.named_parameters())
            assert {k: v.shape for k, v in factors.items()} == {k: v.shape for k, v in mine.items() if k.startswith("lokr_")}
            for k, p in factors.items():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # away from peft's init
                mine[k].copy_(p)
            torch.testing.assert_close(m.delta_weight(), src.get_delta_weight("default"), atol=1e-6, rtol=0)
        getattr(ours, head).load_state_dict(getattr(ref.base_model.model, head).state_dict())
    (expected, h_expected), (got, h_got) = outputs(ref, inputs), outputs(ours, inputs)
    assert (h_expected - h_before).abs().max() > 1e-2, "the adapter must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL_LOGITS, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=ATOL_HIDDEN, rtol=0)


def test_factor_sizes_follow_peft():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 1100):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64, 100):
            assert kron_split(dim, factor) == factorization(dim, factor), (dim, factor)
    assert kron_split(768) == (24, 32) and kron_split(384) == (16, 24) and kron_split(127) == (1, 127)
    assert kron_split(128, 4) == (4, 32) and kron_split(30, 4) == (3, 10)  # 4 does not divide 30


def test_which_factors_are_low_rank():
    m = LokrLinear(nn.Linear(384, 1536), r=8, alpha=8, decompose_factor=-1, decompose_both=False)
    # out 1536 = 32·48, in 384 = 16·24: W₁ 32×16 whole, W₂ 48×24 as B A (8 < 48/2)
    assert isinstance(m.lokr_w1, FullFactor) and m.lokr_w1.weight.shape == (32, 16)
    assert isinstance(m.lokr_w2, LowRankFactor) and (m.lokr_w2.B.shape, m.lokr_w2.A.shape) == ((48, 8), (8, 24))
    m = LokrLinear(nn.Linear(384, 1536), r=8, alpha=8, decompose_factor=-1, decompose_both=True)
    assert isinstance(m.lokr_w1, LowRankFactor) and (m.lokr_w1.B.shape, m.lokr_w1.A.shape) == ((32, 8), (8, 16))
    m = LokrLinear(nn.Linear(32, 32), r=8, alpha=8, decompose_factor=-1, decompose_both=True)
    assert isinstance(m.lokr_w1, FullFactor) and isinstance(m.lokr_w2, FullFactor)  # 8 ≥ max(4, 8)/2


@pytest.mark.parametrize("r,decompose_both", [(8, False), (1, True)])
def test_init_makes_w1_zero_so_the_layer_starts_as_its_base(r, decompose_both):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    m = LokrLinear(base, r=r, alpha=8, decompose_factor=-1, decompose_both=decompose_both)
    w1_zero = m.lokr_w1.weight if isinstance(m.lokr_w1, FullFactor) else m.lokr_w1.B
    assert torch.count_nonzero(w1_zero) == 0
    assert all(torch.count_nonzero(p) == p.numel() for n, p in m.named_parameters()
               if n.startswith("lokr_") and p is not w1_zero)
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


def _randomized(m: LokrLinear, seed: int = 0) -> LokrLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("r", [8, 1], ids=["whole", "low_rank"])
def test_delta_weight_entry_by_entry_and_forward(r):
    # out 12 = 3·4, in 10 = 2·5: ΔW[4a+b, 5c+d] = s·W₁[a,c]·W₂[b,d]
    m = _randomized(LokrLinear(nn.Linear(10, 12), r=r, alpha=3.0, decompose_factor=-1, decompose_both=True))
    with torch.no_grad():
        w1, w2 = m.lokr_w1(), m.lokr_w2()
        assert w1.shape == (3, 2) and w2.shape == (4, 5)
        delta = torch.empty(12, 10)
        for a in range(3):
            for b in range(4):
                for c in range(2):
                    for d in range(5):
                        delta[4 * a + b, 5 * c + d] = m.scaling * w1[a, c] * w2[b, d]
        torch.testing.assert_close(m.delta_weight(), delta, atol=1e-5, rtol=1e-6)
        x = torch.randn(2, 3, 10)
        torch.testing.assert_close(m(x), x @ (m.base_layer.weight + delta).T + m.base_layer.bias, atol=1e-4, rtol=1e-5)


def test_merge_folds_delta_weight_and_unmerge_restores():
    m = _randomized(LokrLinear(nn.Linear(16, 12), r=1, alpha=2.0, decompose_factor=-1, decompose_both=False))
    base = m.base_layer
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = m(x)
        m.merge()
        torch.testing.assert_close(base.weight, w0 + m.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-4, rtol=1e-5)
        assert torch.equal(m(x), base(x))  # merged: the base layer alone
        m.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-5, rtol=0)


def test_gradients_reach_exactly_the_factors_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "lokr", "r": 2})  # W₂ = B A on the 32×32 targets
    model = a.model.train()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LokrLinear)}
    assert len(wrapped) == 5
    factors = {f"{n}.{p}" for n in wrapped for p in ("lokr_w1.weight", "lokr_w2.B", "lokr_w2.A")}
    expected = factors | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    def step1():  # W₁ = 0, so only W₁ has a gradient
        for n in factors:
            assert (model.get_parameter(n).grad.abs().sum() > 0) == n.endswith("lokr_w1.weight"), n

    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]), after_first_backward=step1)


def test_trainable_parameter_counts(tiny_bert):
    head = 32 * 2 + 2
    # Defaults: five 32×32 Linears (query, value ×2 layers, pooler); 32 = 4·8, so W₁ 4×4 and W₂ 8×8
    # (whole: r = 8 ≥ 8/2).
    assert count_params(build(tiny_bert, {"name": "lokr"}).model)[0] == 5 * (4 * 4 + 8 * 8) + head
    # r = 2: W₂ = B A with r·(8 + 8) parameters.
    assert count_params(build(tiny_bert, {"name": "lokr", "r": 2}).model)[0] == 5 * (4 * 4 + 2 * (8 + 8)) + head


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="method.r must be at least 1"):
        methods.build({"name": "lokr", "r": 0})
    with pytest.raises(UserError, match=r"decompose_factor must be -1 \(most balanced split\) or a positive integer, got 0"):
        methods.build({"name": "lokr", "decompose_factor": 0})
    with pytest.raises(UserError, match="no option rank"):
        methods.build({"name": "lokr", "rank": 4})
    assert math.isclose(LokrLinear(nn.Linear(8, 8), r=4, alpha=2, decompose_factor=-1, decompose_both=False).scaling, 0.5)
