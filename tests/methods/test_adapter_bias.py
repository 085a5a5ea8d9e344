"""AdapterBias: the token-dependent shift (w·x + b) v by hand, identity at init, sharing w, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.methods.adapter_bias import AdapterBiasLinear
from peftkit.methods.base import set_merged

from ._helpers import assert_gradients_exactly, LABELS, backbone_cfg, build, hf_model, logits, perturb

ADAPTER_BIAS = {"name": "adapter_bias"}
D, FFN, L, HEAD = 32, 64, 2, 32 * 2 + 2  # the tiny BERT: hidden 32, FFN 64, 2 layers, a 2-class head
LAYERNORMS = L * 2 * 2 * D  # two LayerNorms per layer, gain and bias
POOLER = D + 1 + D  # the pooler's w, b (it reads the 32-wide [CLS]) and v


def _layers(m) -> dict[str, AdapterBiasLinear]:
    return {n: x for n, x in m.named_modules() if isinstance(x, AdapterBiasLinear)}


def test_forward_by_hand_is_a_token_dependent_shift():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    m = AdapterBiasLinear(base, nn.Linear(12, 1))
    with torch.no_grad():
        m.adapter_vector.normal_()
        x = torch.randn(2, 5, 12)
        w, b = m.adapter_alpha.weight[0], m.adapter_alpha.bias
        token_weight = (x @ w + b)[..., None]  # one scalar per token
        expected = x @ base.weight.T + base.bias + token_weight * m.adapter_vector
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        shift = m(x) - base(x)
        assert not torch.allclose(shift[0, 0], shift[0, 1])  # the same v, weighted per token


def test_vector_starts_at_zero_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    m = AdapterBiasLinear(base, nn.Linear(12, 1))
    x = torch.randn(3, 12)
    assert torch.count_nonzero(m.adapter_vector) == 0 and torch.count_nonzero(m.adapter_alpha.weight) > 0
    assert torch.equal(m(x), base(x))


def test_identity_at_init_on_the_model(tiny_bert, batch):
    a = build(tiny_bert, ADAPTER_BIAS)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(a.model(**batch, output_hidden_states=True).hidden_states[-1],
                       plain(**batch, output_hidden_states=True).hidden_states[-1])
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


def test_targets_the_ffn_output_and_the_pooler_reading_their_inputs(tiny_bert, tiny_llama):
    layers = _layers(build(tiny_bert, ADAPTER_BIAS).model)
    ffn = [f"bert.encoder.layer.{i}.output.dense" for i in range(L)]
    assert list(layers) == [*ffn, "bert.pooler.dense"]
    shapes = {n: (x.adapter_alpha.in_features, x.adapter_alpha.out_features, x.adapter_vector.numel()) for n, x in layers.items()}
    assert shapes == {**{n: (FFN, 1, D) for n in ffn}, "bert.pooler.dense": (D, 1, D)}  # the FFN's inner activations; [CLS]
    # Llama has no pooler: the role is skipped
    assert list(_layers(build(tiny_llama, ADAPTER_BIAS).model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(L)]


def test_trainable_set_and_count(tiny_bert):
    a = build(tiny_bert, ADAPTER_BIAS)
    ours = {f"{n}.{p}" for n in _layers(a.model) for p in ("adapter_alpha.weight", "adapter_alpha.bias", "adapter_vector")}
    norms = {n for n, _ in a.model.named_parameters() if ".encoder." in n and "LayerNorm" in n}
    assert set(a.trainable) == ours | norms | {"classifier.weight", "classifier.bias"}
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    assert n == L * (FFN + 1 + D) + POOLER + LAYERNORMS + HEAD == 581


def test_train_layernorm_false_trains_w_and_v_only(tiny_bert):
    a = build(tiny_bert, {**ADAPTER_BIAS, "train_layernorm": False})
    assert not any("LayerNorm" in n for n in a.trainable)
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == L * (FFN + 1 + D) + POOLER + HEAD


def test_gradients_reach_exactly_the_vector_then_w(tiny_bert, batch):
    a = build(tiny_bert, ADAPTER_BIAS)
    m = a.model.train()
    layer = m.get_submodule("bert.encoder.layer.1.output.dense")

    def step1():
        assert layer.adapter_vector.grad.abs().sum() > 0
        assert layer.adapter_alpha.weight.grad.abs().sum() == 0  # v = 0: w has no effect yet

    assert_gradients_exactly(m, a.trainable, batch, torch.tensor([1, 0, 0]), after_first_backward=step1)


def test_share_alpha_uses_one_w_for_the_layers_and_reloads_shared(tiny_bert, batch, tmp_path):
    """The layers share one w; the pooler, of another input width, keeps its own."""
    cfg = {**ADAPTER_BIAS, "share_alpha": True}
    a = build(tiny_bert, cfg)
    layers = _layers(a.model)
    assert len({id(x.adapter_alpha) for n, x in layers.items() if ".encoder." in n}) == 1
    assert layers["bert.pooler.dense"].adapter_alpha is not layers["bert.encoder.layer.0.output.dense"].adapter_alpha
    assert [n for n in a.trainable if "adapter_alpha" in n] == [f"{n}.adapter_alpha.{p}" for n in
                                                               ("bert.encoder.layer.0.output.dense", "bert.pooler.dense")
                                                               for p in ("weight", "bias")]
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == FFN + 1 + L * D + POOLER + LAYERNORMS + HEAD

    perturb(a.model, [n for n in a.trainable if "adapter_" in n])
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert len({id(x.adapter_alpha) for x in _layers(b.model).values()}) == 2  # the layers', the pooler's
    assert torch.equal(logits(b.model, batch), expected)


def test_share_alpha_shares_one_w_per_input_width(tiny_bert):
    """attention.output.dense reads 32 wide, the FFN's output.dense 64: one w for each width."""
    a = build(tiny_bert, {**ADAPTER_BIAS, "share_alpha": True, "target_modules": ["output.dense"]})
    layers = _layers(a.model)
    assert len(layers) == 2 * L
    by_width = {}
    for x in layers.values():
        by_width.setdefault(x.adapter_alpha.in_features, set()).add(id(x.adapter_alpha))
    assert {w: len(ids) for w, ids in by_width.items()} == {D: 1, FFN: 1}
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == (D + 1) + (FFN + 1) + 2 * L * D + LAYERNORMS + HEAD


def test_merge_is_refused(tiny_bert):
    a = build(tiny_bert, ADAPTER_BIAS)
    assert not a.method.mergeable
    with pytest.raises(UserError, match="cannot be merged"):
        set_merged(a.model, True)
