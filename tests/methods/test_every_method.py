"""Every registered method, with its shipped YAML defaults, on a tiny BERT and a tiny Llama:
it trains (loss down, its own tensors move), saves and reloads bit-exactly, merges and unmerges, and
`peftkit merge` folds it into a plain transformers model with the same outputs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.methods import METHODS
from peftkit.methods.base import AdapterLinear, set_merged

from ._helpers import LABELS, ROOT, SENTENCES, backbone_cfg, build, shipped_config, with_sources


def inputs(path):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)  # Llama takes none; BERT defaults them to zeros
    return dict(batch)


@torch.no_grad()
def outputs(m, batch) -> torch.Tensor:
    m.eval()
    return m(**batch).logits


@pytest.fixture(params=["bert", "llama"])
def backbone(request, tiny_bert, tiny_llama):
    return {"bert": tiny_bert, "llama": tiny_llama}[request.param]


def test_every_method_has_a_shipped_yaml():
    assert sorted(METHODS) == sorted(p.stem for p in (ROOT / "configs" / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trains_saves_reloads_merges(name, backbone, tmp_path):
    cfg = with_sources(name, shipped_config(name), backbone_cfg(backbone), tmp_path)
    if name == "bitfit" and "llama" in str(backbone):  # Llama has no bias terms: a clear refusal instead
        with pytest.raises(UserError, match="has none"):
            build(backbone, cfg)
        return
    if name == "llama_adapter" and "bert" in str(backbone):  # it adapts decoder attention: a clear refusal on BERT
        with pytest.raises(UserError, match="adapts decoder attention"):
            build(backbone, cfg)
        return
    a = build(backbone, cfg)
    batch = inputs(backbone)
    labels = torch.tensor([1, 0, 1])
    own = [n for n in a.trainable if n in dict(a.model.named_parameters()) and not n.startswith(("classifier.", "score."))]
    assert own or name == "head", f"{name} trains nothing of its own"
    before = {n: p.detach().clone() for n, p in a.model.named_parameters() if n in own}

    params = [p for p in a.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    a.model.eval()  # no dropout: the loss curve is deterministic
    losses = []
    for _ in range(15):
        loss = a.model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    moved = [n for n, p in a.model.named_parameters() if n in own and not torch.equal(p, before[n])]
    assert own == [] or moved, f"{name}: none of its own parameters changed"

    expected = outputs(a.model, batch)
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, backbone_cfg(backbone), LABELS, "t"))
    b, _ = model.from_adapter(tmp_path / "adapter")
    assert torch.equal(outputs(b.model, batch), expected)  # bit-exact reload

    if not METHODS[name].mergeable:
        return
    weights = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    set_merged(b.model, True)
    if any(isinstance(m, AdapterLinear) for m in b.model.modules()):
        assert all(m.merged for m in b.model.modules() if isinstance(m, AdapterLinear))
    torch.testing.assert_close(outputs(b.model, batch), expected, atol=1e-5, rtol=0)
    set_merged(b.model, False)
    for n, p in b.model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0, msg=lambda m: f"{name} {n}: {m}")

    # peftkit merge mode=into_base: a plain transformers folder with the adapter's outputs
    from transformers import AutoModelForSequenceClassification

    from peftkit.merge import into_base

    into_base.run(OmegaConf.create({"mode": "into_base", "adapter": str(tmp_path / "adapter"), "out": str(tmp_path / "merged")}))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, AdapterLinear) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, batch), expected, atol=1e-5, rtol=0)


def test_every_method_has_a_docs_entry():
    """docs/methods.md: one section per registered method, and one summary-table row."""
    text = (ROOT / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert f"(`{name}`)\n" in text, name
        assert f"[`{name}`]" in text, name


def test_docs_table_names_each_yamls_learning_rate():
    """The summary table's lr column is the rate `trainer.lr` defaults to: the method's YAML `lr`."""
    rows = [line.split("|") for line in (ROOT / "docs" / "methods.md").read_text().splitlines()
            if line.startswith("| ") and "[`" in line]
    lr_in_docs = {row[2].split("`")[1]: float(row[-2]) for row in rows}
    for name in METHODS:
        yaml_lr = OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml").lr
        assert lr_in_docs[name] == float(yaml_lr), (name, lr_in_docs[name], yaml_lr)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_runs_on_a_bf16_base_under_bf16_autocast(name, backbone, tmp_path):
    """trainer.precision=bf16 stores the frozen base in bf16 (`store_frozen_base`): every method still
    runs forward and backward under CPU autocast, its own tensors stay fp32 and get finite gradients,
    and its logits are the fp32 base's under autocast up to bf16 rounding of the residual stream."""
    from peftkit.backbone import store_frozen_base
    from peftkit.methods.base import pack_frozen_linears, packs_linears

    cfg = with_sources(name, shipped_config(name), backbone_cfg(backbone), tmp_path)
    if (name == "bitfit" and "llama" in str(backbone)) or (name == "llama_adapter" and "bert" in str(backbone)):
        return  # refused on this architecture (test_trains_saves_reloads_merges)
    a = build(backbone, cfg)
    batch = inputs(backbone)
    labels = torch.tensor([1, 0, 1])
    a.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = a.model(**batch).logits.float()
    assert store_frozen_base(a.model, torch.bfloat16, a.trainable) > 0 or name == "full"  # full: nothing is frozen
    params = dict(a.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in a.trainable if n in params)
    assert any(p.dtype == torch.bfloat16 for p in params.values()) or name == "full"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a.model(**batch, labels=labels)
    torch.testing.assert_close(out.logits.float(), reference, atol=0.05, rtol=0.05)
    out.loss.backward()
    grads = [p.grad for p in a.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # and on CPU the frozen Linears run on packed weights (`pack_frozen_linears`, as `train.prepare_model`):
    # the same logits and gradients, bit for bit (none is packed where every Linear trains its weight or
    # bias: full fine-tuning, BitFit)
    if not packs_linears() or pack_frozen_linears(a.model) == 0:
        assert name in ("full", "bitfit") or not packs_linears()
        return
    a.model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = a.model(**batch, labels=labels)
    packed.loss.backward()
    assert torch.equal(packed.logits, out.logits)
    assert all(torch.equal(p.grad, g) for p, g in zip((p for p in a.model.parameters() if p.requires_grad), grads))
