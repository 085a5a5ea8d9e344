"""MoE LoRA (MoELoRA / SiRA / MoLA): the layer against a per-token hand computation of the top-k
gating, equal experts as a LoRA, the load-balancing loss by hand, SiRA's capacity and expert dropout,
MoLA's per-layer expert counts, the loss reaching the router through the trainer's hook, and a CLI
run that logs the routing statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.base import merge_into_base, set_merged
from peftkit.methods.lora import LoraLinear
from peftkit.methods.moe_lora import MoeLoRA, MoeLoraLinear
from peftkit.tasks import causal_lm, classification

from ._helpers import build


def layer(in_f=6, out_f=5, experts=3, top_k=2, r=2, alpha=3.0, seed=0, **kw) -> MoeLoraLinear:
    """A MoE layer with every tensor random (B too, so the experts change the output)."""
    torch.manual_seed(seed)
    m = MoeLoraLinear(nn.Linear(in_f, out_f), experts, top_k, r, alpha, 0.0, **kw)
    with torch.no_grad():
        for p in (m.lora_A, m.lora_B, m.router.weight):
            p.copy_(torch.randn(p.shape))
    return m


def by_hand(m: MoeLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """y = W x + b + s Σ_{e∈topk} g_e B_e A_e x token by token, g the top-k softmax renormalised over the k."""
    E, k, r, s = m.num_experts, m.top_k, m.r, m.scaling
    rows = []
    for t in x.reshape(-1, x.shape[-1]):
        p = torch.softmax(m.router.weight @ t, dim=0)
        top = sorted(range(E), key=lambda e: -p[e].item())[:k]
        y = m.base_layer.weight @ t + m.base_layer.bias
        for e in top:
            g = p[e] / sum(p[j] for j in top)
            y = y + s * g * (m.lora_B[:, e * r:(e + 1) * r] @ (m.lora_A[e * r:(e + 1) * r] @ t))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_is_the_closed_form(mode):
    m = layer().train(mode == "train")
    assert m.scaling == 1.5 and m.lora_A.shape == (6, 6) and m.lora_B.shape == (5, 6)  # 3 experts of rank 2
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), by_hand(m, x), atol=1e-5, rtol=1e-5)
        assert (m(x) - m.base_layer(x)).abs().max() > 0.1


def test_at_init_the_layer_is_its_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = MoeLoraLinear(base, 3, 2, 2, 3.0, 0.0)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) == 36
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))


@pytest.mark.parametrize(("experts", "top_k"), [(1, 1), (4, 2), (4, 4)])
def test_equal_experts_are_one_lora(experts, top_k):
    """Gates sum to 1 over the chosen experts: experts that are all the same LoRA make that LoRA."""
    m = layer(experts=experts, top_k=top_k, r=3, alpha=6.0)
    torch.manual_seed(1)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    lora = LoraLinear(m.base_layer, 3, 6.0, 0.0, False, "kaiming")
    with torch.no_grad():
        m.lora_A.copy_(a.repeat(experts, 1))
        m.lora_B.copy_(b.repeat(1, experts))
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)
        x = torch.randn(3, 7, 6)
        torch.testing.assert_close(m(x), lora(x), atol=1e-5, rtol=1e-5)


def test_balance_loss_by_hand_without_the_padding():
    """E · Σ_e f_e P_e over the real tokens: f_e the share of the top-k choices, P_e the mean probability."""
    m = layer(experts=4, top_k=2).train()
    x = torch.randn(2, 3, 6)
    m.token_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token is padding
    m(x)
    real = x.reshape(-1, 6)[:5]
    p = torch.softmax(real @ m.router.weight.T, dim=-1)
    counts = [0.0] * 4
    for row in p:
        for e in sorted(range(4), key=lambda e: -row[e].item())[:2]:
            counts[e] += 1
    f = torch.tensor(counts) / (5 * 2)
    expected = 4 * (f * p.mean(0)).sum()
    torch.testing.assert_close(m.balance, expected)
    assert m.balance.requires_grad
    m.eval()(x)
    assert m.balance is None  # no balance term outside training


def test_capacity_drops_the_overflow_tokens():
    """A router that sends every token to expert 0 (top-1 of 2): capacity ceil(1·4·1/2) = 2, so the
    first two real tokens keep it and the others get no expert; padding takes no place."""
    m = layer(experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 10.0
    x = torch.randn(1, 4, 6)
    x[..., 0] = 1.0
    with torch.no_grad():
        lora0 = m.base_layer(x) + m.scaling * (x @ m.lora_A[:2].T @ m.lora_B[:, :2].T)
        m.train()
        y = m(x)
        torch.testing.assert_close(y[0, :2], lora0[0, :2])
        torch.testing.assert_close(y[0, 2:], m.base_layer(x)[0, 2:])  # dropped for expert 0, and top-1: nothing
        assert m.window["dropped"].item() == 2
        m.token_mask = torch.tensor([[0, 1, 1, 1]])  # 3 real tokens: capacity ceil(1.5) = 2
        assert m.gates(x)[0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0]
        m.eval()  # no capacity at inference: an output never depends on the rest of the batch
        torch.testing.assert_close(m(x), lora0)


def test_expert_dropout_acts_in_training_only():
    m = layer(experts=4, top_k=2, expert_dropout=0.5)
    plain = layer(experts=4, top_k=2)  # the same tensors (same seed), no expert dropout
    x = torch.randn(64, 6)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), plain.eval()(x))
        gates = m.gates(x)
        torch.manual_seed(3)
        dropped = m.train().gates(x)
    chosen = gates > 0
    assert (chosen.sum(-1) == 2).all()
    kept = dropped > 0
    assert not (kept & ~chosen).any()
    assert 0.3 < kept.sum() / chosen.sum() < 0.7  # about half of the chosen gates survive
    torch.testing.assert_close(dropped[kept], 2 * gates[kept])  # torch's dropout: kept gates scaled by 1/(1-p)


def test_mola_gives_each_layer_its_count(tiny_bert):
    a = build(tiny_bert, {"name": "moe_lora", "num_experts": [2, 4], "top_k": 2, "r": 3})
    experts = {n: m.num_experts for n, m in a.model.named_modules() if isinstance(m, MoeLoraLinear)}
    assert experts == {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 2,
                       "bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.attention.self.value": 4,
                       "bert.pooler.dense": 4}  # above the layers: the last layer's count
    q0 = a.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert q0.router.weight.shape == (2, 32) and q0.lora_A.shape == (6, 32) and q0.lora_B.shape == (32, 6)
    with pytest.raises(UserError, match="lists 3 counts but this model has 2 layers") as e:
        build(tiny_bert, {"name": "moe_lora", "num_experts": [2, 4, 6]})
    assert "\n" not in str(e.value)


def test_aux_loss_reaches_the_router_and_padding_is_left_out(tiny_bert, batch):
    a = build(tiny_bert, {"name": "moe_lora", "aux_loss_weight": 0.5})
    net, method = a.model.train(), a.method
    inputs = {**batch, "labels": torch.tensor([1, 0, 1])}
    routers = [m.router.weight for m in net.modules() if isinstance(m, MoeLoraLinear)]

    classification.loss(net, inputs, None).backward()  # B = 0: the task loss alone cannot move a router
    assert all(w.grad is not None and not w.grad.any() for w in routers)
    net.zero_grad()

    loss = classification.loss(net, inputs, None)
    aux = method.aux_loss(net)
    layers = [m for m in net.modules() if isinstance(m, MoeLoraLinear)]
    torch.testing.assert_close(aux, 0.5 * torch.stack([m.balance for m in layers]).mean())
    (loss + aux).backward()
    assert all(w.grad.abs().sum() > 0 for w in routers)

    real = batch["attention_mask"].sum().item()
    stats = method.stats(net)  # over the two training forwards above
    assert all(m.window == {} for m in layers)  # read once
    assert set(stats) == {"moe_load_max", "moe_load_min", "moe_router_entropy", "moe_balance_loss"}
    assert 1 <= stats["moe_load_max"] <= 4 and 0 <= stats["moe_load_min"] <= 1 and 0 < stats["moe_router_entropy"] <= 1
    net(**inputs)
    tokens = {n: m.window["tokens"].item() for n, m in net.named_modules() if isinstance(m, MoeLoraLinear)}
    assert tokens["bert.encoder.layer.0.attention.self.query"] == real < batch["input_ids"].numel()  # padding left out
    assert tokens["bert.pooler.dense"] == 3  # one [CLS] per example

    net.eval()(**inputs)
    assert method.aux_loss(net) is None  # an evaluation forward leaves no training term


def test_packed_causal_lm_rows_train(tiny_lm):
    """Routing is per token, so packed rows (position_ids, no attention mask) work: every position counts."""
    from peftkit import model

    from .test_every_method_lm import CONVS, lm_backbone

    a = model.build(lm_backbone(tiny_lm), {"name": "moe_lora"}, None, "causal_lm")
    assert MoeLoRA.packs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    enc = causal_lm.EncodedLM([causal_lm.render(c, tok, "chat") for c in CONVS], tok.pad_token_id, packed=True, max_length=64)
    batch = enc.batch(list(range(len(enc))))
    assert "attention_mask" not in batch
    net = a.model.train()
    loss = causal_lm.loss(net, batch, enc) + a.method.aux_loss(net)
    loss.backward()
    assert torch.isfinite(loss)
    q = next(m for m in net.modules() if isinstance(m, MoeLoraLinear))
    assert q.window["tokens"].item() == batch["input_ids"].numel() and q.router.weight.grad.abs().sum() > 0


def test_not_mergeable(tiny_bert):
    a = build(tiny_bert, {"name": "moe_lora"})
    assert not MoeLoRA.mergeable
    with pytest.raises(UserError, match="moe_lora cannot be merged"):
        set_merged(a.model, True)
    with pytest.raises(UserError, match="moe_lora cannot be merged"):
        merge_into_base(a.model)


@pytest.mark.parametrize(("options", "match"), [
    ({"num_experts": 0}, "num_experts must be a count of at least 1"),
    ({"num_experts": [2, 0]}, r"num_experts .* got \[2, 0\]"),
    ({"num_experts": []}, r"got \[\]"),
    ({"num_experts": [2, 4], "top_k": 3}, "top_k must be at most num_experts \\(2 in the smallest layer\\), got 3"),
    ({"capacity_factor": 0.0}, "capacity_factor must be positive, got 0.0"),
    ({"expert_dropout": 1.0}, r"expert_dropout must be in \[0, 1\), got 1.0"),
    ({"aux_loss_weight": -0.1}, "aux_loss_weight must be at least 0, got -0.1"),
    ({"num_experts": "4"}, "num_experts"),
])
def test_bad_options_are_one_line(options, match):
    with pytest.raises(UserError, match=match) as e:
        methods.build({"name": "moe_lora", **options})
    assert "\n" not in str(e.value)


def test_cli_run_logs_the_routing_and_backpropagates_the_aux_loss(tiny_bert, tmp_path, monkeypatch):
    """`peftkit train method=moe_lora`: the trainer adds aux_loss to the loss it backpropagates (a hook
    on the returned term sees its gradient), logs the stats at each log step and reports the last."""
    from _train_helpers import read_log, report, tiny, train

    seen = {"calls": 0, "grads": 0}
    real_aux = MoeLoRA.aux_loss

    def spy(self, model):
        aux = real_aux(self, model)
        seen["calls"] += 1
        aux.register_hook(lambda g: seen.__setitem__("grads", seen["grads"] + 1))
        return aux

    monkeypatch.setattr(MoeLoRA, "aux_loss", spy)
    run = tmp_path / "run"
    train(tmp_path, *tiny(tiny_bert, "method=moe_lora", "method.capacity_factor=1.5", "dataset.max_train_samples=96",
                          "dataset.max_eval_samples=16", "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=2",
                          f"hydra.run.dir={run}"))
    assert seen["calls"] == 4 and seen["grads"] == 4  # one training forward per step, each backpropagated
    steps, evals = read_log(run)
    keys = {"moe_load_max", "moe_load_min", "moe_router_entropy", "moe_balance_loss", "moe_capacity_dropped"}
    assert [r["step"] for r in steps] == [2, 4] and all(keys <= set(r) for r in steps)
    for r in steps:
        assert 1 <= r["moe_load_max"] <= 4 and 0 <= r["moe_load_min"] <= 1 and 0 <= r["moe_router_entropy"] <= 1
        assert 0 <= r["moe_capacity_dropped"] < 1 and math.isfinite(r["loss"])
    assert not any(k.startswith("moe_") for r in evals for k in r)
    assert report(run)["method_stats"] == {k: steps[-1][k] for k in keys}
