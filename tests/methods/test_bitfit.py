"""BitFit: exactly the bias terms train (all, or the ones named), nothing is wrapped, Llama is refused."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import UserError
from peftkit.methods import AdapterLinear
from peftkit.methods.base import merge_into_base, set_merged

from ._helpers import build, hf_model, logits, perturb

D, FFN, L, HEAD = 32, 64, 2, 32 * 2 + 2  # the tiny BERT: hidden 32, FFN 64, 2 layers, a 2-class head


def _biases(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")}


def test_every_bias_trains_and_nothing_else(tiny_bert):
    a = build(tiny_bert, {"name": "bitfit"})
    assert set(a.trainable) == _biases(a.model) | {"classifier.weight", "classifier.bias"}
    assert {n for n, p in a.model.named_parameters() if p.requires_grad} == set(a.trainable)
    assert not any(isinstance(m, AdapterLinear) for m in a.model.modules())
    # embeddings LayerNorm; per layer q, k, v, attention out, its LayerNorm, FFN in (64), FFN out, its LayerNorm; pooler
    per_layer = 4 * D + D + FFN + D + D
    n = sum(p.numel() for p in a.model.parameters() if p.requires_grad)
    assert n == D + L * per_layer + D + HEAD == 706


def test_bias_names_restrict_to_roles_as_the_papers_ablation(tiny_bert):
    a = build(tiny_bert, {"name": "bitfit", "bias_names": ["query", "ffn_in"]})
    chosen = {f"bert.encoder.layer.{i}.{m}.bias" for i in range(L) for m in ("attention.self.query", "intermediate.dense")}
    assert set(a.trainable) == chosen | {"classifier.weight", "classifier.bias"}
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == L * (D + FFN) + HEAD


def test_bias_names_take_module_names_and_regexes(tiny_bert):
    a = build(tiny_bert, {"name": "bitfit", "bias_names": ["LayerNorm", r".*layer\.1\.output\.dense"]})
    assert set(a.trainable) - {"classifier.weight", "classifier.bias"} == {
        "bert.embeddings.LayerNorm.bias", "bert.encoder.layer.1.output.dense.bias",
        *(f"bert.encoder.layer.{i}.{s}LayerNorm.bias" for i in range(L) for s in ("attention.output.", "output."))}


def test_the_model_is_the_plain_model_with_its_biases(tiny_bert, batch):
    a = build(tiny_bert, {"name": "bitfit"})
    perturb(a.model, sorted(_biases(a.model)))
    plain = hf_model(tiny_bert)
    plain.load_state_dict(a.model.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


def test_gradients_reach_exactly_the_biases_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "bitfit"})
    a.model.train()
    a.model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
    got = {n for n, p in a.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == set(a.trainable)
    assert all(p.grad is None for n, p in a.model.named_parameters() if n not in a.trainable)


def test_merging_changes_nothing(tiny_bert, batch):
    a = build(tiny_bert, {"name": "bitfit"})
    assert a.method.mergeable
    perturb(a.model, sorted(_biases(a.model)))
    expected = logits(a.model, batch)
    set_merged(a.model, True)
    assert torch.equal(logits(merge_into_base(a.model), batch), expected)


def test_llama_has_no_biases_and_is_refused(tiny_llama):
    with pytest.raises(UserError, match="bitfit trains bias terms and this llama model has none"):
        build(tiny_llama, {"name": "bitfit"})


def test_bias_names_matching_nothing_are_refused(tiny_bert):
    message = r"match no bias; roles: query, key, value.*modules with a bias: .*attention\.self\.query"
    with pytest.raises(UserError, match=message):
        build(tiny_bert, {"name": "bitfit", "bias_names": ["qurey"]})
