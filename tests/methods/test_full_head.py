"""Full fine-tuning trains every weight; the linear probe trains the classifier alone."""

from __future__ import annotations

import torch

from peftkit.methods import AdapterLinear

from ._helpers import build, hf_model, logits


def test_full_trains_everything_and_wraps_nothing(tiny_bert, batch):
    a = build(tiny_bert, {"name": "full"})
    names = [n for n, _ in a.model.named_parameters()]
    assert a.trainable == names
    assert all(p.requires_grad for p in a.model.parameters())
    assert not any(isinstance(m, AdapterLinear) for m in a.model.modules())
    assert a.method.mergeable  # nothing to fold: `peftkit merge` saves the trained model as it is
    plain = hf_model(tiny_bert)
    plain.classifier.load_state_dict(a.model.classifier.state_dict())
    assert torch.equal(logits(a.model, batch), logits(plain, batch))


def test_full_gradients_reach_every_weight(tiny_bert, batch):
    a = build(tiny_bert, {"name": "full"})
    a.model.train()
    a.model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    no_grad = [n for n, p in a.model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_head_trains_only_the_classifier(tiny_bert, batch):
    a = build(tiny_bert, {"name": "head"})
    assert a.head == ["classifier"]
    assert a.trainable == ["classifier.weight", "classifier.bias"]
    assert [n for n, p in a.model.named_parameters() if p.requires_grad] == a.trainable
    assert not any(isinstance(m, AdapterLinear) for m in a.model.modules())
    assert a.method.mergeable  # nothing to fold: `peftkit merge` saves the model with its new head

    a.model.train()
    a.model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    got_grad = {n for n, p in a.model.named_parameters() if p.grad is not None}
    assert got_grad == {"classifier.weight", "classifier.bias"}


def test_the_head_trains_under_every_method(tiny_bert):
    for method in ("lora", "ia3", "houlsby", "full", "head"):
        a = build(tiny_bert, {"name": method})
        assert a.model.classifier.weight.requires_grad and a.model.classifier.bias.requires_grad, method
        assert {"classifier.weight", "classifier.bias"} <= set(a.trainable), method
        assert not isinstance(a.model.classifier, AdapterLinear), method
