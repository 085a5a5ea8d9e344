"""Instruction data for causal-LM fine-tuning: conversations whose assistant turns are learned.

A row is alpaca-style (`instruction`, optional `input`, `output`, optional `answer` to score against)
or a chat (`messages`: role/content dicts, several turns, an optional system turn). Field names
are configurable. Every source (your files, the math sets, the quickstart) becomes `LMData`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from peftkit.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    messages: list[dict]  # {"role", "content"}; ends with the assistant turn to score
    answer: str | None = None  # what a generated reply is scored against (math: the number)
    id: int | str | None = None

    @property
    def prompt(self) -> list[dict]:
        """Everything before the last assistant turn: what generation starts from."""
        return self.messages[:-1]

    @property
    def gold(self) -> str:
        return self.answer if self.answer is not None else self.messages[-1]["content"]


@dataclass
class LMData:
    name: str  # what the user typed: instruct, math, quickstart_lm
    task: str  # the display name of the data (report column)
    splits: dict[str, list[Conversation]]  # train, validation, test_<set> ...
    metrics: tuple[str, ...] = ()  # generation metrics scored on eval splits (evaluation.generation)
    cfg: DictConfig | None = None  # the dataset config: template, generation length, ...
    label_names: None = None  # no classification head
    truncated: dict[str, int] = field(default_factory=dict)

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in self.splits if s != "train"]


def read_rows(path: str | Path, key: str) -> list[dict]:
    """JSON (a list of objects), JSON Lines or Parquet rows as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file; give a .json, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(text)
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]}
        else:
            raise UserError(f"{key}={path}: unknown file type; use .json, .jsonl or .parquet")
    except (ValueError, OSError) as e:
        raise UserError(f"{key}={path}: cannot read: {' '.join(str(e).split())}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{key}={path}: expected a list of objects (one per example)")
    if not rows:
        raise UserError(f"{key}={path} has no rows")
    return rows


def to_conversation(row: dict, cfg: DictConfig, where: str, i: int) -> Conversation | None:
    """One row as a conversation; None for a row with nothing to learn (an empty response)."""
    f = cfg.fields
    answer = row.get(f.answer) if f.get("answer") else None
    answer = None if answer is None or (isinstance(answer, float) and np.isnan(answer)) else str(answer)
    if f.get("messages") and row.get(f.messages) is not None:
        messages = row[f.messages]
        if hasattr(messages, "tolist"):  # Parquet gives numpy arrays
            messages = messages.tolist()
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: row {i}: {f.messages} must be a list of {{role, content}} messages")
        out = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: row {i}: each message needs a role ({', '.join(ROLES)}) and a text content, got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        while out and out[-1]["role"] != "assistant":  # trailing user turns have no response to learn
            out.pop()
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            return None
        return Conversation(out, answer, row.get("id", i))
    missing = [k for k in (f.instruction, f.output) if k not in row]
    if missing:
        raise UserError(f"{where}: row {i} has no {' or '.join(missing)}; its fields are {sorted(row)} "
                        f"(set dataset.fields.instruction / output / messages)")
    instruction, output = row[f.instruction], row[f.output]
    extra = row.get(f.input) if f.get("input") else None
    if not isinstance(output, str) or not output.strip() or not isinstance(instruction, str):
        return None
    user = instruction if not (isinstance(extra, str) and extra.strip()) else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if cfg.get("system"):
        messages.insert(0, {"role": "system", "content": cfg.system})
    return Conversation(messages, answer, row.get("id", i))


def conversations(rows: list[dict], cfg: DictConfig, where: str) -> list[Conversation]:
    out = [c for i, r in enumerate(rows, 1) if (c := to_conversation(r, cfg, where, i)) is not None]
    if not out:
        raise UserError(f"{where}: no row has a response to learn (all outputs are empty)")
    if len(out) < len(rows):
        print(f"peftkit: warning: {where}: dropped {len(rows) - len(out)} of {len(rows)} rows with an empty response",
              file=sys.stderr)
    return out


def carve(train: list[Conversation], cfg: DictConfig) -> tuple[list[Conversation], list[Conversation]]:
    """(train, dev): dev_size rows (or dev_fraction of them) drawn with split_seed."""
    order = np.random.default_rng(cfg.split_seed).permutation(len(train))
    n_dev = cfg.get("dev_size") or max(1, int(round(len(train) * cfg.dev_fraction)))
    if n_dev >= len(train):
        raise UserError(f"{len(train)} examples leave none to train on after taking {n_dev} for dev; "
                        f"lower dataset.dev_fraction / dev_size or give dataset.dev_file")
    dev, rest = np.sort(order[:n_dev]), np.sort(order[n_dev:])
    return [train[i] for i in rest], [train[i] for i in dev]


def head(rows: list, n: int | None) -> list:
    return rows if n is None else rows[:n]


def load_files(cfg: DictConfig, splits: tuple[str, ...]) -> LMData:
    """`dataset=instruct`: your JSON / JSONL / Parquet file(s)."""
    if not cfg.get("train_file"):
        raise UserError("dataset=instruct needs dataset.train_file=PATH (.json, .jsonl or .parquet)")
    train = conversations(read_rows(cfg.train_file, "dataset.train_file"), cfg, str(cfg.train_file))
    if cfg.get("dev_file"):
        dev = conversations(read_rows(cfg.dev_file, "dataset.dev_file"), cfg, str(cfg.dev_file))
    else:
        train, dev = carve(train, cfg)
    out = {"train": head(train, cfg.get("max_train_samples")), "validation": head(dev, cfg.get("max_eval_samples"))}
    return LMData(cfg.name, Path(cfg.train_file).stem, out, tuple(cfg.metrics), cfg)


def load_math(cfg: DictConfig, splits: tuple[str, ...]) -> LMData:
    """`dataset=math`: word problems in the LLM-Adapters layout, from a local folder: the training
    file (GSM8K train) and test sets `<Set>/test.json`; scored by the last number of the reply."""
    if not cfg.get("data_dir"):
        raise UserError("dataset=math needs dataset.data_dir=DIR, a folder in the LLM-Adapters layout "
                        "(the training file and <Set>/test.json, e.g. AddSub/test.json)")
    root = Path(cfg.data_dir).expanduser()
    out: dict[str, list[Conversation]] = {}
    if "train" in splits or "validation" in splits:
        rows = read_rows(root / cfg.train_file, "dataset.train_file")
        train, dev = carve(conversations(rows, cfg, str(root / cfg.train_file)), cfg)
        out["train"], out["validation"] = head(train, cfg.get("max_train_samples")), head(dev, cfg.get("max_eval_samples"))
    if "test" in splits:
        for name in cfg.eval_sets:
            f = root / name / "test.json"
            out[f"test_{name}"] = head(conversations(read_rows(f, f"dataset.eval_sets ({name})"), cfg, str(f)), cfg.get("max_eval_samples"))
    return LMData(cfg.name, "math", out, tuple(cfg.metrics), cfg)


def load_quickstart(cfg: DictConfig, splits: tuple[str, ...]) -> LMData:
    """`dataset=quickstart_lm`: the Rotten Tomatoes snippets of the classification quickstart, as
    instructions with a one-word answer (fresh or rotten), split the same way (seed 0)."""
    from peftkit.data import quickstart

    data = quickstart.load(OmegaConf.create({"name": "quickstart", "dev_size": 1000, "split_seed": 0}), splits)

    def as_chats(split) -> list[Conversation]:
        return [Conversation([{"role": "user", "content": cfg.prompt.format(text=t)},
                              {"role": "assistant", "content": quickstart.LABELS[y]}], None, i)
                for t, y, i in zip(split.text_a, split.labels, split.ids)]

    out = {"train": head(as_chats(data.splits["train"]), cfg.get("max_train_samples")),
           "validation": head(as_chats(data.splits["validation"]), cfg.get("max_eval_samples"))}
    return LMData(cfg.name, "rotten_tomatoes_lm", out, tuple(cfg.metrics), cfg)


LOADERS = {"instruct": load_files, "math": load_math, "quickstart_lm": load_quickstart}


def load(cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> LMData:
    if cfg.name not in LOADERS:
        raise UserError(f"dataset {cfg.name} is not instruction data; choose one of: {', '.join(LOADERS)}")
    return LOADERS[cfg.name](cfg, splits)
