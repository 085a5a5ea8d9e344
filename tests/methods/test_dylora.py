"""DyLoRA: rank b uses A[:b], B[:, :b] scaled alpha/b; the hook changes b between steps; eval at rank k is rank-k LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.dylora import DyLoraLinear
from peftkit.methods.lora import LoraLinear

from ._helpers import build, hf_model, logits, perturb, randomize_biases

DYLORA = {"name": "dylora", "r": 6, "alpha": 12}


def _layer(r=5, alpha=10.0, eval_rank=5, seed=0) -> DyLoraLinear:
    torch.manual_seed(seed)
    m = DyLoraLinear(nn.Linear(7, 6), r=r, alpha=alpha, dropout=0.0, init="kaiming", eval_rank=eval_rank)
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def _layers(model) -> list[DyLoraLinear]:
    return [m for m in model.modules() if isinstance(m, DyLoraLinear)]


@pytest.mark.parametrize("b", [1, 3, 5])
def test_training_forward_uses_the_first_b_components_scaled_alpha_over_b(b):
    m = _layer().train()
    m.train_rank.fill_(b)
    x = torch.randn(4, 7)
    w = m.base_layer.weight + (10.0 / b) * m.lora_B[:, :b] @ m.lora_A[:b]
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ w.T + m.base_layer.bias, atol=1e-5, rtol=0)


def test_eval_forward_and_merge_use_eval_rank():
    m = _layer(eval_rank=2)
    m.train_rank.fill_(5)  # ignored in eval mode
    m.eval()
    x = torch.randn(4, 7)
    w = m.base_layer.weight + (10.0 / 2) * m.lora_B[:, :2] @ m.lora_A[:2]
    with torch.no_grad():
        expected = x @ w.T + m.base_layer.bias
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        base_weight = m.base_layer.weight.clone()
        m.merge()
        torch.testing.assert_close(m.base_layer.weight, w, atol=1e-6, rtol=0)
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, base_weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_eval_at_rank_k_equals_plain_lora_from_the_first_k_components(tiny_bert, batch, k):
    a = build(tiny_bert, {**DYLORA, "eval_rank": k})
    randomize_biases(a.model)
    perturb(a.model, [n for n in a.trainable if "lora_" in n], std=0.3)
    lora = build(tiny_bert, {"name": "lora", "r": k, "alpha": 12})
    randomize_biases(lora.model)
    dy_layers = {n: m for n, m in a.model.named_modules() if isinstance(m, DyLoraLinear)}
    with torch.no_grad():
        for name, m in lora.model.named_modules():
            if isinstance(m, LoraLinear):
                m.lora_A.copy_(dy_layers[name].lora_A[:k])
                m.lora_B.copy_(dy_layers[name].lora_B[:, :k])
        lora.model.classifier.load_state_dict(a.model.classifier.state_dict())
    assert len(dy_layers) == 5  # query and value in 2 layers, and the pooler
    expected = logits(lora.model, batch)
    assert (expected - logits(hf_model(tiny_bert), batch)).abs().max() > 1e-3
    torch.testing.assert_close(logits(a.model, batch), expected, atol=1e-6, rtol=0)


def test_hook_draws_one_rank_per_step_shared_by_every_layer(tiny_bert):
    a = build(tiny_bert, DYLORA)
    torch.manual_seed(3)
    drawn = []
    for step in range(1, 41):
        a.method.after_optimizer_step(a.model, step, 40)
        ranks = {int(m.train_rank) for m in _layers(a.model)}
        assert len(ranks) == 1
        drawn.append(ranks.pop())
    assert set(drawn) == set(range(1, 7))  # 40 uniform draws from 1..6 cover them all

    torch.manual_seed(3)  # the trainer checkpoints torch's RNG: a resumed run draws the same ranks
    again = []
    for step in range(1, 41):
        a.method.after_optimizer_step(a.model, step, 40)
        again.append(int(_layers(a.model)[0].train_rank))
    assert again == drawn
    assert all(f"{n}.train_rank" in a.trainable for n, m in a.model.named_modules() if isinstance(m, DyLoraLinear))


def test_training_steps_update_only_the_components_in_use(tiny_bert, batch):
    """Rank b trains A[:b] and B[:, :b]; different steps use different ranks, so different rows move."""
    a = build(tiny_bert, DYLORA)
    model = a.model.train()
    perturb(model, [n for n in a.trainable if "lora_B" in n], std=0.1)  # B = 0 would zero A's gradient
    labels = torch.tensor([1, 0, 1])
    layer = _layers(model)[0]
    for b in (2, 5):
        for m in _layers(model):
            m.train_rank.fill_(b)
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
        assert layer.lora_A.grad[:b].abs().sum(1).min() > 0 and layer.lora_B.grad[:, :b].abs().sum(0).min() > 0
        assert not layer.lora_A.grad[b:].any() and not layer.lora_B.grad[:, b:].any()
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and n not in a.trainable]
    assert frozen == []


def test_trainable_parameter_count(tiny_bert):
    a = build(tiny_bert, {"name": "dylora"})  # shipped defaults: r = 8 on query, value, pooler
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    assert n == 5 * 8 * (32 + 32) + 32 * 2 + 2


@pytest.mark.parametrize("eval_rank", [0, 7])
def test_eval_rank_outside_one_to_r_is_a_user_error(eval_rank):
    with pytest.raises(UserError, match="between 1 and r=6"):
        methods.build({**DYLORA, "eval_rank": eval_rank})


def test_bad_rank_and_init_are_user_errors():
    with pytest.raises(UserError, match="at least 1"):
        methods.build({"name": "dylora", "r": 0})
    with pytest.raises(UserError, match="kaiming, gaussian"):
        methods.build({"name": "dylora", "init": "xavier"})
