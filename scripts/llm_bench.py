"""Causal-LM benchmark: peftkit against Hugging Face peft + transformers' Trainer, on SmolLM2-135M-Instruct.

Three parts, each a subcommand; every row trains in its own fresh subprocess (so peak memory is its own):

  speed     The same examples, once each (one epoch), LoRA r=8 alpha=16 on q,k,v,o, lr 1e-3, AdamW,
            response-only loss, the Alpaca prompt: peftkit with packing (rows of up to 512 tokens,
            no attention across examples) against peft + Trainer with length-grouped padded batches
            of 8 (`train_sampling_strategy="group_by_length"`, `DataCollatorForSeq2Seq`). Both see
            the identical token ids (peftkit renders the examples for both). Measured: real
            (non-padding) tokens per second of the whole training loop, first step included, on
            both sides (peftkit: real tokens / (the report's `train_time_s` - `eval_time_s`);
            its own `tokens_per_s`, which leaves out its first log window, is kept as
            `tokens_per_s_own`; Trainer: real tokens / its `train_runtime`), peak RSS (CPU) or
            peak allocated CUDA memory, and their ratios. `--precision bf16`: both under bf16
            autocast (peftkit's frozen base stored in bf16).
  classify  Instruction-following classification: GLUE SST-2 or RTE as instructions with one-word
            answers (templates below) in the chat template, exact-match accuracy on dev by greedy
            generation. Rows: `base` (zero-shot), peftkit methods (`lora`, `dora`, `ia3`,
            `prefix_tuning`, `llama_adapter`, ...), and `peft_lora` (peft + Trainer, the same
            LoRA recipe as peftkit's `lora`, scored by the same generation code).
  math      GSM8K train solutions (human-written, the LLM-Adapters Alpaca prompt), scored on the first
            `--test-n` problems of AddSub, MultiArith, SingleEq and GSM8K: answer accuracy (the
            LLM-Adapters rule), answer-format rate ("The answer is N"), and the mean response-token
            loss on held-out GSM8K train solutions (human-written; LLM-Adapters' GSM8K test
            rationales were written by a model, so they are no reference).

Templates (chat turns, the tokenizer's chat template):
  SST-2  user: "Is the sentiment of this sentence positive or negative? Answer with one word.\\n\\nSentence: {s}"
         assistant: "positive" | "negative"
  RTE    user: "Does the first sentence entail the second? Answer yes or no.\\n\\nFirst: {a}\\nSecond: {b}"
         assistant: "yes" | "no"

Usage:
    .venv/bin/python scripts/llm_bench.py speed --train 48 [--precision bf16] [--json bench/llm_speed.json]
    .venv/bin/python scripts/llm_bench.py classify --task sst2 --rows base,lora,peft_lora --train 480 --dev 200
    .venv/bin/python scripts/llm_bench.py math --rows base,lora,peft_lora --train 240 --test-n 50
  --model DIR uses a local model folder instead of the smollm2 backbone; --random-init builds that
  folder's architecture with random weights (GPU speed runs, where the weights cannot be brought).
  --glue-dir / --math-dir default to ../shared/glue and ../shared/llm/math beside the checkout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TEMPLATES = {
    "sst2": ("Is the sentiment of this sentence positive or negative? Answer with one word.\n\nSentence: {sentence}",
             {"0": "negative", "1": "positive"}),
    "rte": ("Does the first sentence entail the second? Answer yes or no.\n\nFirst: {sentence1}\nSecond: {sentence2}",
            {"entailment": "yes", "not_entailment": "no"}),
}
MATH_SETS = ["AddSub", "MultiArith", "SingleEq", "gsm8k"]


def child_env() -> dict:
    """A row's subprocess: offline, this checkout first on the import path (and whatever was there)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


# ------------------------------------------------------------------------------------------ data

def glue_rows(glue_dir: Path, task: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` rows of a GLUE split (train: a seeded sample) as chat rows with one-word answers."""
    import random

    folder = {"sst2": "SST-2", "rte": "RTE"}[task]
    with open(glue_dir / folder / f"{split}.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if split == "train":
        random.Random(seed).shuffle(rows)
    prompt, answers = TEMPLATES[task]
    return [{"messages": [{"role": "user", "content": prompt.format(**r)},
                          {"role": "assistant", "content": answers[r["label"]]}]} for r in rows[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def model_folder(args) -> str:
    """The SmolLM2 folder peftkit converts from the GGUF file (or --model), random weights with --random-init."""
    if args.model:
        folder = args.model
    else:
        from omegaconf import OmegaConf

        from peftkit import backbone

        folder = backbone.resolve_path(OmegaConf.load(ROOT / "configs" / "backbone" / "smollm2.yaml"), convert=True)
    if not args.random_init:
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="llm_bench_random_"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------------------ rows

def peftkit_row(method: str, model: str, train: Path, dev: Path | None, run_dir: Path, args, *, template: str,
                metrics: list[str], max_new: int, steps: int | None, batch: int, eval_before: bool = False,
                math_dir: Path | None = None) -> dict:
    """`peftkit train` in a subprocess; its report, plus the base model's step-0 scores when asked."""
    cmd = [sys.executable, "-m", "peftkit.cli", "train", f"method={method}", f"backbone.path={model}",
           "backbone.name=smollm2", f"backbone.max_length={args.max_length}", f"seed={args.seed}",
           f"trainer.batch_size={batch}", f"trainer.eval_batch_size={args.eval_batch}", "trainer.epochs=1",
           "trainer.log_every=5", "trainer.keep_best=false", "trainer.checkpoint=false", f"trainer.precision={args.precision}",
           f"trainer.eval_before={str(eval_before).lower()}", f"hydra.run.dir={run_dir}"]
    if math_dir is not None:
        cmd += ["dataset=math", f"dataset.data_dir={math_dir}", f"dataset.max_train_samples={args.train}",
                f"dataset.dev_size={args.dev}"]
    else:
        cmd += ["dataset=instruct", f"dataset.train_file={train}", f"dataset.dev_file={dev}"]
    cmd += [f"dataset.template={template}", f"dataset.metrics=[{','.join(metrics)}]", f"dataset.max_new_tokens={max_new}",
            "dataset.generate_samples=null", f"dataset.packing={str(args.packing).lower()}"]
    if steps:
        cmd.append(f"trainer.max_steps={steps}")
    if method in ("lora", "dora"):
        cmd += [f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}", f"method.target_modules=[{','.join(LORA['targets'])}]"]
    if args.lr:
        cmd.append(f"trainer.lr={args.lr}")
    given = {o.split("=", 1)[0] for o in args.override}  # an --override replaces the bench's value (a key twice is refused)
    cmd = [c for c in cmd if c.split("=", 1)[0] not in given] + list(args.override)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True,
                          env=child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}", "wall_s": wall}
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    row = {"metrics": report["metrics"], "score": report["score"], "tokens_per_s": report.get("tokens_per_s"),
           "peak_rss_mb": report.get("peak_rss_mb"), "peak_gpu_mb": report.get("peak_gpu_mb"),
           "train_time_s": report.get("train_time_s"), "eval_time_s": report.get("eval_time_s"),
           "trainable_params": report.get("trainable_params"), "total_steps": report.get("total_steps"), "wall_s": wall,
           "samples": report.get("samples"), "run": str(run_dir)}
    if eval_before:
        first = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[0])
        row["base"] = {"metrics": first["eval"], "score": first["score"]}
    return row


def peer_row(model: str, train: Path, dev: Path | None, out: Path, args, *, template: str, metrics: list[str],
             max_new: int, steps: int | None, batch: int, math_dir: Path | None = None, base_only: bool = False) -> dict:
    """peft + Trainer in a subprocess (this script's `_peer` entry); `base_only`: score the untrained base."""
    spec = {"model": model, "train": str(train) if train else None, "dev": str(dev) if dev else None, "template": template,
            "metrics": metrics, "max_new": max_new, "steps": steps, "batch": batch, "lr": args.lr or 1e-3,
            "max_length": args.max_length, "seed": args.seed, "eval_batch": args.eval_batch, "out": str(out),
            "math_dir": str(math_dir) if math_dir else None, "train_n": args.train, "dev_n": args.dev,
            "test_n": getattr(args, "test_n", None), "skip_eval": bool(getattr(args, "skip_eval", False)),
            "base_only": base_only, "precision": args.precision}
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "_peer", str(out / "spec.json")], capture_output=True, text=True,
                          env=child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1], "wall_s": wall,
                "stderr_tail": proc.stderr[-2000:]}
    row = json.loads((out / "result.json").read_text())
    row["wall_s"] = wall
    return row


def _peer(spec_path: str) -> None:
    """peft LoRA + transformers Trainer on the examples peftkit would train on, token for token."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftkit.tasks import causal_lm

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    cuda = torch.cuda.is_available()
    bf16 = spec["precision"] == "bf16" or (spec["precision"] == "auto" and cuda)  # as trainer.precision
    tok = AutoTokenizer.from_pretrained(spec["model"])
    net = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    if spec.get("base_only"):  # the base model, untrained: its test-set scores
        net = net.to("cuda" if cuda else "cpu").eval()
        result = {"test": score_sets(net, tok, test_convs(spec), spec)}
        Path(spec["out"], "result.json").write_text(json.dumps(result, indent=2))
        return
    net = get_peft_model(net, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                         target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    data = load_lm_data(spec)
    rows = []
    for conv in data.splits["train"]:
        ids, labels = causal_lm.render(conv, tok, spec["template"])
        ids, labels = ids[: spec["max_length"]], labels[: spec["max_length"]]
        if any(x != causal_lm.IGNORE for x in labels):
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    real_tokens = sum(len(r["input_ids"]) for r in rows)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    targs = TrainingArguments(output_dir=str(Path(spec["out"]) / "trainer"), per_device_train_batch_size=spec["batch"],
                              learning_rate=spec["lr"], num_train_epochs=1, max_steps=spec["steps"] or -1,
                              lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                              logging_steps=5, save_strategy="no", report_to=[], seed=spec["seed"], bf16=bf16,
                              train_sampling_strategy="group_by_length", dataloader_num_workers=0, disable_tqdm=True,
                              use_cpu=not cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=net, args=targs, train_dataset=Rows(),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=causal_lm.IGNORE))
    metrics = trainer.train().metrics
    steps = trainer.state.global_step
    seen = real_tokens if not spec["steps"] else real_tokens * min(1.0, steps * spec["batch"] / len(rows))
    result = {"tokens_per_s": seen / metrics["train_runtime"], "train_time_s": metrics["train_runtime"],
              "total_steps": steps, "examples": len(rows), "real_tokens": real_tokens,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad)}
    if not spec["skip_eval"]:
        net.eval()
        dev = score_sets(net, tok, {"validation": data.splits["validation"]}, spec)
        result["metrics"] = dev
        result["score"] = dev["validation"].get(spec["metrics"][0]) if spec["metrics"] else None
        if spec["math_dir"]:
            result["test"] = score_sets(net, tok, test_convs(spec), spec)
    Path(spec["out"], "result.json").write_text(json.dumps(result, indent=2))


def test_convs(spec: dict) -> dict:
    """The math test sets' first `test_n` problems."""
    from omegaconf import OmegaConf

    from peftkit.data import instruct

    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "math.yaml")
    cfg.data_dir, cfg.max_eval_samples = spec["math_dir"], spec["test_n"]
    return instruct.load(cfg, ("test",)).splits


def load_lm_data(spec: dict):
    from omegaconf import OmegaConf

    from peftkit.data import instruct

    if spec["math_dir"]:
        cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "math.yaml")
        cfg.data_dir, cfg.max_train_samples, cfg.dev_size = spec["math_dir"], spec["train_n"], spec["dev_n"]
        return instruct.load(cfg, ("train", "validation"))
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "instruct.yaml")
    cfg.train_file, cfg.dev_file, cfg.template = spec["train"], spec["dev"], spec["template"]
    return instruct.load(cfg, ("train", "validation"))


def score_sets(net, tok, sets: dict, spec: dict) -> dict:
    """Per set: response-token loss and greedy replies scored, with peftkit's own scoring code."""
    import torch

    from peftkit.evaluation import generation
    from peftkit.tasks import causal_lm

    device = next(net.parameters()).device
    out = {}
    for name, convs in sets.items():
        loss_sum, n = 0.0, 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for conv in convs:
                ids, labels = causal_lm.render(conv, tok, spec["template"])
                ids, labels = ids[: spec["max_length"]], labels[: spec["max_length"]]
                logits = net(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
                target = torch.tensor(labels[1:], device=device)
                loss_sum += torch.nn.functional.cross_entropy(logits, target, ignore_index=causal_lm.IGNORE, reduction="sum").item()
                n += int((target != causal_lm.IGNORE).sum())
        loss = loss_sum / max(1, n)
        out[name] = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        if spec["metrics"]:
            prompts = [causal_lm.prompt_ids(c, tok, spec["template"])[-spec["max_length"]:] for c in convs]
            replies = generation.generate(net, tok, prompts, spec["max_new"], spec["eval_batch"], device)
            out[name].update(generation.score_replies(tuple(spec["metrics"]), replies, [c.gold for c in convs]))
    return out


# ------------------------------------------------------------------------------------------ parts

def speed(args) -> dict:
    math_dir = Path(args.math_dir)
    model = model_folder(args)
    work = Path(tempfile.mkdtemp(prefix="llm_bench_speed_"))
    args.dev, args.skip_eval = 8, True
    # peftkit's packed rows hold ~2.5 GSM8K solutions per 512 tokens: 3 rows a step is about the peer's 8 examples
    ours = peftkit_row("lora", model, None, None, work / "peftkit", args, template="alpaca", metrics=[], max_new=1,
                       steps=None, batch=args.rows_per_step, math_dir=math_dir)
    theirs = peer_row(model, None, None, work / "peer", args, template="alpaca", metrics=[], max_new=1, steps=None,
                      batch=8, math_dir=math_dir)
    mem = "peak_gpu_mb" if ours.get("peak_gpu_mb") else "peak_rss_mb"
    # one measure for both: the same real tokens over the whole training loop, first step included
    # (the Trainer's train_runtime; peftkit's train_time_s less its evaluation). peftkit's own
    # tokens_per_s leaves out its first log window, which in a 7-step run is most of it.
    if "error" not in ours:
        ours["tokens_per_s_own"] = ours.pop("tokens_per_s")
        ours["tokens_per_s"] = (theirs["real_tokens"] / (ours["train_time_s"] - (ours.get("eval_time_s") or 0.0))
                                if "real_tokens" in theirs else None)  # the peer's count of the same tokens
    return {"peftkit": ours, "peft_trainer": theirs,
            "tokens_per_s_ratio": ratio(ours.get("tokens_per_s"), theirs.get("tokens_per_s")),
            "memory": mem, "memory_ratio": ratio(ours.get(mem), theirs.get(mem))}


def classify(args) -> dict:
    glue = Path(args.glue_dir)
    work = Path(tempfile.mkdtemp(prefix=f"llm_bench_{args.task}_"))
    train = write_jsonl(work / "train.jsonl", glue_rows(glue, args.task, "train", args.train, args.seed))
    dev = write_jsonl(work / "dev.jsonl", glue_rows(glue, args.task, "dev", args.dev))
    model = model_folder(args)
    kw = dict(template="chat", metrics=["exact_match"], max_new=3, steps=None)
    return run_rows(args, model, lambda m, d, before: peftkit_row(m, model, train, dev, d, args, eval_before=before,
                                                                  batch=args.batch, **kw),
                    lambda d: peer_row(model, train, dev, d, args, batch=args.peer_batch, **kw), work)


def math_part(args) -> dict:
    math_dir = Path(args.math_dir)
    work = Path(tempfile.mkdtemp(prefix="llm_bench_math_"))
    model = model_folder(args)
    kw = dict(template="alpaca", metrics=["numeric", "answer_format"], max_new=args.max_new, steps=None)
    rows = run_rows(args, model, lambda m, d, before: peftkit_row(m, model, None, None, d, args, eval_before=before,
                                                                  math_dir=math_dir, batch=args.batch, **kw),
                    lambda d: peer_row(model, None, None, d, args, math_dir=math_dir, batch=args.peer_batch, **kw), work)
    for name, row in rows["rows"].items():  # the test sets: `peftkit eval split=test` on each peftkit run
        if "run" in row and name != "base":
            row["test"] = test_sets(row["run"], math_dir, args)
    if "base" in rows["rows"]:  # the untrained base on the same test problems, scored by the same code
        rows["rows"]["base"]["test"] = peer_row(model, None, None, work / "base_tests", args, math_dir=math_dir,
                                                base_only=True, batch=args.peer_batch, **kw).get("test")
    return rows


def test_sets(run: str, math_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "peftkit.cli", "eval", f"run={run}", f"dataset.data_dir={math_dir}",
           f"dataset.max_eval_samples={args.test_n}", f"dataset.max_new_tokens={args.max_new}", "split=test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads((Path(run) / "eval" / "test_report.json").read_text())["metrics"]


def run_rows(args, model, ours, theirs, work: Path) -> dict:
    """Every row in --rows; `base` comes from the first peftkit row's step-0 evaluation (or its own 1-step run)."""
    wanted = args.rows.split(",")
    rows, base_from = {}, None
    for name in wanted:
        if name == "base":
            continue
        t0 = time.perf_counter()
        if name == "peft_lora":
            rows[name] = theirs(work / name)
        else:
            rows[name] = ours(name, work / name, base_from is None and "base" in wanted)
            if "base" in rows[name]:
                base_from = name
                rows["base"] = {**rows[name].pop("base"), "from": f"step 0 of the {name} run", "run": rows[name].get("run")}
        print(f"{name}: {summary(rows[name])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "base" in wanted and "base" not in rows:
        rows["base"] = ours("lora", work / "base", True).get("base", {})
    return {"rows": rows}


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summary(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    m = row.get("metrics", {}).get("validation", {})
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items()) + (f", {row['tokens_per_s']:.0f} tok/s" if row.get("tokens_per_s") else "")


def _f(v, spec=".1f") -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:{spec}}"


def markdown(result: dict) -> str:
    """The part's table, as docs/results.md shows it."""
    if result["part"] == "speed":
        mem = result["memory"]
        lines = ["| side | real tokens/s | peak memory (MB) | train time (s) |", "|---|---|---|---|"]
        for name in ("peftkit", "peft_trainer"):
            r = result[name]
            lines.append(f"| {name} | {_f(r.get('tokens_per_s'))} | {_f(r.get(mem), '.0f')} | {_f(r.get('train_time_s'), '.0f')} |")
        lines.append(f"| ratio | {_f(result['tokens_per_s_ratio'], '.2f')}× | {_f(result['memory_ratio'], '.2f')}× | |")
        return "\n".join(lines)
    rows = result["rows"]
    if result["part"] == "classify":
        lines = ["| row | exact match (dev) | dev loss | trainable params | tokens/s | train time (s) |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            m = (r.get("metrics") or {}).get("validation", {})
            lines.append(f"| {name} | {_f(m.get('exact_match'))} | {_f(m.get('loss'), '.3f')} | {_f(r.get('trainable_params'), ',')} | "
                         f"{_f(r.get('tokens_per_s'), '.0f')} | {_f(r.get('train_time_s'), '.0f')} |" if "error" not in r
                         else f"| {name} | error: {r['error']} | | | | |")
        return "\n".join(lines)
    sets = [f"test_{s}" for s in MATH_SETS]
    lines = ["| row | " + " | ".join(f"{s} acc / format" for s in MATH_SETS) + " | held-out loss | tokens/s |",
             "|---|" + "---|" * (len(MATH_SETS) + 2)]
    for name, r in rows.items():
        test = r.get("test") or {}
        cells = [f"{_f(test.get(s, {}).get('numeric'))} / {_f(test.get(s, {}).get('answer_format'))}" for s in sets]
        loss = (r.get("metrics") or {}).get("validation", {}).get("loss")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_f(loss, '.3f')} | {_f(r.get('tokens_per_s'), '.0f')} |")
    return "\n".join(lines)


def machine() -> dict:
    import peft
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_peer":
        return _peer(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["speed", "classify", "math"])
    p.add_argument("--task", choices=["sst2", "rte"], default="sst2")
    p.add_argument("--rows", default="base,lora,dora,ia3,prefix_tuning,llama_adapter,peft_lora")
    p.add_argument("--train", type=int, default=480, help="training examples (classify, math, speed)")
    p.add_argument("--dev", type=int, default=200, help="dev examples (classify), held-out solutions (math)")
    p.add_argument("--test-n", type=int, default=50, help="math: the first N problems of each test set")
    p.add_argument("--batch", type=int, default=3, help="peftkit's rows a step (with packing, several examples each)")
    p.add_argument("--peer-batch", type=int, default=8, help="peft + Trainer's examples a step (padded)")
    p.add_argument("--rows-per-step", type=int, default=3, help="speed: peftkit's packed rows a step")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="both sides: peftkit trainer.precision, the peer's bf16 autocast (auto: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--max-new", type=int, default=128, help="math: new tokens per reply")
    p.add_argument("--lr", type=float, default=None, help="every row's rate (default: each method's own; the peer 1e-3, peftkit LoRA's)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", default=None)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--glue-dir", default=str(SHARED / "glue"))
    p.add_argument("--math-dir", default=str(SHARED / "llm" / "math"))
    p.add_argument("--override", action="append", default=[], help="extra peftkit KEY=VALUE for every peftkit row")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    result = {"speed": speed, "classify": classify, "math": math_part}[args.part](args)
    result.update(part=args.part, args=vars(args), wall_s=time.perf_counter() - t0, machine=machine())
    text = json.dumps(result, indent=2, default=str)
    print(text if args.part == "speed" else json.dumps({k: summary(v) for k, v in result["rows"].items()}, indent=2))
    print(markdown(result))
    print(f"wall {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
