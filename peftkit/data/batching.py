"""Tokenize once (cached on disk), then batch by length: padding is the biggest waste on short text.

Training batches follow the length-grouped scheme of transformers' `group_by_length`: shuffle,
cut into mega-batches of 50 batches, sort each by length, split, and shuffle the batch order.
Batch lists are a pure function of (seed, epoch), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from peftkit.data import Split

CACHE_ENV = "PEFTKIT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "peftkit")) / "tokenized"


# "truncation": and "padding": open the serialized tokenizer, each null or an object nested at most
# once (padding's {"strategy":{"Fixed":128},...})
_PER_CALL_STATE = re.compile(r'"(?:truncation|padding)":(?:null|\{(?:[^{}]|\{[^{}]*\})*\}),?')


def _key(split: Split, tokenizer, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{max_length}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole fast tokenizer (vocab, normalizer, ...) less per-call state
        h.update(_PER_CALL_STATE.sub("", backend.to_str(), count=2).encode())  # (json.loads/dumps of it took 0.1 s)
    else:
        h.update(repr(sorted(tokenizer.init_kwargs.items())).encode())
    for col in (split.text_a, split.text_b or []):
        h.update("\x1f".join(col).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:24]


FEATURES = ("input_ids", "token_type_ids")


def tokenize(split: Split, tokenizer, max_length: int) -> dict[str, list[list[int]]]:
    """input_ids (and token_type_ids where the model has them) per example, cached on disk by
    content: one safetensors file per split, each feature flat with the examples' offsets."""
    path = cache_dir() / f"{_key(split, tokenizer, max_length)}.safetensors"
    if path.is_file():
        try:
            return _unflatten(load_file(str(path)))
        except Exception:  # an unreadable cache entry is tokenized again
            pass
    features: dict[str, list] = {"input_ids": []}
    for i in range(0, len(split), 2000):
        args = (split.text_a[i : i + 2000],) + ((split.text_b[i : i + 2000],) if split.text_b is not None else ())
        out = tokenizer(*args, truncation=True, max_length=max_length)
        for name in FEATURES:
            if name in out:
                features.setdefault(name, []).extend(out[name])
    try:
        _write_cache(path, features)
    except Exception:  # a cache that cannot be written (full disk, read-only) only costs time
        for tmp in path.parent.glob(f".{path.name}.tmp-{os.getpid()}"):
            tmp.unlink(missing_ok=True)
    return features


def _write_cache(path: Path, features: dict[str, list]) -> None:
    from safetensors.torch import save_file

    lengths = [len(x) for x in features["input_ids"]]
    tensors = {"offsets": torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int64)}
    for name, rows in features.items():
        tensors[name] = torch.tensor([t for row in rows for t in row], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, list[list[int]]]:
    offsets = tensors.pop("offsets").tolist()
    out = {}
    for name, flat in tensors.items():
        values = flat.tolist()
        out[name] = [values[a:b] for a, b in zip(offsets, offsets[1:])]
    return out


def train_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  stream: tuple[int, ...] = ()) -> list[list[int]]:
    """`stream`: more numbers for the generator, for several independent orders in one epoch (tasks)."""
    rng = np.random.default_rng([seed, epoch, *stream])
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    lengths_np = np.asarray(lengths)
    mega = batch_size * 50
    batches = []
    for i in range(0, len(order), mega):
        chunk = order[i : i + mega]
        chunk = chunk[np.argsort(-lengths_np[chunk], kind="stable")]
        batches += [chunk[j : j + batch_size].tolist() for j in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    batches = [batches[k] for k in perm]
    longest = max(range(len(batches)), key=lambda k: lengths_np[batches[k]].max())
    batches.insert(0, batches.pop(longest))  # an out-of-memory shows at step 1, not hours in
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the run's device. On a GPU it is copied from pinned memory without waiting: a copy
    from pageable memory first waits for all the GPU work queued before it, which would make every
    step wait for the last one to finish instead of queueing behind it."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def collate(features: dict[str, list], idx: list[int], pad_id: int, labels=None, float_labels=False) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest example (dynamic padding). Each feature's rows go into the
    (rows × longest) tensor in one masked assignment, not a tensor and a copy per row."""
    real = torch.tensor([len(features["input_ids"][i]) for i in idx])
    real = torch.arange(int(real.max())) < real[:, None]
    batch = {"input_ids": _padded(features["input_ids"], idx, real, pad_id), "attention_mask": real.long()}
    if "token_type_ids" in features:
        batch["token_type_ids"] = _padded(features["token_type_ids"], idx, real, 0)
    if labels is not None:
        batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=torch.float if float_labels else torch.long)
    return batch


def _padded(rows: list[list[int]], idx: list[int], real: torch.Tensor, fill: int) -> torch.Tensor:
    out = torch.full(real.shape, fill, dtype=torch.long)
    out[real] = torch.tensor(list(itertools.chain.from_iterable(rows[i] for i in idx)), dtype=torch.long)
    return out


class Encoded:
    """A tokenized split: features per example, lengths for batching, labels and ids."""

    def __init__(self, split: Split, tokenizer, max_length: int, float_labels: bool = False):
        self.features = tokenize(split, tokenizer, max_length)
        self.float_labels = float_labels  # regression
        self.lengths = [len(x) for x in self.features["input_ids"]]
        self.labels = split.labels
        self.ids = split.ids
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate(self.features, idx, self.pad_id, self.labels, self.float_labels)
