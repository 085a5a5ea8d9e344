"""Merging: W + ΔW gives the adapter's outputs, unmerging restores W, `peftkit merge` writes a plain HF model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import run_cli
from methods._helpers import LABELS, SENTENCES, backbone_cfg, build, hf_model, outputs, perturb
from peftkit import adapter, model
from peftkit.methods import AdapterLinear
from peftkit.methods.base import merge_into_base, set_merged
from peftkit.methods.ia3 import IA3Linear
from peftkit.methods.lora import LoraLinear

MERGEABLE = {
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "lora_rslora": {"name": "lora", "r": 4, "alpha": 8, "rslora": True},
    "ia3": {"name": "ia3"},
}
MERGED_ATOL = 1e-5  # fp32: (W + ΔW)x vs Wx + ΔWx differ by rounding only
RESTORE_ATOL = 1e-6  # W + ΔW - ΔW (LoRA), W·l/l (IA3) in fp32


@torch.no_grad()
def _nontrivial(a) -> None:
    """Trained-looking adapters (B ≠ 0, l ≠ 1) and a head of scale 1/sqrt(d), so logits are O(1)."""
    g = torch.Generator().manual_seed(11)
    for m in a.model.modules():
        if isinstance(m, LoraLinear):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
        elif isinstance(m, IA3Linear):
            m.ia3_l.copy_(torch.empty(m.ia3_l.shape).uniform_(0.5, 1.5, generator=g))
    a.model.classifier.weight.copy_(torch.randn(a.model.classifier.weight.shape, generator=g) * a.model.config.hidden_size**-0.5)


@pytest.fixture
def batch(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(params=list(MERGEABLE))
def adapted(request, biased_bert, batch):
    """(adapted model with non-trivial weights, its logits, its last hidden states)."""
    a = build(biased_bert, MERGEABLE[request.param])
    _nontrivial(a)
    plain = hf_model(biased_bert)
    base_hidden = outputs(plain, batch)[1]
    out, hidden = outputs(a.model, batch)
    assert (hidden - base_hidden).abs().max() > 1e-2, "the adapters must change the model, or merging proves nothing"
    return a, out, hidden


def test_merged_equals_unmerged(adapted, batch):
    a, expected, hidden = adapted
    set_merged(a.model, True)
    wrapped = [m for m in a.model.modules() if isinstance(m, AdapterLinear)]
    assert wrapped and all(m.merged for m in wrapped)
    got, got_hidden = outputs(a.model, batch)
    torch.testing.assert_close(got, expected, atol=MERGED_ATOL, rtol=0)
    torch.testing.assert_close(got_hidden, hidden, atol=MERGED_ATOL, rtol=0)


def test_merge_changes_the_weights_and_unmerge_restores_them(adapted, batch):
    a, expected, hidden = adapted
    base = {n: p.detach().clone() for n, p in a.model.named_parameters() if ".base_layer." in n}
    set_merged(a.model, True)
    merged = {n: p.detach().clone() for n, p in a.model.named_parameters() if ".base_layer." in n}
    assert all(not torch.allclose(merged[n], base[n], atol=1e-4) for n in base if n.endswith(".weight"))
    set_merged(a.model, True)  # already merged: a no-op
    assert all(torch.equal(p, merged[n]) for n, p in a.model.named_parameters() if n in merged)

    set_merged(a.model, False)
    assert not any(m.merged for m in a.model.modules() if isinstance(m, AdapterLinear))
    for n, p in a.model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], atol=RESTORE_ATOL, rtol=0)
    got, got_hidden = outputs(a.model, batch)
    torch.testing.assert_close(got, expected, atol=MERGED_ATOL, rtol=0)
    torch.testing.assert_close(got_hidden, hidden, atol=MERGED_ATOL, rtol=0)


def test_merge_into_base_leaves_a_plain_transformers_model(adapted, batch, biased_bert):
    a, expected, hidden = adapted
    targets = [n for n, m in a.model.named_modules() if isinstance(m, AdapterLinear)]
    merged = merge_into_base(a.model)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in targets)
    assert sorted(merged.state_dict()) == sorted(hf_model(biased_bert).state_dict())  # no base_layer, lora_*, ia3_l
    got, got_hidden = outputs(merged, batch)
    torch.testing.assert_close(got, expected, atol=MERGED_ATOL, rtol=0)
    torch.testing.assert_close(got_hidden, hidden, atol=MERGED_ATOL, rtol=0)


def test_merge_into_base_after_set_merged_does_not_merge_twice(adapted, batch):
    a, expected, hidden = adapted
    set_merged(a.model, True)
    merged = merge_into_base(a.model)
    got, got_hidden = outputs(merged, batch)
    torch.testing.assert_close(got, expected, atol=MERGED_ATOL, rtol=0)
    torch.testing.assert_close(got_hidden, hidden, atol=MERGED_ATOL, rtol=0)


# ----------------------------------------------------------------- `peftkit merge`, end to end

def _hf_outputs(path, sentences=SENTENCES):
    """Logits and last hidden states of a model folder loaded by transformers alone."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    net = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(sentences, padding=True, return_tensors="pt")
    return net, outputs(net, batch)


def _peftkit_outputs(adapter_dir, sentences=SENTENCES):
    a, _ = model.from_adapter(adapter_dir)
    batch = a.tokenizer(sentences, padding=True, return_tensors="pt")
    return a, outputs(a.model, batch)


def _save_adapter(backbone_path, out, method_cfg, randomize) -> None:
    a = build(backbone_path, method_cfg)
    randomize(a)
    adapter.save(out, a.model, a.trainable, model.meta(a, backbone_cfg(backbone_path), LABELS, "test"))


@pytest.fixture(scope="module")
def lora_run(tiny_bert, tmp_path_factory):
    """A 4-step quickstart LoRA run on the tiny BERT."""
    tmp = tmp_path_factory.mktemp("merge_cli")
    r = run_cli("train", "recipe=quickstart", f"backbone.path={tiny_bert}", "trainer.max_steps=4", "trainer.eval_every=4",
                "dataset.max_train_samples=128", "dataset.max_eval_samples=32", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "run" / "adapter" / adapter.WEIGHTS).is_file()
    return tmp


def test_cli_merge_lora_run(lora_run, tiny_bert):
    tmp = lora_run
    r = run_cli("merge", f"adapter={tmp / 'run'}", f"out={tmp / 'merged'}", cwd=tmp)  # a run dir: finds its adapter/
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    net, (got, got_hidden) = _hf_outputs(out)
    a, (expected, hidden) = _peftkit_outputs(tmp / "run" / "adapter")
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got_hidden - hidden).abs().max().item() <= 1e-5
    assert net.config.id2label == {0: "rotten", 1: "fresh"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertForSequenceClassification"]
    assert not any("lora" in k or "peft" in k for k in cfg)

    # the LoRA update is in the weights (small after 4 steps, but there), the pooler's too; the head is the trained one
    base = hf_model(tiny_bert)
    for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value", "bert.pooler.dense"):
        assert not torch.equal(net.get_submodule(name).weight, base.get_submodule(name).weight), name
    assert torch.equal(net.bert.encoder.layer[0].attention.self.key.weight, base.bert.encoder.layer[0].attention.self.key.weight)
    assert torch.equal(net.classifier.weight, a.model.classifier.weight)


def test_cli_merge_ia3_with_random_vectors(biased_bert, tmp_path):
    _save_adapter(biased_bert, tmp_path / "adapter", MERGEABLE["ia3"], _nontrivial)
    r = run_cli("merge", f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'merged'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, (got, got_hidden) = _hf_outputs(tmp_path / "merged")
    _, (expected, hidden) = _peftkit_outputs(tmp_path / "adapter")
    _, (_, base_hidden) = _hf_outputs(biased_bert)
    assert (hidden - base_hidden).abs().max() > 1e-2
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got_hidden - hidden).abs().max().item() <= 1e-5


def test_cli_merge_houlsby_is_refused(tiny_bert, tmp_path):
    cfg = {"name": "houlsby", "bottleneck": 8}
    _save_adapter(tiny_bert, tmp_path / "adapter", cfg, lambda a: perturb(a.model, a.trainable))
    r = run_cli("merge", f"adapter={tmp_path / 'adapter'}", f"out={tmp_path / 'merged'}", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:") and "houlsby" in lines[0] and "not mergeable" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half-written or temporary folder
