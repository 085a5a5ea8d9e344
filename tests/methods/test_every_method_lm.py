"""Every registered method on a tiny causal LM (Llama): it trains on response-only labels, saves and
reloads bit-exactly, generates with the KV cache exactly as a full recompute does, and (mergeable
ones) folds into a plain `AutoModelForCausalLM` with the same logits; or it is refused in one line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import adapter, model
from peftkit.data.instruct import Conversation
from peftkit.errors import UserError
from peftkit.methods import METHODS
from peftkit.methods.base import AdapterLinear
from peftkit.tasks import causal_lm

from ._helpers import shipped_config, shipped_yaml, with_sources

# methods a causal LM has no place for, and why (the refusal must say so)
REFUSED = {"bitfit": "has none",  # Llama has no bias terms
           "head": "a causal LM has none"}  # a linear probe trains a new head only


def lm_backbone(path) -> OmegaConf:
    cfg = shipped_yaml("backbone/minilm.yaml")
    cfg.path, cfg.package, cfg.max_length = str(path), None, 64
    return cfg


CONVS = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
         for q, a in [("is it good?", "fresh"), ("a long, dull, joyless slog", "rotten"), ("fine", "fresh")]]


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def lm_batch(tokenizer) -> dict:
    examples = [causal_lm.render(c, tokenizer, "chat") for c in CONVS]
    return causal_lm.EncodedLM(examples, tokenizer.pad_token_id, packed=False, max_length=64).batch([0, 1, 2])


@torch.no_grad()
def logits(m, batch) -> torch.Tensor:
    m.eval()
    return m(**{k: v for k, v in batch.items() if k != "labels"}).logits


def greedy_full_recompute(m, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_on_a_causal_lm(name, tiny_lm, tokenizer, tmp_path):
    cfg = with_sources(name, shipped_config(name), lm_backbone(tiny_lm), tmp_path, None, "causal_lm")
    torch.manual_seed(0)
    if name in REFUSED:
        with pytest.raises(UserError, match=REFUSED[name]):
            model.build(lm_backbone(tiny_lm), cfg, None, "causal_lm")
        return
    a = model.build(lm_backbone(tiny_lm), cfg, None, "causal_lm")
    assert a.head == []  # the LM head is the pretrained one, frozen unless the method trains it
    batch = lm_batch(tokenizer)
    own = [n for n, p in a.model.named_parameters() if p.requires_grad]
    assert own, f"{name} trains nothing on a causal LM"
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=1e-2)
    a.model.eval()
    losses = []
    for _ in range(12):
        loss = a.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    expected = logits(a.model, batch)
    meta = model.meta(a, lm_backbone(tiny_lm), None, "t", "causal_lm")
    adapter.save(tmp_path / "adapter", a.model, a.trainable, meta)
    b, saved = model.from_adapter(tmp_path / "adapter")
    assert saved["task_type"] == "causal_lm"
    assert torch.equal(logits(b.model, batch), expected)  # bit-exact reload

    prompt = causal_lm.prompt_ids(CONVS[1], tokenizer, "chat")
    cached = b.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    if name == "loreft":  # it edits the prompt's positions only, as pyreft does: a recompute would edit each new last token
        assert cached[0, len(prompt)].item() == greedy_full_recompute(b.model, prompt, 1)[0]  # the prefill is the same
    else:
        assert cached[0, len(prompt):].tolist() == greedy_full_recompute(b.model, prompt, 5), f"{name}: the KV cache changes the reply"

    if not METHODS[name].mergeable:
        return
    from transformers import AutoModelForCausalLM

    from peftkit.merge import into_base

    into_base.run(OmegaConf.create({"mode": "into_base", "adapter": str(tmp_path / "adapter"), "out": str(tmp_path / "merged")}))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, AdapterLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)
