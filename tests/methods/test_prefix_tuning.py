"""Prefix tuning / P-Tuning v2: peft's prefixes give the same logits, one attention layer by hand,
padding, gradients, parameter counts, refusals.

peft 0.21.2's own prefix-tuning forward refuses to run on transformers 5.24 ("Model does not
support past key values"): it looks for a `past_key_values` parameter, which transformers renamed
to `cache`. Its prefix encoder and `get_prompt` still work, so the peft test runs peft's recipe by
hand (mask widened by ones, prefixes as the KV cache); the attention-layer tests are closed forms.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoTokenizer

from peftkit import adapter, methods, model
from peftkit.errors import UserError
from peftkit.methods.base import count_params
from peftkit.methods.prefix_tuning import PrefixMLP, PrefixTable

from ._helpers import LABELS, SENTENCES, assert_gradients_exactly, backbone_cfg, build, hf_model, randomize_biases

P, E = 5, 24  # virtual tokens; MLP width when reparameterised
DIRECT = {"name": "prefix_tuning", "num_virtual_tokens": P}
MLP = {**DIRECT, "reparameterize": True, "encoder_hidden_size": E}
ATOL = 1e-5  # fp32 logits of order 1, batched vs one sentence: rounding only


@pytest.fixture(params=["bert", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def path(arch, tiny_bert, tiny_llama):
    return {"bert": tiny_bert, "llama": tiny_llama}[arch]


def inputs(path) -> dict:
    batch = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")  # Llama takes none; BERT defaults them to zeros
    return batch


def head_of(m):
    return "classifier" if hasattr(m, "classifier") else "score"


@pytest.mark.parametrize("cfg", [DIRECT, MLP], ids=["direct", "reparameterized"])
def test_same_logits_as_peft_prefixes(path, cfg):
    from peft import PrefixTuningConfig, get_peft_model

    base = hf_model(path)
    base.config.pad_token_id = 0
    randomize_biases(base)
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=P, prefix_projection=cfg is MLP, encoder_hidden_size=E)).eval()
    methods.prepare(ours, methods.build(cfg), head=[head_of(ours)])

    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        if cfg is MLP:
            ours.prefix_tuning.embedding.copy_(encoder.embedding.weight)
            ours.prefix_tuning.mlp.load_state_dict(encoder.transform.state_dict())
        else:
            ours.prefix_tuning.prefix.copy_(encoder.embedding.weight)

    batch = inputs(path)
    cache = ref.get_prompt(batch_size=3)
    prefixes = ours.prefix_tuning()
    # peft runs the MLP on a batch of 3 copies, we on one: with several threads the matmuls may round
    # differently, so equal within 1e-6 (bit-equal with one thread and for the direct table).
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # noqa: E731
    for layer, (k, v) in enumerate(prefixes):
        close(cache.layers[layer].keys, k.expand(3, -1, -1, -1))
        close(cache.layers[layer].values, v.expand(3, -1, -1, -1))

    wide = {**batch, "attention_mask": torch.cat([torch.ones(3, P, dtype=torch.long), batch["attention_mask"]], 1)}
    with torch.no_grad():
        expected = ref.base_model(**wide, cache=cache, output_hidden_states=True)
        got = ours.eval()(**batch, output_hidden_states=True)
    close(got.hidden_states[-1], expected.hidden_states[-1])
    close(got.logits, expected.logits)


def _capture(module):
    seen = {}

    def hook(m, args, kwargs, out):
        seen["x"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), out[0]

    module.register_forward_hook(hook, with_kwargs=True)
    return seen


def _attention(q, k, v, visible):
    """softmax(q kᵀ/√d) v over keys `visible` allows; q (B,H,L,d), k and v (B,H,P+L,d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).flatten(2)


def _with_prefix(prefix, x):
    return torch.cat([prefix.expand(x.shape[0], -1, -1, -1), x], dim=2)


@torch.no_grad()
def test_bert_attention_layer_by_hand(tiny_bert):
    a = build(tiny_bert, DIRECT)
    randomize_biases(a.model)
    attn = a.model.bert.encoder.layer[1].attention.self
    seen = _capture(attn)
    batch = inputs(tiny_bert)
    a.model.eval()(**batch)

    x, mask = seen["x"], batch["attention_mask"].bool()
    B, L, _ = x.shape
    split = lambda t: t.view(B, L, 4, 8).transpose(1, 2)
    pk, pv = a.model.prefix_tuning()[1]
    q, k, v = split(attn.query(x)), _with_prefix(pk, split(attn.key(x))), _with_prefix(pv, split(attn.value(x)))
    visible = torch.cat([torch.ones(B, P, dtype=torch.bool), mask], 1)[:, None, None, :]  # prefixes: always
    torch.testing.assert_close(seen["out"], _attention(q, k, v, visible), atol=1e-6, rtol=0)


def _rotate(t, positions, theta):
    d = t.shape[-1]
    angles = positions[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin


@torch.no_grad()
def test_llama_attention_layer_by_hand(tiny_llama):
    """Grouped-query attention (4 heads share 2 KV heads), rotary positions, causal mask: a token sees
    every prefix, then the real tokens up to itself. Real tokens rotate by positions P…P+L-1 (they
    come after the prefix, as after cached keys); prefix keys are used as stored, unrotated."""
    a = build(tiny_llama, DIRECT)
    attn = a.model.model.layers[1].self_attn
    seen = _capture(attn)
    batch = inputs(tiny_llama)
    a.model.eval()(**batch)

    x, mask = seen["x"], batch["attention_mask"].bool()
    B, L, _ = x.shape
    theta = a.model.config.rope_parameters["rope_theta"]
    split = lambda t: t.view(B, L, -1, 8).transpose(1, 2)
    pos = torch.arange(P, P + L)
    pk, pv = a.model.prefix_tuning()[1]
    q = _rotate(split(attn.q_proj(x)), pos, theta)
    k = _with_prefix(pk, _rotate(split(attn.k_proj(x)), pos, theta)).repeat_interleave(2, dim=1)
    v = _with_prefix(pv, split(attn.v_proj(x))).repeat_interleave(2, dim=1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    visible = torch.cat([torch.ones(B, 1, L, P, dtype=torch.bool), causal & mask[:, None, None, :]], -1)
    torch.testing.assert_close(seen["out"], attn.o_proj(_attention(q, k, v, visible)), atol=1e-6, rtol=0)


@torch.no_grad()
def test_bert_positions_start_after_the_prefix(tiny_bert):
    """As with any cached keys (and in P-Tuning v2 and peft), real tokens take positions P…P+L-1."""
    a = build(tiny_bert, DIRECT)
    seen = {}
    a.model.bert.embeddings.register_forward_hook(lambda m, args, out: seen.update(out=out))
    batch = inputs(tiny_bert)
    a.model.eval()(**batch)
    L = batch["input_ids"].shape[1]
    expected = a.model.bert.embeddings(batch["input_ids"], position_ids=torch.arange(P, P + L)[None])
    assert torch.equal(seen["out"], expected)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DIRECT, MLP], ids=["direct", "reparameterized"])
def test_padded_batch_equals_each_sentence_alone(path, cfg):
    a = build(path, cfg)
    batch = inputs(path)
    together = a.model.eval()(**batch).logits
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        alone = a.model(**{key: t[i : i + 1, :n] for key, t in batch.items()}).logits
        torch.testing.assert_close(alone[0], together[i], atol=ATOL, rtol=0)
    without_mask = {key: t[1:2, :3] for key, t in batch.items() if key != "attention_mask"}
    assert torch.equal(a.model(**without_mask).logits, a.model(**{key: t[1:2, :3] for key, t in batch.items()}).logits)


@pytest.mark.parametrize("cfg", [DIRECT, MLP], ids=["direct", "reparameterized"])
def test_gradients_reach_only_the_prefixes_and_head(path, cfg):
    a = build(path, cfg)
    head = head_of(a.model)
    own = ["prefix_tuning.prefix"] if cfg is DIRECT else \
        ["prefix_tuning.embedding"] + [f"prefix_tuning.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    expected = set(own) | {n for n, _ in a.model.named_parameters() if n.startswith(head + ".")}
    assert set(a.trainable) == expected
    assert {n for n, p in a.model.named_parameters() if p.requires_grad} == expected

    assert_gradients_exactly(a.model, expected, inputs(path), torch.tensor([1, 0, 1]), steps=1)


def test_parameter_counts(path, arch):
    layers, kv_dim, head = (2, 4 * 8, 32 * 2 + 2) if arch == "bert" else (2, 2 * 8, 32 * 2)  # Llama: 2 KV heads, no head bias
    assert build(path, DIRECT).model.prefix_tuning.prefix.shape == (P, layers * 2 * kv_dim)
    assert count_params(build(path, DIRECT).model)[0] == layers * 2 * P * kv_dim + head
    mlp = P * kv_dim + (kv_dim * E + E) + (E * layers * 2 * kv_dim + layers * 2 * kv_dim)
    assert count_params(build(path, MLP).model)[0] == mlp + head


def test_reparameterized_reloads_bit_exact(tiny_llama, tmp_path):
    a = build(tiny_llama, MLP)
    assert isinstance(a.model.prefix_tuning, PrefixMLP)
    with torch.no_grad():
        a.model.prefix_tuning.mlp[2].weight.mul_(3)
    batch = inputs(tiny_llama)
    expected = a.model.eval()(**batch).logits
    adapter.save(tmp_path / "a", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_llama), LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "a")
    assert torch.equal(b.model.eval()(**batch).logits, expected)


def test_defaults_are_p_tuning_v2(tiny_bert):
    a = build(tiny_bert, {"name": "prefix_tuning"})
    assert isinstance(a.model.prefix_tuning, PrefixTable)
    assert a.model.prefix_tuning.prefix.shape == (20, 2 * 2 * 32)
    assert not a.method.mergeable


@pytest.mark.parametrize("key", ["num_virtual_tokens", "encoder_hidden_size"])
def test_refuses_sizes_below_one(key):
    with pytest.raises(UserError, match=f"{key} must be at least 1"):
        methods.build({**MLP, key: 0})


def test_refuses_a_backbone_without_a_kv_cache():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    m = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UserError, match="takes a KV cache .*BERT.*Llama"):
        methods.prepare(m, methods.build(DIRECT), head=["classifier"])
