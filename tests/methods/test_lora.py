"""LoRA: the same numbers as Hugging Face peft on the same weights, and the closed form W + s·BA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import minilm_dir, needs_minilm
from peftkit import adapter, methods
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.lora import LoraLinear, PissaLinear

from ._helpers import SENTENCES, build, hf_model, logits, perturb, randomize_biases

# Both implementations compute base(x) + B(A(x))·s with the same ops in fp32: they agree to
# rounding (in practice bit for bit). 1e-6 absolute on logits of order 1.
ATOL = 1e-6


def _peft_vs_peftkit(path, batch, targets: list[str], r: int, alpha: float, rslora: bool):
    """(peft logits, peftkit logits, base logits, peft model, peftkit model) on one model, one set of weights."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1), not O(0.01)
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = logits(base, batch)
    ours = copy.deepcopy(base)

    # No task_type: with SEQ_CLS peft would wrap the classifier in modules_to_save; its forward is unchanged
    # either way. init_lora_weights=False gives B random (not zero) weights, so the adapter changes the output.
    ref = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                          use_rslora=rslora, init_lora_weights=False)).eval()
    methods.prepare(ours, methods.build({"name": "lora", "r": r, "alpha": alpha, "rslora": rslora,
                                         "target_modules": targets}), head=["classifier"])

    ref_modules = dict(ref.base_model.model.named_modules())
    ref_wrapped = {n for n, m in ref_modules.items() if isinstance(m, LoraLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert set(ours_wrapped) == ref_wrapped and ref_wrapped
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_modules[name]
            assert m.scaling == pytest.approx(src.scaling["default"])
            m.lora_A.copy_(src.lora_A["default"].weight)
            m.lora_B.copy_(src.lora_B["default"].weight)
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    return logits(ref, batch), logits(ours, batch), before, ref, ours


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_forward_equals_peft(tiny_bert, batch, rslora):
    r, alpha = 4, 8  # s = 2 (alpha/r) or 4 (alpha/sqrt r): a wrong scaling rule shows
    ref, ours, before, _, model = _peft_vs_peftkit(tiny_bert, batch, ["query", "value", "pooler.dense"], r, alpha, rslora)
    assert (ref - before).abs().max() > 1e-2, "the adapter must move the logits, or this comparison proves nothing"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert {m.scaling for m in model.modules() if isinstance(m, LoraLinear)} == {scaling}


def test_forward_equals_peft_on_one_named_layer(tiny_bert, batch):
    """A full-name target: only that Linear is adapted, in both libraries (compared on the hidden states,
    which one adapter moves far more than the random tiny model's logits)."""
    ref, ours, _, ref_model, model = _peft_vs_peftkit(
        tiny_bert, batch, ["bert.encoder.layer.0.attention.self.value"], r=2, alpha=4, rslora=False)
    assert [n for n, m in model.named_modules() if isinstance(m, LoraLinear)] == ["bert.encoder.layer.0.attention.self.value"]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        h_ref = ref_model(**batch, output_hidden_states=True).hidden_states[-1]
        h_ours = model(**batch, output_hidden_states=True).hidden_states[-1]
        with ref_model.disable_adapter():
            h_base = ref_model(**batch, output_hidden_states=True).hidden_states[-1]
    assert (h_ref - h_base).abs().max() > 1e-2
    torch.testing.assert_close(h_ours, h_ref, atol=1e-5, rtol=0)  # hidden states are O(1): 1e-5 absolute


@needs_minilm
def test_forward_equals_peft_on_minilm():
    from transformers import AutoTokenizer

    path = minilm_dir()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    ref, ours, before, _, model = _peft_vs_peftkit(path, batch, ["query", "value"], r=8, alpha=16, rslora=False)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 12  # 6 layers x (query, value)
    assert (ref - before).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def _lora_linear(in_f=6, out_f=5, r=3, alpha=6.0, rslora=False, bias=True) -> LoraLinear:
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=alpha, dropout=0.0, rslora=rslora, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def test_init_b_is_zero_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = LoraLinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False, init="kaiming")
    x = torch.randn(4, 6)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    assert torch.equal(m(x), base(x))
    assert m.lora_A.shape == (3, 6) and m.lora_B.shape == (5, 3)


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_is_scaled_b_times_a(rslora):
    m = _lora_linear(r=4, alpha=6.0, rslora=rslora)
    s = 6.0 / 2 if rslora else 6.0 / 4
    assert m.scaling == s
    torch.testing.assert_close(m.delta_weight(), s * m.lora_B @ m.lora_A, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_times_merged_weight(bias):
    m = _lora_linear(bias=bias)
    x = torch.randn(2, 7, 6)
    w = m.base_layer.weight + m.scaling * m.lora_B @ m.lora_A
    expected = x @ w.T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-2


def _frozen_lora(dtype=torch.float64, dropout=0.0, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias).to(dtype).requires_grad_(False)
    m = LoraLinear(base, r=3, alpha=6.0, dropout=dropout, rslora=False, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
    return m


@pytest.mark.parametrize("bias", [True, False])
def test_one_node_forward_and_gradients_are_the_closed_form(bias):
    """A frozen base without dropout runs as one autograd node (`low_rank_linear`); y = x Wᵀ + b + s·x Aᵀ Bᵀ
    and its gradients, written out here, in float64."""
    m = _frozen_lora(bias=bias)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 7, 5, dtype=torch.float64)
    y = m(x)
    assert type(y.grad_fn).__name__ == "_LowRankLinearBackward"
    W, A, B, s = m.base_layer.weight, m.lora_A, m.lora_B, m.scaling
    torch.testing.assert_close(y, x @ W.T + (m.base_layer.bias if bias else 0) + s * (x @ A.T) @ B.T, atol=1e-12, rtol=0)
    y.backward(up)
    with torch.no_grad():
        gh = s * up @ B  # dL/d(x Aᵀ)
        torch.testing.assert_close(x.grad, up @ W + gh @ A, atol=1e-12, rtol=0)
        torch.testing.assert_close(A.grad, (gh.reshape(-1, 3).T @ x.reshape(-1, 6)), atol=1e-12, rtol=0)
        torch.testing.assert_close(B.grad, s * up.reshape(-1, 5).T @ (x @ A.T).reshape(-1, 3), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, A, B: m(x), (x.detach().requires_grad_(), A, B))  # A, B: m's own factors


def test_one_node_under_bf16_autocast_is_the_two_node_path_to_bf16_rounding():
    m = _frozen_lora(torch.float32)
    x = torch.randn(4, 9, 6, requires_grad=True)
    up = torch.randn(4, 9, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y2 = m.base_layer(x) + nn.functional.linear(nn.functional.linear(x, m.lora_A), m.lora_B) * m.scaling
    assert y.dtype == y2.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == "_LowRankLinearBackward"
    torch.testing.assert_close(y.float(), y2.float(), atol=0.02 * y2.abs().max().item(), rtol=0)  # a bf16 step or two
    grads = torch.autograd.grad(y, (x, m.lora_A, m.lora_B), up)
    expected = torch.autograd.grad(y2, (x, m.lora_A, m.lora_B), up)
    for g, e in zip(grads, expected):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0.02 * e.abs().max().item(), rtol=0)


def test_the_one_node_path_steps_aside_for_dropout_a_trained_base_or_a_hook():
    x = torch.randn(3, 6, dtype=torch.float64)
    two_node = "AddBackward0"
    m = _frozen_lora(dropout=0.1)
    assert type(m(x).grad_fn).__name__ == two_node
    m = _frozen_lora()
    m.base_layer.bias.requires_grad_(True)  # a method that trains the base's bias: it must get its gradient
    m(x).sum().backward()
    assert m.base_layer.bias.grad is not None
    m = _frozen_lora()
    seen = []
    m.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert type(m(x).grad_fn).__name__ == two_node and seen == [(3, 5)]


def test_dropout_acts_on_the_lora_path_only_in_training():
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.5, rslora=False, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(32, 16)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ (m.base_layer.weight + m.delta_weight()).T + m.base_layer.bias, atol=1e-5, rtol=0)
        m.train()
        assert not torch.allclose(m(x), m(x))  # two dropout masks


def test_gaussian_init_and_unknown_init():
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(256, 256), r=4, alpha=8, dropout=0.0, rslora=False, init="gaussian")
    assert m.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    with pytest.raises(UserError, match="unknown lora init"):
        LoraLinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.0, rslora=False, init="xavier")


def test_rank_below_one_is_a_user_error():
    with pytest.raises(UserError, match="at least 1"):
        methods.build({"name": "lora", "r": 0})


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option rank"):
        methods.build({"name": "lora", "rank": 8})


# --- PiSSA (init: pissa) and the rslora name ---------------------------------------------------

PISSA_TARGETS = ["query", "value", "pooler.dense"]


def _pissa_vs_peft(path, batch, r: int, alpha: float):
    """(peft model, peftkit model, base logits), both PiSSA-initialised from the same weights."""
    from peft import LoraConfig, get_peft_model

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = logits(base, batch)
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=PISSA_TARGETS,
                                          init_lora_weights="pissa")).eval()
    methods.prepare(ours, methods.build({"name": "lora", "r": r, "alpha": alpha, "init": "pissa",
                                         "target_modules": PISSA_TARGETS}), head=["classifier"])
    with torch.no_grad():
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    return ref, ours, before


def test_pissa_equals_peft_at_init_and_after_training_moves(tiny_bert, batch):
    """Same SVD, same factors, same residual as peft's init_lora_weights="pissa"; then the same
    perturbed A and B give the same logits (1e-6 absolute, as for plain LoRA)."""
    ref, ours, before = _pissa_vs_peft(tiny_bert, batch, r=4, alpha=8)
    torch.testing.assert_close(logits(ours, batch), before, atol=1e-5, rtol=0)  # starts as W (up to the residual's rounding)
    torch.testing.assert_close(logits(ours, batch), logits(ref, batch), atol=ATOL, rtol=0)

    ref_modules = dict(ref.base_model.model.named_modules())
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, PissaLinear)}
    assert len(wrapped) == 5
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in wrapped.items():
            src = ref_modules[name]
            torch.testing.assert_close(m.lora_A, src.lora_A["default"].weight, atol=1e-6, rtol=0)
            torch.testing.assert_close(m.lora_B, src.lora_B["default"].weight, atol=1e-6, rtol=0)
            torch.testing.assert_close(m.base_layer.weight, src.base_layer.weight, atol=1e-6, rtol=0)  # the residual
            for p in (src.lora_A["default"].weight, src.lora_B["default"].weight):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            m.lora_A.copy_(src.lora_A["default"].weight)
            m.lora_B.copy_(src.lora_B["default"].weight)
    moved = logits(ref, batch)
    assert (moved - before).abs().max() > 1e-2, "the adapter must move the logits, or this comparison proves nothing"
    torch.testing.assert_close(logits(ours, batch), moved, atol=ATOL, rtol=0)


def test_pissa_factors_are_the_principal_part_and_the_base_keeps_the_residual():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w = base.weight.detach().clone()
    m = PissaLinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(m.scaling * m.lora_B @ m.lora_A, principal, atol=1e-5, rtol=0)
    assert torch.equal(m.lora_A, m.lora_A_initial) and torch.equal(m.lora_B, m.lora_B_initial)
    torch.testing.assert_close(m.lora_A @ m.lora_A.T, torch.diag(s[:3] / m.scaling), atol=1e-5, rtol=0)  # √S Vᵀ: orthogonal rows

    x = torch.randn(4, 12)
    with torch.no_grad():
        y = m(x)  # first use forms the residual
        torch.testing.assert_close(m.base_layer.weight, w - principal, atol=1e-5, rtol=0)
        torch.testing.assert_close(y, x @ w.T + base.bias, atol=1e-5, rtol=0)  # starts as W
        m.lora_B.add_(torch.randn(m.lora_B.shape))
        expected = x @ (m.base_layer.weight + m.scaling * m.lora_B @ m.lora_A).T + base.bias
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        weights = m.base_layer.weight.clone()
        m.merge()
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, weights, atol=1e-6, rtol=0)


def test_pissa_buffers_are_saved_and_only_a_b_and_head_train(tiny_bert):
    a = build(tiny_bert, {"name": "lora", "r": 4, "init": "pissa"})
    names = [n for n, m in a.model.named_modules() if isinstance(m, PissaLinear)]
    params = {f"{n}.lora_{x}" for n in names for x in ("A", "B")} | {"classifier.weight", "classifier.bias"}
    buffers = {f"{n}.lora_{x}_initial" for n in names for x in ("A", "B")}
    assert {n for n, p in a.model.named_parameters() if p.requires_grad} == params
    assert set(a.trainable) == params | buffers
    assert count_params(a.model)[0] == 5 * 4 * (32 + 32) + 32 * 2 + 2  # same as LoRA: r·(in + out) per target


def test_pissa_reload_forms_the_residual_from_the_saved_factors(tiny_bert, batch, tmp_path, monkeypatch):
    """Reloading rebuilds the model with a fresh SVD, then copies the saved factors in. Here the
    fresh SVD comes out one ulp off (as it may on another machine or thread count); the residual
    must still come from the saved factors, so the logits match bit for bit."""
    a = build(tiny_bert, {"name": "lora", "r": 4, "init": "pissa"})
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], std=0.2)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, {})

    svd = torch.linalg.svd

    def svd_one_ulp_off(w, **kw):
        u, s, vh = svd(w, **kw)
        return u, torch.nextafter(s, torch.full_like(s, math.inf)), vh

    monkeypatch.setattr(torch.linalg, "svd", svd_one_ulp_off)
    b = build(tiny_bert, {"name": "lora", "r": 4, "init": "pissa"})
    monkeypatch.undo()
    adapter.load_weights(tmp_path / "adapter", b.model, b.trainable)
    assert torch.equal(logits(b.model, batch), expected)


def test_pissa_refuses_a_rank_above_the_layer():
    with pytest.raises(UserError, match="r ≤ min"):
        PissaLinear(nn.Linear(6, 4), r=5, alpha=5, dropout=0.0, rslora=False)


def test_unknown_init_names_every_choice():
    with pytest.raises(UserError, match="kaiming, gaussian, pissa"):
        methods.build({"name": "lora", "init": "olora"})


def test_rslora_is_lora_scaled_by_alpha_over_sqrt_r(tiny_bert, batch):
    a = build(tiny_bert, {"name": "rslora", "r": 4, "alpha": 8})
    b = build(tiny_bert, {"name": "lora", "r": 4, "alpha": 8, "rslora": True})
    assert {m.scaling for m in a.model.modules() if isinstance(m, LoraLinear)} == {4.0}
    assert a.method.cfg.rslora and a.trainable == b.trainable
    perturb(a.model, a.trainable)
    perturb(b.model, b.trainable)
    assert torch.equal(logits(a.model, batch), logits(b.model, batch))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_pissa_trains_reloads_bit_exactly_and_merges(which, tiny_bert, tiny_llama, tmp_path):
    """What test_every_method checks for the shipped YAML, for init: pissa (the residual base included)."""
    from transformers import AutoTokenizer

    from peftkit import model
    from peftkit.methods.base import set_merged

    from ._helpers import LABELS, backbone_cfg

    path = {"bert": tiny_bert, "llama": tiny_llama}[which]
    cfg = {"name": "lora", "r": 4, "init": "pissa"}
    a = build(path, cfg)
    batch = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=1e-2)
    a.model.eval()
    losses = []
    for _ in range(10):
        loss = a.model(**batch, labels=torch.tensor([1, 0, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(path), LABELS, "t"))

    b, _ = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(logits(b.model, batch), expected)
    weights = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    set_merged(b.model, True)
    torch.testing.assert_close(logits(b.model, batch), expected, atol=1e-5, rtol=0)
    set_merged(b.model, False)
    for n, p in b.model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0)


def test_rslora_default_takes_loras_rate_at_loras_scale():
    """rsLoRA's YAML scales the update as LoRA's does at the default rank (alpha/sqrt(r) = alpha/r = 2),
    so LoRA's learning rate fits it: at LoRA's alpha (16) its scale was 2.8x LoRA's and the same rate
    left CoLA at the majority class (docs/results.md). Raising r then keeps rsLoRA's scale growing as
    sqrt(r), where LoRA's falls as 1/r."""
    from omegaconf import OmegaConf

    from peftkit import config

    lora, rslora = (OmegaConf.load(config.group_options("method")[n]) for n in ("lora", "rslora"))
    assert rslora.rslora and not lora.get("rslora", False)
    assert rslora.r == lora.r and rslora.lr == lora.lr
    assert rslora.alpha / math.sqrt(rslora.r) == pytest.approx(lora.alpha / lora.r, rel=1e-6)
    r = 64
    assert rslora.alpha / math.sqrt(r) > lora.alpha / r * 2
