"""LoRA and (IA)³ on an embedding table, named in target_modules: peft's math (checked through a
peft export), exact merges, and a tied LM head that stays as pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import adapter, config, merge, model
from peftkit.errors import UserError
from peftkit.methods.base import merge_into_base

from .test_every_method_lm import CONVS, lm_backbone, logits


@pytest.fixture(scope="module")
def tied_lm(tmp_path_factory):
    """A tiny Llama whose LM head is its input embedding (tie_word_embeddings), as SmolLM2 and GPT-2."""
    from conftest import minilm_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                                       tie_word_embeddings=True))
    assert net.lm_head.weight is net.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied_lm")
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def batch_of(path):
    from transformers import AutoTokenizer

    from peftkit.tasks import causal_lm

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    examples = [causal_lm.render(c, tok, "chat") for c in CONVS]
    return causal_lm.EncodedLM(examples, tok.pad_token_id, packed=False, max_length=64).batch([0, 1, 2])


def trained(path, method_cfg):
    torch.manual_seed(0)
    a = model.build(lm_backbone(path), method_cfg, None, "causal_lm")
    with torch.no_grad():
        for p in a.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return a


def test_lora_on_the_embedding_is_peft_lora_and_merges_with_the_lm_head_untouched(tied_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = trained(tied_lm, {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["embed_tokens", "q_proj"]})
    emb = a.model.model.embed_tokens
    assert type(emb).__name__ == "LoraEmbedding" and emb.lora_embedding_A.shape == (4, emb.base_layer.num_embeddings)
    head_before = a.model.lm_head.weight.detach().clone()
    assert a.model.lm_head.weight is not emb.base_layer.weight  # untied: the adapter must not move the LM head
    batch = batch_of(tied_lm)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, lm_backbone(tied_lm), None, "t", "causal_lm"))

    merge.run(config.compose_merge("to_peft", [f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'peft'}"]))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in cfg["target_modules"]
    peft_net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied_lm), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_net, batch), expected, atol=1e-5, rtol=0)  # peft's embedding LoRA, same math

    plain = merge_into_base(a.model)
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)
    assert torch.equal(plain.lm_head.weight, head_before) and not plain.config.tie_word_embeddings
    merge.run(config.compose_merge("into_base", [f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'merged'}"]))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=0)

    merge.run(config.compose_merge("from_peft", [f"adapter={tmp_path / 'peft'}", f"out={tmp_path / 'back'}"]))
    b, _ = model.from_adapter(tmp_path / "back" / "adapter")
    torch.testing.assert_close(logits(b.model, batch), expected, atol=1e-5, rtol=0)


def test_ia3_on_the_embedding_scales_each_token_vector(tied_lm, tmp_path):
    a = trained(tied_lm, {"name": "ia3", "target_modules": ["embed_tokens", "v_proj"]})
    emb = a.model.model.embed_tokens
    ids = torch.tensor([[5, 7, 9]])
    torch.testing.assert_close(emb(ids), emb.base_layer.weight[ids] * emb.ia3_l)  # closed form: l ⊙ E[x]
    batch = batch_of(tied_lm)
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, lm_backbone(tied_lm), None, "t", "causal_lm"))
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(logits(b.model, batch), expected)
    torch.testing.assert_close(logits(merge_into_base(b.model), batch), expected, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="IA3Embedding"):  # peft's IA³ has no embedding layer: refused, not dropped
        merge.run(config.compose_merge("to_peft", [f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'peft'}"]))


@pytest.mark.parametrize("name", ["dora", "vera", "houlsby"])
def test_other_methods_refuse_an_embedding_in_one_line(name, tied_lm):
    with pytest.raises(UserError, match="is an embedding"):
        model.build(lm_backbone(tied_lm), {**OmegaConf.to_container(OmegaConf.create({"name": name})),
                                           "target_modules": ["embed_tokens"]}, None, "causal_lm")


def test_all_linear_and_roles_never_take_an_embedding(tied_lm):
    a = model.build(lm_backbone(tied_lm), {"name": "lora", "target_modules": ["all-linear"]}, None, "causal_lm")
    assert not any("embed" in n for n in a.method.cfg.target_modules) and "lm_head" not in a.method.cfg.target_modules
