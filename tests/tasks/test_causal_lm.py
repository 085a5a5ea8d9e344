"""The causal-LM task: response-only labels, packing without attention across examples, the
reply metrics, batched greedy decoding, and a whole run from the command line on a tiny decoder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from peftkit.data.instruct import Conversation
from peftkit.evaluation import generation
from peftkit.tasks import causal_lm
from peftkit.tasks.causal_lm import IGNORE, EncodedLM, pack, render


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from peftkit.tasks.causal_lm import load_model

    return load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_lm), "max_length": 64, "trust_remote_code": False})).eval()


def chat(*turns: str, system: str | None = None) -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    msgs = [{"role": r, "content": t} for r, t in zip(roles, turns)]
    return Conversation(([{"role": "system", "content": system}] if system else []) + msgs)


def learned(ids, labels, tokenizer) -> list[str]:
    """The learned spans, decoded: runs of labelled tokens."""
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                spans.append(tokenizer.decode(cur))
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return spans + ([tokenizer.decode(cur)] if cur else [])


def test_chat_template_labels_only_the_assistant_turns(tokenizer):
    ids, labels = render(chat("is it good?", "fresh", "and this one?", "rotten", system="be brief"), tokenizer, "chat")
    assert len(ids) == len(labels)
    spans = learned(ids, labels, tokenizer)
    assert [s.split("<")[0].strip() for s in spans] == ["fresh", "rotten"]  # the reply, then its end marker
    assert all("im _ end" in s for s in spans) and not any("good" in s or "brief" in s for s in spans)
    full = tokenizer.apply_chat_template(chat("is it good?", "fresh", "and this one?", "rotten", system="be brief").messages,
                                         tokenize=True)["input_ids"]
    assert ids == list(full)  # the ids are the template's own rendering


def test_alpaca_template_labels_the_response_and_its_end(tokenizer):
    ids, labels = render(chat("add 2 and 3", "The answer is 5."), tokenizer, "alpaca")
    text = tokenizer.decode(ids)
    assert "# # # instruction : add 2 and 3 # # # response :" in text  # the Alpaca prompt, as this tokenizer spells it
    assert learned(ids, labels, tokenizer) == [tokenizer.decode(tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"]
                                                                + [tokenizer.eos_token_id])]
    prompt = causal_lm.prompt_ids(chat("add 2 and 3", "The answer is 5."), tokenizer, "alpaca")
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE  # generation starts where the learned part does


def test_pack_fills_rows_and_keeps_every_example_once():
    lengths = [5, 9, 3, 7, 2, 8, 1, 10]
    rows = pack(lengths, max_length=12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 12)  # first-fit decreasing is tight here


def test_packed_loss_equals_unpacked_loss_and_no_attention_crosses_examples(tokenizer, lm):
    convs = [chat("good?", "fresh"), chat("the plot was a mess and the acting wooden", "rotten"), chat("fine", "fresh fresh")]
    examples = [render(c, tokenizer, "chat") for c in convs]
    packed = EncodedLM(examples, tokenizer.pad_token_id, packed=True, max_length=200)
    padded = EncodedLM(examples, tokenizer.pad_token_id, packed=False, max_length=200)
    assert len(packed) == 1 and len(padded) == 3
    with torch.no_grad():
        loss_packed = lm(**packed.batch([0])).loss
        loss_padded = lm(**padded.batch([0, 1, 2])).loss
    assert loss_packed.item() == pytest.approx(loss_padded.item(), abs=1e-5)

    # changing the first example changes no logit of the others in the packed row
    batch = packed.batch([0])
    first = packed.rows[0][0]
    n_first = len(examples[first][0])
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][0, 1 : n_first - 1] = 1000
    with torch.no_grad():
        a, b = lm(**batch).logits, lm(**other).logits
    assert torch.equal(a[0, n_first:], b[0, n_first:])
    assert not torch.equal(a[0, 1:n_first], b[0, 1:n_first])


@pytest.mark.parametrize("arch, window", [("llama", None), ("qwen2", None), ("mistral", 4)])
def test_packed_attention_is_transformers_sdpa_with_the_block_mask(tmp_path, tokenizer, arch, window):
    """One example at a time (causal_lm.packed_sdpa) against transformers' own SDPA over the whole row
    with the block-diagonal mask: the same logits and gradients, rows padded at the end, 2 query heads
    per key head. A sliding window shorter than an example falls back to plain SDPA."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_causal_lm

    extra = {"sliding_window": window, "use_sliding_window": True} if window else {}
    path = make_tiny_causal_lm(tmp_path, seed=1, arch=arch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, **extra)
    ours = causal_lm.load_model(OmegaConf.create({"name": "t", "path": str(path), "max_length": 64, "trust_remote_code": False}))
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", use_cache=False)  # (a cache: no block mask)
    assert ours.config._attn_implementation == causal_lm.PACKED_ATTENTION and theirs.config._attn_implementation == "sdpa"
    convs = [chat("good?", "fresh"), chat("the plot was a mess and the acting wooden", "rotten"), chat("fine", "fresh fresh"),
             chat("a long and winding film about nothing much at all", "rotten rotten"), chat("yes", "fresh")]
    enc = EncodedLM([render(c, tokenizer, "chat") for c in convs], tokenizer.pad_token_id, packed=True, max_length=100)
    assert len(enc) == 2 and len(set(enc.lengths)) > 1 and all(len(r) > 1 for r in enc.rows)  # the shorter row is padded
    batch = enc.batch(list(range(len(enc))))
    calls = []
    real = causal_lm.packed_sdpa
    with pytest.MonkeyPatch.context() as m:  # count the per-example path's SDPA calls
        m.setattr(torch.nn.functional, "scaled_dot_product_attention",
                  lambda *a, _f=torch.nn.functional.scaled_dot_product_attention, **k: calls.append(k.get("is_causal")) or _f(*a, **k))
        out_ours = ours(**batch)
    out_theirs = theirs(**batch)
    for r, n in enumerate(enc.lengths):  # the padding's logits are nobody's (transformers' differ there)
        torch.testing.assert_close(out_ours.logits[r, :n], out_theirs.logits[r, :n], atol=1e-5, rtol=1e-4)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    examples_per_layer = sum(len(r) + (w < max(enc.lengths)) for r, w in zip(enc.rows, enc.lengths))  # + the padding tails
    if window:  # its sliding-window layers took plain SDPA (and the logits above are still transformers')
        assert False in calls, calls
    else:
        assert calls == [True] * examples_per_layer * 2, calls
    assert real is causal_lm.packed_sdpa


@pytest.mark.parametrize("heads, groups, scaling", [(4, 4, None), (6, 2, None), (6, 3, 0.3)])
def test_short_example_attention_is_causal_sdpa(heads, groups, scaling):
    """`short_causal_attention` (query heads stacked per key head, an additive mask) is causal SDPA with
    grouped-query attention: the same outputs and gradients in float64, to its rounding."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, groups, 7, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ours = causal_lm.short_causal_attention(q, k, v, scaling)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    up = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((out * up).sum(), (q, k, v)) for out in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bf16_packed_rows_take_the_short_example_path_up_to_its_length(tokenizer, tiny_lm, monkeypatch):
    """In bf16 a packed row's examples of up to `SHORT_EXAMPLE` tokens go through `short_causal_attention`,
    longer ones through SDPA; either way the logits are the flash kernel's to bf16 rounding."""
    net = causal_lm.load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_lm), "max_length": 64,
                                                 "trust_remote_code": False})).eval().to(torch.bfloat16)
    convs = [chat("good?", "fresh"), chat("the plot was a mess and the acting wooden", "rotten"), chat("fine", "fresh fresh")]
    enc = EncodedLM([render(c, tokenizer, "chat") for c in convs], tokenizer.pad_token_id, packed=True, max_length=200)
    batch = enc.batch(list(range(len(enc))))
    lengths = [len(ids) for ids, _ in enc.examples]
    calls = []
    real = causal_lm.short_causal_attention
    monkeypatch.setattr(causal_lm, "short_causal_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    logits = {}
    for short in (max(lengths), min(lengths), 0):
        monkeypatch.setattr(causal_lm, "SHORT_EXAMPLE", short)
        calls.clear()
        with torch.no_grad():
            logits[short] = net(**batch).logits.float()
        layers = net.config.num_hidden_layers
        assert sorted(calls) == sorted([n for n in lengths if n <= short] * layers)
    for short in (max(lengths), min(lengths)):
        # logits up to 0.6, bf16 steps of 0.004: the two differ by a step here; without the causal mask by 0.31
        torch.testing.assert_close(logits[short], logits[0], atol=3e-2, rtol=0)


@pytest.mark.parametrize("packed", [True, False])
def test_training_loss_with_the_head_at_response_positions_only_is_the_models_own(tokenizer, tiny_lm, packed, monkeypatch):
    """`causal_lm.loss` applies the LM head only where a response token is predicted, first through the
    model's head (`response_logits`), from then on fused with the loss (`head_cross_entropy`): the same
    value and the same gradients as the model's own loss over every position, both times."""
    from peftkit.tasks import causal_lm

    convs = [chat("good?", "fresh"), chat("the plot was a mess and the acting wooden", "rotten"), chat("fine", "fresh fresh")]
    enc = EncodedLM([render(c, tokenizer, "chat") for c in convs], tokenizer.pad_token_id, packed=packed, max_length=200)
    enc.sequence_kept = True
    batch = enc.batch(list(range(len(enc))))
    fused = []
    real = causal_lm.head_cross_entropy
    monkeypatch.setattr(causal_lm, "head_cross_entropy", lambda *a: fused.append(1) or real(*a))

    def net():
        return causal_lm.load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_lm), "max_length": 64,
                                                      "trust_remote_code": False})).eval()

    def loss_and_grads(model, value):
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return value.detach(), grads

    theirs = net()
    own_loss, own_grads = loss_and_grads(theirs, theirs(**batch).loss)  # the reference: transformers' own loss
    ours = net()
    for first in (True, False):
        fast_loss, fast_grads = loss_and_grads(ours, causal_lm.loss(ours, batch, enc))
        assert len(fused) == (0 if first else 1)
        # the head's matmul over fewer rows may sum in another order: float32 rounding, no more
        torch.testing.assert_close(fast_loss, own_loss, atol=1e-5, rtol=1e-5)
        assert fast_grads.keys() == own_grads.keys()
        for n in own_grads:
            torch.testing.assert_close(fast_grads[n], own_grads[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change", ["gemma2_soft_cap", "hook"])
def test_a_head_whose_output_is_changed_is_never_fused(tmp_path, tokenizer, tiny_lm, monkeypatch, change):
    """Gemma 2 soft-caps its logits after the head; someone else's forward hook on the head (here it
    doubles them) changes them too: the loss keeps the model's own logits on every call."""
    from conftest import make_tiny_causal_lm

    path = tiny_lm if change == "hook" else make_tiny_causal_lm(
        tmp_path, seed=2, arch="gemma2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=256)
    net = causal_lm.load_model(OmegaConf.create({"name": "t", "path": str(path), "max_length": 64, "trust_remote_code": False})).eval()
    if change == "hook":
        net.get_output_embeddings().register_forward_hook(lambda _, args, out: out * 2)
    else:
        assert net.config.final_logit_softcapping
    enc = EncodedLM([render(chat("good?", "fresh fresh"), tokenizer, "chat")], tokenizer.pad_token_id, packed=False, max_length=200)
    enc.sequence_kept = True
    batch = enc.batch([0])
    monkeypatch.setattr(causal_lm, "head_cross_entropy", lambda *a: pytest.fail("the head was fused"))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(causal_lm.loss(net, batch, enc), net(**batch).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias, head_grad", [(False, False), (True, True)])
def test_head_cross_entropy_is_cross_entropy_of_the_head(monkeypatch, reduction, bias, head_grad):
    """`head_cross_entropy` in chunks of 3 rows: the value and the gradients (hidden states, and the head's
    weight and bias when they learn) of cross_entropy(linear(...)) in float64, to its rounding."""
    monkeypatch.setattr(causal_lm, "CHUNK_LOGITS", 3 * 11)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=head_grad)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=head_grad) if bias else None
    target = torch.randint(0, 11, (8,), generator=g)
    ours = causal_lm.head_cross_entropy(hidden, weight, b, target, reduction)
    theirs = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, b), target, reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    inputs = [x for x in (hidden, weight, b) if x is not None and x.requires_grad]
    for a, e in zip(torch.autograd.grad(ours * 3, inputs), torch.autograd.grad(theirs * 3, inputs)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(causal_lm.head_cross_entropy(hidden, weight, b, target, reduction), ours.detach())


def test_head_cross_entropy_under_bf16_autocast_is_the_unfused_arithmetic():
    """Under bf16 autocast the fused head and loss round as the unfused ones do: matmuls in bf16, the
    softmax in float32. The loss agrees to float32 summation order, the gradient to a bf16 step."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 16, generator=g).bfloat16()
    target = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm.head_cross_entropy(hidden, weight, None, target)
        theirs = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), target)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    (a,), (e,) = torch.autograd.grad(ours, [hidden]), torch.autograd.grad(theirs, [hidden])
    assert a.dtype == e.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), e.float(), atol=2 ** -8 * e.float().abs().max().item(), rtol=2 ** -8)  # (equal here)


def test_every_logit_path_is_the_models_own_loss_too(tokenizer, tiny_lm):
    """Methods that move positions take every logit (`sequence_kept` false): the same loss again."""
    from peftkit.tasks import causal_lm

    convs = [chat("good?", "fresh"), chat("the plot was a mess", "rotten")]
    enc = EncodedLM([render(c, tokenizer, "chat") for c in convs], tokenizer.pad_token_id, packed=False, max_length=200)
    batch = enc.batch([0, 1])
    net = causal_lm.load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_lm), "max_length": 64,
                                                 "trust_remote_code": False})).eval()
    enc.sequence_kept = False
    with torch.no_grad():
        torch.testing.assert_close(causal_lm.loss(net, batch, enc), net(**batch).loss, atol=1e-5, rtol=1e-5)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tokenizer, lm):
    prompts = [causal_lm.prompt_ids(c, tokenizer, "chat") for c in
               [chat("good?", "x"), chat("a much longer question about the movie and its plot", "x"), chat("ok", "x")]]
    batched = generation.generate(lm, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generation.generate(lm, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # and the KV cache changes nothing: a full recompute, token by token
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        for _ in range(6):
            nxt = lm(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert tokenizer.decode(ids[0, len(prompts[1]):], skip_special_tokens=True).strip() == alone[1]


@pytest.mark.parametrize("metric, reply, gold, want", [
    ("numeric", "5 + 3 = 8, so The answer is 1,008.", "1008", 1.0),
    ("numeric", "The answer is 7.0005", "7", 1.0),
    ("numeric", "The answer is 7.01", "7", 0.0),
    ("numeric", "no number here", "7", 0.0),
    ("numeric", "It is -3.", "-3.0", 1.0),
    ("exact_match", "  Fresh. ", "fresh", 1.0),
    ("exact_match", "The fresh one", "fresh", 0.0),
    ("exact_match", "The answer", "answer", 1.0),
    ("answer_format", "so the answer is 12", "12", 1.0),
    ("answer_format", "12", "12", 0.0),
    ("choice", "I think (B) because", "B", 1.0),
    ("choice", "answer: c", "C", 0.0),
    ("rougeL", "the cat sat", "the cat sat", 1.0),
])
def test_reply_metrics(metric, reply, gold, want):
    assert generation.METRICS[metric](reply, gold) == pytest.approx(want)


def test_rouge_l_is_the_lcs_f1():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat: 4 words; P = 4/6, R = 4/6
    assert generation.METRICS["rougeL"]("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)


def test_truncation_is_counted_and_an_example_without_response_tokens_dropped(tokenizer):
    from peftkit.data.instruct import LMData

    short, long, mid = chat("short", "yes"), chat("word " * 40, "no"), chat("mid " * 4, "ok")
    limit = len(render(mid, tokenizer, "chat")[0])
    cfg = OmegaConf.create({"backbone": {"max_length": limit}, "dataset": {"template": "chat", "packing": True}})
    data = LMData("instruct", "x", {"train": [short, long, mid], "validation": [short]})
    enc = causal_lm.encode(data, tokenizer, cfg)
    assert data.truncated == {"train": 1, "validation": 0}
    assert len(enc["train"].examples) == 2  # the long one lost its whole response
    assert max(enc["train"].lengths) <= limit


# ---- a whole run --------------------------------------------------------------------------------------------

ROWS = [{"instruction": f"Is review {i} fresh or rotten? {'great fun' if i % 2 else 'dull mess'}",
         "input": "", "output": "fresh" if i % 2 else "rotten"} for i in range(48)]


def test_train_eval_reload_on_a_tiny_decoder(tmp_path, tiny_lm):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "run"
    args = ["train", "dataset=instruct", f"dataset.train_file={tmp_path / 'train.jsonl'}", "dataset.dev_size=8",
            "dataset.metrics=[exact_match]", "dataset.max_new_tokens=3", f"backbone.path={tiny_lm}",
            "backbone.max_length=64", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=4",
            "trainer.eval_before=true", f"hydra.run.dir={run}"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    m = report["metrics"]["validation"]
    assert set(m) == {"loss", "perplexity", "exact_match"} and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert report["score"] == m["exact_match"] and len(report["samples"]["validation"]) == 3
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "eval" in log[0]  # the before
    assert [r["step"] for r in log if "eval" in r] == [0, 3, 6]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "causal_lm"
    again = run_cli("eval", f"run={run}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reproduces the training-time scores" in again.stdout
    # the same up to float32 rounding: on an AVX2-only CPU the training process's float32 sums can land
    # one ulp away from a fresh process's (loss 10.359952926635742 against 10.359951972961426, the adapters
    # equal); perplexity = exp(loss) turns that ulp into 1e-6 relative
    again_m = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    assert again_m.keys() == report["metrics"].keys()
    assert all(again_m[s] == pytest.approx(report["metrics"][s], rel=1e-5) for s in again_m)
