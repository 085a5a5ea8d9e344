"""LoReFT: the edit h + Rᵀ(Wh + b − Rh) by hand on real hidden states, at the right tokens only."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.loreft import (
    LoReFTIntervention,
    TokenPositions,
    select_positions,
    transformer_layers,
)

from ._helpers import LABELS, SENTENCES, assert_gradients_exactly, backbone_cfg, build, hf_model, perturb

ATOL = 1e-5  # hidden states are O(1); the edit is a few fp32 matmuls


def _interventions(m) -> dict[str, LoReFTIntervention]:
    return {n: x for n, x in m.named_modules() if isinstance(x, LoReFTIntervention)}


def _inputs(path) -> dict:
    b = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    b.pop("token_type_ids")
    return b


def _adapted(path, **cfg):
    """A LoReFT model with W, b and R moved away from their init (R stays orthonormal by construction)."""
    a = build(path, {"name": "loreft", "r": 3, **cfg})
    perturb(a.model, [n for n in a.trainable if ".loreft." in n], std=0.3)
    return a.model.eval()


@torch.no_grad()
def _hidden(m, batch) -> tuple[torch.Tensor, ...]:
    return m(**batch, output_hidden_states=True).hidden_states


def _by_hand(x: LoReFTIntervention, h: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    R, W, b = x.orthonormal_rotation(), x.learned_source.weight, x.learned_source.bias
    edited = h + (h @ W.T + b - h @ R.T) @ R
    return torch.where(selected[..., None], edited, h)


def test_select_positions_either_padding_side():
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(select_positions(right, prefix=2, suffix=2), expected)
    assert torch.equal(select_positions(right.flip(1), prefix=2, suffix=2), expected.flip(1))
    assert torch.equal(select_positions(right, prefix=0, suffix=1), torch.tensor(
        [[0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool))


@torch.no_grad()
def _layer_io(m, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every transformer layer, as the next layer sees it (after any edit)."""
    seen = []
    hooks = [layer.register_forward_hook(lambda _, args, out: seen.append((args[0], out[0] if isinstance(out, tuple) else out)))
             for layer in transformer_layers(m)]
    m(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("layer", [0, 1])
def test_layer_output_is_the_closed_form(arch, layer, tiny_bert, tiny_llama):
    """One edited layer: its output equals the formula applied by hand to the base model's output there."""
    path = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    batch = _inputs(path)
    base = _layer_io(hf_model(path), batch)
    m = _adapted(path, layers=[layer], prefix_positions=2, suffix_positions=1)
    (x,) = _interventions(m).values()
    selected = select_positions(batch["attention_mask"], 2, 1)
    got = _layer_io(m, batch)
    h_in, h = base[layer]
    assert torch.equal(got[layer][0], h_in)  # the layer's input: nothing before it changed
    with torch.no_grad():
        expected = _by_hand(x, h, selected)
    assert (expected - h).abs().max() > 1e-1, "the edit must move the state, or this proves nothing"
    torch.testing.assert_close(got[layer][1], expected, atol=ATOL, rtol=0)
    assert torch.equal(got[layer][1][~selected], h[~selected])  # other tokens pass untouched, bit for bit


def test_hidden_states_show_the_edited_layer_output(tiny_bert, batch):
    """The edit runs before transformers' own output recorder, even one installed before the method."""
    plain = hf_model(tiny_bert)
    base = _hidden(plain, batch)  # installs the recorder hooks first
    methods.prepare(plain, methods.build({"name": "loreft", "layers": [0]}), head=["classifier"])
    (x,) = _interventions(plain).values()
    with torch.no_grad():
        expected = _by_hand(x, base[1], select_positions(batch["attention_mask"], 1, 1))
    torch.testing.assert_close(_hidden(plain, batch)[1], expected, atol=ATOL, rtol=0)


def test_last_layer_edit_reaches_the_classifier_by_hand(tiny_bert, batch):
    """BERT's last layer edited: the pooler and head see exactly the edited [CLS]."""
    plain = hf_model(tiny_bert)
    base = _hidden(plain, batch)[-1]
    m = _adapted(tiny_bert, layers=[1], prefix_positions=1, suffix_positions=0)
    (x,) = _interventions(m).values()
    with torch.no_grad():
        cls = _by_hand(x, base, select_positions(batch["attention_mask"], 1, 0))[:, 0]
        expected = m.classifier(m.bert.pooler.activation(m.bert.pooler.dense(cls)))
        torch.testing.assert_close(m(**batch).logits, expected, atol=1e-6, rtol=0)


def test_identity_when_w_is_r_and_b_is_zero(tiny_bert, batch):
    m = _adapted(tiny_bert)
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(m.classifier.state_dict())
    assert (_hidden(m, batch)[-1] - _hidden(plain, batch)[-1]).abs().max() > 1e-1
    with torch.no_grad():
        for x in _interventions(m).values():
            x.learned_source.weight.copy_(x.orthonormal_rotation())
            x.learned_source.bias.zero_()
    torch.testing.assert_close(_hidden(m, batch)[-1], _hidden(plain, batch)[-1], atol=1e-6, rtol=0)


def test_rotation_stays_orthonormal_through_training_with_weight_decay(tiny_bert, batch):
    a = build(tiny_bert, {"name": "loreft", "r": 4})
    xs = list(_interventions(a.model).values())
    assert len(xs) == 2 and xs[0].rotation.shape == (4, 32) and xs[0].learned_source.weight.shape == (4, 32)
    torch.testing.assert_close(xs[0].orthonormal_rotation(), xs[0].rotation, atol=1e-6, rtol=0)  # orthonormal at init
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    start = xs[0].orthonormal_rotation().detach().clone()
    for _ in range(5):
        a.model(**batch, labels=torch.tensor([1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    for x in xs:
        R = x.orthonormal_rotation()
        torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)
    assert (xs[0].orthonormal_rotation() - start).abs().max() > 1e-2  # R trained


def test_padding_does_not_change_a_sentence_logits(tiny_bert, tiny_llama):
    """Positions come from the attention mask: a padded row edits the same tokens as the sentence alone."""
    for path in (tiny_bert, tiny_llama):
        m = _adapted(path, prefix_positions=2, suffix_positions=2)
        tok = AutoTokenizer.from_pretrained(path)
        together = m(**_inputs(path)).logits.detach()
        for i, s in enumerate(SENTENCES):
            alone = dict(tok([s], return_tensors="pt"))
            alone.pop("token_type_ids")
            torch.testing.assert_close(m(**alone).logits.detach()[0], together[i], atol=1e-5, rtol=0)


def test_gradients_reach_only_interventions_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "loreft", "layers": [1]})
    expected = {f"bert.encoder.layer.1.loreft.{p}" for p in ("rotation", "learned_source.weight", "learned_source.bias")}
    expected |= {"classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    assert_gradients_exactly(a.model, expected, batch, torch.tensor([1, 0, 1]), steps=1)


def test_a_head_that_names_the_pooler_trains_it_and_the_adapter_carries_it(tiny_bert, batch, tmp_path):
    """pyreft trains RoBERTa's whole head (dense + tanh + projection); BERT's analog is the pooler plus
    the classifier: `backbone.head=[classifier,score,pooler]` makes the pooler's dense layer train, and
    the adapter carries it (the one way to do it for any method)."""
    cfg = backbone_cfg(tiny_bert)
    cfg.head = ["classifier", "score", "pooler"]
    torch.manual_seed(0)
    a = model.build(cfg, {"name": "loreft", "layers": [1]}, list(LABELS))
    expected = {f"bert.encoder.layer.1.loreft.{p}" for p in ("rotation", "learned_source.weight", "learned_source.bias")}
    expected |= {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert set(a.trainable) == expected and a.head == ["bert.pooler", "classifier"]
    labels = torch.tensor([1, 0, 1])
    assert_gradients_exactly(a.model, expected, batch, labels, steps=1)
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        a.model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    pooler = a.model.bert.pooler.dense.weight.detach().clone()
    assert not torch.equal(pooler, hf_model(tiny_bert).bert.pooler.dense.weight)  # it trained
    adapter.save(tmp_path / "a", a.model, a.trainable, model.meta(a, cfg, LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "a")
    assert torch.equal(b.model.bert.pooler.dense.weight, pooler)
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(**batch).logits, b.model(**batch).logits)


def test_trainable_count_is_r_times_2d_plus_1_per_layer_plus_head(tiny_bert):
    a = build(tiny_bert, {"name": "loreft", "r": 4})
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == 2 * 4 * (2 * 32 + 1) + 32 * 2 + 2


def test_save_and_load_give_the_same_rotation_bit_for_bit(tiny_bert, batch, tmp_path):
    cfg = {"name": "loreft", "r": 3}
    a = build(tiny_bert, cfg)
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        a.model(**batch, labels=torch.tensor([1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter.save(tmp_path / "a", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "a")
    for (name, x), y in zip(_interventions(a.model).items(), _interventions(b.model).values()):
        assert torch.equal(x.orthonormal_rotation(), y.orthonormal_rotation()), name
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(**batch).logits, b.model(**batch).logits)


def test_positions_are_recorded_per_forward(tiny_bert, batch):
    """A layer called outside the model's forward has no positions: refuse rather than edit stale ones."""
    m = _adapted(tiny_bert, layers=[0])
    layer = m.bert.encoder.layer[0]
    x = layer.loreft
    assert isinstance(x.positions, TokenPositions) and x.positions.selected is None
    with pytest.raises(RuntimeError, match="outside its model's forward"):
        layer(torch.randn(1, 4, 32))


@pytest.mark.parametrize("cfg, message", [
    ({"r": 0}, "method.r must be at least 1, got 0"),
    ({"layers": []}, "distinct layer indices"),
    ({"layers": [0, 0]}, "distinct layer indices"),
    ({"prefix_positions": 0, "suffix_positions": 0}, "not both 0"),
])
def test_bad_options_are_refused_before_any_model_loads(cfg, message):
    with pytest.raises(UserError, match=message):
        methods.build({"name": "loreft", **cfg})


@pytest.mark.parametrize("cfg, message", [
    ({"r": 33}, "between 1 and the hidden size 32"),
    ({"layers": [2]}, "from 0 to 1"),
])
def test_options_beyond_the_model_are_user_errors(tiny_bert, cfg, message):
    with pytest.raises(UserError, match=message):
        methods.prepare(hf_model(tiny_bert), methods.build({"name": "loreft", **cfg}), head=["classifier"])


def test_not_mergeable():
    assert not methods.build({"name": "loreft"}).mergeable


def test_a_deep_copy_runs_on_its_own_interventions(tiny_bert, batch):
    """The hooks are the interventions' own methods, so a copied model's hooks use the copied ones."""
    m = _adapted(tiny_bert)
    copied = copy.deepcopy(m)
    expected = _hidden(m, batch)[-1]
    with torch.no_grad():
        copied.bert.encoder.layer[1].loreft.learned_source.bias.add_(1.0)
    assert torch.equal(_hidden(m, batch)[-1], expected)
    assert not torch.equal(_hidden(copied, batch)[-1], expected)
