"""VB-LoRA: the same numbers as Hugging Face peft on the same bank and logits, one bank, the closed form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.vb_lora import VBLoraLinear, VectorBank

from ._helpers import LABELS, assert_gradients_exactly, backbone_cfg, build, hf_model, outputs, randomize_biases

# Three shapes (32→32, 32→64, 64→32), all multiples of the vector length, as peft requires.
TARGETS = ["query", "value", "intermediate.dense", "layer.1.output.dense"]
ATOL = 1e-6  # same ops in fp32 in both libraries: they agree to rounding (here bit for bit)
VB = {"name": "vb_lora", "r": 4, "num_vectors": 12, "vector_length": 16, "topk": 2}


def _layers(m) -> dict[str, VBLoraLinear]:
    return {n: x for n, x in m.named_modules() if isinstance(x, VBLoraLinear)}


@pytest.mark.parametrize("topk", [1, 3])
def test_forward_equals_peft(tiny_bert, batch, topk):
    from peft import VBLoRAConfig, get_peft_model
    from peft.tuners.vblora import VBLoRALayer

    r, n, length = 4, 12, 16
    base = hf_model(tiny_bert)
    randomize_biases(base)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1)
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, batch)[1]
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, VBLoRAConfig(r=r, num_vectors=n, vector_length=length, topk=topk,
                                            target_modules=TARGETS, vblora_dropout=0.0)).eval()
    methods.prepare(ours, methods.build({**VB, "r": r, "num_vectors": n, "vector_length": length, "topk": topk,
                                         "target_modules": TARGETS}), head=["classifier"])

    ref_wrapped = {k: m for k, m in ref.base_model.model.named_modules() if isinstance(m, VBLoRALayer)}
    ours_wrapped = _layers(ours)
    assert set(ours_wrapped) == set(ref_wrapped) and len(ours_wrapped) == 7
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref_bank = ref.base_model.vblora_vector_bank["default"]
        ref_bank.copy_(torch.randn(ref_bank.shape, generator=g) * 0.5)  # larger than the init: the update must show
        next(iter(ours_wrapped.values())).bank.vectors.copy_(ref_bank)
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name]
            for ref_logits, ours_logits in ((src.vblora_logits_A["default"], m.vblora_logits_A),
                                            (src.vblora_logits_B["default"], m.vblora_logits_B)):
                assert ours_logits.shape == ref_logits.shape
                ref_logits.copy_(torch.randn(ref_logits.shape, generator=g))
                ours_logits.copy_(ref_logits)
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    (expected, h_expected), (got, h_got) = outputs(ref, batch), outputs(ours, batch)
    assert (h_expected - before).abs().max() > 1e-1, "the adapter must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=1e-5, rtol=0)  # hidden states are O(1)


def _vb_linear(in_f, out_f, r=3, num_vectors=5, length=4, topk=2, bias=True) -> VBLoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias)
    bank = VectorBank(num_vectors, length, init_bound=1.0, like=base.weight)
    return VBLoraLinear(base, bank, r, topk, init_logits_std=1.0)


def _sub_vector(bank: torch.Tensor, logits: torch.Tensor, topk: int) -> torch.Tensor:
    """One sub-vector by hand: the top-k logits, softmaxed, weight their bank vectors."""
    idx = torch.argsort(logits, descending=True)[:topk]
    w = F.softmax(logits[idx], dim=0)
    return sum(w[j] * bank[idx[j]] for j in range(topk))


@pytest.mark.parametrize(("in_f", "out_f"), [(8, 12), (10, 6)], ids=["divisible", "last_piece_cut"])
def test_factors_are_built_sub_vector_by_sub_vector(in_f, out_f):
    m = _vb_linear(in_f, out_f)
    bank, la, lb = m.bank.vectors, m.vblora_logits_A, m.vblora_logits_B
    a = torch.zeros(3, la.shape[1] * 4)
    for i in range(3):
        for c in range(la.shape[1]):
            a[i, 4 * c: 4 * c + 4] = _sub_vector(bank, la[i, c], 2)
    b = torch.zeros(lb.shape[0] * 4, 3)
    for c in range(lb.shape[0]):
        for j in range(3):
            b[4 * c: 4 * c + 4, j] = _sub_vector(bank, lb[c, j], 2)
    got_a, got_b = m.factors()
    assert got_a.shape == (3, in_f) and got_b.shape == (out_f, 3)
    torch.testing.assert_close(got_a, a[:, :in_f], atol=1e-6, rtol=0)
    torch.testing.assert_close(got_b, b[:out_f], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_merge_are_the_closed_form(bias):
    m = _vb_linear(10, 6, bias=bias)
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        a, b = m.factors()
        expected = x @ (m.base_layer.weight + b @ a).T + (m.base_layer.bias if bias else 0)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-1
        original = m.base_layer.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, original, atol=1e-6, rtol=0)


def test_init_is_small_not_zero(tiny_bert, batch):
    """As the paper: bank U(-0.02, 0.02), logits N(0, 0.1²). The model starts close to, not at, its base."""
    a = build(tiny_bert, {"name": "vb_lora"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    m = next(iter(_layers(a.model).values()))
    assert m.bank.vectors.shape == (90, 128) and m.bank.vectors.abs().max() <= 0.02
    assert m.vblora_logits_A.std().item() == pytest.approx(0.1, rel=0.2)
    h, h_plain = outputs(a.model, batch)[1], outputs(plain, batch)[1]
    assert 0 < (h - h_plain).abs().max() < 1e-2


def test_one_bank_shared_and_saved_once(tiny_bert, tmp_path):
    a = build(tiny_bert, VB)
    layers = _layers(a.model)
    assert len({id(m.bank) for m in layers.values()}) == 1
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    keys = load_file(str(tmp_path / "adapter" / adapter.WEIGHTS))
    assert [k for k in keys if "bank" in k] == ["bert.encoder.layer.0.attention.self.query.bank.vectors"]
    assert sum(".vblora_logits_" in k for k in keys) == 2 * len(layers)

    b, _ = model.from_adapter(tmp_path / "adapter")
    loaded = list(_layers(b.model).values())
    assert len({id(m.bank) for m in loaded}) == 1
    assert torch.equal(loaded[-1].bank.vectors, next(iter(layers.values())).bank.vectors)


def test_sharing_survives_a_dtype_move(tiny_bert):
    a = build(tiny_bert, VB)
    a.model.to(torch.float64)
    layers = list(_layers(a.model).values())
    assert len({id(m.bank.vectors) for m in layers}) == 1 and layers[0].bank.vectors.dtype == torch.float64


def test_gradients_reach_bank_logits_and_head(tiny_bert, batch):
    a = build(tiny_bert, VB)
    net = a.model.train()
    layers = _layers(net)
    first = next(iter(layers))
    expected = {f"{n}.vblora_logits_{f}" for n in layers for f in "AB"} | {f"{first}.bank.vectors"}
    expected |= {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    assert_gradients_exactly(net, expected, batch, torch.tensor([1, 0, 0]), steps=1)  # the update is not zero at init: one step suffices
    bank_grad = net.get_submodule(first).bank.vectors.grad
    assert (bank_grad.abs().sum(-1) > 0).sum() > 1  # several bank vectors are in use


def test_only_the_top_k_logits_get_gradient():
    m = _vb_linear(8, 8, num_vectors=6, topk=2)
    a, b = m.factors()
    (b @ a).sum().backward()
    nonzero = (m.vblora_logits_A.grad != 0).sum(-1)
    assert torch.all(nonzero <= 2) and nonzero.sum() > 0


def test_trainable_count_is_the_formula(tiny_bert):
    """bank N·L, plus per layer r·N·(⌈in/L⌉ + ⌈out/L⌉), plus the head."""
    trainable, _ = count_params(build(tiny_bert, VB).model)
    assert trainable == 12 * 16 + 5 * 4 * 12 * (2 + 2) + (32 * 2 + 2)  # q, v x 2 layers + pooler
    trainable, _ = count_params(build(tiny_bert, {"name": "vb_lora"}).model)
    assert trainable == 90 * 128 + 5 * 4 * 90 * (1 + 1) + (32 * 2 + 2)  # 32 < 128: one cut sub-vector a side


@pytest.mark.parametrize(("option", "message"), [
    ({"r": 0}, "method.r must be at least 1"),
    ({"vector_length": 0}, "method.vector_length must be at least 1"),
    ({"topk": 13}, r"method.topk must be between 1 and num_vectors \(12\), got 13"),
    ({"topk": 0}, r"method.topk must be between 1 and num_vectors \(12\), got 0"),
])
def test_bad_values_are_user_errors(option, message):
    with pytest.raises(UserError, match=message):
        methods.build({**VB, **option})


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option bank_size"):
        methods.build({"name": "vb_lora", "bank_size": 8})
