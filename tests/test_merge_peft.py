"""`peftkit merge mode=to_peft / from_peft`: adapters exchanged with Hugging Face peft, checked against peft itself.

The reference is peft 0.21 (a test dependency): an exported adapter must load with
`PeftModel.from_pretrained` and give peftkit's outputs; a peft-made adapter, imported, must give
peft's. fp32 throughout, so outputs agree to rounding: 1e-5.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import run_cli
from methods._helpers import (
    LABELS,
    SENTENCES,
    backbone_cfg,
    build,
    outputs,
    perturb,
)
from safetensors.torch import load_file

from peftkit import adapter, config, merge, methods, model
from peftkit.errors import UserError

ATOL = 1e-5  # fp32: the same sums in another order (PiSSA: W − s·B₀A₀ formed, then s·B₀A₀ added back)
EXPORTS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "rslora": {"name": "rslora", "r": 4, "alpha": 8},
    "dora": {"name": "dora", "r": 4, "alpha": 8},
    "pissa": {"name": "lora", "r": 4, "alpha": 8, "init": "pissa"},
    "ia3": {"name": "ia3"},
}


def _batch(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")


def _hf_base(path, num_labels=2):
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32).eval()


def _peft_load(base_path, peft_dir, num_labels=2):
    """PeftModel.from_pretrained on a fresh base; fails if peft reports keys it did not load."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = PeftModel.from_pretrained(_hf_base(base_path, num_labels), str(peft_dir)).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return net


def _merge(mode, **kv):
    args = [f"{k}={v}" for k, v in kv.items()]
    return merge.run(config.compose_merge(mode, args))


def _save_peftkit(base_path, out, method_cfg):
    """A peftkit adapter far from its init: every trained parameter noised (B ≠ 0, l ≠ 1, a random head).

    IA³'s vectors get more noise: behind LayerNorms, l = 1 ± 0.1 barely moves the hidden states.
    """
    a = build(base_path, method_cfg)
    params = dict(a.model.named_parameters())
    perturb(a.model, [n for n in a.trainable if n in params], std=0.5 if method_cfg["name"] == "ia3" else 0.1)
    adapter.save(out, a.model, a.trainable, model.meta(a, backbone_cfg(base_path), LABELS, "test"))
    return out


def _assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:"), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------- peftkit → peft

@pytest.mark.parametrize("kind", list(EXPORTS))
def test_to_peft_loads_in_peft_with_the_same_outputs(kind, biased_bert, tmp_path):
    _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS[kind])
    _merge("to_peft", adapter=tmp_path / "adapter", out=tmp_path / "peft")

    a, _ = model.from_adapter(tmp_path / "adapter")
    batch = _batch(biased_bert)
    expected, hidden = outputs(a.model, batch)
    got, got_hidden = outputs(_peft_load(biased_bert, tmp_path / "peft"), batch)
    _, base_hidden = outputs(_hf_base(biased_bert), batch)
    assert (hidden - base_hidden).abs().max() > 1e-2, "the adapter must change the model, or the check proves nothing"
    assert (got - expected).abs().max().item() <= ATOL
    assert (got_hidden - hidden).abs().max().item() <= ATOL


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_to_peft_writes_peft_config_and_key_names(kind, biased_bert, tmp_path):
    _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS[kind])
    _merge("to_peft", adapter=tmp_path / "adapter", out=tmp_path / "peft")
    out = tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    keys = load_file(str(out / "adapter_model.safetensors"))
    q = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert cfg["base_model_name_or_path"] == str(biased_bert.resolve())
    assert keys["base_model.model.classifier.weight"].shape == (2, 32)
    assert not any(".default." in k or "modules_to_save" in k for k in keys)
    if kind == "ia3":
        assert cfg["peft_type"] == "IA3"
        assert cfg["feedforward_modules"] == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
        assert keys["base_model.model.bert.encoder.layer.0.output.dense.ia3_l"].shape == (1, 64)  # scales the input
        assert keys["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"].shape == (32, 1)  # the output
        return
    assert cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
                                     "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
                                     "bert.pooler.dense"]
    assert cfg["use_rslora"] == (kind == "rslora") and cfg["use_dora"] == (kind == "dora")
    rank = 8 if kind == "pissa" else 4  # PiSSA: [A; A₀], [B, −B₀]
    assert (cfg["r"], cfg["lora_alpha"]) == (rank, 2 * rank)  # scaling 2 either way
    assert keys[f"{q}.lora_A.weight"].shape == (rank, 32) and keys[f"{q}.lora_B.weight"].shape == (32, rank)
    assert (f"{q}.lora_magnitude_vector" in keys) == (kind == "dora")
    card = (out / "README.md").read_text()
    assert "library_name: peft\n" in card and "PeftModel.from_pretrained" in card


def test_to_peft_lora_on_llama(tiny_llama, tmp_path):
    _save_peftkit(tiny_llama, tmp_path / "adapter", EXPORTS["lora"])
    _merge("to_peft", adapter=tmp_path / "adapter", out=tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]
    assert cfg["target_modules"] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]

    a, _ = model.from_adapter(tmp_path / "adapter")
    batch = _batch(tiny_llama)
    expected, hidden = outputs(a.model, batch)
    got, got_hidden = outputs(_peft_load(tiny_llama, tmp_path / "peft"), batch)
    _, base_hidden = outputs(_hf_base(tiny_llama), batch)
    assert (hidden - base_hidden).abs().max() > 1e-2
    assert (got - expected).abs().max().item() <= ATOL
    assert (got_hidden - hidden).abs().max().item() <= ATOL


def test_to_peft_refuses_a_peft_adapter(biased_bert, tmp_path):
    _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS["lora"])
    _merge("to_peft", adapter=tmp_path / "adapter", out=tmp_path / "peft")
    with pytest.raises(UserError, match="already a peft adapter"):
        _merge("to_peft", adapter=tmp_path / "peft", out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


# ----------------------------------------------------------------- peft → peftkit

def _peft_adapter(base_path, out, peft_config, num_labels=2, std=0.1):
    """An adapter made by peft itself: get_peft_model, every trainable tensor noised, save_pretrained."""
    from peft import get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(_hf_base(base_path, num_labels), peft_config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in net.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * std)
    net.save_pretrained(str(out))
    return net.eval()


def _lora(**kw):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value", "pooler.dense"], **kw)


def _ia3():
    from peft import IA3Config, TaskType

    # peft matches `output.dense` as a suffix: attention.output.dense (square, 32×32) scales its input too
    return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])


IMPORTS = {  # name: (peft config, num_labels, labels=, expected peftkit method, expected label names)
    "lora": (_lora, 2, None, "lora", ["LABEL_0", "LABEL_1"]),
    "dora_rslora": (lambda: _lora(use_dora=True, use_rslora=True), 3, "[neg,mid,pos]", "dora", ["neg", "mid", "pos"]),
    "ia3_regression": (_ia3, 1, None, "ia3", None),
}


@pytest.mark.parametrize("kind", list(IMPORTS))
def test_from_peft_gives_peft_outputs(kind, biased_bert, tmp_path):
    make, num_labels, labels, method, label_names = IMPORTS[kind]
    peft_net = _peft_adapter(biased_bert, tmp_path / "peft", make(), num_labels, std=0.5 if method == "ia3" else 0.1)
    kv = {"labels": labels} if labels else {}
    _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "out", **kv)

    a, meta = model.from_adapter(tmp_path / "out" / "adapter")
    assert meta["method"]["name"] == method and meta["label_names"] == label_names
    assert meta["backbone"]["path"] == str(biased_bert.resolve())
    batch = _batch(biased_bert)
    expected, hidden = outputs(peft_net, batch)
    got, got_hidden = outputs(a.model, batch)
    _, base_hidden = outputs(_hf_base(biased_bert), batch)
    assert got.shape == (len(SENTENCES), num_labels)
    assert (hidden - base_hidden).abs().max() > 1e-2
    assert (got - expected).abs().max().item() <= ATOL
    assert (got_hidden - hidden).abs().max().item() <= ATOL
    if method == "ia3":  # both `output.dense` layers scale their input, the keys and values their output
        assert meta["method"]["feedforward_modules"] == [f"bert.encoder.layer.{i}.{p}output.dense" for i in (0, 1)
                                                         for p in ("attention.", "")]


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "ia3"])
def test_round_trip_is_bit_identical(kind, biased_bert, tmp_path):
    src = _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS[kind])
    _merge("to_peft", adapter=src, out=tmp_path / "peft")
    _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "back", labels="[" + ",".join(LABELS) + "]")
    before, after = load_file(str(src / adapter.WEIGHTS)), load_file(str(tmp_path / "back" / "adapter" / adapter.WEIGHTS))
    assert sorted(before) == sorted(after)
    for n in before:
        assert before[n].dtype == after[n].dtype and torch.equal(before[n], after[n]), n
    old, new = adapter.read_config(src), adapter.read_config(tmp_path / "back" / "adapter")
    assert new["base_fingerprint"] == old["base_fingerprint"] and new["label_names"] == LABELS
    old_cfg, new_cfg = (vars(methods.build(c["method"]).cfg) for c in (old, new))
    for k in old_cfg.keys() - {"target_modules", "feedforward_modules"}:  # regexes / roles then, exact names now
        assert new_cfg[k] == old_cfg[k], k


def test_round_trip_of_pissa_keeps_the_outputs(biased_bert, tmp_path):
    """PiSSA comes back as a plain rank-2r LoRA on the original base: other tensors, the same function."""
    src = _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS["pissa"])
    _merge("to_peft", adapter=src, out=tmp_path / "peft")
    _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "back")
    batch = _batch(biased_bert)
    expected, hidden = outputs(model.from_adapter(src)[0].model, batch)
    a, meta = model.from_adapter(tmp_path / "back" / "adapter")
    assert (meta["method"]["r"], meta["method"]["init"]) == (8, "kaiming")
    got, got_hidden = outputs(a.model, batch)
    assert (got - expected).abs().max().item() <= ATOL
    assert (got_hidden - hidden).abs().max().item() <= ATOL


@pytest.mark.parametrize("change, message", [
    ({"rank_pattern": {"query": 8}}, "rank_pattern"),
    ({"bias": "all"}, "bias=all"),
    ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
    ({"peft_type": "LOHA"}, "LOHA adapter"),
])
def test_from_peft_refuses_what_it_cannot_hold(change, message, biased_bert, tmp_path):
    _peft_adapter(biased_bert, tmp_path / "peft", _lora())
    f = tmp_path / "peft" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    with pytest.raises(UserError, match=message):
        _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_peft_refuses_a_peftkit_adapter_and_bad_labels(biased_bert, tmp_path):
    _save_peftkit(biased_bert, tmp_path / "adapter", EXPORTS["lora"])
    with pytest.raises(UserError, match="a peftkit adapter already"):
        _merge("from_peft", adapter=tmp_path / "adapter", out=tmp_path / "out")
    _peft_adapter(biased_bert, tmp_path / "peft", _lora())
    with pytest.raises(UserError, match="the head has 2 outputs"):
        _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "out", labels="[a,b,c]")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def lora_run(tiny_bert, tmp_path_factory):
    """A 4-step quickstart LoRA run on the tiny BERT."""
    tmp = tmp_path_factory.mktemp("peft_cli")
    r = run_cli("train", "recipe=quickstart", f"backbone.path={tiny_bert}", "trainer.max_steps=4", "trainer.eval_every=4",
                "dataset.max_train_samples=128", "dataset.max_eval_samples=32", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_cli_trained_run_to_peft_and_back(lora_run, tiny_bert):
    tmp = lora_run
    r = run_cli("merge", "mode=to_peft", f"adapter={tmp / 'run'}", f"out={tmp / 'peft'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    a, _ = model.from_adapter(tmp / "run" / "adapter")
    batch = a.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected, hidden = outputs(a.model, batch)
    got, got_hidden = outputs(_peft_load(tiny_bert, tmp / "peft"), batch)
    assert (got - expected).abs().max().item() <= ATOL
    assert (got_hidden - hidden).abs().max().item() <= ATOL

    r = run_cli("merge", "mode=from_peft", f"adapter={tmp / 'peft'}", f"out={tmp / 'back'}", "labels=[rotten,fresh]", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    before = load_file(str(tmp / "run" / "adapter" / adapter.WEIGHTS))
    after = load_file(str(tmp / "back" / "adapter" / adapter.WEIGHTS))
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)
    assert json.loads((tmp / "back" / "merge.json").read_text())["mode"] == "from_peft"


def test_cli_to_peft_refuses_houlsby(tiny_bert, tmp_path):
    _save_peftkit(tiny_bert, tmp_path / "adapter", {"name": "houlsby", "bottleneck": 8})
    r = run_cli("merge", "mode=to_peft", f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'peft'}", cwd=tmp_path)
    _assert_one_line_error(r, "houlsby", "lora, rslora, dora, ia3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written, no temporary folder


@pytest.mark.parametrize("damage, words", [
    ("peft_type", ["PREFIX_TUNING", "LORA and IA3"]),
    ("bin_only", ["adapter_model.safetensors", "adapter_model.bin", "pickle"]),
    ("no_backbone", ["nobody/no-such-model", "backbone=", "backbone_path="]),
])
def test_cli_from_peft_refusals(damage, words, biased_bert, tmp_path):
    _peft_adapter(biased_bert, tmp_path / "peft", _lora())
    f = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(f.read_text())
    if damage == "peft_type":
        cfg["peft_type"] = "PREFIX_TUNING"
    elif damage == "no_backbone":
        cfg["base_model_name_or_path"] = "nobody/no-such-model"
    else:
        weights = tmp_path / "peft" / "adapter_model.safetensors"
        weights.rename(weights.with_name("adapter_model.bin"))  # the name is what matters: it is never opened
    f.write_text(json.dumps(cfg))
    r = run_cli("merge", "mode=from_peft", f"adapter={tmp_path / 'peft'}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    _assert_one_line_error(r, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


# ----------------------------------------------------------------- GPT-2's Conv1D layers

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 sequence classifier (Conv1D layers, fused c_attn) with random biases, MiniLM's tokenizer."""
    from conftest import minilm_dir
    from methods._helpers import randomize_biases
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    net = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                   pad_token_id=tok.pad_token_id, num_labels=2))
    randomize_biases(net)
    out = tmp_path_factory.mktemp("tiny_gpt2")
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_conv1d_adapters_go_to_peft_and_back_with_the_same_outputs(kind, tiny_gpt2, tmp_path):
    """GPT-2: peftkit adapts Conv1D as the Linear it computes; the export sets fan_in_fan_out and peft
    computes the same outputs; imported back, the tensors are bit-identical."""
    cfg = {**EXPORTS[kind], "target_modules": ["query", "attn_out", "ffn_in", "ffn_out"]}
    src = _save_peftkit(tiny_gpt2, tmp_path / "adapter", cfg)
    _merge("to_peft", adapter=src, out=tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["fan_in_fan_out"] is True and "transformer.h.0.attn.c_attn" in peft_cfg["target_modules"]
    if kind == "ia3":
        assert peft_cfg["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]

    batch = _batch(tiny_gpt2)
    batch.pop("token_type_ids", None)
    expected, hidden = outputs(model.from_adapter(src)[0].model, batch)
    got, got_hidden = outputs(_peft_load(tiny_gpt2, tmp_path / "peft"), batch)
    _, base_hidden = outputs(_hf_base(tiny_gpt2), batch)
    assert (hidden - base_hidden).abs().max() > 1e-2
    assert (got - expected).abs().max().item() <= ATOL and (got_hidden - hidden).abs().max().item() <= ATOL

    _merge("from_peft", adapter=tmp_path / "peft", out=tmp_path / "back", labels="[" + ",".join(LABELS) + "]")
    before, after = load_file(str(src / adapter.WEIGHTS)), load_file(str(tmp_path / "back" / "adapter" / adapter.WEIGHTS))
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)


def test_conv1d_lora_merges_into_a_plain_gpt2(tiny_gpt2, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    src = _save_peftkit(tiny_gpt2, tmp_path / "adapter", {"name": "lora", "r": 4, "target_modules": ["all-linear"]})
    _merge("into_base", adapter=src, out=tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D) and isinstance(plain.transformer.h[1].mlp.c_proj, Conv1D)
    batch = _batch(tiny_gpt2)
    batch.pop("token_type_ids", None)
    expected, _ = outputs(model.from_adapter(src)[0].model, batch)
    assert (outputs(plain, batch)[0] - expected).abs().max().item() <= ATOL
    _merge("svd", adapters=f"[{src}]", rank=4, out=tmp_path / "svd")  # the sum of one rank-4 LoRA: exact at rank 4
    got, _ = outputs(model.from_adapter(tmp_path / "svd" / "adapter")[0].model, batch)
    assert (got - expected).abs().max().item() <= 1e-4
