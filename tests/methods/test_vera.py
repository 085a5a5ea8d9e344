"""VeRA: the same numbers as Hugging Face peft on the same tensors, one shared A and B, the closed form."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.vera import VeraLinear, VeraProjections

from ._helpers import assert_gradients_exactly, LABELS, backbone_cfg, build, hf_model, logits, outputs, randomize_biases

# Layers of three shapes (32→32, 32→64, 64→32): A and B are 64 wide and every layer slices them.
TARGETS = ["query", "intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"]
ATOL = 1e-6  # same ops in fp32 in both libraries: they agree to rounding (here bit for bit)
VERA = {"name": "vera", "r": 16}


def _peft_and_ours(path, r: int, seed: int):
    from peft import VeraConfig, get_peft_model

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1)
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, VeraConfig(r=r, target_modules=TARGETS, projection_prng_key=seed, vera_dropout=0.0)).eval()
    methods.prepare(ours, methods.build({"name": "vera", "r": r, "projection_seed": seed, "target_modules": TARGETS}),
                    head=["classifier"])
    return ref, ours


def test_same_seed_gives_peft_projections(tiny_bert):
    ref, ours = _peft_and_ours(tiny_bert, r=16, seed=7)
    proj = next(m for m in ours.modules() if isinstance(m, VeraLinear)).projections
    assert proj.vera_A.shape == (16, 64) and proj.vera_B.shape == (64, 16)
    assert torch.equal(proj.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, ref.base_model.vera_B["default"])


def test_forward_equals_peft(tiny_bert, batch):
    from peft.tuners.vera import VeraLayer

    ref, ours = _peft_and_ours(tiny_bert, r=16, seed=0)
    before = outputs(ours, batch)[1]
    ref_wrapped = {n: m for n, m in ref.base_model.model.named_modules() if isinstance(m, VeraLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, VeraLinear)}
    assert set(ours_wrapped) == set(ref_wrapped) and len(ours_wrapped) == 6

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        shared = next(iter(ours_wrapped.values())).projections
        for ref_t, ours_t in ((ref.base_model.vera_A["default"], shared.vera_A), (ref.base_model.vera_B["default"], shared.vera_B)):
            ref_t.add_(torch.randn(ref_t.shape, generator=g) * 0.1)  # not the seeded init: the copy must matter
            ours_t.copy_(ref_t)
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name]
            for ref_p in (src.vera_lambda_b["default"], src.vera_lambda_d["default"]):
                ref_p.copy_(torch.randn(ref_p.shape, generator=g))  # b = 0 at init would hide everything
            m.vera_lambda_b.copy_(src.vera_lambda_b["default"])
            m.vera_lambda_d.copy_(src.vera_lambda_d["default"])
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    (expected, h_expected), (got, h_got) = outputs(ref, batch), outputs(ours, batch)
    assert (h_expected - before).abs().max() > 1e-1, "the adapter must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=1e-5, rtol=0)  # hidden states are O(1)


def test_one_projection_pair_shared_and_saved_once(tiny_bert, tmp_path):
    cfg = {**VERA, "target_modules": TARGETS}
    a = build(tiny_bert, cfg)
    layers = [m for m in a.model.modules() if isinstance(m, VeraLinear)]
    assert len({id(m.projections) for m in layers}) == 1
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    keys = load_file(str(tmp_path / "adapter" / adapter.WEIGHTS))
    assert [k for k in keys if "vera_A" in k or "vera_B" in k] == [
        "bert.encoder.layer.0.attention.self.query.projections.vera_A",
        "bert.encoder.layer.0.attention.self.query.projections.vera_B",
    ]
    assert sum(".vera_lambda_" in k for k in keys) == 2 * len(layers)

    b, _ = model.from_adapter(tmp_path / "adapter")
    loaded = [m for m in b.model.modules() if isinstance(m, VeraLinear)]
    assert len({id(m.projections) for m in loaded}) == 1
    assert torch.equal(loaded[0].projections.vera_A, layers[0].projections.vera_A)


def test_sharing_survives_a_dtype_move(tiny_bert):
    a = build(tiny_bert, VERA)
    a.model.to(torch.float64)
    layers = [m for m in a.model.modules() if isinstance(m, VeraLinear)]
    assert {m.projections.vera_A.dtype for m in layers} == {torch.float64}
    assert len({id(m.projections.vera_A) for m in layers}) == 1


def test_starts_unchanged(tiny_bert, batch):
    a = build(tiny_bert, VERA)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    m = next(m for m in a.model.modules() if isinstance(m, VeraLinear))
    assert torch.equal(m.vera_lambda_d, torch.full((16,), 0.1)) and torch.count_nonzero(m.vera_lambda_b) == 0
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_merge_are_the_closed_form(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=bias)
    proj = VeraProjections(r=4, in_max=9, out_max=7, seed=0, like=base.weight)
    m = VeraLinear(base, proj, d_initial=0.1)
    with torch.no_grad():
        m.vera_lambda_b.normal_()
        m.vera_lambda_d.normal_()
        x = torch.randn(2, 3, 6)
        a, b = proj.vera_A[:, :6], proj.vera_B[:5, :]
        w = base.weight + torch.diag(m.vera_lambda_b) @ b @ torch.diag(m.vera_lambda_d) @ a
        expected = x @ w.T + (base.bias if bias else 0)
        # fp32's own tolerances (rtol 1.3e-6, atol 1e-5): the two sides sum the same products in a
        # different order, which moves outputs near 3 by up to ~1.4e-6 on some BLAS paths; a wrong
        # formula is off by tenths
        torch.testing.assert_close(m(x), expected)
        original = base.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), expected)
        m.unmerge()
        torch.testing.assert_close(base.weight, original)


def test_projection_init_is_kaiming_uniform_from_the_seed():
    like = torch.empty(0)
    p, q = VeraProjections(64, 400, 300, seed=5, like=like), VeraProjections(64, 400, 300, seed=5, like=like)
    assert torch.equal(p.vera_A, q.vera_A) and torch.equal(p.vera_B, q.vera_B)
    assert not torch.equal(p.vera_A, VeraProjections(64, 400, 300, seed=6, like=like).vera_A)
    for t, fan_in in ((p.vera_A, 400), (p.vera_B, 64)):
        bound = (6 / fan_in) ** 0.5
        assert t.abs().max() <= bound and t.abs().max() > 0.95 * bound


def test_gradients_reach_exactly_the_vectors_and_head(tiny_bert, batch):
    a = build(tiny_bert, VERA)
    model_ = a.model.train()
    layers = {n: m for n, m in model_.named_modules() if isinstance(m, VeraLinear)}
    expected = {f"{n}.vera_lambda_{v}" for n in layers for v in "bd"} | {"classifier.weight", "classifier.bias"}
    assert {n for n, p in model_.named_parameters() if p.requires_grad} == expected
    buffers = [n for n in a.trainable if n not in expected]
    assert buffers == ["bert.encoder.layer.0.attention.self.query.projections.vera_A",
                       "bert.encoder.layer.0.attention.self.query.projections.vera_B"]

    assert_gradients_exactly(model_, expected, batch, torch.tensor([1, 0, 0]))  # step 1: b = 0, so d's gradient is zero


def test_trainable_count_is_the_formula(tiny_bert):
    """Per layer r + out; the shared A and B are buffers, not trained. Default roles: q, v x 2 layers + pooler."""
    from peftkit.methods.base import count_params

    a = build(tiny_bert, VERA)
    trainable, _ = count_params(a.model)
    assert trainable == 5 * (16 + 32) + (32 * 2 + 2)


def test_rank_below_one_is_a_user_error():
    with pytest.raises(UserError, match="method.r must be at least 1"):
        methods.build({"name": "vera", "r": 0})


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option seed; options: d_initial, projection_seed, r, target_modules"):
        methods.build({"name": "vera", "seed": 1})


def test_merge_into_base_leaves_a_plain_model(tiny_bert, batch):
    """After merging, no projection buffer is left behind: the state dict is that of the plain model."""
    from peftkit.methods.base import merge_into_base

    a = build(tiny_bert, VERA)
    with torch.no_grad():
        for m in a.model.modules():
            if isinstance(m, VeraLinear):
                m.vera_lambda_b.normal_()
    expected = outputs(a.model, batch)[1]
    merged = merge_into_base(a.model)
    assert set(merged.state_dict()) == set(hf_model(tiny_bert).state_dict())
    torch.testing.assert_close(outputs(merged, batch)[1], expected, atol=1e-5, rtol=0)
