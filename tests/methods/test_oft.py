"""OFT: the same numbers as Hugging Face peft (exact Cayley) on the same Q, and R orthogonal by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.oft import OFTLinear

from ._helpers import SENTENCES, build, hf_model, outputs, randomize_biases

BERT_TARGETS = ["query", "value", "pooler.dense"]
# Both rotate x by the same Cayley blocks, solved by LAPACK in fp32 with the sides swapped (we solve
# (I−Q)R = I+Q, peft R(I+Q) = I−Q for Rᵀ): rounding-level differences. Logits are O(1): 1e-5 absolute.
ATOL = 1e-5


def _peft_vs_peftkit(path, batch, targets, peft_kwargs: dict, ours_cfg: dict, std: float = 1.0, coft_eps=None):
    """(peft logits and hidden states, ours, the base model's hidden states, our model) with peft's Q copied into ours."""
    from peft import OFTConfig, get_peft_model
    from peft.tuners.oft import OFTLayer

    base = hf_model(path)
    randomize_biases(base)
    head = "classifier" if hasattr(base, "classifier") else "score"
    with torch.no_grad():
        base.get_submodule(head).weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, batch)[1]
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, OFTConfig(target_modules=targets, use_cayley_neumann=False, **peft_kwargs)).eval()
    method = methods.build({"name": "oft", "target_modules": targets, **ours_cfg})
    methods.prepare(ours, method, head=[head])

    ref_modules = dict(ref.base_model.model.named_modules())
    ref_wrapped = {n: m for n, m in ref_modules.items() if isinstance(m, OFTLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, OFTLinear)}
    assert set(ours_wrapped) == set(ref_wrapped) and ours_wrapped
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name].oft_R["default"].weight
            assert src.shape == m.oft_q.shape
            src.copy_(torch.randn(src.shape, generator=g) * std)  # Q = 0 would make R = I: perturb it
            m.oft_q.copy_(src)
        ours.get_submodule(head).load_state_dict(ref.base_model.model.get_submodule(head).state_dict())
    if coft_eps is not None:
        method.after_optimizer_step(ours, step=1, total_steps=1)
    return outputs(ref, batch), outputs(ours, batch), before, ours, ref_wrapped


@pytest.mark.parametrize("peft_kwargs, ours_cfg, block", [
    ({"oft_block_size": 8, "r": 0}, {"block_size": 8}, 8),
    ({"oft_block_size": 0, "r": 2}, {"block_size": 0, "r": 2}, 16),
], ids=["block_size", "r_blocks"])
def test_forward_equals_peft(tiny_bert, batch, peft_kwargs, ours_cfg, block):
    (ref, h_ref), (got, h_got), before, model, _ = _peft_vs_peftkit(tiny_bert, batch, BERT_TARGETS, peft_kwargs, ours_cfg)
    assert (h_ref - before).abs().max() > 2e-2, "the rotations must move the output, or this comparison proves nothing"
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_ref, atol=ATOL, rtol=0)  # hidden states are O(1) too
    assert {m.block_size for m in model.modules() if isinstance(m, OFTLinear)} == {block}


def test_forward_equals_peft_on_llama(tiny_llama):
    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(tiny_llama)(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    targets = ["q_proj", "v_proj", "down_proj"]  # down_proj: in_features 64, 8 blocks of 8
    (ref, h_ref), (got, h_got), before, model, _ = _peft_vs_peftkit(tiny_llama, batch, targets, {"oft_block_size": 8, "r": 0}, {"block_size": 8})
    assert sum(isinstance(m, OFTLinear) for m in model.modules()) == 6
    assert (h_ref - before).abs().max() > 2e-2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_ref, atol=ATOL, rtol=0)


def test_coft_projection_equals_peft(tiny_bert, batch):
    """peft projects Q inside forward; we project after each optimizer step. Same Q, same outputs."""
    eps = 4.0  # peft's default 6e-5 keeps R so close to I that the comparison could not fail
    (ref, h_ref), (got, h_got), before, model, ref_wrapped = _peft_vs_peftkit(
        tiny_bert, batch, BERT_TARGETS, {"oft_block_size": 8, "r": 0, "coft": True, "eps": eps},
        {"block_size": 8, "coft": True, "eps": eps}, coft_eps=eps)
    assert (h_ref - before).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_ref, atol=ATOL, rtol=0)
    for name, m in model.named_modules():
        if isinstance(m, OFTLinear):
            torch.testing.assert_close(m.oft_q, ref_wrapped[name].oft_R["default"].weight, atol=1e-7, rtol=0)
            assert (m.skew().norm(dim=(1, 2)) <= eps / m.oft_q.shape[0] ** 0.5 * (1 + 1e-6)).all()


def _oft_linear(in_f=12, out_f=5, block_size=4, bias=True, std=0.5) -> OFTLinear:
    torch.manual_seed(0)
    m = OFTLinear(nn.Linear(in_f, out_f, bias=bias), block_size)
    with torch.no_grad():
        m.oft_q.normal_(0, std)
    return m


def test_starts_as_identity():
    torch.manual_seed(0)
    base = nn.Linear(12, 5)
    m = OFTLinear(base, 4)
    x = torch.randn(3, 12)
    assert m.oft_q.shape == (3, 6) and torch.count_nonzero(m.oft_q) == 0
    assert torch.equal(m.rotation(), torch.eye(4).expand(3, 4, 4))
    assert torch.equal(m(x), base(x))


def test_rotation_is_the_cayley_transform_and_orthogonal():
    m = _oft_linear()
    q = m.skew()
    assert torch.equal(q, -q.transpose(1, 2))
    eye = torch.eye(4)
    expected = (eye + q) @ torch.linalg.inv(eye - q)
    r = m.rotation()
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye.expand(3, 4, 4), atol=1e-6, rtol=0)
    assert (r - eye).abs().max() > 0.1


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_times_w_r(bias):
    m = _oft_linear(bias=bias)
    x = torch.randn(2, 7, 12)
    r = torch.block_diag(*m.rotation())
    expected = x @ (m.base_layer.weight @ r).T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-1
        # R is orthogonal, so the rotated input keeps its norm
        rotated = torch.einsum("...nk,njk->...nj", x.reshape(2, 7, 3, 4), m.rotation()).reshape(x.shape)
        torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)


def test_merge_and_unmerge_are_exact():
    m = _oft_linear()
    x = torch.randn(4, 12)
    w0, b0 = m.base_layer.weight.clone(), m.base_layer.bias.clone()
    with torch.no_grad():
        expected = m(x)
        m.merge()
        assert m.merged
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.base_layer.weight, w0 @ torch.block_diag(*m.rotation()), atol=1e-6, rtol=0)
        m.unmerge()
    torch.testing.assert_close(m.base_layer.weight, w0, atol=1e-6, rtol=0)
    assert torch.equal(m.base_layer.bias, b0)


def test_coft_constrain_scales_only_large_blocks():
    m = _oft_linear()
    with torch.no_grad():
        m.oft_q[0].mul_(1e-4)  # this block is already inside the ball
    small, large = m.oft_q[0].clone(), m.oft_q[1:].clone()
    radius = 0.1 / 3**0.5
    m.constrain_(0.1)
    assert torch.equal(m.oft_q[0], small)
    norms = m.skew().norm(dim=(1, 2))
    torch.testing.assert_close(norms[1:], torch.full((2,), radius), atol=1e-6, rtol=0)
    # a projection, not a new direction
    torch.testing.assert_close(m.oft_q[1:] / m.oft_q[1:].norm(dim=1, keepdim=True),
                               large / large.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)


def test_default_targets_and_trainable_count(tiny_bert):
    a = build(tiny_bert, {"name": "oft"})
    wrapped = [n for n, m in a.model.named_modules() if isinstance(m, OFTLinear)]
    assert wrapped == [f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2) for s in ("query", "value")] + ["bert.pooler.dense"]
    # in·(b−1)/2 per layer: 32·31/2 for each of 5 layers with in_features 32, plus the head 32·2+2
    expected = 5 * 32 * 31 // 2 + 32 * 2 + 2
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == expected
    assert not any(".rows" in n or ".cols" in n for n in a.trainable)  # index caches are not saved


def test_gradients_reach_exactly_q_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "oft", "block_size": 8})
    model = a.model.train()
    expected = {f"{n}.oft_q" for n, m in model.named_modules() if isinstance(m, OFTLinear)} | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    labels = torch.tensor([1, 0, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, labels=labels).loss.backward()
    opt.step()
    a.method.after_optimizer_step(model, 1, 2)
    opt.zero_grad(set_to_none=True)
    model(**batch, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_coft_keeps_trained_q_in_the_ball(tiny_bert, batch):
    eps = 1e-3
    a = build(tiny_bert, {"name": "oft", "block_size": 8, "coft": True, "eps": eps})
    model = a.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    for step in range(1, 4):
        model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
        opt.step()
        a.method.after_optimizer_step(model, step, 3)
        opt.zero_grad()
    for m in model.modules():
        if isinstance(m, OFTLinear):
            norms = m.skew().norm(dim=(1, 2))
            radius = eps / 4**0.5  # eps/√(blocks): 4 blocks of 8
            assert norms.max() > radius * 0.99 and (norms <= radius * (1 + 1e-5)).all()


@pytest.mark.parametrize("cfg, message", [
    ({"block_size": 1}, "at least 2"),
    ({"block_size": 8, "r": 4}, "exactly one of method.block_size and method.r"),
    ({"block_size": 0, "r": 0}, "exactly one of method.block_size and method.r"),
    ({"coft": True, "eps": 0.0}, "eps must be positive"),
])
def test_bad_values_are_refused_before_any_model_loads(cfg, message):
    with pytest.raises(UserError, match=message):
        methods.build({"name": "oft", **cfg})


@pytest.mark.parametrize("cfg, message", [
    ({"block_size": 5}, "choose one of: 2, 4, 8, 16, 32"),
    ({"block_size": 0, "r": 3}, "choose one of: 1, 2, 4, 8, 16"),
])
def test_sizes_that_do_not_divide_the_layer_are_user_errors(tiny_bert, cfg, message):
    with pytest.raises(UserError, match=message):
        methods.prepare(hf_model(tiny_bert), methods.build({"name": "oft", **cfg}), head=["classifier"])


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option oft_block_size"):
        methods.build({"name": "oft", "oft_block_size": 8})
