"""Any architecture from the command line: `recipe=glue_lora backbone.path=<folder>` trains GPT-2,
DistilBERT and Gemma checkpoints without naming a module, and `peftkit ls targets` / `train --dry-run`
show what a recipe would adapt without training or writing anything."""

from __future__ import annotations

import json

import pytest
from conftest import GLUE_DIR, make_tiny_causal_lm, minilm_dir, needs_glue, run_cli
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)

DECODER_SIZES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gemma": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, max_position_embeddings=256),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders as users have them: decoders saved with their LM head, DistilBERT as a bare encoder."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = {t: make_tiny_causal_lm(tmp_path_factory.mktemp(t), seed=0, arch=t, **kw) for t, kw in DECODER_SIZES.items()}
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("distilbert")
    AutoModel.from_config(AutoConfig.for_model("distilbert", vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=128)).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(d)
    out["distilbert"] = d
    return out


@needs_glue
@pytest.mark.parametrize("family", ["gpt2", "distilbert", "gemma"])
def test_glue_lora_on_a_folder_of_any_family(family, checkpoints, tmp_path):
    r = run_cli("train", "recipe=glue_lora", f"backbone.path={checkpoints[family]}", "dataset=glue/rte",
                f"dataset.data_dir={GLUE_DIR}", "dataset.max_train_samples=32", "dataset.max_eval_samples=16",
                "trainer.max_steps=2", "trainer.batch_size=16", "backbone.max_length=64", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    targets = meta["method"]["target_modules"]
    expected = {"gpt2": "transformer.h.0.attn.c_attn", "distilbert": "distilbert.transformer.layer.0.attention.q_lin",
                "gemma": "model.layers.0.self_attn.q_proj"}[family]
    assert expected in targets  # full names, as resolved from the roles, recorded in the adapter
    if family == "distilbert":  # the fresh pre_classifier trains with the classifier
        assert meta["head"] == ["pre_classifier", "classifier"]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["status"] in FINISHED  # a tiny random model may collapse to one class: finished all the same


def test_ls_targets_and_dry_run_print_the_modules_and_write_nothing(checkpoints, tmp_path):
    r = run_cli("ls", "targets", "recipe=quickstart_lm", f"backbone.path={checkpoints['gpt2']}", "method=lora",
                "method.target_modules=[query,ffn_out]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "Conv1D 32→96" in out and "query, key, value" in out and "ffn_out" in out
    assert "trainable params: 4,608 of" in out  # r=8: (32+96)·8 + (128+32)·8 per layer, 2 layers, no head
    r = run_cli("train", "recipe=quickstart_lm", f"backbone.path={checkpoints['gpt2']}", "method=ia3", "--dry-run",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ffn_out" in r.stdout and "Conv1D 128→32" in r.stdout and not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []


def test_ls_targets_names_a_missing_role(checkpoints, tmp_path):
    r = run_cli("ls", "targets", f"backbone.path={checkpoints['gpt2']}", "method=lora", "method.target_modules=[pooler]",
                cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "'pooler' matches no Linear layer" in r.stderr and "transformer.h.N.attn.c_attn" in r.stderr
