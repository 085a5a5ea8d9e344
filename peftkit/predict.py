"""`peftkit predict`: a file of inputs, each row naming the run whose adapter answers it, served by
one base model in mixed batches (`serve`: every row of a batch on its own adapter, one forward).

Classification rows get their run's label and probabilities (regression runs: a score); causal-LM
rows get a greedy reply to their prompt, formatted with their run's template as `peftkit generate`
does. Output: JSON lines in the input's order, written atomically.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from peftkit import adapter, serve
from peftkit.data import label_key
from peftkit.data.batching import collate, eval_batches, to_device
from peftkit.data.local import _missing, read_table
from peftkit.errors import UserError
from peftkit.files import atomic_write_text, check_writable, json_text, resolved

console = Console(stderr=True)
BASE_NAME = "base"
DEFAULT_FIELDS = {"classification": ["text"], "causal_lm": ["prompt"]}


def check_out(out: Path, file: Path, overwrite: bool, reads: tuple[tuple[str, str], ...] = ()) -> None:
    """out= is a new file (or an earlier output, with overwrite=true), never the input nor inside a run or
    model folder it reads (`reads`: (key, folder) pairs), in a writable folder."""
    target = resolved(out, "out")
    if target == resolved(file, "file"):
        raise UserError(f"out={out} is the input file; write the predictions to another file")
    for key, folder in reads:
        if resolved(folder, key) in target.parents:
            raise UserError(f"out={out} is inside {folder} ({key}=), which predict reads; write the predictions outside it")
    if out.is_dir():
        raise UserError(f"out={out} is a folder; give a file name, e.g. out={out / 'predictions.jsonl'}")
    if out.exists() and not overwrite:
        raise UserError(f"out={out} already exists; choose a new file, or pass overwrite=true to replace it")
    check_writable(out.parent, "output folder", "out")


class Names:
    """How a row names its run: the path as given in runs=, the run directory's name (when no other
    run has it), or its position in runs= (0-based); `base` (causal LMs) is the base model alone."""

    def __init__(self, runs: list[str], base_allowed: bool):
        self.runs = runs
        self.short = [resolved(r, "runs").name for r in runs]
        self.base_allowed = base_allowed
        seen = {}
        for r, full in zip(runs, (resolved(r, "runs") for r in runs)):
            if full in seen:
                raise UserError(f"runs= names {full} twice ({seen[full]} and {r}); give each run once")
            seen[full] = r

    def index(self, value, row: int, field: str) -> int:
        key = label_key(value) if not _missing(value) else None
        if key is None:
            raise UserError(f"row {row}: no adapter in column '{field}'; name a run ({self.choices()})")
        if key in self.runs:
            return self.runs.index(key)
        hits = [k for k, s in enumerate(self.short) if s == key]
        if len(hits) > 1:
            raise UserError(f"row {row}: adapter '{key}' is the name of {len(hits)} runs ({', '.join(self.runs[k] for k in hits)}); "
                            f"name them by the path given in runs= or by position (0..{len(self.runs) - 1})")
        if hits:
            return hits[0]
        if key.isdigit() and int(key) < len(self.runs):
            return int(key)
        if key == BASE_NAME and self.base_allowed:
            return serve.BASE
        raise UserError(f"row {row}: adapter '{key}' is none of the runs; name one of: {self.choices()}")

    def choices(self) -> str:
        extra = f", or {BASE_NAME} for the base model alone" if self.base_allowed else ""
        return f"{', '.join(self.short)} (or 0..{len(self.runs) - 1} by position in runs=){extra}"

    def of(self, k: int) -> str:
        return BASE_NAME if k == serve.BASE else self.short[k]


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def run(runs: list[str], file: Path, out: Path, adapter_field: str = "adapter", text_fields: list[str] | None = None,
        id_field: str | None = None, batch_size: int = 32, max_new_tokens: int | None = None, overwrite: bool = False,
        backbone_path: str | None = None) -> list[dict]:
    check_out(out, file, overwrite, (*[("runs", r) for r in runs], *([("backbone_path", backbone_path)] if backbone_path else [])))
    configs = [adapter.read_config(adapter.folder(r), model=True) for r in runs]
    serve.check_configs(runs, configs)  # before anything heavy loads
    task = configs[0].get("task_type") or "classification"
    if task not in DEFAULT_FIELDS:
        raise UserError(f"peftkit predict reads text; these runs are {task} runs (score them with peftkit eval)")
    if max_new_tokens is not None and task != "causal_lm":
        raise UserError("max_new_tokens= is for causal-LM runs; these runs classify")
    names = Names(runs, base_allowed=task == "causal_lm")
    fields = list(text_fields or DEFAULT_FIELDS[task])
    if task == "causal_lm" and len(fields) != 1:
        raise UserError(f"text_fields={fields}: a causal-LM row has one prompt column; give text_fields=[COLUMN]")
    if task == "classification" and len(fields) not in (1, 2):
        raise UserError(f"text_fields={fields}: give one column, or two for sentence pairs")
    templates = [_template(r, c) for r, c in zip(runs, configs)] if task == "causal_lm" else None
    df = read_table(str(file), key="file")
    cols = [adapter_field, *fields, *([id_field] if id_field else [])]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(f"{file}: no column {', '.join(repr(c) for c in missing)}; its columns are {list(df.columns)} "
                        f"(set adapter_field= / text_fields=[...] / id_field=)")
    index = [names.index(v, i + 1, adapter_field) for i, v in enumerate(df[adapter_field].tolist())]
    texts = [[_text(v, i + 1, c) for i, v in enumerate(df[c].tolist())] for c in fields]
    mixed = serve.load(runs, backbone_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed.model.to(device)
    if task == "classification":
        preds = _classify(mixed, index, texts, batch_size, device)
    else:
        preds = _generate(mixed, index, texts[0], templates, batch_size, max_new_tokens or 128, device)
    ids = df[id_field].tolist() if id_field else None
    records = [{"row": i + 1, **({"id": _plain(ids[i])} if ids else {}), "adapter": names.of(k), **p}
               for i, (k, p) in enumerate(zip(index, preds))]
    atomic_write_text(out, "".join(json_text(r, indent=None) + "\n" for r in records))
    counts = Counter(names.of(k) for k in index)
    console.print(f"wrote {len(records)} predictions to {out} ({', '.join(f'{n}: {c}' for n, c in counts.items())})",
                  highlight=False)
    return records


def _template(run: str, cfg: dict) -> str:
    """A causal-LM run's prompt template, from its config.yaml (the adapter folder alone lacks it)."""
    from peftkit.evaluate import load_run_config

    folder = adapter.folder(run)
    run_dir = folder if (folder / "config.yaml").is_file() else folder.parent
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run}: a causal-LM run's prompt template is in its run directory's config.yaml; give the run directory")
    return load_run_config(run_dir, {}).dataset.template


def _text(v, row: int, column: str) -> str:
    if _missing(v) and not (isinstance(v, str)):
        raise UserError(f"row {row}: no text in column '{column}'; fill it in or drop the row")
    if isinstance(v, (list, dict)):
        raise UserError(f"row {row}: column '{column}' holds a {type(v).__name__}, not a text")
    return str(v)


def _plain(v):
    """A cell as JSON takes it (numpy numbers as Python's)."""
    return v.item() if hasattr(v, "item") else v


@torch.no_grad()
def _classify(mixed: serve.Mixed, index: list[int], texts: list[list[str]], batch_size: int, device) -> list[dict]:
    """Each row's label and probabilities over its own run's labels (a regression run's: its score);
    every row truncated to its run's backbone.max_length, as `peftkit eval` does."""
    tok = mixed.tokenizer
    features: dict[str, list] = {}
    limits = [c["backbone"]["max_length"] for c in mixed.configs]
    for limit in sorted(set(limits)):  # tokenizing, not the forward: one call per distinct max_length
        rows = [i for i, k in enumerate(index) if limits[k] == limit]
        enc = tok(*([t[i] for i in rows] for t in texts), truncation=True, max_length=limit)
        for name in ("input_ids", "token_type_ids"):
            if name in enc:
                col = features.setdefault(name, [None] * len(index))
                for i, x in zip(rows, enc[name]):
                    col[i] = x
    lengths = [len(x) for x in features["input_ids"]]
    preds: list[dict | None] = [None] * len(index)
    with progress() as bar:
        job = bar.add_task("predict", total=len(index))
        for b in eval_batches(lengths, batch_size):
            batch = to_device(collate(features, b, tok.pad_token_id), device)
            with mixed.use([index[i] for i in b]):
                logits = mixed.model(**batch).logits.float().cpu()
            for row, i in enumerate(b):
                k = index[i]
                labels = mixed.label_names[k]
                if labels is None:
                    preds[i] = {"score": logits[row, 0].item()}
                    continue
                p = logits[row, : len(labels)].softmax(-1)
                preds[i] = {"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist()))}
            bar.advance(job, len(b))
    return preds


def _generate(mixed: serve.Mixed, index: list[int], prompts: list[str], templates: list[str], batch_size: int,
              max_new_tokens: int, device) -> list[dict]:
    """Greedy replies, each prompt rendered with its run's template (the base alone: the first run's),
    rows of several adapters generated together with the KV cache."""
    from peftkit.evaluation import generation
    from peftkit.generate import prompt_ids

    tok = mixed.tokenizer
    ids = [prompt_ids(tok, templates[max(k, 0)], [{"role": "user", "content": p}]) for k, p in zip(index, prompts)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    replies: list[str | None] = [None] * len(ids)
    with progress() as bar:
        job = bar.add_task("generate", total=len(ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out = generation.generate(mixed.model, tok, [ids[i] for i in chunk], max_new_tokens, batch_size=len(chunk),
                                      device=device, per_batch=lambda rows, chunk=chunk: mixed.use([index[chunk[r]] for r in rows]))
            for i, reply in zip(chunk, out):
                replies[i] = reply
            bar.advance(job, len(chunk))
    return [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]
