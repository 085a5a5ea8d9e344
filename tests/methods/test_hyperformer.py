"""HyperFormer++: Houlsby adapters generated per (task, layer, position) by one shared hypernetwork,
checked against the closed form written here from the hypernetwork's own parameters; identity at
init; tasks switched by set_task; gradients; the hypernetwork stored once and reloaded bit-exactly;
the parameter count docs/methods.md states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.methods.base import merge_into_base
from peftkit.methods.hyperformer import HyperAdapter, HyperNetwork
from peftkit.tasks import multitask

from ._helpers import assert_gradients_exactly, backbone_cfg, build, hf_model, logits, perturb

HYPER = {"name": "hyperformer", "bottleneck": 4, "task_embedding_dim": 6, "projector_hidden_dim": 10, "projected_dim": 8}
TASKS = {"sent": ["neg", "pos"], "pair": ["a", "b", "c"], "score": None}
# tiny BERT's adapted layers: (layer id, position id); the pooler sits outside the blocks: its own layer id
IDS = {"bert.encoder.layer.0.attention.output.dense": (0, 0), "bert.encoder.layer.0.output.dense": (0, 1),
       "bert.encoder.layer.1.attention.output.dense": (1, 0), "bert.encoder.layer.1.output.dense": (1, 1),
       "bert.pooler.dense": (2, 2)}


def multi(tiny_bert, cfg=HYPER, seed: int = 0) -> model.Adapted:
    torch.manual_seed(seed)
    return model.build(backbone_cfg(tiny_bert), dict(cfg), TASKS, multitask.NAME)


def hypernet_of(m) -> HyperNetwork:
    return next(x for x in m.modules() if isinstance(x, HyperNetwork))


def by_hand(net: HyperNetwork, task: int, layer: int, position: int) -> tuple[torch.Tensor, ...]:
    """W_down, b_down, W_up, b_up from the embeddings, the projector (Linear, ReLU, Linear, LayerNorm)
    and the generators' own weights, each generated tensor divided by √P."""
    e = torch.cat([net.task_embedding.weight[task], net.layer_embedding.weight[layer], net.position_embedding.weight[position]])
    lin1, _, lin2, norm = net.projector
    u = torch.relu(lin1.weight @ e + lin1.bias) @ lin2.weight.T + lin2.bias
    z = (u - u.mean()) / torch.sqrt(u.var(unbiased=False) + norm.eps) * norm.weight + norm.bias
    root_p = z.numel() ** 0.5
    gen = [(net.down_weight, (4, 32)), (net.down_bias, (4,)), (net.up_weight, (32, 4)), (net.up_bias, (32,))]
    return tuple(((g.weight @ z + g.bias) / root_p).view(shape) for g, shape in gen)


@torch.no_grad()
def test_the_layers_output_is_the_closed_form_for_each_task_layer_and_position(tiny_bert):
    a = multi(tiny_bert)
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], std=0.3)  # W_up away from zero
    layers = {n: m for n, m in a.model.named_modules() if isinstance(m, HyperAdapter)}
    assert {n: (m.layer, m.position) for n, m in layers.items()} == IDS
    net = hypernet_of(a.model)
    assert all(m.hypernet is net for m in layers.values())  # one hypernetwork, held by every layer
    assert (net.task_embedding.num_embeddings, net.layer_embedding.num_embeddings, net.position_embedding.num_embeddings) == (3, 3, 3)
    outs = {}
    for t in range(3):
        for name, layer in layers.items():
            x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))  # the FFN's: 64
            net.set_task(t)
            base = layer.base_layer(x)
            down_w, down_b, up_w, up_b = by_hand(net, t, *IDS[name])
            want = base + F.gelu(base @ down_w.T + down_b) @ up_w.T + up_b
            torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)
            outs[t, name] = want
    name = "bert.encoder.layer.1.output.dense"
    assert not torch.allclose(outs[0, name], outs[1, name]) and not torch.allclose(outs[1, name], outs[2, name])
    materialized = a.method.materialize(a.model, 2, [n for n in a.trainable if not n.startswith("task_heads.")])[1]
    for t_name, t in zip(("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"), by_hand(net, 2, 1, 1)):
        torch.testing.assert_close(materialized[f"{name}.{t_name}"], t, atol=1e-6, rtol=1e-5)


def test_starts_as_the_identity_for_every_task(tiny_bert, batch):
    a = build(tiny_bert, {"name": "hyperformer"})
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    net = hypernet_of(a.model)
    w_down = net.generate(0, 0)[0]
    assert w_down.std().item() == pytest.approx(0.01, rel=0.3)  # init_std, as Houlsby's W_down
    assert torch.equal(logits(a.model, batch), logits(plain, batch))
    assert torch.equal(a.model(**batch, output_hidden_states=True).hidden_states[-1],
                       plain(**batch, output_hidden_states=True).hidden_states[-1])
    m = multi(tiny_bert)
    hidden = []
    for t in range(3):
        with torch.no_grad(), multitask.active(m.model.eval(), t):
            hidden.append(m.model(**batch, output_hidden_states=True).hidden_states[-1])
    assert torch.equal(hidden[0], hidden[1]) and torch.equal(hidden[1], hidden[2])


def test_one_step_on_a_task_makes_the_tasks_differ_and_set_task_switches_them(tiny_bert, batch):
    a = multi(tiny_bert)
    net = a.model.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    multitask.loss(net, {**batch, "labels": torch.tensor([1, 0, 1]), "task": torch.tensor(0)}, None).backward()
    hyper = {n: p for n, p in net.named_parameters() if ".hypernet." in n}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hyper.values())
    assert all(hyper[n].grad.abs().sum() > 0 for n in hyper if ".up_weight." in n or ".up_bias." in n)
    opt.step()

    def hidden(t):
        with torch.no_grad(), multitask.active(net.eval(), t):
            return net(**batch, output_hidden_states=True).hidden_states[-1]

    h0, h1, h2 = hidden(0), hidden(1), hidden(2)
    assert not torch.allclose(h0, h1, atol=1e-4) and not torch.allclose(h1, h2, atol=1e-4)
    assert torch.equal(hidden(0), h0)  # back to task 0: its outputs again
    layer = net.get_submodule("bert.encoder.layer.0.output.dense")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hypernet_of(net).set_task(1)
        y1 = layer(x)
        hypernet_of(net).set_task(0)
        assert not torch.allclose(layer(x), y1) and torch.equal(layer(x), layer(x))
    with pytest.raises(IndexError):
        hypernet_of(net).set_task(3)


def test_gradients_reach_exactly_the_hypernetwork_layernorms_and_head(tiny_bert, batch):
    a = build(tiny_bert, {**HYPER, "projected_dim": 16})
    hyper = {n for n, _ in a.model.named_parameters() if ".hypernet." in n}
    assert hyper and all(n.startswith("bert.encoder.layer.0.attention.output.dense.hypernet.") for n in hyper)  # one name each
    norms = {n for n, _ in a.model.named_parameters() if ".encoder." in n and "LayerNorm" in n}
    expected = hyper | norms | {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected and len(a.trainable) == len(expected)
    assert_gradients_exactly(a.model, expected, batch, torch.tensor([1, 0, 0]))


def test_the_hypernetwork_is_saved_once_and_reloads_bit_exactly(tiny_bert, batch, tmp_path):
    a = multi(tiny_bert)
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], std=0.2)
    want = []
    for t in range(3):
        with torch.no_grad(), multitask.active(a.model.eval(), t):
            want.append(a.model(**batch).logits)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), TASKS, "mt", multitask.NAME))
    stored = adapter.read_tensors(tmp_path / "adapter" / adapter.WEIGHTS, "adapter", "")
    assert sum(".hypernet.task_embedding." in n for n in stored) == 1 and stored[next(
        n for n in stored if ".hypernet.task_embedding." in n)].shape == (3, HYPER["task_embedding_dim"])
    b, _ = model.from_adapter(tmp_path / "adapter")
    for t in range(3):
        with torch.no_grad(), multitask.active(b.model.eval(), t):
            assert torch.equal(b.model(**batch).logits, want[t])
    assert len({id(m.hypernet) for m in b.model.modules() if isinstance(m, HyperAdapter)}) == 1


def test_the_parameter_count_is_the_documented_formula(tiny_bert):
    """(T + L + Q)·e + (3e·h + h) + (h·P + P) + 2P + (P + 1)(2bd + b + d), as docs/methods.md states."""
    a = multi(tiny_bert)
    T, L, Q, e, h, P, b, d = 3, 3, 3, 6, 10, 8, 4, 32
    formula = (T + L + Q) * e + (3 * e * h + h) + (h * P + P) + 2 * P + (P + 1) * (2 * b * d + b + d)
    assert sum(x.numel() for x in hypernet_of(a.model).parameters()) == formula


def test_not_mergeable_and_one_width_only(tiny_bert):
    a = build(tiny_bert, HYPER)
    with pytest.raises(UserError, match="cannot be merged"):
        merge_into_base(a.model)
    with pytest.raises(UserError) as e:
        build(tiny_bert, {**HYPER, "target_modules": ["attn_out", "ffn_in"]})
    msg = str(e.value)
    assert "\n" not in msg and "one width" in msg and "32" in msg and "64" in msg and "target_modules" in msg
