"""LN tuning: the same trainable set and the same numbers as Hugging Face peft's LNTuningConfig."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods import AdapterLinear
from peftkit.methods.base import merge_into_base, set_merged

from ._helpers import build, hf_model, logits, outputs, perturb, randomize_biases

D, L = 32, 2  # both tiny models: hidden 32, 2 layers
BERT_HEAD, LLAMA_HEAD = 32 * 2 + 2, 32 * 2  # Llama's score has no bias
ATOL = 1e-6  # the same norms and the same ops in fp32: logits of order 1 agree to rounding


def _inputs(path, batch):
    if "llama" in str(path):
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_trainable_set_and_forward_equal_peft(arch, tiny_bert, tiny_llama, batch):
    from peft import LNTuningConfig, get_peft_model

    path = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    head = {"bert": "classifier", "llama": "score"}[arch]
    inputs = _inputs(path, batch)
    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1)
        getattr(base, head).weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, inputs)[1]
    ours = copy.deepcopy(base)
    # peft knows Llama's norms (input_layernorm, post_attention_layernorm, norm) but not BERT's: name them.
    ref = get_peft_model(base, LNTuningConfig(target_modules=["LayerNorm"] if arch == "bert" else None)).eval()
    methods.prepare(ours, methods.build({"name": "ln_tuning"}), head=[head])

    prefix, infix = "base_model.model.", ".ln_tuning_layers.default"
    ref_trainable = {n.removeprefix(prefix).replace(infix, ""): p for n, p in ref.named_parameters() if p.requires_grad}
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad and not n.startswith(head + ".")}
    assert set(ref_trainable) == ours_trainable and ours_trainable

    perturb(ref, sorted(n for n, p in ref.named_parameters() if p.requires_grad))  # away from 1 and 0: the test can fail
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in ref_trainable.items():
            params[n].copy_(p)
    (expected, h_expected), (got, h_got) = outputs(ref, inputs), outputs(ours, inputs)
    assert (h_expected - before).abs().max() > 1e-2, "the norms must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=1e-5, rtol=0)  # hidden states are O(1)


def test_trainable_count_on_bert(tiny_bert):
    a = build(tiny_bert, {"name": "ln_tuning"})
    norms = {n for n, _ in a.model.named_parameters() if "LayerNorm" in n}
    assert set(a.trainable) == norms | {"classifier.weight", "classifier.bias"}
    # the embeddings' LayerNorm and two per layer, each a gain and a bias
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == (1 + 2 * L) * 2 * D + BERT_HEAD == 386
    assert not any(isinstance(m, AdapterLinear) for m in a.model.modules())


def test_trainable_count_on_llama(tiny_llama):
    a = build(tiny_llama, {"name": "ln_tuning"})
    norms = {f"model.layers.{i}.{n}.weight" for i in range(L) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(a.trainable) == norms | {"model.norm.weight", "score.weight"}
    # RMSNorm: a gain only; two per layer and the final norm
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == (2 * L + 1) * D + LLAMA_HEAD == 224


def test_target_modules_restrict_the_norms(tiny_bert):
    a = build(tiny_bert, {"name": "ln_tuning", "target_modules": ["attention.output.LayerNorm"]})
    assert set(a.trainable) == {f"bert.encoder.layer.{i}.attention.output.LayerNorm.{p}" for i in range(L)
                                for p in ("weight", "bias")} | {"classifier.weight", "classifier.bias"}


def test_gradients_reach_exactly_the_norms_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "ln_tuning"})
    a.model.train()
    a.model(**batch, labels=torch.tensor([1, 0, 0])).loss.backward()
    assert {n for n, p in a.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == set(a.trainable)
    assert all(p.grad is None for n, p in a.model.named_parameters() if n not in a.trainable)


def test_merging_changes_nothing(tiny_bert, batch):
    a = build(tiny_bert, {"name": "ln_tuning"})
    assert a.method.mergeable
    perturb(a.model, [n for n in a.trainable if "LayerNorm" in n])
    expected = logits(a.model, batch)
    set_merged(a.model, True)
    merged = merge_into_base(a.model)
    plain = hf_model(tiny_bert)
    plain.load_state_dict(merged.state_dict())
    assert torch.equal(logits(plain, batch), expected)


def test_target_modules_matching_no_norm_are_refused(tiny_bert):
    message = r"match no norm layer; this model has: .*bert\.encoder\.layer\.N\.output\.LayerNorm"
    with pytest.raises(UserError, match=message):
        build(tiny_bert, {"name": "ln_tuning", "target_modules": ["query"]})
