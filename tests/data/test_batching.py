"""Batching: length-grouped training batches, sorted eval batches, dynamic padding, the token cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import GLUE_DIR, minilm_dir, needs_glue, needs_minilm
from peftkit.data import Split
from peftkit.data import batching
from peftkit.data.batching import Encoded, collate, eval_batches, train_batches


def padded_tokens(batches: list[list[int]], lengths) -> int:
    """Tokens a batch list feeds the model when each batch pads to its own longest example."""
    lengths = np.asarray(lengths)
    return int(sum(len(b) * lengths[b].max() for b in batches))


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's tokenizer (the tests that use it carry needs_minilm)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Short-text-like lengths: mostly short, a long tail (as SST-2 or tweets)."""
    rng = np.random.default_rng(seed)
    return (3 + rng.lognormal(2.3, 0.7, n)).astype(int).clip(3, 128).tolist()


# ---- train_batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n, bs", [(1037, 32), (3333, 16), (7, 32), (64, 8)])
def test_train_batches_cover_every_index_exactly_once(group, n, bs):
    lengths = skewed_lengths(n)
    batches = train_batches(lengths, bs, seed=3, epoch=0, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= bs for b in batches)
    assert sum(len(b) < bs for b in batches) <= 1 + n // (bs * 50)  # one short batch per mega-batch at most
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("group", [True, False])
def test_train_batches_are_a_function_of_seed_and_epoch(group):
    lengths = skewed_lengths(2000)
    a = train_batches(lengths, 32, seed=7, epoch=2, group_by_length=group)
    assert a == train_batches(list(lengths), 32, seed=7, epoch=2, group_by_length=group)
    assert a != train_batches(lengths, 32, seed=7, epoch=3, group_by_length=group)
    assert a != train_batches(lengths, 32, seed=8, epoch=2, group_by_length=group)
    # different epochs put different examples together, not just the same batches reordered
    b = train_batches(lengths, 32, seed=7, epoch=3, group_by_length=group)
    assert {tuple(sorted(x)) for x in a} != {tuple(sorted(x)) for x in b}


def test_grouped_batches_are_sorted_inside_and_longest_first():
    lengths = skewed_lengths(5000, seed=1)
    batches = train_batches(lengths, 32, seed=0, epoch=0, group_by_length=True)
    lengths_np = np.asarray(lengths)
    assert lengths_np[batches[0]].max() == max(lengths)  # an out-of-memory shows at step 1
    for b in batches:
        ls = lengths_np[b]
        assert (np.diff(ls) <= 0).all()
    # and the batch order is shuffled, not longest-to-shortest
    maxima = [lengths_np[b].max() for b in batches[1:]]
    assert maxima != sorted(maxima, reverse=True)


def test_grouping_cuts_padding_on_synthetic_lengths():
    lengths = skewed_lengths(8000, seed=2)
    grouped = train_batches(lengths, 32, seed=0, epoch=0, group_by_length=True)
    shuffled = train_batches(lengths, 32, seed=0, epoch=0, group_by_length=False)
    assert padded_tokens(grouped, lengths) < 0.7 * padded_tokens(shuffled, lengths)
    assert padded_tokens(grouped, lengths) < 1.1 * sum(lengths)


@pytest.fixture(scope="module")
def sst2_lengths(tokenizer) -> list[int]:
    import pandas as pd

    path = GLUE_DIR / "SST-2" / "train.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    df = pd.read_csv(path, sep="\t", quoting=3, dtype=str, keep_default_na=False, nrows=8000)
    return [len(x) for x in tokenizer(df["sentence"].tolist(), truncation=True, max_length=128)["input_ids"]]


@needs_glue
@needs_minilm
def test_grouping_cuts_padding_on_sst2(sst2_lengths):
    real = sum(sst2_lengths)
    for epoch in range(3):
        grouped = padded_tokens(train_batches(sst2_lengths, 32, seed=42, epoch=epoch, group_by_length=True), sst2_lengths)
        shuffled = padded_tokens(train_batches(sst2_lengths, 32, seed=42, epoch=epoch, group_by_length=False), sst2_lengths)
        assert grouped < 0.7 * shuffled
        assert grouped < 1.1 * real
        assert shuffled > 2 * real  # random batches of short text are mostly padding


# ---- eval_batches -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, bs", [(1000, 128), (5, 128), (129, 64)])
def test_eval_batches_sorted_longest_first_and_complete(n, bs):
    lengths = skewed_lengths(n, seed=5)
    batches = eval_batches(lengths, bs)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert [len(b) for b in batches] == [min(bs, n - k) for k in range(0, n, bs)]
    ordered = np.asarray(lengths)[flat]
    assert (np.diff(ordered) <= 0).all()
    assert batches == eval_batches(lengths, bs)


def test_eval_batches_keep_input_order_among_equal_lengths():
    assert eval_batches([2, 5, 2, 5, 2], 2) == [[1, 3], [0, 2], [4]]


# ---- collate ----------------------------------------------------------------------------------------

FEATURES = {
    "input_ids": [[101, 5, 102], [101, 102], [101, 7, 8, 9, 102], [101, 6, 102, 11, 102]],
    "token_type_ids": [[0, 0, 0], [0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]],
}


def test_collate_pads_to_the_longest_in_the_batch():
    batch = collate(FEATURES, [1, 3, 0], pad_id=99, labels=[1, 0, 2, 1])
    assert torch.equal(batch["input_ids"], torch.tensor([
        [101, 102, 99, 99, 99],
        [101, 6, 102, 11, 102],
        [101, 5, 102, 99, 99],
    ]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert torch.equal(batch["token_type_ids"], torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([0, 1, 1]))
    assert batch["labels"].dtype == torch.long
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "token_type_ids"))


def test_collate_width_is_the_batch_maximum_not_the_global_one():
    batch = collate(FEATURES, [0, 1], pad_id=0)
    assert batch["input_ids"].shape == (2, 3)
    assert "labels" not in batch


def test_collate_float_labels_and_no_token_types():
    feats = {"input_ids": FEATURES["input_ids"]}
    batch = collate(feats, [2, 0], pad_id=1, labels=[0.5, 1.0, 4.25, 3.0], float_labels=True)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [4.25, 0.5]
    assert batch["input_ids"][1].tolist() == [101, 5, 102, 1, 1]


# ---- tokenize and its cache -------------------------------------------------------------------------

def pairs(n: int) -> Split:
    a = [f"the movie number {i} was {'very ' * (i % 7)}good" for i in range(n)]
    b = [f"a film {i}" for i in range(n)]
    return Split(a, b, [i % 2 for i in range(n)], list(range(n)))


@needs_minilm
def test_tokenize_caches_on_disk(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path / "cache"))
    split = pairs(40)
    first = batching.tokenize(split, tokenizer, 64)
    files = sorted((tmp_path / "cache" / "tokenized").glob("*.safetensors"))
    assert len(files) == 1
    expected = tokenizer(split.text_a, split.text_b, truncation=True, max_length=64)
    assert list(first["input_ids"]) == expected["input_ids"]
    assert list(first["token_type_ids"]) == expected["token_type_ids"]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", refuse)
        second = batching.tokenize(split, tokenizer, 64)
    assert list(second["input_ids"]) == list(first["input_ids"])
    assert list(second["token_type_ids"]) == list(first["token_type_ids"])
    assert sorted((tmp_path / "cache" / "tokenized").glob("*.safetensors")) == files

    # another max length or other text is another cache entry
    batching.tokenize(split, tokenizer, 16)
    batching.tokenize(Split(split.text_a, None, split.labels, split.ids), tokenizer, 64)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))) == 3


@needs_minilm
def test_the_cache_key_is_the_whole_tokenizer_less_its_per_call_state(tokenizer):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    split = pairs(4)
    key = batching._key(split, tokenizer, 64)
    tokenizer(["a b c"] * 2, truncation=True, max_length=3, padding="max_length")  # sets both on the backend
    assert tokenizer.backend_tokenizer.truncation and tokenizer.backend_tokenizer.padding
    assert batching._key(split, tokenizer, 64) == key
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert batching._key(split, other, 64) == key
    other.backend_tokenizer.normalizer = normalizers.NFD()  # same vocabulary, other text → other ids
    assert batching._key(split, other, 64) != key


@needs_minilm
def test_encoded_truncates_and_batches(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv(batching.CACHE_ENV, str(tmp_path / "cache"))
    split = Split(["short", "word " * 200, "a bit longer text here"], None, [0, 1, 0], ["x", "y", "z"])
    enc = Encoded(split, tokenizer, max_length=32)
    assert len(enc) == 3
    assert enc.lengths[1] == 32 and enc.lengths[0] == 3  # [CLS] short [SEP]
    assert enc.ids == ["x", "y", "z"] and enc.pad_id == tokenizer.pad_token_id
    batch = enc.batch([0, 2])
    assert batch["input_ids"].shape == (2, enc.lengths[2])
    assert batch["attention_mask"].sum(1).tolist() == [enc.lengths[0], enc.lengths[2]]
    assert batch["input_ids"][0, enc.lengths[0]:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 0]
