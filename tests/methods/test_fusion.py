"""AdapterFusion and ScaLearn: frozen pfeiffer adapters of earlier runs composed per layer, checked
against their closed forms written here; sources copied into the adapter (it reloads without them);
one-line refusals for sources that cannot be composed; the two-stage recipe from the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.methods.fusion import FusionLayer, ScaledLayer

from ._helpers import LABELS, SENTENCES, backbone_cfg, build, perturb, with_sources
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)

LAYER = "bert.encoder.layer.1.output.dense"


@pytest.fixture
def sources(tiny_bert, tmp_path):
    return with_sources("adapter_fusion", {}, backbone_cfg(tiny_bert), tmp_path)["adapters"]


def layer_input(layer) -> torch.Tensor:
    return torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(7))


def source_changes(paths, x_h):
    """uᵢ = W_up relu(W_down h + b_down) + b_up for each source, read from its own adapter file."""
    out = []
    for p in paths:
        t = adapter.read_tensors(adapter.folder(p) / adapter.WEIGHTS, "adapter", "")
        down = F.linear(x_h, t[f"{LAYER}.adapter_down.weight"], t[f"{LAYER}.adapter_down.bias"])
        out.append(F.linear(torch.relu(down), t[f"{LAYER}.adapter_up.weight"], t[f"{LAYER}.adapter_up.bias"]))
    return out


@torch.no_grad()
def test_adapter_fusion_is_attention_over_the_sources_changes(tiny_bert, sources):
    a = build(tiny_bert, {"name": "adapter_fusion", "adapters": sources, "temperature": 2.0})
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad and "fusion" in n], std=0.3)
    layer = a.model.get_submodule(LAYER)
    assert isinstance(layer, FusionLayer)
    x = layer_input(layer)
    h = layer.base_layer(x)
    u = source_changes(sources, h)
    q = F.linear(h, layer.fusion_query.weight, layer.fusion_query.bias)
    scores = torch.stack([(q * F.linear(ui, layer.fusion_key.weight, layer.fusion_key.bias)).sum(-1) for ui in u], -1)
    p = torch.softmax(scores / 2.0, -1)
    expected = h + sum(p[..., i:i + 1] * F.linear(u[i], layer.fusion_value.weight) for i in range(2))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_fusion_starts_with_identity_values_and_regularises_towards_them(tiny_bert, sources):
    a = build(tiny_bert, {"name": "adapter_fusion", "adapters": sources, "regularization": 0.5})
    values = [m.fusion_value.weight for m in a.model.modules() if isinstance(m, FusionLayer)]
    assert len(values) == 3 and all(torch.allclose(v, torch.eye(32), atol=1e-6) for v in values)  # 2 FFN outputs, the pooler
    perturb(a.model, [n for n, _ in a.model.named_parameters() if "fusion_value" in n], std=0.1)
    expected = 0.5 * sum(((torch.eye(32) - v) ** 2).sum() for v in values)
    torch.testing.assert_close(a.method.aux_loss(a.model), expected)


@torch.no_grad()
def test_scalearn_with_unit_scale_on_one_source_is_that_source_adapter(tiny_bert, sources):
    """ω = (1, 0): the layer computes exactly what source 0's own pfeiffer adapter computes."""
    a = build(tiny_bert, {"name": "scalearn", "adapters": sources})
    layer = a.model.get_submodule(LAYER)
    assert isinstance(layer, ScaledLayer) and layer.scales.omega.shape == (2, 32)
    torch.testing.assert_close(layer.scales.omega, torch.full((2, 32), 0.5))  # starts at the mean of the sources
    layer.scales.omega.copy_(torch.tensor([1.0, 0.0])[:, None].expand(2, 32))
    source0, _ = model.from_adapter(adapter.folder(sources[0]))
    x = layer_input(layer)
    torch.testing.assert_close(layer(x), source0.model.get_submodule(LAYER)(x), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_scalearn_scalar_and_shared_variants(tiny_bert, sources):
    a = build(tiny_bert, {"name": "scalearn", "adapters": sources, "scaling": "scalar", "share_layers": True})
    layers = [m for m in a.model.modules() if isinstance(m, ScaledLayer)]
    assert len(layers) == 3 and all(m.scales is layers[0].scales for m in layers)
    assert layers[0].scales.omega.shape == (2, 1)
    assert [n for n in a.trainable if "omega" in n] == ["bert.encoder.layer.0.output.dense.scales.omega"]  # stored once
    layers[0].scales.omega.copy_(torch.tensor([[0.25], [2.0]]))
    x = layer_input(layers[1])
    h = layers[1].base_layer(x)
    u = source_changes(sources, h)
    torch.testing.assert_close(layers[1](x), h + 0.25 * u[0] + 2.0 * u[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["adapter_fusion", "scalearn"])
def test_reloads_bit_exactly_without_the_source_runs(name, tiny_bert, sources, tmp_path):
    from transformers import AutoTokenizer

    a = build(tiny_bert, {"name": name, "adapters": sources})
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad])
    adapter.save(tmp_path / "fused", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    meta = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert [s["bottleneck"] for s in meta["method"]["sources"]] == [4, 4]
    for p in sources:
        shutil.rmtree(p)  # the composed adapter holds what it needs of them
    batch = dict(AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt"))
    b, _ = model.from_adapter(tmp_path / "fused")
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        assert torch.equal(b.model(**batch).logits, a.model(**batch).logits)


def test_refusals_name_the_source_and_the_fix(tiny_bert, tmp_path, sources):
    from conftest import make_tiny_bert

    def refused(adapters, *words):
        with pytest.raises(UserError) as e:
            build(tiny_bert, {"name": "adapter_fusion", "adapters": [str(p) for p in adapters]})
        assert all(w in str(e.value) for w in words), str(e.value)

    refused(sources[:1], "two or more runs")
    lora = build(tiny_bert, {"name": "lora"})
    adapter.save(tmp_path / "lora", lora.model, lora.trainable, model.meta(lora, backbone_cfg(tiny_bert), LABELS, "t"))
    refused([sources[0], tmp_path / "lora"], "is a lora adapter", "method=pfeiffer")
    houlsby = build(tiny_bert, {"name": "houlsby", "bottleneck": 4, "target_modules": ["ffn_out", "pooler"]})
    adapter.save(tmp_path / "houlsby", houlsby.model, houlsby.trainable, model.meta(houlsby, backbone_cfg(tiny_bert), LABELS, "t"))
    refused([sources[0], tmp_path / "houlsby"], "LayerNorm", "train_layernorm=false")
    narrow = build(tiny_bert, {"name": "pfeiffer", "bottleneck": 4, "target_modules": ["ffn_out"]})
    adapter.save(tmp_path / "narrow", narrow.model, narrow.trainable, model.meta(narrow, backbone_cfg(tiny_bert), LABELS, "t"))
    refused([sources[0], tmp_path / "narrow"], "adapts other layers")
    other = make_tiny_bert(tmp_path / "other_bert", seed=1)
    foreign = build(other, {"name": "pfeiffer", "bottleneck": 4})
    adapter.save(tmp_path / "foreign", foreign.model, foreign.trainable, model.meta(foreign, backbone_cfg(other), LABELS, "t"))
    refused([sources[0], tmp_path / "foreign"], "another base")


def test_two_stage_recipe_from_the_command_line(tiny_bert, tmp_path):
    """Stage one: two pfeiffer runs; stage two: fusion over them trains, reports, re-scores; merge refuses it."""
    from _train_helpers import tiny
    from conftest import run_cli

    for i, seed in enumerate((0, 1)):
        r = run_cli("train", *tiny(tiny_bert, "method=pfeiffer", "method.bottleneck=4", f"seed={seed}", "trainer.max_steps=4",
                                   f"hydra.run.dir={tmp_path / f'source{i}'}"), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli("train", *tiny(tiny_bert, "method=adapter_fusion", f"method.adapters=[{tmp_path / 'source0'},{tmp_path / 'source1'}]",
                               "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'fused'}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    report = json.loads((tmp_path / "fused" / "eval" / "report.json").read_text())
    assert report["status"] in FINISHED
    r = run_cli("eval", f"run={tmp_path / 'fused'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli("merge", f"adapter={tmp_path / 'fused'}", f"out={tmp_path / 'merged'}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("cfg", "expected"), [
    ({"name": "adapter_fusion"}, 3 * (3 * 32 * 32 + 2 * 32) + 66),  # W_q, W_k (+ biases), W_v per adapted layer; head
    ({"name": "scalearn"}, 3 * 2 * 32 + 66),  # ω: 2 sources × width per layer
    ({"name": "scalearn", "scaling": "scalar", "share_layers": True}, 2 + 66),  # one number per source, shared
])
def test_trainable_parameters_follow_the_formulas_in_docs(cfg, expected, tiny_bert, sources):
    """docs/methods.md gives these formulas (and their MiniLM values); the tiny BERT: d = 32, 3 adapted layers."""
    a = build(tiny_bert, {**cfg, "adapters": sources})
    assert sum(p.numel() for p in a.model.parameters() if p.requires_grad) == expected
