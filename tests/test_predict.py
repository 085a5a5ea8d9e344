"""Mixed-adapter batches (`peftkit.serve`) and `peftkit predict`: every row of a batch on its own LoRA
adapter in one forward pass gives what that adapter gives alone (logits to 1e-5 in fp32, greedy
replies token for token), through one stacked module per layer; the command end to end; refusals in
one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import make_tiny_bert, run_cli
from methods._helpers import backbone_cfg, perturb

SENTENCES = ["a gripping, funny and warm film", "dull", "the plot never quite comes together, sadly", "fine",
             "an utter mess from start to end", "I laughed, I cried", "so so", "not for me"]
# (method config, labels): different ranks, target sets and label counts; a PiSSA start; a regression head
CLASSIFIERS = [({"name": "lora", "r": 2}, ["rotten", "fresh"]),
               ({"name": "rslora", "r": 4, "target_modules": ["query", "value", "ffn_in"]}, ["neg", "neutral", "pos"]),
               ({"name": "lora", "r": 3, "init": "pissa", "target_modules": ["key"]}, ["no", "yes"]),
               ({"name": "lora", "r": 1, "target_modules": ["attn_out"]}, None)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in-process CLI runs use: on a few busy cores torch's pool mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapter(out: Path, bb: Path, method: dict, labels, task: str | None = None, seed: int = 0) -> Path:
    """An adapter folder as training would leave it: every trained tensor (factors, head) noised."""
    from peftkit import adapter, model

    torch.manual_seed(seed)
    cfg = backbone_cfg(bb)
    a = model.build(cfg, dict(method), labels, task)
    perturb(a.model, [n for n, p in a.model.named_parameters() if p.requires_grad], std=0.5, seed=seed)
    adapter.save(out, a.model, a.trainable, model.meta(a, cfg, labels, "t", task))
    return out


def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory, tiny_bert) -> list[Path]:
    tmp = tmp_path_factory.mktemp("bert_adapters")
    return [make_adapter(tmp / f"a{k}", tiny_bert, m, labels, seed=k) for k, (m, labels) in enumerate(CLASSIFIERS)]


@torch.no_grad()
def alone(path: Path, batch) -> torch.Tensor:
    """The adapter as `peftkit eval` loads it, on the whole batch."""
    from peftkit import model

    a, _ = model.from_adapter(path)
    return a.model.eval()(**batch).logits


@pytest.mark.parametrize("arch", ["bert", "llama"])
@torch.no_grad()
def test_mixed_batch_logits_equal_each_adapter_alone(arch, bert_adapters, tiny_llama, tmp_path):
    from peftkit import serve

    paths = bert_adapters if arch == "bert" else [make_adapter(tmp_path / f"l{k}", tiny_llama, m, labels, seed=k)
                                                  for k, (m, labels) in enumerate(CLASSIFIERS[:3])]
    mixed = serve.load(paths)
    batch = mixed.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    index = [k % len(paths) for k in range(len(SENTENCES))][::-1]
    with mixed.use(index):
        logits = mixed.model(**batch).logits
    assert logits.shape == (len(SENTENCES), 3)  # padded to the largest label count
    wants = [alone(p, batch) for p in paths]
    for k, want in enumerate(wants):
        rows = [i for i, j in enumerate(index) if j == k]
        assert rows
        torch.testing.assert_close(logits[rows, : mixed.outputs(k)], want[rows], rtol=0, atol=1e-5)
        other = wants[(k + 1) % len(paths)]
        assert (want[rows, 0] - other[rows, 0]).abs().max() > 1e-3  # the adapters differ: a mix-up would show


def count_bmm(mixed, index, batch) -> int:
    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.bmm
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), mixed.use(index), Count():
        mixed.model(**batch)
    return Count.n


def test_one_stacked_module_per_layer_and_no_loop_over_adapters(bert_adapters):
    """Each adapted Linear is one MultiLoraLinear with A: (N+1, r_max, in), B: (N+1, out, r_max), zero where an
    adapter leaves the layer alone and in the base's slot; the head one StackedLinear. The forward does the same
    batched matmuls for 2 adapters as for 4: it never loops over them."""
    from peftkit import adapter, serve
    from peftkit.methods.lora import LoraLinear

    mixed = serve.load(bert_adapters)
    layers = {n: m for n, m in mixed.model.named_modules() if isinstance(m, serve.MultiLoraLinear)}
    assert not any(isinstance(m, LoraLinear) for m in mixed.model.modules())
    n = len(bert_adapters)
    targets = [set(adapter.read_config(p)["method"]["target_modules"]) for p in bert_adapters]
    assert set(layers) == set().union(*targets)
    ranks = [2, 4, 6, 1]  # PiSSA's change from the original W: rank 2r
    for name, m in layers.items():
        a, b = m.lora_A, m.lora_B
        r = max(rk for rk, t in zip(ranks, targets) if name in t)
        assert a.shape == (n + 1, r, m.base_layer.in_features) and b.shape == (n + 1, m.base_layer.out_features, r)
        for k, t in enumerate(targets):
            if name not in t:
                assert not a[k].any() and not b[k].any()
            else:
                assert not a[k, ranks[k]:].any() and not b[k, :, ranks[k]:].any()  # rank padding
        assert not a[n].any() and not b[n].any()
    head = mixed.model.get_submodule("classifier")
    assert isinstance(head, serve.StackedLinear) and head.weight.shape == (n, 3, 32)
    batch = mixed.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    two = serve.load(bert_adapters[:2])
    calls_two = count_bmm(two, [0, 1] * 4, batch)
    calls_all = count_bmm(mixed, [0, 1, 2, 3] * 2, batch)
    assert calls_two == 2 * sum(1 for m in two.model.modules() if isinstance(m, serve.MultiLoraLinear)) + 1
    assert calls_all == 2 * len(layers) + 1


@torch.no_grad()
def test_greedy_generation_per_row_equals_each_adapter_alone(tiny_lm, tmp_path):
    """Rows of two adapters and the base in one generate() with the KV cache: each row's tokens and step scores
    are those of its adapter alone on the same padded batch."""
    from peftkit import model, serve

    specs = [{"name": "lora", "r": 2}, {"name": "rslora", "r": 4, "target_modules": ["query", "value", "ffn_in"]}]
    paths = [make_adapter(tmp_path / f"lm{k}", tiny_lm, m, None, "causal_lm", seed=k) for k, m in enumerate(specs)]
    mixed = serve.load(paths)
    tok = mixed.tokenizer
    tok.padding_side = "left"
    batch = tok(["hello there", "a b c d e f", "what is this", "xyz", "one more prompt"], padding=True, return_tensors="pt",
                return_token_type_ids=False)
    index = [0, 1, serve.BASE, 1, 0]
    kw = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "return_dict_in_generate": True, "output_scores": True,
          "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    with mixed.use(index):
        got = mixed.model.generate(**batch, **kw)
    base = model.build(backbone_cfg(tiny_lm), {"name": "lora"}, None, "causal_lm").model.eval()  # B = 0: the base
    refs = [model.from_adapter(p)[0].model.eval() for p in paths] + [base]
    for k, ref in zip([0, 1, serve.BASE], refs):
        want = ref.generate(**batch, **kw)
        rows = [i for i, j in enumerate(index) if j == k]
        assert torch.equal(got.sequences[rows], want.sequences[rows])
        for s_got, s_want in zip(got.scores, want.scores):
            torch.testing.assert_close(s_got[rows], s_want[rows], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_bert) -> tuple[Path, list[Path]]:
    """Two tiny classification runs of `peftkit train` (lora r=2 and r=4) in one sweep."""
    from _train_helpers import check, tiny

    tmp = tmp_path_factory.mktemp("predict_runs")
    check(run_cli("train", "-m", *tiny(tiny_bert, "method=lora", "method.r=2,4", "trainer.max_steps=2", "trainer.eval_every=2",
                                       f"hydra.sweep.dir={tmp / 'sweep'}"), cwd=tmp))
    return tmp, [tmp / "sweep" / "0", tmp / "sweep" / "1"]


def test_predict_cli_writes_each_rows_label_and_probabilities(two_runs, tmp_path):
    from peftkit import model

    _, runs = two_runs
    rows = [{"text": s, "adapter": ["0", 1, str(runs[1])][i % 3], "id": f"x{i}"} for i, s in enumerate(SENTENCES)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    args = ("predict", f"runs=[{runs[0]},{runs[1]}]", "file=in.jsonl", "out=preds.jsonl", "id_field=id", "batch_size=3")
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["row"] for g in got] == list(range(1, len(rows) + 1)) and [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["adapter"] for g in got] == ["0", "1", "1"] * 2 + ["0", "1"]
    for k, run in enumerate(runs):  # each run alone, as peftkit eval loads it
        a, cfg = model.from_adapter(run / "adapter")
        idx = [i for i, g in enumerate(got) if g["adapter"] == str(k)]
        batch = a.tokenizer([SENTENCES[i] for i in idx], padding=True, return_tensors="pt")
        with torch.no_grad():
            p = a.model.eval()(**batch).logits.softmax(-1)
        for row, i in enumerate(idx):
            probs = got[i]["probabilities"]
            assert list(probs) == cfg["label_names"]
            assert list(probs.values()) == pytest.approx(p[row].tolist(), abs=1e-5)
            assert got[i]["label"] == cfg["label_names"][int(p[row].argmax())]
    again = run_cli(*args, cwd=tmp_path)
    one_line_error(again, "already exists", "overwrite=true")
    assert run_cli(*args, "overwrite=true", cwd=tmp_path).returncode == 0


def test_predict_cli_causal_lm_replies_as_generate_does(tiny_lm, tmp_path):
    """Two causal-LM runs and the base in one file: each reply is `peftkit generate`'s for that run."""
    from peftkit import generate

    data = [{"instruction": f"Is review {i} fresh? {'great' if i % 2 else 'dull'}", "input": "",
             "output": "fresh" if i % 2 else "rotten"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    proc = run_cli("train", "-m", "method=lora,rslora", "dataset=instruct", f"dataset.train_file={tmp_path / 'train.jsonl'}",
                   "dataset.dev_size=4", "dataset.metrics=[exact_match]", "dataset.max_new_tokens=2", f"backbone.path={tiny_lm}",
                   "backbone.max_length=48", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.batch_size=4",
                   "trainer.lr=0.05", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    prompts = ["Is this fresh? great fun", "hello", "Is review 3 fresh? dull", "tell me more"]
    adapters = ["0", "1", "base", "1"]
    (tmp_path / "in.csv").write_text("prompt,adapter\n" + "".join(f"{p},{a}\n" for p, a in zip(prompts, adapters)))
    proc = run_cli("predict", f"runs=[{runs[0]},{runs[1]}]", "file=in.csv", "out=out.jsonl", "max_new_tokens=5", "batch_size=4",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["adapter"] for g in got] == adapters and [g["prompt"] for g in got] == prompts
    for k, run in enumerate(runs):
        rows = [i for i, a in enumerate(adapters) if a == str(k)]
        assert [got[i]["reply"] for i in rows] == generate.run(run, [prompts[i] for i in rows], 5, {})


def test_refusals_are_one_line(bert_adapters, tiny_bert, tiny_lm, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": s, "adapter": "a0"}) + "\n" for s in SENTENCES[:2]))
    a0, a1 = bert_adapters[0], bert_adapters[1]

    def predict(*runs, file="in.jsonl", extra=()):
        return run_cli("predict", f"runs=[{','.join(str(r) for r in runs)}]", f"file={file}", "out=o.jsonl", *extra, cwd=tmp_path)

    ia3 = make_adapter(tmp_path / "ia3", tiny_bert, {"name": "ia3"}, ["a", "b"])
    one_line_error(predict(a0, ia3), "ia3 adapter", "lora and rslora")
    other_base = make_adapter(tmp_path / "other", make_tiny_bert(tmp_path / "bb1", seed=1), {"name": "lora"}, ["a", "b"])
    one_line_error(predict(a0, other_base), "another base")
    lm = make_adapter(tmp_path / "lm", tiny_lm, {"name": "lora"}, None, "causal_lm")
    one_line_error(predict(a0, lm), "different task types")
    emb = make_adapter(tmp_path / "emb", tiny_bert, {"name": "lora", "target_modules": ["word_embeddings", "query"]}, ["a", "b"])
    one_line_error(predict(a0, emb), "LoraEmbedding", "Linear layers")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "adapter": "nope"}) + "\n")
    one_line_error(predict(a0, a1, file="bad.jsonl"), "row 1", "'nope'", "a0, a1")
    (tmp_path / "base.jsonl").write_text(json.dumps({"text": "x", "adapter": "base"}) + "\n")
    one_line_error(predict(a0, a1, file="base.jsonl"), "'base' is none of the runs")  # a classifier has no base head
    one_line_error(predict(a0, a1, extra=("adapter_field=run",)), "no column 'run'")
    one_line_error(predict(a0, a1, extra=("max_new_tokens=4",)), "causal-LM")
    one_line_error(predict(a0, a0), "twice")
    one_line_error(run_cli("predict", f"runs=[{a0}]", "file=in.jsonl", "out=in.jsonl", cwd=tmp_path), "input file")
    for inside in ("adapter.safetensors", "adapter_config.json", "new.jsonl"):  # in an adapter it reads, even with overwrite=true
        before = {f.name: f.read_bytes() for f in a0.iterdir()}
        one_line_error(run_cli("predict", f"runs=[{a0}]", "file=in.jsonl", f"out={a0 / inside}", "overwrite=true", cwd=tmp_path),
                       f"out={a0 / inside}", "which predict reads")
        assert {f.name: f.read_bytes() for f in a0.iterdir()} == before
    one_line_error(run_cli("predict", f"runs=[{a0}]", "file=in.jsonl", cwd=tmp_path), "out=")
    one_line_error(run_cli("predict", f"runs=[{a0}]", "file=in.jsonl", "out=o.jsonl", "batch=3", cwd=tmp_path), "unknown option batch")
    assert not (tmp_path / "o.jsonl").exists()
