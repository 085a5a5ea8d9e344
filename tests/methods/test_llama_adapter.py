"""LLaMA-Adapter: zero-init gate (starts as the base model), one layer's formula by hand, and peft's
`adaption_prompt` on the same weights gives the same logits."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import model
from peftkit.errors import UserError
from peftkit.methods.llama_adapter import AdaptedAttention

from ._helpers import ROOT

CFG = {"name": "llama_adapter", "adapter_len": 4, "adapter_layers": 2}


def lm_backbone(path) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "configs" / "backbone" / "minilm.yaml")
    cfg.path, cfg.package, cfg.max_length = str(path), None, 64
    return cfg


@pytest.fixture()
def ids():
    torch.manual_seed(3)
    return torch.randint(1000, 2000, (2, 9))


def base_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def test_zero_gate_is_the_base_model(tiny_lm, ids):
    a = model.build(lm_backbone(tiny_lm), CFG, None, "causal_lm")
    adapted = [m for m in a.model.modules() if isinstance(m, AdaptedAttention)]
    assert len(adapted) == 2 and all(m.adaption_gate.item() == 0 for m in adapted)
    assert sorted(n for n, p in a.model.named_parameters() if p.requires_grad) == [
        f"model.layers.{i}.self_attn.{k}" for i in (0, 1) for k in ("adaption_gate", "adaption_prompt")]
    torch.testing.assert_close(a.model.eval()(input_ids=ids).logits, base_lm(tiny_lm)(input_ids=ids).logits, atol=0, rtol=0)


@torch.no_grad()
def test_one_layer_by_hand(tiny_lm, ids):
    a = model.build(lm_backbone(tiny_lm), {**CFG, "adapter_layers": 1}, None, "causal_lm")
    layer = a.model.model.layers[-1].self_attn
    layer.adaption_gate.fill_(0.7)
    attn = layer.base
    x = torch.randn(2, 9, 32)
    position_ids = torch.arange(9).expand(2, 9)
    cos, sin = a.model.model.rotary_emb(x, position_ids)
    got = layer(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
    base = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
    hd = attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(2, 9, 4, hd).transpose(1, 2)
    rot = torch.cat([-q[..., hd // 2:], q[..., : hd // 2]], dim=-1)
    q = q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)
    p = layer.adaption_prompt[0]
    k = (p @ attn.k_proj.weight.T).view(4, 2, hd).transpose(0, 1).repeat_interleave(2, dim=0)  # 2 KV heads → 4
    v = (p @ attn.v_proj.weight.T).view(4, 2, hd).transpose(0, 1).repeat_interleave(2, dim=0)
    w = 0.7 * torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
    extra = (w @ v).transpose(1, 2).reshape(2, 9, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, base + extra, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_equals_peft_adaption_prompt_on_the_same_weights(tiny_lm, ids):
    from peft import AdaptionPromptConfig, get_peft_model

    a = model.build(lm_backbone(tiny_lm), CFG, None, "causal_lm")
    ours = [m for m in a.model.modules() if isinstance(m, AdaptedAttention)]
    for i, m in enumerate(ours):
        m.adaption_gate.fill_(0.3 + 0.2 * i)
    peft_model = get_peft_model(base_lm(tiny_lm), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    theirs = [m for m in peft_model.modules() if type(m).__name__ == "AdaptedAttention"]
    assert len(theirs) == 2
    for o, t in zip(ours, theirs):
        t.adaption_prompt.copy_(o.adaption_prompt)
        t.adaption_gate.copy_(o.adaption_gate)
    torch.testing.assert_close(a.model.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_refused_where_there_is_no_decoder_attention(tiny_bert, tiny_lm):
    with pytest.raises(UserError, match="adapts decoder attention"):
        model.build(lm_backbone(tiny_bert), CFG, ["a", "b"])
    with pytest.raises(UserError, match="adapter_layers=9: this model has 2"):
        model.build(lm_backbone(tiny_lm), {**CFG, "adapter_layers": 9}, None, "causal_lm")
