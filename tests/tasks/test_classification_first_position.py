"""The last layer on the first position only (`classification.skip_unread_positions`): for every
method that acts on each position alone, the same logits, loss and gradients as the whole layer."""

from __future__ import annotations

import pytest
import torch

from peftkit.methods import METHODS
from peftkit.tasks import classification

from methods._helpers import LABELS, backbone_cfg, build, perturb, shipped_config, with_sources


def _batch(path):
    from transformers import AutoTokenizer

    sentences = ["a gripping, funny and warm film", "dull", "the plot never quite comes together, sadly"]
    return dict(AutoTokenizer.from_pretrained(path)(sentences, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_logits_and_gradients_as_the_whole_layer(name, biased_bert, tmp_path):
    cfg = with_sources(name, shipped_config(name), backbone_cfg(biased_bert), tmp_path)
    if name == "llama_adapter":
        return  # refused on BERT (tests/methods/test_every_method.py)
    whole, first = build(biased_bert, cfg), build(biased_bert, cfg)
    assert classification.skip_unread_positions(first.model, first.method) == METHODS[name].positionwise
    if not METHODS[name].positionwise:
        return
    batch, labels = _batch(biased_bert), torch.tensor([1, 0, 1])
    for a in (whole, first):
        perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], std=0.2)  # away from the init, where many adapters are the identity
        a.model.eval()  # no dropout: the two are compared draw for draw
    out_whole, out_first = whole.model(**batch, labels=labels), first.model(**batch, labels=labels)
    torch.testing.assert_close(out_first.logits, out_whole.logits, atol=1e-6, rtol=1e-5)
    out_whole.loss.backward()
    out_first.loss.backward()
    grads = {n: p.grad for n, p in whole.model.named_parameters() if p.requires_grad}
    assert grads
    for n, p in first.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=f"{name}: {n}")


def test_not_for_a_decoder_classifier_or_when_hidden_states_are_asked(tiny_llama, tiny_bert):
    llama = build(tiny_llama, shipped_config("lora"))
    assert not classification.skip_unread_positions(llama.model, llama.method)  # it reads the last token
    bert = build(tiny_bert, shipped_config("lora"))
    assert classification.skip_unread_positions(bert.model, bert.method)
    batch = _batch(tiny_bert)
    hidden = bert.model.eval()(**batch, output_hidden_states=True).hidden_states
    assert hidden[-1].shape[1] == 1 and hidden[-2].shape[1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("kind", ["roberta", "electra", "xlm-roberta"])
def test_other_encoders_whose_heads_read_the_first_position(kind):
    """RoBERTa-, ELECTRA- and XLM-R-style classifiers (random tiny configs, padded rows): the same
    logits and gradients with the last layer on the first position."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from peftkit.methods import build as build_method, prepare

    config = AutoConfig.for_model(kind, vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                  **({"embedding_size": 32} if kind == "electra" else {}))
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_config(config).eval()
        method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]})
        prepare(m, method, ["classifier"])
        perturb(m, [n for n, p in m.named_parameters() if p.requires_grad], std=0.2)
        models.append((m, method))
    assert classification.skip_unread_positions(*models[1])
    outs = [m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])) for m, _ in models]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-6, rtol=1e-5)
    for out in outs:
        out.loss.backward()
    for (n, p), q in zip(models[0][0].named_parameters(), models[1][0].parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_no_weight_is_copied_per_row(tiny_bert):
    """The one-position layer multiplies (rows, dim) matrices: a (rows, 1, dim) input that needs a
    gradient made torch.matmul copy each weight once per row (a bmm on (rows, dim, dim))."""
    from torch.profiler import profile

    a = build(tiny_bert, shipped_config("lora"))
    assert classification.skip_unread_positions(a.model, a.method)
    batch = _batch(tiny_bert)
    with profile(record_shapes=True) as prof:
        a.model(**batch, labels=torch.tensor([1, 0, 1])).loss.backward()
    rows = batch["input_ids"].shape[0]
    per_row = [e.input_shapes for e in prof.events() if e.name == "aten::bmm" and e.input_shapes
               and len(e.input_shapes[0]) == 3 and e.input_shapes[0][:2] == [rows, 1]]
    assert not per_row, per_row
