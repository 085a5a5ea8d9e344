"""ETHER and ETHER+ (not in peft): the closed forms by hand, on small random matrices and the tiny BERT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.ether import EtherLinear, EtherPlusLinear, reflect, relaxed_reflect

from ._helpers import assert_gradients_exactly, build, hf_model, logits, outputs


def _householder(u: torch.Tensor) -> torch.Tensor:
    """The dense block-diagonal H = diag(I − 2 û ûᵀ), built directly."""
    return torch.block_diag(*[torch.eye(len(b)) - 2 * torch.outer(b, b) / (b @ b) for b in u])


def _relaxed(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The dense block-diagonal H⁺ = diag(I − û ûᵀ + v̂ v̂ᵀ), built directly."""
    return torch.block_diag(*[torch.eye(len(a)) - torch.outer(a, a) / (a @ a) + torch.outer(b, b) / (b @ b) for a, b in zip(u, v)])


def _ether_plus(in_f=12, out_f=8, n_blocks=2, bias=True, std=0.5) -> EtherPlusLinear:
    torch.manual_seed(0)
    m = EtherPlusLinear(nn.Linear(in_f, out_f, bias=bias), n_blocks)
    with torch.no_grad():
        for p in (m.ether_v_in, m.ether_v_out):  # move v away from u: H⁺ ≠ I
            p.add_(torch.randn(p.shape) * std)
    return m


# --- ETHER ---------------------------------------------------------------------------------------


def test_h_is_a_block_diagonal_orthogonal_symmetric_involution():
    torch.manual_seed(0)
    u = torch.randn(3, 4)
    h = reflect(torch.eye(12), u)  # H applied to every basis vector: the dense H (symmetric, so rows = columns)
    torch.testing.assert_close(h, _householder(u), atol=1e-6, rtol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h.T, atol=1e-6, rtol=0)
    for i in range(3):  # one reflection per block, nothing between blocks
        block = h[4 * i: 4 * i + 4, 4 * i: 4 * i + 4]
        assert torch.linalg.det(block).item() == pytest.approx(-1, abs=1e-5)
        torch.testing.assert_close((block - torch.eye(4)).norm(), torch.tensor(2.0), atol=1e-5, rtol=0)
        off = h[4 * i: 4 * i + 4].clone()
        off[:, 4 * i: 4 * i + 4] = 0
        assert torch.count_nonzero(off) == 0
    # H u = −u and H w = w for w ⟂ u, block by block
    torch.testing.assert_close(reflect(u.flatten(), u), -u.flatten(), atol=1e-6, rtol=0)
    w = torch.randn(3, 4)
    w = w - (w * u).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u
    torch.testing.assert_close(reflect(w.flatten(), u), w.flatten(), atol=1e-6, rtol=0)


def test_h_only_depends_on_the_direction_of_u():
    torch.manual_seed(0)
    u, x = torch.randn(2, 5), torch.randn(3, 10)
    torch.testing.assert_close(reflect(x, u), reflect(x, u * torch.tensor([[7.0], [-0.1]])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_w_h_x_and_keeps_norms(bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 6, bias=bias)
    m = EtherLinear(base, n_blocks=3)
    x = torch.randn(2, 5, 12)
    h = _householder(m.ether_u.detach())
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ (base.weight @ h).T + (base.bias if bias else 0), atol=1e-5, rtol=0)
        hx = reflect(x, m.ether_u)
        torch.testing.assert_close(hx.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)  # ‖H x‖ = ‖x‖
        # W H has W's singular values: a reflection changes directions, never scales
        torch.testing.assert_close(torch.linalg.svdvals(base.weight @ h), torch.linalg.svdvals(base.weight), atol=1e-5, rtol=0)


def test_is_a_reflection_not_the_identity_at_init():
    """As the paper's code: u is kaiming-uniform, so ETHER starts reflected, at distance 2 from I per block."""
    torch.manual_seed(0)
    base = nn.Linear(32, 8)
    m = EtherLinear(base, n_blocks=4)
    x = torch.randn(3, 32)
    assert m.ether_u.shape == (4, 8)
    with torch.no_grad():
        assert (m(x) - base(x)).abs().max() > 1e-2
    h = _householder(m.ether_u.detach())
    torch.testing.assert_close((h - torch.eye(32)).norm(), torch.tensor(2.0 * 4**0.5), atol=1e-5, rtol=0)


def test_ether_merge_is_exact_and_unmerge_reflects_back():
    torch.manual_seed(0)
    m = EtherLinear(nn.Linear(12, 6), n_blocks=2)
    x = torch.randn(4, 12)
    w0, b0 = m.base_layer.weight.clone(), m.base_layer.bias.clone()
    with torch.no_grad():
        expected = m(x)
        m.merge()
        torch.testing.assert_close(m.base_layer.weight, w0 @ _householder(m.ether_u), atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        m.unmerge()
    torch.testing.assert_close(m.base_layer.weight, w0, atol=1e-6, rtol=0)
    assert torch.equal(m.base_layer.bias, b0)


# --- ETHER+ --------------------------------------------------------------------------------------


def test_ether_plus_starts_as_identity(tiny_bert, batch):
    a = build(tiny_bert, {"name": "ether_plus"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    layers = [m for m in a.model.modules() if isinstance(m, EtherPlusLinear)]
    assert len(layers) == 5 and all(torch.equal(m.ether_u_in, m.ether_v_in) for m in layers)
    torch.testing.assert_close(outputs(a.model, batch)[1], outputs(plain, batch)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(a.model, batch), logits(plain, batch), atol=1e-6, rtol=0)


def test_ether_plus_matrix_is_symmetric_and_near_identity():
    m = _ether_plus()
    with torch.no_grad():
        h = relaxed_reflect(torch.eye(12), m.ether_u_in, m.ether_v_in)
        dense = _relaxed(m.ether_u_in, m.ether_v_in)
    torch.testing.assert_close(h, dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h.T, atol=1e-6, rtol=0)
    assert (h @ h.T - torch.eye(12)).abs().max() > 1e-2  # relaxed: no longer orthogonal
    for i in range(2):  # ‖H⁺ − I‖_F = ‖v̂v̂ᵀ − ûûᵀ‖_F ≤ √2 per block
        block = h[6 * i: 6 * i + 6, 6 * i: 6 * i + 6]
        assert 0.1 < (block - torch.eye(6)).norm().item() <= 2**0.5 + 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_ether_plus_forward_is_h_out_w_h_in_x_plus_b(bias):
    m = _ether_plus(bias=bias)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        h_in, h_out = _relaxed(m.ether_u_in, m.ether_v_in), _relaxed(m.ether_u_out, m.ether_v_out)
        w = m.base_layer.weight
        expected = x @ (h_out @ w @ h_in).T + (m.base_layer.bias if bias else 0)  # the bias is not transformed
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-2


def test_ether_plus_merge_and_unmerge_are_exact():
    m = _ether_plus()
    x = torch.randn(4, 12)
    w0 = m.base_layer.weight.clone()
    with torch.no_grad():
        expected = m(x)
        m.merge()
        h_in, h_out = _relaxed(m.ether_u_in, m.ether_v_in), _relaxed(m.ether_u_out, m.ether_v_out)
        torch.testing.assert_close(m.base_layer.weight, h_out @ w0 @ h_in, atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        m.unmerge()
    assert torch.equal(m.base_layer.weight, w0)


def test_ether_plus_unmerge_survives_a_near_singular_h():
    """û almost ⟂ v̂: H⁺ is nearly singular, yet unmerge gives W back (it restores, not inverts)."""
    m = _ether_plus(in_f=4, out_f=4, n_blocks=1, std=0.0)
    with torch.no_grad():
        m.ether_u_in.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        m.ether_v_in.copy_(torch.tensor([[1e-4, 1.0, 0, 0]]))
    w0 = m.base_layer.weight.clone()
    m.merge()
    m.unmerge()
    assert torch.equal(m.base_layer.weight, w0) and m.weight_before_merge is None


# --- both: the model, gradients, counts, refusals ------------------------------------------------


@pytest.mark.parametrize("name, params, per_layer", [
    ("ether", ("ether_u",), lambda i, o: i),
    ("ether_plus", ("ether_u_in", "ether_v_in", "ether_u_out", "ether_v_out"), lambda i, o: 2 * (i + o)),
])
def test_trainable_tensors_count_and_gradients(tiny_bert, batch, name, params, per_layer):
    a = build(tiny_bert, {"name": name})
    model = a.model.train()
    cls = EtherLinear if name == "ether" else EtherPlusLinear
    wrapped = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert wrapped == [f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2) for s in ("query", "value")] + ["bert.pooler.dense"]
    expected = {f"{n}.{p}" for n in wrapped for p in params} | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    # 5 layers of 32 → 32, plus the head 32·2+2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * per_layer(32, 32) + 32 * 2 + 2

    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 0]))
    # H depends on û alone, so u's gradient has no component along u
    u = model.get_submodule(wrapped[0]).get_parameter(params[0])
    torch.testing.assert_close((u.grad * u).sum(-1), torch.zeros(4), atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", ["ether", "ether_plus"])
def test_merge_on_the_model_is_exact(tiny_bert, batch, name):
    from peftkit.methods.base import set_merged

    a = build(tiny_bert, {"name": name})
    model = a.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ether_" in n:
                p.add_(torch.randn(p.shape) * 0.3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = outputs(model, batch)[1]
    set_merged(model, True)
    torch.testing.assert_close(outputs(model, batch)[1], expected, atol=1e-5, rtol=0)
    set_merged(model, False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


def test_functional_forms_agree_with_a_direct_computation():
    """reflect and relaxed_reflect against x − 2(x·û)û and x − (x·û)û + (x·v̂)v̂ on one block."""
    torch.manual_seed(0)
    x, u, v = torch.randn(3, 6), torch.randn(1, 6), torch.randn(1, 6)
    uh, vh = F.normalize(u[0], dim=0), F.normalize(v[0], dim=0)
    torch.testing.assert_close(reflect(x, u), x - 2 * (x @ uh)[:, None] * uh, atol=1e-6, rtol=0)
    torch.testing.assert_close(relaxed_reflect(x, u, v), x - (x @ uh)[:, None] * uh + (x @ vh)[:, None] * vh, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, cfg, message", [
    ("ether", {"n_blocks": 5}, "n_blocks=5 must split in_features=32 .* choose one of: 1, 2, 4, 8, 16"),
    ("ether", {"n_blocks": 32}, "blocks of 2 or more"),
    ("ether_plus", {"n_blocks": 3}, "choose one of: 1, 2, 4, 8, 16"),
])
def test_bad_block_counts_are_user_errors(tiny_bert, name, cfg, message):
    with pytest.raises(UserError, match=message):
        methods.prepare(hf_model(tiny_bert), methods.build({"name": name, **cfg}), head=["classifier"])


@pytest.mark.parametrize("name", ["ether", "ether_plus"])
def test_no_blocks_is_refused_before_any_model_loads(name):
    with pytest.raises(UserError, match="method.n_blocks must be at least 1, got 0"):
        methods.build({"name": name, "n_blocks": 0})


def test_ether_plus_checks_the_output_side_too(tiny_llama):
    """Llama's v_proj is 32 → 16 (2 KV heads of 8): 16 blocks fit the input, not the output."""
    model = hf_model(tiny_llama)
    with pytest.raises(UserError, match="out_features=16 .* choose one of: 1, 2, 4, 8$"):
        methods.prepare(model, methods.build({"name": "ether_plus", "n_blocks": 16, "target_modules": ["v_proj"]}), head=["score"])
    methods.prepare(hf_model(tiny_llama), methods.build({"name": "ether", "n_blocks": 16, "target_modules": ["v_proj"]}), head=["score"])


@pytest.mark.parametrize("name", ["ether", "ether_plus"])
def test_unknown_option_is_a_user_error(name):
    with pytest.raises(UserError, match="no option nb"):
        methods.build({"name": name, "nb": 4})
