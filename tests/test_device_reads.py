"""A training step on a GPU reads nothing from the device (peftkit.device_reads): checked on CPU with
the GPU's behaviour switched on (`reads_are_free` false), by counting the ops that would read, and the
step computing what transformers' own path computes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from peftkit import device_reads, model, train
from peftkit.device_reads import HostReads
from peftkit.tasks import causal_lm, classification


@pytest.fixture
def gpu_behaviour(monkeypatch):
    monkeypatch.setattr(device_reads, "reads_are_free", lambda device: False)


def step(net, kind, batch, encoded=None, device: str = "cpu") -> tuple[HostReads, torch.Tensor, list[torch.Tensor]]:
    """One training step as the trainer takes it (loss, backward, clipping, its fused AdamW) under
    `HostReads`: (the reads, the loss, the gradients). The optimizer steps a copy of the adapter's
    parameters, so the model is unchanged for the next call."""
    net.zero_grad(set_to_none=True)
    trained = [p for p in net.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_() for p in trained]
    optimizer = train.make_optimizer(torch.nn.ParameterList(copies), OmegaConf.create(
        {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}))
    with HostReads(device) as reads:
        loss = kind.loss(net, batch, encoded)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for p, c in zip(trained, copies):
            c.grad = p.grad
        optimizer.step()
    return reads, loss.detach(), [p.grad.clone() for p in trained]


def classifier(path, arch: str):
    cfg = OmegaConf.create({"backbone": {"name": arch, "path": str(path), "max_length": 32, "trust_remote_code": False,
                                         "head": ["classifier", "score"]},
                            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": None}})
    torch.manual_seed(0)
    a = model.build(cfg.backbone, cfg.method, ["no", "yes"], classification.NAME)
    for p in a.model.parameters():  # B ≠ 0: the adapter takes part in the gradients
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return a.model.train()


def padded_batch(lengths: list[int], vocab: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i % 2 for i in range(len(lengths))])}


@pytest.mark.parametrize("arch", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("lengths", [[9, 5, 3], [6, 6, 6]], ids=["padded", "unpadded"])
def test_a_classification_step_reads_nothing_and_computes_the_same(arch, lengths, request, monkeypatch):
    net = classifier(request.getfixturevalue(arch), arch)
    for m in net.modules():  # the same numbers twice
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = padded_batch(lengths)
    before, loss, grads = step(net, classification, batch)
    assert before.count >= 1  # transformers asks whether the mask holds padding (the test can fail)

    monkeypatch.setattr(device_reads, "reads_are_free", lambda device: False)
    device_reads.attend_without_reads(net, torch.device("cpu"))
    assert net.config._attn_implementation == device_reads.SDPA
    after, loss_after, grads_after = step(net, classification, batch)
    assert after.count == 0, after.where
    torch.testing.assert_close(loss_after, loss, rtol=1e-6, atol=1e-7)
    for g, g_after in zip(grads, grads_after):
        torch.testing.assert_close(g_after, g, rtol=1e-5, atol=1e-7)


EXAMPLES = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([10, 11, 12], [-100, 11, 12]), ([13, 14, 15, 16], [-100, -100, -100, 16])]


def lm_and_rows(path, packed: bool, max_length: int):
    """The tiny decoder as peftkit loads it (its packed attention) and `EXAMPLES` encoded as training rows."""
    cfg = OmegaConf.create({"name": "tiny", "path": str(path), "max_length": 64, "trust_remote_code": False})
    torch.manual_seed(0)
    net = causal_lm.load_model(cfg).train()
    enc = causal_lm.EncodedLM(EXAMPLES, pad_id=0, packed=packed, max_length=max_length)
    enc.sequence_kept = True
    return net, enc


def test_a_causal_lm_step_reads_nothing_and_selects_the_same_tokens(tiny_lm, gpu_behaviour):
    net, enc = lm_and_rows(tiny_lm, packed=False, max_length=64)
    batch = enc.batch([0, 1, 2])
    assert batch["learned"].tolist() == [1, 2, 3, 4, 5, 10]  # in labels[:, 1:], rows of 4: (0, 1..3), (1, 0..1), (2, 2)
    reads, loss, _ = step(net, causal_lm, batch, enc)
    assert reads.count == 0, reads.where

    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # the model's own loss, by mask
    target = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1][target != -100], target[target != -100])
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)


def test_host_reads_counts_what_would_wait_for_a_gpu():
    x = torch.arange(6.0)
    with HostReads("cpu") as reads:
        x.sum().item()
        x[x > 2]
        (x > 2).nonzero()
        x * 2  # no read
    assert reads.count == 3 and any("test_device_reads.py" in w for w in reads.where)
    with HostReads("meta") as reads:  # another device's reads only
        x.sum().item()
    assert reads.count == 0


def test_packed_rows_read_nothing_and_attend_within_their_examples(tiny_lm, monkeypatch):
    """Packed rows get their block-diagonal mask from peftkit, built on the device: given none,
    transformers reads the positions back to see whether they restart. The same loss and gradients
    as on CPU, where each example is attended alone (`packed_sdpa`)."""
    net, enc = lm_and_rows(tiny_lm, packed=True, max_length=8)
    batch = enc.batch(list(range(len(enc))))
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]  # the second row's padding: a sequence of its own
    _, loss, grads = step(net, causal_lm, batch, enc)  # CPU: each example attended alone

    monkeypatch.setattr(device_reads, "reads_are_free", lambda device: False)
    assert causal_lm.model_inputs(net, batch)["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
    reads, loss_gpu, grads_gpu = step(net, causal_lm, batch, enc)
    assert reads.count == 0, reads.where
    torch.testing.assert_close(loss_gpu, loss, rtol=1e-5, atol=1e-6)
    for g, g_gpu in zip(grads, grads_gpu):
        torch.testing.assert_close(g_gpu, g, rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(causal_lm, "_full_attention_only", lambda config: False)  # no mask given: transformers' own path
    reads, loss_hf, _ = step(net, causal_lm, batch, enc)
    assert reads.count == 1 and all("masking_utils" in w for w in reads.where), reads.where
    torch.testing.assert_close(loss_hf, loss, rtol=1e-5, atol=1e-6)


def test_one_mask_only_where_every_layer_attends_fully():
    from types import SimpleNamespace as C

    packed = causal_lm.PACKED_ATTENTION
    assert causal_lm._full_attention_only(C(_attn_implementation=packed))
    assert causal_lm._full_attention_only(C(_attn_implementation=packed, layer_types=["full_attention"] * 2, sliding_window=4096))
    assert not causal_lm._full_attention_only(C(_attn_implementation=packed, layer_types=["sliding_attention", "full_attention"]))
    assert not causal_lm._full_attention_only(C(_attn_implementation=packed, sliding_window=4096))
    assert not causal_lm._full_attention_only(C(_attn_implementation=packed, attention_chunk_size=8192))
    assert not causal_lm._full_attention_only(C(_attn_implementation="eager"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the real reads, not the CPU's stand-in")
def test_on_a_gpu_a_step_reads_nothing(tiny_bert, tiny_lm):
    """On a real GPU, with nothing switched: a classifier's padded step and a packed causal-LM step."""
    cuda = torch.device("cuda")
    net = classifier(tiny_bert, "tiny_bert").to(cuda)
    device_reads.attend_without_reads(net, cuda)  # as train.prepare_model does
    batch = {k: v.to(cuda) for k, v in padded_batch([9, 5, 3]).items()}
    reads, _, _ = step(net, classification, batch, device="cuda")
    assert reads.count == 0, reads.where

    lm, enc = lm_and_rows(tiny_lm, packed=True, max_length=8)
    lm.to(cuda)
    batch = {k: v.to(cuda) for k, v in enc.batch(list(range(len(enc)))).items()}
    reads, _, _ = step(lm, causal_lm, batch, enc, device="cuda")
    assert reads.count == 0, reads.where
