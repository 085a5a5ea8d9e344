"""Inference throughput of mixed-adapter batches (`peftkit.serve`) against one adapter per batch.

The job: all-MiniLM-L6-v2 (the `minilm` backbone, BERT, 6 layers) for sequence classification with
4 LoRA adapters, r=8, alpha=16, on `query`, `value` and the pooler (peftkit's LoRA defaults), each
with its own 2-label head. The adapters' factors and heads are random (seeded, B not zero): speed
does not depend on what they learned. Batches of `--batch` rows (default 32) of made-up sentences
of 8 to 60 words, padded to the batch's longest, fp32, forward only (`torch.inference_mode`).

Configurations:
  single        one adapter for all rows: the model `peftkit eval` loads (`model.from_adapter`,
                LoraLinear layers).
  mixed         the 4 adapters at once (`serve.load`), rows cycling through them (0,1,2,3,0,...),
                one forward per batch; its logits are checked against `single`'s for the rows of
                adapter 0 and against each adapter alone for the rest before timing.
  mixed_same    the mixed model with every row on adapter 0 (same work as `mixed`: the cost does
                not depend on how rows are spread).
  base          the plain base model with no adapter (a floor for the cost of the base weights).
  peft_single   peft 0.21 `PeftModelForSequenceClassification` with the same 4 LoRA configs, one
                adapter active for all rows.
  peft_mixed    the same with `adapter_names=` per row (peft's mixed batches: it splits the batch by
                adapter and runs each adapter's LoRA on its sub-batch, heads too via
                `modules_to_save`).

Each configuration runs `--iters` batches (after 2 warm-up batches) per repeat, `--repeat` times (in
turn, so each sees the same machine load), and reports the median rows/s. `--json PATH` writes
every number, the per-repeat values, ratio mixed/single, and the machine.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_mixed.py [--batch 32] [--iters 20] [--repeat 5]
        [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ADAPTERS = 4
LABELS = ["neg", "pos"]
WORDS = ["the", "film", "was", "a", "warm", "funny", "gripping", "mess", "of", "a", "plot", "that", "never", "quite",
         "comes", "together", "and", "yet", "I", "laughed", "cried", "and", "left", "the", "theatre", "thinking",
         "about", "it", "for", "days", "dull", "bright", "sharp", "slow"]  # repeats kept: the measured runs drew from this list


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 61, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out


def make_adapters(out: Path) -> tuple[list[Path], object]:
    """4 peftkit LoRA adapter folders with random factors and heads (seeded)."""
    from omegaconf import OmegaConf

    from peftkit import adapter, model

    bb = OmegaConf.load(ROOT / "configs" / "backbone" / "minilm.yaml")
    paths = []
    for k in range(N_ADAPTERS):
        torch.manual_seed(100 + k)
        a = model.build(bb, {"name": "lora", "r": 8, "alpha": 16}, LABELS)
        with torch.no_grad():
            for n, p in a.model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        adapter.save(out / f"adapter{k}", a.model, a.trainable, model.meta(a, bb, LABELS, "bench"))
        paths.append(out / f"adapter{k}")
    return paths, bb


def peft_model(paths: list[Path], bb):
    """peft's PeftModelForSequenceClassification holding the same 4 adapters (factors and heads copied)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from peftkit import adapter, backbone

    cfg0 = adapter.read_config(paths[0])
    base = backbone.load_model(bb, len(LABELS), "single_label_classification", LABELS).eval()
    targets = cfg0["method"]["target_modules"]

    def config():
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"])

    net = get_peft_model(base, config(), adapter_name="a0")
    for k in range(1, N_ADAPTERS):
        net.add_adapter(f"a{k}", config())
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, p in enumerate(paths):
            tensors = load_file(str(p / adapter.WEIGHTS))
            for name, t in tensors.items():
                if name.endswith((".lora_A", ".lora_B")):
                    params[f"base_model.model.{name}.a{k}.weight"].copy_(t)
                else:  # classifier.weight / .bias
                    module, _, leaf = name.rpartition(".")
                    params[f"base_model.model.{module}.modules_to_save.a{k}.{leaf}"].copy_(t)
    return net.eval()


def timed(fn, iters: int) -> float:
    """rows/s of `fn` (one batch per call) over `iters` calls after 2 warm-up calls."""
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return iters / (time.perf_counter() - start)


@torch.inference_mode()
def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.repeat < 3:
        ap.error("--repeat: at least 3 (the median of them is reported)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from peftkit import model, serve

    transformers.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    paths, bb = make_adapters(tmp)
    single, _ = model.from_adapter(paths[0])
    single.model.eval()
    mixed = serve.load(paths)
    base = model.build(bb, {"name": "lora"}, LABELS).model.eval()  # B = 0; timed as the plain base below
    from peftkit.methods.base import merge_into_base

    base = merge_into_base(base)
    tok = mixed.tokenizer
    batch = dict(tok(sentences(args.batch), padding=True, truncation=True, max_length=128, return_tensors="pt"))
    rows = [k % N_ADAPTERS for k in range(args.batch)]
    names = [f"a{k}" for k in rows]

    # the mixed model's rows equal each adapter alone (fp32), before anything is timed
    with mixed.use(rows):
        got = mixed.model(**batch).logits
    worst = 0.0
    for k, p in enumerate(paths):
        alone = single if k == 0 else model.from_adapter(p)[0]
        want = alone.model.eval()(**batch).logits
        sel = [i for i, j in enumerate(rows) if j == k]
        worst = max(worst, (got[sel] - want[sel]).abs().max().item())
    assert worst <= 1e-5, f"mixed logits differ from each adapter alone by {worst}"

    configs = {
        "single": lambda: single.model(**batch),
        "mixed": lambda: _with(mixed, rows, batch),
        "mixed_same": lambda: _with(mixed, [0] * args.batch, batch),
        "base": lambda: base(**batch),
    }
    peft_note = None
    try:
        pm = peft_model(paths, bb)
        got_peft = pm(**batch, adapter_names=names).logits
        peft_worst = (got_peft - got).abs().max().item()
        assert peft_worst <= 1e-4, f"peft's mixed logits differ from peftkit's by {peft_worst}"
        pm.set_adapter("a0")
        configs["peft_single"] = lambda: pm(**batch)
        configs["peft_mixed"] = lambda: pm(**batch, adapter_names=names)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        peft_note = f"peft side not run: {type(e).__name__}: {e}"
        print(peft_note, file=sys.stderr)

    runs: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeat):
        for k, fn in configs.items():
            runs[k].append(timed(fn, args.iters) * args.batch)
    med = {k: statistics.median(v) for k, v in runs.items()}
    import peft

    result = {
        "rows_per_s": med, "runs": runs, "ratio_mixed_vs_single": med["mixed"] / med["single"],
        "ratio_peft_mixed_vs_peft_single": (med["peft_mixed"] / med["peft_single"]) if "peft_mixed" in med else None,
        "max_abs_diff_vs_alone": worst, "peft_note": peft_note,
        "setup": {"backbone": "minilm", "adapters": N_ADAPTERS, "r": 8, "targets": "query, value, pooler", "batch": args.batch,
                  "tokens_per_batch": int(batch["attention_mask"].sum()), "padded_width": batch["input_ids"].shape[1],
                  "iters": args.iters, "repeat": args.repeat, "precision": "fp32", "factors": "random (seeded)"},
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}},
    }
    print(f"\nMiniLM, {N_ADAPTERS} LoRA adapters r=8, batch {args.batch} ({result['setup']['padded_width']} tokens wide), "
          f"fp32, {torch.get_num_threads()} threads; median of {args.repeat} x {args.iters} batches\n")
    print("| configuration | rows/s | vs single |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / med['single']:.2f} |")
    print(f"\nmixed / single = {result['ratio_mixed_vs_single']:.2f} (target ≥ 0.8); "
          f"mixed rows vs each adapter alone: max |Δlogit| = {worst:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def _with(mixed, rows, batch):
    with mixed.use(rows):
        return mixed.model(**batch)


if __name__ == "__main__":
    main()
