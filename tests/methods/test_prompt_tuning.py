"""Prompt tuning: the same numbers as Hugging Face peft on the same prompt, the text init, padding, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from peftkit import methods
from peftkit.errors import UserError

from ._helpers import SENTENCES, assert_gradients_exactly, build, hf_model, outputs

N = 5
# Both build the same inputs_embeds (prompt, then the word embeddings) and run the same model: in
# practice bit for bit; 1e-6 absolute on logits of order 1 and 1e-5 on hidden states.
ATOL = 1e-6


def _peft_vs_peftkit(path, batch):
    from peft import PromptTuningConfig, get_peft_model

    base = hf_model(path)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1)
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, batch)
    ours = copy.deepcopy(base)
    # SEQ_CLS: PeftModelForSequenceClassification, the class that prepends the prompt (before [CLS]).
    ref = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)).eval()
    methods.prepare(ours, methods.build({"name": "prompt_tuning", "num_virtual_tokens": N}), head=["classifier"])
    with torch.no_grad():
        prompt = ref.prompt_encoder["default"].embedding.weight
        prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(3)))  # not peft's init: our own draw
        ours.soft_prompt.embedding.copy_(prompt)
        ours.classifier.load_state_dict(ref.base_model.classifier.modules_to_save["default"].state_dict())
    return ref, ours, before


@pytest.mark.parametrize("token_type_ids", [True, False], ids=["with_token_types", "without"])
def test_forward_equals_peft(tiny_bert, batch, token_type_ids):
    inputs = dict(batch) if token_type_ids else {k: v for k, v in batch.items() if k != "token_type_ids"}
    ref, ours, (_, h_before) = _peft_vs_peftkit(tiny_bert, inputs)
    (expected, h_expected), (got, h_got) = outputs(ref, inputs), outputs(ours, inputs)
    assert h_got.shape[1] == inputs["input_ids"].shape[1] + N
    assert (h_expected[:, N:] - h_before).abs().max() > 1e-2, "the prompt must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=1e-5, rtol=0)


def test_inputs_embeds_and_positional_ids_give_the_same_output(tiny_bert, batch):
    a = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": N})
    m = a.model.eval()
    with torch.no_grad():
        by_ids = m(**batch).logits
        embeds = m.get_input_embeddings()(batch["input_ids"])
        by_embeds = m(inputs_embeds=embeds, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits
        positional = m(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    assert torch.equal(by_embeds, by_ids) and torch.equal(positional, by_ids)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_padding_does_not_change_a_sentence_logits(arch, tiny_bert, tiny_llama):
    """Llama's classifier reads the last non-pad token from input_ids: the placeholders must keep that working."""
    path = {"bert": tiny_bert, "llama": tiny_llama}[arch]
    a = build(path, {"name": "prompt_tuning", "num_virtual_tokens": N})
    tok = AutoTokenizer.from_pretrained(path)
    padded = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    padded.pop("token_type_ids")
    assert padded["attention_mask"][1].sum() < padded["attention_mask"].shape[1], "the batch must contain padding"
    together = outputs(a.model, padded)[0]
    for i, s in enumerate(SENTENCES):
        alone = dict(tok([s], return_tensors="pt"))
        alone.pop("token_type_ids")
        torch.testing.assert_close(outputs(a.model, alone)[0][0], together[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("text, n", [("positive or negative?", 12), ("is this movie review positive or negative in tone overall", 4)],
                         ids=["repeated", "cut"])
def test_text_init_is_the_token_embeddings(tiny_bert, text, n):
    a = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": n, "init": "text", "init_text": text})
    ids = AutoTokenizer.from_pretrained(tiny_bert)(text, add_special_tokens=False)["input_ids"]
    ids = (ids * n)[:n]
    words = a.model.get_input_embeddings().weight
    assert torch.equal(a.model.soft_prompt.embedding, words[ids])
    assert a.model.soft_prompt.embedding.data_ptr() != words.data_ptr()


def test_random_init_is_uniform_in_half_unit(tiny_bert):
    p = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": 50}).model.soft_prompt.embedding
    assert p.shape == (50, 32)
    assert -0.5 <= p.min() < -0.45 and 0.45 < p.max() <= 0.5


def test_gradients_reach_only_the_prompt_and_head(tiny_bert, batch):
    a = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": N})
    expected = {"soft_prompt.embedding", "classifier.weight", "classifier.bias"}
    assert set(a.trainable) == expected
    model = a.model.train()
    assert_gradients_exactly(model, expected, batch, torch.tensor([1, 0, 1]), steps=1)
    assert model.get_input_embeddings().weight.grad is None


def test_trainable_count_is_n_times_hidden_plus_head(tiny_bert):
    a = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": 7})
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == 7 * 32 + 32 * 2 + 2


def test_too_long_for_the_position_table_is_a_user_error(tiny_bert):
    a = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": 20})
    ids = torch.ones(1, 120, dtype=torch.long)  # 120 + 20 > 128 positions
    with pytest.raises(UserError, match="lower backbone.max_length to 108"):
        a.model(input_ids=ids)


@pytest.mark.parametrize("cfg, message", [
    ({"init": "vocab"}, "choose one of: random, text"),
    ({"init": "text"}, "needs method.init_text"),
    ({"num_virtual_tokens": 0}, "at least 1"),
])
def test_bad_options_are_user_errors(cfg, message):
    with pytest.raises(UserError, match=message):
        methods.build({"name": "prompt_tuning", **cfg})


def test_not_mergeable(tiny_bert):
    assert not methods.build({"name": "prompt_tuning"}).mergeable


def test_a_deep_copy_runs_on_its_own_prompt(tiny_bert, batch):
    """The hooks are the prompt module's own methods, so a copied model's hooks use the copied prompt."""
    m = build(tiny_bert, {"name": "prompt_tuning", "num_virtual_tokens": N}).model
    copied = copy.deepcopy(m)
    expected = outputs(m, batch)[1]
    with torch.no_grad():
        copied.soft_prompt.embedding.add_(1.0)
    assert torch.equal(outputs(m, batch)[1], expected)
    assert not torch.equal(outputs(copied, batch)[1], expected)
