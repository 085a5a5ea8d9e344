"""AdaLoRA: peft's forward and rank allocation on the same weights, the cubic budget by hand, masking,
the orthogonality penalty, and a reloaded adapter keeping its ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.adalora import SvdLinear, budget_at

from ._helpers import (
    LABELS,
    assert_gradients_exactly,
    backbone_cfg,
    build,
    hf_model,
    logits,
    perturb,
    randomize_biases,
)

# Both compute base(x) + s·((x (λ⊙Q)ᵀ) Pᵀ) in fp32: in practice bit for bit; 1e-6 absolute on hidden
# states and logits of order 1. peft scales by alpha / (r + 1e-5) where peftkit uses alpha / r: the
# helper checks that and then gives ours peft's value.
ATOL = 1e-6
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _svd_layers(m) -> dict[str, SvdLinear]:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, SvdLinear)}


def _peft_and_ours(path, init_r=4, target_r=2, alpha=8.0, total_step=10, tinit=2, tfinal=3, orth=0.0, factor_std=None):
    """The same AdaLoRA adapter in peft and in peftkit (every attention and FFN Linear), sharing weights.

    λ is drawn from N(0, 1) (it starts at 0 in both); `factor_std` also redraws P and Q, whose N(0, 0.02)
    init barely moves the output."""
    from peft import AdaLoraConfig, get_peft_model

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=PEFT_TARGETS,
                                             total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=1,
                                             orth_reg_weight=orth, lora_dropout=0.0))
    method = methods.build({"name": "adalora", "init_r": init_r, "target_r": target_r, "alpha": alpha,
                            "tinit": tinit, "tfinal": tfinal, "orth_reg_weight": orth})
    methods.prepare(ours, method, head=[])
    ref_modules = dict(ref.base_model.model.named_modules())
    layers = _svd_layers(ours)
    assert len(layers) == 12 and set(layers) <= set(ref_modules)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, m in layers.items():
            src = ref_modules[name]
            src.lora_E["default"].normal_()
            if factor_std:
                src.lora_A["default"].normal_(0, factor_std)
                src.lora_B["default"].normal_(0, factor_std)
            m.lora_P.copy_(src.lora_B["default"])
            m.lora_lambda.copy_(src.lora_E["default"][:, 0])
            m.lora_Q.copy_(src.lora_A["default"])
            peft_scaling = src.scaling["default"] / (src.ranknum["default"].item() + 1e-5)
            assert m.scaling == pytest.approx(peft_scaling, rel=1e-5)
            m.scaling = peft_scaling  # the 1e-5 peft adds to r is not worth a tolerance of its own
    return ref, ours, method


def test_forward_equals_peft(tiny_bert, batch):
    ref, ours, _ = _peft_and_ours(tiny_bert, factor_std=0.3)
    base = hf_model(tiny_bert)
    randomize_biases(base)
    with torch.no_grad():
        ref.eval(), ours.eval()
        h_ref = ref(**batch, output_hidden_states=True).hidden_states[-1]
        h_ours = ours(**batch, output_hidden_states=True).hidden_states[-1]
        h_base = base(**batch, output_hidden_states=True).hidden_states[-1]
    assert (h_ref - h_base).abs().max() > 1e-2, "the adapter must move the hidden states"
    torch.testing.assert_close(h_ours, h_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(ours, batch), logits(ref, batch), atol=ATOL, rtol=0)


def test_rank_allocation_follows_peft_step_by_step(tiny_bert, batch):
    """Same gradients, same SGD steps: peft's RankAllocator and our hook prune the same triplets at
    every step (warm-up, the cubic fall, the final fixed mask) and leave the same λ."""
    total, tinit, tfinal = 10, 2, 3
    ref, ours, method = _peft_and_ours(tiny_bert, total_step=total, tinit=tinit, tfinal=tfinal)
    ref_modules = dict(ref.base_model.model.named_modules())
    layers = _svd_layers(ours)
    ref_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    our_params = [p for m in layers.values() for p in m.factors().values()]
    opt_ref, opt_ours = torch.optim.SGD(ref_params, lr=0.05), torch.optim.SGD(our_params, lr=0.05)
    labels = torch.tensor([1, 0, 1])
    ref.eval(), ours.eval()
    kept = []
    for step in range(1, total + 1):
        for net, opt in ((ref, opt_ref), (ours, opt_ours)):
            net(**batch, labels=labels).loss.backward()
            opt.step()
        ref.base_model.update_and_allocate(step)
        method.after_optimizer_step(ours, step, total)
        opt_ref.zero_grad(), opt_ours.zero_grad()
        for name, m in layers.items():
            ref_lambda = ref_modules[name].lora_E["default"][:, 0]
            assert torch.equal(m.rank_mask, ref_lambda != 0), (step, name)
            torch.testing.assert_close(m.lora_lambda, ref_lambda, atol=1e-5, rtol=0)
        kept.append(sum(int(m.rank_mask.sum()) for m in layers.values()))
    budgets = [budget_at(s, total, 48, 24, tinit, tfinal) for s in range(1, total + 1)]
    assert kept == budgets == [48, 48, 36, 29, 25, 24, 24, 24, 24, 24]
    assert len({int(m.rank_mask.sum()) for m in layers.values()}) > 1, "the budget should end up uneven across layers"


def test_cubic_budget_schedule_by_hand():
    # 3 layers of init_r 4 → 12 triplets, target_r 2 → 6; 20 steps, 4 of warm-up, the last 6 fixed.
    # The fall spans steps 4..14: budget = 6 + int(6·(1 − (t − 4)/10)³).
    got = [budget_at(t, 20, 12, 6, 4, 6) for t in range(1, 21)]
    assert got == [12, 12, 12, 12, 10, 9, 8, 7, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]
    assert budget_at(5, 20, 12, 6, 4, 6) == 6 + int(6 * 0.9**3)  # 6 + int(4.374)
    assert budget_at(9, 20, 12, 6, 4, 6) == 6 + int(6 * 0.5**3)  # 6 + int(0.75)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_masking_by_hand_on_a_small_model():
    """Three Linears, init_r 4 → 12 triplets, target_r 2 → 6. The hook keeps exactly the scheduled
    number of triplets each step; after the final allocation the mask is fixed, the pruned λ are 0,
    and the output is that of the kept triplets alone."""
    torch.manual_seed(0)
    net = _Small()
    method = methods.build({"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 4, "tfinal": 6,
                            "target_modules": ["a", "b", "c"]})
    methods.prepare(net, method, head=[])
    layers = list(_svd_layers(net).values())
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    kept, masks = [], []
    for step in range(1, 21):
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        method.after_optimizer_step(net, step, 20)
        opt.zero_grad()
        kept.append(sum(int(m.rank_mask.sum()) for m in layers))
        masks.append(torch.cat([m.rank_mask for m in layers]).clone())
        for m in layers:
            assert not m.lora_lambda[~m.rank_mask].any()
    assert kept == [budget_at(t, 20, 12, 6, 4, 6) for t in range(1, 21)]
    assert kept[-1] == 6
    assert all(torch.equal(mk, masks[-1]) for mk in masks[14:])  # fixed from the final allocation (step 14) on
    assert all(layer.importance == {} for layer in layers)  # no scores kept after the final allocation
    with torch.no_grad():
        expected = x
        for i, m in enumerate(layers):
            keep = m.rank_mask
            w = m.base_layer.weight + m.scaling * m.lora_P[:, keep] @ (m.lora_lambda[keep, None] * m.lora_Q[keep])
            expected = expected @ w.T + m.base_layer.bias
            if i < 2:
                expected = torch.tanh(expected)
        torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=0)


def test_reloaded_adapter_keeps_the_pruned_ranks(tiny_bert, batch, tmp_path):
    cfg = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0}
    a = build(tiny_bert, cfg)
    labels = torch.tensor([1, 0, 1])
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 4):
        a.model(**batch, labels=labels).loss.backward()
        opt.step()
        a.method.after_optimizer_step(a.model, step, 3)
        opt.zero_grad()
    masks = {n: m.rank_mask.clone() for n, m in _svd_layers(a.model).items()}
    assert sum(int(m.sum()) for m in masks.values()) == 2 * 12
    assert all(f"{n}.rank_mask" in a.trainable for n in masks)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert {n: m.rank_mask for n, m in _svd_layers(b.model).items()}.keys() == masks.keys()
    assert all(torch.equal(m.rank_mask, masks[n]) for n, m in _svd_layers(b.model).items())
    assert torch.equal(logits(b.model, batch), expected)


def test_orthogonality_penalty_is_added_to_the_training_loss(tiny_bert, batch):
    cfg = {"name": "adalora", "orth_reg_weight": 0.3}
    a, plain = build(tiny_bert, cfg), build(tiny_bert, {**cfg, "orth_reg_weight": 0.0})
    perturb(a.model, [n for n in a.trainable if "lora_lambda" in n])
    perturb(plain.model, [n for n in plain.trainable if "lora_lambda" in n])
    labels = torch.tensor([1, 0, 1])
    layers = list(_svd_layers(a.model).values())
    eye = torch.eye(12)
    by_hand = sum(((m.lora_P.T @ m.lora_P - eye) ** 2).sum() + ((m.lora_Q @ m.lora_Q.T - eye) ** 2).sum()
                  for m in layers) / len(layers)
    torch.testing.assert_close(a.method.aux_loss(a.model), 0.3 * by_hand, atol=1e-5, rtol=0)  # the trainer adds it
    assert plain.method.aux_loss(plain.model) is None
    # the model's own loss (evaluation, a causal LM's perplexity) stays the task's
    torch.testing.assert_close(a.model(**batch, labels=labels).loss, plain.model(**batch, labels=labels).loss, atol=1e-6, rtol=0)


def test_gradients_reach_exactly_p_lambda_q_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "adalora"})
    net = a.model.train()
    layers = _svd_layers(net)
    assert len(layers) == 12  # query, key, value, attention output, FFN in and out, in 2 layers
    expected = {f"{n}.{p}" for n in layers for p in ("lora_P", "lora_lambda", "lora_Q")} | {"classifier.weight", "classifier.bias"}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    assert set(a.trainable) == expected | {f"{n}.rank_mask" for n in layers}
    assert_gradients_exactly(net, expected, batch, torch.tensor([1, 0, 0]), steps=2)  # λ = 0 at init: P and Q get gradient once λ moved


def test_forward_and_merge_by_hand():
    torch.manual_seed(0)
    m = SvdLinear(nn.Linear(7, 5), r=3, alpha=6.0, dropout=0.0)
    assert m.lora_P.shape == (5, 3) and m.lora_lambda.shape == (3,) and m.lora_Q.shape == (3, 7)
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert not m.lora_lambda.any() and torch.equal(m(x), m.base_layer(x))  # λ = 0: starts unchanged
        m.lora_lambda.normal_()
        w = m.base_layer.weight + 2.0 * m.lora_P @ torch.diag(m.lora_lambda) @ m.lora_Q
        torch.testing.assert_close(m(x), x @ w.T + m.base_layer.bias, atol=1e-6, rtol=0)
        m.merge()
        torch.testing.assert_close(m.base_layer.weight, w, atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), x @ w.T + m.base_layer.bias, atol=1e-6, rtol=0)


def test_trainable_parameter_count(tiny_bert):
    a = build(tiny_bert, {"name": "adalora"})  # init_r 12 on the 6 attention/FFN Linears of 2 layers
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    per_layer = 4 * 12 * (32 + 32 + 1) + 2 * 12 * (32 + 64 + 1)
    assert n == 2 * per_layer + 32 * 2 + 2


@pytest.mark.parametrize("bad, match", [
    ({"target_r": 13}, "target_r must be between 1 and init_r=12"),
    ({"tinit": 2.5}, "fraction of the run in \\[0, 1\\) or a whole number of steps"),
    ({"beta1": 1.0}, "lie in \\(0, 1\\)"),
    ({"allocate_every": 0}, "at least 1"),
    ({"orth_reg_weight": -1}, "at least 0"),
])
def test_bad_options_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        methods.build({"name": "adalora", **bad})


def test_schedule_without_a_pruning_phase_is_a_user_error(tiny_bert):
    a = build(tiny_bert, {"name": "adalora", "tinit": 5, "tfinal": 5})
    with pytest.raises(UserError, match="leave no steps"):
        a.method.after_optimizer_step(a.model, 1, 10)


def test_importance_scores_survive_a_checkpoint(tmp_path):
    """A resumed run continues the smoothed importance scores; restarting them from zero would prune
    other triplets than the uninterrupted run."""
    from peftkit import checkpoint

    def setup():
        torch.manual_seed(0)
        net = _Small()
        method = methods.build({"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                                "target_modules": ["a", "b", "c"]})
        names = methods.prepare(net, method, head=[])
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        return net, method, names, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    net, method, names, opt, sched = setup()
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    for step in range(1, 4):
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        method.after_optimizer_step(net, step, 10)
        opt.zero_grad()
    saved = method.training_state(net)
    assert len(saved) == 3 * 3 * 2  # 3 layers × (P, λ, Q) × (smoothed, uncertainty)
    checkpoint.save(tmp_path / "ckpt", net, names, method, opt, sched, {"step": 3})

    fresh, fresh_method, _, fresh_opt, fresh_sched = setup()
    assert fresh_method.training_state(fresh) == {}
    checkpoint.load(tmp_path / "ckpt", fresh, fresh_method, fresh_opt, fresh_sched)
    restored = fresh_method.training_state(fresh)
    assert restored.keys() == saved.keys() and all(torch.equal(restored[k], saved[k]) for k in saved)
