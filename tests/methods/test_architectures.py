"""Any architecture: tiny random configs of twelve model families, every registered method with its
shipped defaults and no target named, as a sequence classifier: it builds, trains one step (its own
tensors get finite gradients), saves and reloads bit-exactly and, where mergeable, merges into a
plain model of the original layer types (GPT-2 keeps its Conv1D) with the same outputs, or it is
refused with one line that says why. Role inference (which layer is the query, the FFN's down
projection, ...) is checked on each family by name."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from peftkit import adapter, backbone, model
from peftkit.errors import UserError
from peftkit.methods import METHODS
from peftkit.methods.base import AdapterLinear, merge_into_base
from peftkit.methods.targets import candidate_layers, folded, roles_of

from conftest import minilm_dir

from ._helpers import LABELS, SENTENCES, backbone_cfg, shipped_config, with_sources

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
DECODER = dict(num_key_value_heads=2, tie_word_embeddings=False)
ARCHS = {  # model type: config overrides (vocab and pad id come from MiniLM's tokenizer)
    "bert": SMALL, "roberta": {**SMALL, "max_position_embeddings": 130},  # RoBERTa's positions start after the pad id
    "deberta-v2": SMALL, "electra": {**SMALL, "embedding_size": 32},
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": SMALL, "llama": {**SMALL, **DECODER}, "qwen2": {**SMALL, **DECODER}, "mistral": {**SMALL, **DECODER},
    "gemma": {**SMALL, **DECODER, "head_dim": 8}, "phi3": {**SMALL, **DECODER},
}
# Each family's layers by role, as `folded` prints them: inferred from names, places and shapes, no table.
ROLES = {
    "bert": ("bert.encoder.layer.N.attention.self.query", "bert.encoder.layer.N.attention.output.dense",
             "bert.encoder.layer.N.intermediate.dense", "bert.encoder.layer.N.output.dense"),
    "distilbert": ("distilbert.transformer.layer.N.attention.q_lin", "distilbert.transformer.layer.N.attention.out_lin",
                   "distilbert.transformer.layer.N.ffn.lin1", "distilbert.transformer.layer.N.ffn.lin2"),
    "gpt2": ("transformer.h.N.attn.c_attn", "transformer.h.N.attn.c_proj", "transformer.h.N.mlp.c_fc",
             "transformer.h.N.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.N.attention.query_key_value", "gpt_neox.layers.N.attention.dense",
                 "gpt_neox.layers.N.mlp.dense_h_to_4h", "gpt_neox.layers.N.mlp.dense_4h_to_h"),
    "phi3": ("model.layers.N.self_attn.qkv_proj", "model.layers.N.self_attn.o_proj", "model.layers.N.mlp.gate_up_proj",
             "model.layers.N.mlp.down_proj"),
    "gemma": ("model.layers.N.self_attn.q_proj", "model.layers.N.self_attn.o_proj",
              "model.layers.N.mlp.gate_proj, model.layers.N.mlp.up_proj", "model.layers.N.mlp.down_proj"),
    "deberta-v2": ("deberta.encoder.layer.N.attention.self.query_proj", "deberta.encoder.layer.N.attention.output.dense",
                   "deberta.encoder.layer.N.intermediate.dense", "deberta.encoder.layer.N.output.dense"),
}
ENCODER_ONLY = {"bert", "roberta", "deberta-v2", "electra", "distilbert"}
# Refusals, each one line: (method, family or "*" for any) -> what the message says
REFUSED = {
    **{("bitfit", t): "has none" for t in ("llama", "mistral", "gemma", "phi3")},  # no bias terms (Qwen2's q, k, v have)
    **{("llama_adapter", t): "adapts decoder attention" for t in ENCODER_ONLY | {"gpt2", "gpt_neox", "phi3"}},
    **{("prefix_tuning", t): "takes a KV cache" for t in ("deberta-v2", "distilbert")},
}


@pytest.fixture(scope="module")
def minilm_tokenizer_dir():
    return minilm_dir()


_TOKENIZERS: dict = {}


@pytest.fixture(autouse=True)
def one_tokenizer_a_folder(monkeypatch):
    """The method × family matrices build hundreds of models from a dozen folders, and loading the same
    tokenizer again was about half of each build. What they test is the methods on each architecture, so
    each folder's tokenizer loads once here (loading tokenizers is tested where it matters)."""
    load = backbone.load_tokenizer

    def once(cfg):
        key = (str(cfg.path), bool(cfg.get("trust_remote_code")))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load(cfg)
        return _TOKENIZERS[key]

    monkeypatch.setattr(backbone, "load_tokenizer", once)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_tokenizer_dir):
    """One saved tiny model per family (sequence classifier with a 2-label head), MiniLM's tokenizer."""
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    out = {}
    for t, kw in ARCHS.items():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(t, vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=2, **kw)
        if t in ("gpt2", "phi3", "gpt_neox"):
            cfg.bos_token_id = cfg.eos_token_id = tok.sep_token_id
        d = tmp_path_factory.mktemp(t)
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        out[t] = d
    return out


@pytest.fixture(scope="module")
def batch(minilm_tokenizer_dir):
    b = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)(SENTENCES, padding=True, return_tensors="pt")
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


@torch.no_grad()
def outputs(m, batch):
    m.eval()
    return m(**batch).logits


@pytest.mark.parametrize("family", sorted(ROLES))
def test_roles_are_inferred(family, folders):
    m = AutoModelForSequenceClassification.from_pretrained(folders[family])
    roles = roles_of(candidate_layers(m, ["classifier", "score", "pre_classifier"]))
    assert tuple(folded(roles[r]) for r in ("query", "attn_out", "ffn_in", "ffn_out")) == ROLES[family]
    if family in ("gpt2", "gpt_neox", "phi3"):  # fused query-key-value: one layer holds the three roles
        assert roles["query"] == roles["key"] == roles["value"]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(ARCHS))
def test_every_method_on_every_family(family, name, folders, batch, tmp_path):
    path = folders[family]
    cfg = with_sources(name, shipped_config(name), backbone_cfg(path), tmp_path)
    refusal = REFUSED.get((name, family))
    torch.manual_seed(0)
    if refusal:
        with pytest.raises(UserError, match=refusal):
            model.build(backbone_cfg(path), cfg, list(LABELS))
        return
    a = model.build(backbone_cfg(path), cfg, list(LABELS))
    own = [n for n in a.trainable if n in dict(a.model.named_parameters()) and not any(n.startswith(h + ".") for h in a.head)]
    assert own or name == "head", f"{name} trains nothing of its own on {family}"
    a.model.eval()
    loss = a.model(**batch, labels=torch.tensor([1, 0, 1])).loss
    loss.backward()
    grads = {n: p.grad for n, p in a.model.named_parameters() if n in own}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), f"{name} on {family}: no or bad gradients"
    assert own == [] or any(g.abs().sum() > 0 for g in grads.values()), f"{name} on {family}: all gradients zero"
    with torch.no_grad():  # one step's worth of change, so that reload and merge see a trained adapter
        for n, p in a.model.named_parameters():
            if n in own:
                p -= 1e-2 * p.grad.sign()
    expected = outputs(a.model, batch)

    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(path), LABELS, "t"))
    b, meta = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(outputs(b.model, batch), expected)  # bit-exact reload
    targets = meta["method"].get("target_modules")
    if targets:  # the adapter records the full names it attached to, not the rules that found them
        assert all(t in dict(b.model.named_modules()) for t in targets)

    if METHODS[name].mergeable:
        conv1d = {n for n, m in b.model.named_modules() if isinstance(m, Conv1D)}
        plain = merge_into_base(copy.deepcopy(b.model))
        assert not any(isinstance(m, AdapterLinear) for m in plain.modules())
        wrapped_conv = {n for n, m in b.model.named_modules() if isinstance(m, AdapterLinear)} if family == "gpt2" else set()
        assert {n for n, m in plain.named_modules() if isinstance(m, Conv1D)} == conv1d | wrapped_conv
        torch.testing.assert_close(outputs(plain, batch), expected, atol=1e-5, rtol=0)


def test_a_role_the_model_lacks_is_named_with_what_it_has(folders):
    with pytest.raises(UserError) as e:
        model.build(backbone_cfg(folders["gpt2"]), {"name": "lora", "target_modules": ["pooler"]}, list(LABELS))
    msg = str(e.value)
    assert "'pooler' matches no Linear layer" in msg and "roles found: query, key, value, attn_out, ffn_in, ffn_out" in msg
    assert "transformer.h.N.attn.c_attn" in msg


def test_distilbert_pre_classifier_is_part_of_the_head(tmp_path, minilm_tokenizer_dir):
    """DistilBERT's classification head is two fresh Linears; peftkit trains both (a frozen random
    pre_classifier would be noise between the backbone and the classifier)."""
    from transformers import AutoModel

    cfg = AutoConfig.for_model("distilbert", vocab_size=30522, **ARCHS["distilbert"])
    AutoModel.from_config(cfg).save_pretrained(tmp_path)  # a base checkpoint: no head in it
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(tmp_path)
    a = model.build(backbone_cfg(tmp_path), {"name": "lora"}, list(LABELS))
    assert a.head == ["pre_classifier", "classifier"]
    assert a.model.pre_classifier.weight.requires_grad


def test_ia3_scales_the_input_of_the_down_projection_on_any_family(folders):
    for family, ffn_out in (("gpt2", "mlp.c_proj"), ("gpt_neox", "mlp.dense_4h_to_h"), ("distilbert", "ffn.lin2")):
        a = model.build(backbone_cfg(folders[family]), {"name": "ia3"}, list(LABELS))
        ffn = a.method.cfg.feedforward_modules
        assert ffn and all(n.endswith(ffn_out) for n in ffn), (family, ffn)
        assert all(a.model.get_submodule(n).on_input for n in ffn)


def test_config_of_a_saved_adapter_is_plain_names(folders, tmp_path):
    a = model.build(backbone_cfg(folders["gpt2"]), {"name": "lora", "target_modules": ["query", "ffn_out"]}, list(LABELS))
    assert a.method.cfg.target_modules == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")]
    assert OmegaConf.create(model.meta(a, backbone_cfg(folders["gpt2"]), LABELS, "t"))  # JSON-able


# ----------------------------------------------------------------- the decoders as causal LMs

LM_FAMILIES = {  # the decoder families test_every_method_lm.py (Llama) and test_lm_runs.py (Qwen2, Mistral) leave out
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=256),
    "gemma": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, max_position_embeddings=256),
    "phi3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                 max_position_embeddings=256),
}
LM_REFUSED = {("head", t): "a causal LM has none" for t in LM_FAMILIES} | {
    ("bitfit", t): "has none" for t in ("gemma", "phi3")} | {
    ("llama_adapter", t): "adapts decoder attention" for t in ("gpt2", "gpt_neox", "phi3")}


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    from conftest import make_tiny_causal_lm

    return {t: make_tiny_causal_lm(tmp_path_factory.mktemp(f"lm_{t}"), seed=0, arch=t, **kw) for t, kw in LM_FAMILIES.items()}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(LM_FAMILIES))
def test_every_method_on_every_decoder_as_a_causal_lm(family, name, lm_folders, tmp_path):
    """One step on response-only labels, a bit-exact reload, cached greedy decoding equal to a full
    recompute (prompt and prefix tuning keep the cache right on every family), and a merge with the
    same logits; or a one-line refusal."""
    from transformers import AutoTokenizer

    from .test_every_method_lm import CONVS, greedy_full_recompute, lm_backbone, logits
    from peftkit.tasks import causal_lm

    path = lm_folders[family]
    cfg = with_sources(name, shipped_config(name), lm_backbone(path), tmp_path, None, "causal_lm")
    torch.manual_seed(0)
    if (name, family) in LM_REFUSED:
        with pytest.raises(UserError, match=LM_REFUSED[name, family]):
            model.build(lm_backbone(path), cfg, None, "causal_lm")
        return
    a = model.build(lm_backbone(path), cfg, None, "causal_lm")
    tok = AutoTokenizer.from_pretrained(path)
    examples = [causal_lm.render(c, tok, "chat") for c in CONVS]
    batch = causal_lm.EncodedLM(examples, tok.pad_token_id, packed=False, max_length=64).batch([0, 1, 2])
    a.model.eval()
    a.model(**batch).loss.backward()
    own = [p for p in a.model.parameters() if p.requires_grad]
    assert own and all(p.grad is not None and torch.isfinite(p.grad).all() for p in own), f"{name} on {family}"
    with torch.no_grad():
        for p in own:
            p -= 1e-2 * p.grad.sign()
    expected = logits(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, lm_backbone(path), None, "t", "causal_lm"))
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(logits(b.model, batch), expected)

    prompt = causal_lm.prompt_ids(CONVS[1], tok, "chat")
    cached = b.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    n = 1 if name == "loreft" else 3  # LoReFT edits the prompt's positions only (see test_every_method_lm)
    assert cached[0, len(prompt):len(prompt) + n].tolist() == greedy_full_recompute(b.model, prompt, n)

    if METHODS[name].mergeable:
        torch.testing.assert_close(logits(merge_into_base(b.model), batch), expected, atol=1e-5, rtol=0)
