"""Causal-LM runs through the whole CLI, as for classification: a sweep on tiny Llama, Qwen2 and
Mistral decoders, `peftkit report` over it, `merge` into the base (a plain AutoModelForCausalLM with
the same logits), to and from peft's format (AutoPeftModelForCausalLM, the same logits), every
combine mode, checkpoint averaging and compression, each result scored again by `peftkit eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_causal_lm, run_cli

ROWS = [{"instruction": f"Is review {i} fresh or rotten? {'great fun' if i % 2 else 'dull mess'}",
         "input": "", "output": "fresh" if i % 2 else "rotten"} for i in range(40)]
PROMPTS = ["<|im_start|>user\nIs review 3 fresh or rotten? great fun<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_lm):
    """lora (seeds 1, 2) and ia3 (seed 1) on the tiny Llama, snapshots kept for mwa."""
    tmp = tmp_path_factory.mktemp("lm_runs")
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ok(run_cli("train", "-m", "method=lora,ia3", "seed=1,2", "dataset=instruct", f"dataset.train_file={tmp / 'train.jsonl'}",
               "dataset.dev_size=8", "dataset.metrics=[exact_match]", "dataset.max_new_tokens=3", f"backbone.path={tiny_lm}",
               "backbone.max_length=64", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4",
               "trainer.keep_checkpoints=2", f"hydra.sweep.dir={tmp / 'sweep'}", cwd=tmp))
    runs = {}
    for d in (tmp / "sweep").iterdir():
        if (d / "eval" / "report.json").is_file():
            r = json.loads((d / "eval" / "report.json").read_text())
            runs[f"{r['method']}{r['seed']}"] = d
    assert sorted(runs) == ["ia31", "ia32", "lora1", "lora2"]
    return tmp, runs


def adapted_logits(run) -> torch.Tensor:
    from peftkit import model

    a, _ = model.from_adapter(run / "adapter")
    return logits_of(a.model.eval(), a.tokenizer)


@torch.no_grad()
def logits_of(net, tokenizer) -> torch.Tensor:
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt", add_special_tokens=False)
    return net(**batch).logits


def test_report_shows_lm_scores_and_losses(sweep):
    tmp, runs = sweep
    ok(run_cli("report", str(tmp / "sweep"), cwd=tmp))
    board = json.loads((tmp / "sweep" / "leaderboard" / "leaderboard.json").read_text())
    cells = {r["label"]: next(iter(r["scores"].values())) for r in board["rows"]}
    assert sorted(cells) == ["ia3", "lora"] and all(c["n"] == 2 for c in cells.values())
    for label, c in cells.items():  # the dev loss is the mean of the runs' own
        want = [json.loads((runs[f"{label}{s}"] / "eval" / "report.json").read_text())["metrics"]["validation"]["loss"]
                for s in (1, 2)]
        assert c["loss"] == pytest.approx(sum(want) / 2)
    assert "(loss " in (tmp / "sweep" / "leaderboard" / "leaderboard.md").read_text()


def test_eval_scores_the_math_test_sets_beside_the_dev_report(sweep):
    """`peftkit eval run=RUN dataset=math dataset.data_dir=DIR split=test`: one table row per test set, samples,
    eval/test_report.{json,md}; the dev report stays as it was."""
    tmp, runs = sweep
    data = tmp / "math"
    for name, n in [("AddSub", 5), ("SingleEq", 3)]:
        (data / name).mkdir(parents=True)
        rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"The answer is {2 * i}.", "answer": str(2 * i)}
                for i in range(n)]
        (data / name / "test.json").write_text(json.dumps(rows))
    (data / "gsm8k_train.json").write_text("[]")
    run = runs["lora1"]
    dev_report = (run / "eval" / "report.json").read_bytes()
    ok(run_cli("eval", f"run={run}", "dataset=math", f"dataset.data_dir={data}", "dataset.eval_sets=[AddSub,SingleEq]",
               "dataset.max_new_tokens=8", "split=test", cwd=tmp))
    r = json.loads((run / "eval" / "test_report.json").read_text())
    assert r["examples"] == {"test_AddSub": 5, "test_SingleEq": 3}
    for m in r["metrics"].values():
        assert set(m) == {"loss", "perplexity", "numeric", "answer_format"}
    assert r["score"] == pytest.approx((r["metrics"]["test_AddSub"]["numeric"] + r["metrics"]["test_SingleEq"]["numeric"]) / 2)
    md = (run / "eval" / "test_report.md").read_text()
    assert "| AddSub | 5 |" in md and "## Sample generations" in md
    assert (run / "eval" / "report.json").read_bytes() == dev_report


def test_math_trains_from_a_data_dir_given_relative_to_the_working_directory(tmp_path, tiny_lm):
    """`dataset=math dataset.data_dir=DIR`: the train file is found inside DIR, from any working directory."""
    data = tmp_path / "data" / "math"
    data.mkdir(parents=True)
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} + {i} = {2 * i}. The answer is {2 * i}.",
             "answer": str(2 * i)} for i in range(30)]
    (data / "gsm8k_train.json").write_text(json.dumps(rows))
    run = tmp_path / "run"
    ok(run_cli("train", "dataset=math", "dataset.data_dir=data/math", "dataset.dev_size=6", "dataset.max_new_tokens=6",
               f"backbone.path={tiny_lm}", "backbone.max_length=64", "trainer.max_steps=2", "trainer.batch_size=4",
               f"hydra.run.dir={run}", cwd=tmp_path))
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["metrics"]["validation"]) == {"loss", "perplexity", "numeric", "answer_format"}
    assert report["score"] == report["metrics"]["validation"]["numeric"]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "loreft"])
def test_methods_that_move_positions_train_and_evaluate_through_the_cli(method, tmp_path, tiny_lm):
    """Prompt tuning's logits include its virtual tokens: training and the dev loss must still line up."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "run"
    ok(run_cli("train", f"method={method}", "dataset=instruct", f"dataset.train_file={tmp_path / 'train.jsonl'}",
               "dataset.dev_size=6", "dataset.metrics=[exact_match]", "dataset.max_new_tokens=3", f"backbone.path={tiny_lm}",
               "backbone.max_length=64", "trainer.max_steps=2", "trainer.batch_size=4", f"hydra.run.dir={run}", cwd=tmp_path))
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["status"] == "ok" and math.isfinite(report["metrics"]["validation"]["loss"])
    ok(run_cli("eval", f"run={run}", cwd=tmp_path))
    again = json.loads((run / "eval" / "report.json").read_text())["metrics"]  # equal up to float32 rounding
    assert again.keys() == report["metrics"].keys()
    assert all(again[s] == pytest.approx(report["metrics"][s], rel=1e-5) for s in again)


def test_into_base_is_a_plain_causal_lm_with_the_same_logits(sweep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, runs = sweep
    ok(run_cli("merge", f"adapter={runs['lora1']}", f"out={tmp / 'merged'}", cwd=tmp))
    out = tmp / "merged"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer_config.json").is_file()
    net = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(net, AutoTokenizer.from_pretrained(out)), adapted_logits(runs["lora1"]),
                               atol=1e-5, rtol=1e-5)
    assert "pipeline_tag: text-generation" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["lora1", "ia31"])
def test_to_peft_loads_in_auto_peft_model_for_causal_lm_and_comes_back(sweep, name):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tmp, runs = sweep
    exported, back = tmp / f"peft_{name}", tmp / f"back_{name}"
    ok(run_cli("merge", "mode=to_peft", f"adapter={runs[name]}", f"out={exported}", cwd=tmp))
    assert json.loads((exported / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    theirs = AutoPeftModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(runs[name] / "adapter") if (runs[name] / "adapter" / "tokenizer_config.json").is_file() \
        else AutoTokenizer.from_pretrained(theirs.peft_config["default"].base_model_name_or_path)
    ours = adapted_logits(runs[name])
    torch.testing.assert_close(logits_of(theirs, tokenizer), ours, atol=1e-5, rtol=1e-5)

    ok(run_cli("merge", "mode=from_peft", f"adapter={exported}", f"out={back}", cwd=tmp))
    assert json.loads((back / "adapter" / "adapter_config.json").read_text())["task_type"] == "causal_lm"
    torch.testing.assert_close(adapted_logits(back), ours, atol=1e-6, rtol=1e-6)


# task arithmetic, TIES and DARE write a plain model folder; svd and concat a LoRA, compress and mwa an adapter
TO_MODEL = {"task_arithmetic": [], "ties": ["density=0.5"], "dare": []}
TO_RUN = {"svd": ["adapters=[{a},{b}]", "rank=4"], "concat": ["adapters=[{a},{b}]"], "compress": ["adapter={a}"],
          "mwa": ["run={a}"]}


@pytest.mark.parametrize("mode", sorted(TO_MODEL))
def test_task_vector_modes_write_a_plain_causal_lm(sweep, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, runs = sweep
    out = tmp / f"combined_{mode}"
    ok(run_cli("merge", f"mode={mode}", f"adapters=[{runs['lora1']},{runs['ia32']}]", *TO_MODEL[mode], f"out={out}", cwd=tmp))
    net = AutoModelForCausalLM.from_pretrained(out).eval()
    got = logits_of(net, AutoTokenizer.from_pretrained(out))
    assert torch.isfinite(got).all() and (out / "generation_config.json").is_file()
    assert not torch.allclose(got, adapted_logits(runs["lora1"]))  # the IA³ vector counts too


@pytest.mark.parametrize("mode", sorted(TO_RUN))
def test_adapter_modes_on_lm_adapters_give_a_run_eval_scores(sweep, mode):
    tmp, runs = sweep
    out = tmp / f"combined_{mode}"
    args = [x.format(a=runs["lora1"], b=runs["lora2"]) for x in TO_RUN[mode]]
    ok(run_cli("merge", f"mode={mode}", *args, f"out={out}", cwd=tmp))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "causal_lm"
    ok(run_cli("eval", f"run={out}", cwd=tmp))
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["metrics"]["validation"]) == {"loss", "perplexity", "exact_match"}
    (weights,) = (out / "adapter").glob("*.safetensors")  # adapter.safetensors, or adapter.compeft.safetensors
    assert all(torch.isfinite(t.float()).all() for t in load_file(str(weights)).values())


def test_task_arithmetic_of_one_lm_adapter_at_weight_one_is_that_adapter(sweep):
    """A check with a closed form: base + 1·τ of a single LoRA is the adapted model itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, runs = sweep
    out = tmp / "ta_single"
    ok(run_cli("merge", "mode=task_arithmetic", f"adapters=[{runs['lora2']}]", f"out={out}", cwd=tmp))
    net = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(net, AutoTokenizer.from_pretrained(out)), adapted_logits(runs["lora2"]),
                               atol=1e-5, rtol=1e-5)


def test_concat_of_two_loras_is_their_sum(sweep):
    """concat stacks [A₁; A₂], [B₁, B₂] (weights 1): the model computes base + τ₁ + τ₂, as task arithmetic does."""
    tmp, runs = sweep
    pair = f"adapters=[{runs['lora1']},{runs['lora2']}]"
    ok(run_cli("merge", "mode=task_arithmetic", pair, f"out={tmp / 'sum_model'}", cwd=tmp))
    ok(run_cli("merge", "mode=concat", pair, f"out={tmp / 'sum_lora'}", cwd=tmp))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(tmp / "sum_model").eval()
    torch.testing.assert_close(logits_of(net, AutoTokenizer.from_pretrained(tmp / "sum_model")),
                               adapted_logits(tmp / "sum_lora"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_train_generate_and_merge(arch, tmp_path):
    """(transformers 5 loads the fixture's WordPiece files with the architecture's own tokenizer class,
    which splits them into characters: hence the longer max_length. Real checkpoints ship their own.)"""
    base = make_tiny_causal_lm(tmp_path / arch, seed=3, arch=arch)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "run"
    ok(run_cli("train", "dataset=instruct", f"dataset.train_file={tmp_path / 'train.jsonl'}", "dataset.dev_size=8",
               "dataset.max_new_tokens=3", f"backbone.path={base}", "backbone.max_length=256", "trainer.max_steps=3",
               "trainer.batch_size=4", f"hydra.run.dir={run}", cwd=tmp_path))
    proc = ok(run_cli("generate", f"run={run}", "prompt=Is it fresh?", "max_new_tokens=4", cwd=tmp_path))
    assert proc.stdout.strip()
    ok(run_cli("merge", f"adapter={run}", f"out={tmp_path / 'merged'}", cwd=tmp_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert net.config.model_type == arch
    torch.testing.assert_close(logits_of(net, AutoTokenizer.from_pretrained(tmp_path / "merged")), adapted_logits(run),
                               atol=1e-5, rtol=1e-5)
