"""dataset=local on bad user files: one clear line (a UserError), or one warning line when training still makes sense."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from peftkit.data import local
from peftkit.errors import UserError


def csv(*rows: str, sep: str = ",") -> str:
    return "".join(r.replace(",", sep) + "\n" for r in rows)


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def labelled(n: int, classes=("neg", "pos")) -> list[str]:
    """n CSV rows 'text i,class' cycling through the classes."""
    return [f"text {i},{classes[i % len(classes)]}" for i in range(n)]


def sentences(n: int, label_first: bool = True) -> list[str]:
    """n headerless CSV rows of a 0/1 label and a sentence (SST-2's `label<TAB>sentence` with sep='\\t')."""
    rows = [(str(i % 2), f"the film number {i} is {'a delight' if i % 2 else 'a slog'}") for i in range(n)]
    return [",".join(r if label_first else r[::-1]) for r in rows]


HEADERLESS = {"header": False, "text_fields": [1], "label_field": 0}


# name: (files, config fields, substrings of the one-line error)
ERRORS = {
    "empty csv (0 bytes)": ({"t.csv": ""}, {}, ["t.csv is empty", "dataset.train_file"]),
    "empty jsonl (0 bytes)": ({"t.jsonl": ""}, {}, ["t.jsonl is empty", "dataset.train_file"]),
    "empty parquet (0 bytes)": ({"t.parquet": ""}, {}, ["t.parquet is empty", "dataset.train_file"]),
    "blank lines only": ({"t.csv": "\n\n"}, {}, ["t.csv is empty"]),
    "header-only csv": ({"t.csv": csv("text,label")}, {}, ["t.csv has columns ['text', 'label'] but no rows", "dataset.train_file"]),
    "header-only tsv": ({"t.tsv": csv("text,label", sep="\t")}, {}, ["t.tsv has columns", "no rows"]),
    "json with no records": ({"t.json": "[]"}, {}, ["t.json is empty"]),
    "empty dev file": ({"t.csv": csv("text,label", *labelled(6)), "dev.csv": ""}, {},
                       ["dev.csv is empty", "dataset.dev_file"]),
    "header-only dev file": ({"t.csv": csv("text,label", *labelled(6)), "dev.csv": csv("text,label")}, {},
                             ["dev.csv has columns", "no rows", "dataset.dev_file"]),
    "one-row train file": ({"t.csv": csv("text,label", "great,pos")}, {},
                           ["t.csv has 1 usable row(s)", "dataset.dev_fraction=0.1", "1 for dev and 0 for train", "dataset.dev_file"]),
    "one usable row after drops": ({"t.csv": csv("text,label", "great,pos", ",neg", "bad,")}, {},
                                   ["has 1 usable row(s)", "dataset.dev_file"]),
    "dev_fraction=0": ({"t.csv": csv("text,label", *labelled(20))}, {"dev_fraction": 0},
                       ["has 20 usable row(s)", "dataset.dev_fraction=0 leaves 0 for dev", "between 0 and 1", "dataset.dev_file"]),
    "dev_fraction=1": ({"t.csv": csv("text,label", *labelled(20))}, {"dev_fraction": 1.0},
                       ["dataset.dev_fraction=1.0 leaves 20 for dev and 0 for train"]),
    "all-null jsonl": ({"t.jsonl": jsonl(*[{"text": None, "label": None}] * 3)}, {},
                       ["t.jsonl: no usable rows: all 3", "3 with an empty text in ['text']", "3 with an empty label in 'label'"]),
    "all texts blank csv": ({"t.csv": csv("text,label", ",pos", "  ,neg")}, {},
                            ["no usable rows: all 2", "2 with an empty text in ['text']", "dataset.text_fields"]),
    "all labels blank csv": ({"t.csv": csv("text,label", "a,", "b, ")}, {},
                             ["no usable rows: all 2", "2 with an empty label in 'label'", "dataset.label_field"]),
    "list label jsonl": ({"t.jsonl": jsonl({"text": "a", "label": 1}, {"text": "b", "label": [1, 0]})}, {},
                         ["t.jsonl: row 2: label [1, 0] in column 'label' is a list",
                          "one class name or number per row", "multi-label is not supported"]),
    "dict label json": ({"t.json": json.dumps([{"text": "a", "label": {"pos": 1}}])}, {},
                        ["t.json: row 1: label {'pos': 1}", "is a dict", "multi-label is not supported"]),
    "list label parquet": ({"t.parquet": pd.DataFrame({"text": ["a", "b"], "label": [[0, 1], [1, 0]]})}, {},
                           ["t.parquet: row 1: label [0, 1]", "multi-label is not supported"]),
    "one class": ({"t.csv": csv("text,label", *labelled(10, ["pos"]))}, {},
                  ["t.csv: the train split has one class only, 'pos'", "column 'label'", "at least two",
                   "dataset.regression=true", "dataset.label_names"]),
    "one class after drops": ({"t.csv": csv("text,label", *labelled(10, ["pos"]), ",neg")}, {},
                              ["one class only, 'pos'"]),
    "one class in a one-row file with a dev file": ({"t.csv": csv("text,label", "a,pos"), "dev.csv": csv("text,label", "b,neg")}, {},
                                                   ["one class only, 'pos'"]),
    "one declared class": ({"t.csv": csv("text,label", *labelled(10, ["pos"]))}, {"label_names": ["pos"]},
                           ["one class only", "dataset.label_names"]),
    "duplicate csv column": ({"t.csv": csv("text,label,text", "a,pos,b", "c,neg,d")}, {},
                             ["t.csv: column 'text' appears twice in the header"]),
    "duplicate tsv column": ({"t.tsv": csv("label,text,label", "pos,a,x", "neg,b,y", sep="\t")}, {},
                             ["t.tsv: column 'label' appears twice"]),
    "text_fields as a string": ({"t.csv": csv("text,label", *labelled(10))}, {"text_fields": "text"},
                                ["dataset.text_fields is the string 'text'", "dataset.text_fields=[text]"]),
    "label_names as a string": ({"t.csv": csv("text,label", *labelled(10))}, {"label_names": "neg"},
                                ["dataset.label_names=[neg]"]),
    "regression word": ({"t.csv": csv("text,label", "a,0.5", "b,high"), "dev.csv": csv("text,label", "c,1")}, {"regression": True},
                        ["t.csv: row 2: regression labels must be numbers, got 'high'"]),
    "regression nan text": ({"t.csv": csv("text,label", "a,0.5", "b,1", "c,nan"), "dev.csv": csv("text,label", "c,1")}, {"regression": True},
                            ["t.csv: row 3: regression label 'nan' is not a finite number"]),
    "regression inf in dev": ({"t.csv": csv("text,label", "a,0.5", "b,1"), "dev.csv": csv("text,label", "c,-inf")}, {"regression": True},
                              ["dev.csv: row 1: regression label '-inf' is not a finite number"]),
    "regression inf parquet": ({"t.parquet": pd.DataFrame({"text": ["a", "b", "c"], "label": [0.5, 1.0, np.inf]})},
                               {"regression": True, "dev_fraction": 0.4}, ["row 3: regression label inf is not a finite number"]),
    # a file without a header row, read as if it had one: say so, with the settings that read it
    "headerless tsv, number label first": ({"t.tsv": csv(*sentences(10), sep="\t")}, {},
                                           ["t.tsv: missing column(s) ['text', 'label']", "its first row looks like data, not column names",
                                            "'0' is a number", "read it with dataset.header=false dataset.text_fields=[1] dataset.label_field=0"]),
    "headerless csv, word label last": ({"t.csv": csv(*[f"{'great' if i % 2 else 'dull'} film {i},{'pos' if i % 2 else 'neg'}" for i in range(10)])},
                                        {}, ["its first row looks like data", "'neg' is also a value in its column",
                                             "dataset.header=false dataset.text_fields=[0] dataset.label_field=1"]),
    "headerless csv, a declared label first": ({"t.csv": csv("neg,dull", "pos,fine", "neg,bad")}, {"label_names": ["neg", "pos"]},
                                               ["'neg' is one of dataset.label_names", "dataset.text_fields=[1] dataset.label_field=0"]),
    "headerless tsv, a long sentence first": (
        {"t.tsv": csv("a stirring and funny and finally transporting re-imagining,7", "dull,3", sep="\t")}, {"label_field": "score"},
        ["missing column(s) ['text', 'score']", "'a stirring and funny and finally transpo'... is a sentence", "dataset.text_fields=[0] dataset.label_field=1"]),
    "headerless tsv, sentence pairs": ({"t.tsv": csv("A man eats.,Someone is eating a meal.,1", "Dogs run.,Cats sleep all day.,0", sep="\t")},
                                       {"text_fields": ["s1", "s2"]}, ["looks like data", "dataset.text_fields=[0,1] dataset.label_field=2"]),
    "headerless dev file": ({"t.csv": csv("text,label", *labelled(6)), "dev.csv": csv(*sentences(4))}, {},
                            ["dev.csv: missing column(s) ['text', 'label']; its first row looks like data"]),
    # dataset.header=false
    "label index out of range": ({"t.tsv": csv(*sentences(10), sep="\t")}, {**HEADERLESS, "label_field": 2},
                                 ["t.tsv: dataset.label_field asks for column 2, but the file has 2 column(s)", "an index from 0 to 1"]),
    "text index out of range in the dev file": ({"t.tsv": csv(*sentences(10), sep="\t"), "dev.tsv": csv("0", "1", sep="\t")}, HEADERLESS,
                                                ["dev.tsv: dataset.text_fields asks for column 1, but the file has 1 column(s)"]),
    "header=false on jsonl": ({"t.jsonl": jsonl(*[{"text": "a", "label": 1}] * 3)}, HEADERLESS,
                              ["t.jsonl: dataset.header=false is for CSV/TSV files", "a jsonl file names its columns", "dataset.header=true"]),
    "header=false, a long row": ({"t.tsv": csv("0,a", "1,b", "0,c,d", sep="\t")}, HEADERLESS,
                                 ["t.tsv: line 3 has 3 fields, the first row 2", "quote a text that holds a tab"]),
    "header=false, duplicate cells are data": ({"t.csv": csv("x,x", "y,y")}, {**HEADERLESS, "dev_fraction": 0.5},
                                               ["the train split has one class only, 'y'"]),
    # dataset.test_file
    "test file not found": ({"t.csv": csv("text,label", *labelled(6))}, {"test_file": "nope/test.csv"},
                            ["nope/test.csv not found", "dataset.test_file=PATH"]),
    "test file is a folder": ({"t.csv": csv("text,label", *labelled(6))}, {"test_file": "/"},
                              ["dataset.test_file=/ is a folder", "a data file in it"]),
    "test file without labels": ({"t.csv": csv("text,label", *labelled(6)), "test.csv": csv("text,label", "a,", "b,")}, {},
                                 ["test.csv: no usable rows: all 2", "2 with an empty label in 'label'"]),
    "test file without the label column": ({"t.csv": csv("text,label", *labelled(6)), "test.csv": csv("text,gold", "a,pos")}, {},
                                           ["test.csv: missing column(s) ['label']"]),
    "empty test file": ({"t.csv": csv("text,label", *labelled(6)), "test.csv": ""}, {}, ["test.csv is empty", "dataset.test_file"]),
}

# name: (files, config fields, (train rows, dev rows), substrings of the one warning, or None for no warning)
LOADS = {
    "2-class csv": ({"t.csv": csv("text,label", *labelled(20))}, {}, (18, 2), None),
    "jsonl": ({"t.jsonl": jsonl(*[{"text": f"t{i}", "label": i % 3} for i in range(30)])}, {}, (27, 3), None),
    "tsv with two text fields": ({"t.tsv": csv("a,b,label", *[f"x{i},y{i},{'yes' if i % 2 else 'no'}" for i in range(10)], sep="\t")},
                                 {"text_fields": ["a", "b"]}, (9, 1), None),
    "tiny but usable": ({"t.csv": csv("text,label", *labelled(4))}, {}, (3, 1), None),
    "blank trailing header cells are no duplicates": ({"t.csv": csv("text,label,,", *[r + ",," for r in labelled(10)])}, {}, (9, 1), None),
    "blank texts dropped": ({"t.csv": csv("text,label", *labelled(8), ",pos", "   ,neg")}, {}, (7, 1),
                            ["t.csv: dropped 2 of 10 rows (2 with an empty text in ['text']; the first is row 9)"]),
    "blank labels dropped": ({"t.csv": csv("text,label", "x,", *labelled(9))}, {}, (8, 1),
                             ["dropped 1 of 10 rows (1 with an empty label in 'label'; the first is row 1)"]),
    "null json label dropped, integer classes kept": (
        {"t.jsonl": jsonl(*[{"text": f"t{i}", "label": None if i == 4 else i % 2} for i in range(11)])}, {}, (9, 1),
        ["t.jsonl: dropped 1 of 11 rows", "1 with an empty label in 'label'", "row 5"]),
    "blank second text field in tsv": (
        {"t.tsv": csv("a,b,label", *[f"x{i},{'' if i == 3 else f'y{i}'},{i % 2}" for i in range(10)], sep="\t")},
        {"text_fields": ["a", "b"]}, (8, 1), ["1 with an empty text in ['a', 'b']", "row 4"]),
    "null text and NaN label in parquet": (
        {"t.parquet": pd.DataFrame({"text": ["a", None, "c", "d", "e"], "label": [0.0, 1.0, np.nan, 1.0, 0.0]})}, {}, (2, 1),
        ["dropped 2 of 5 rows (1 with an empty text in ['text'], 1 with an empty label in 'label'; the first is row 2)"]),
    "blank labels in regression dropped": ({"t.csv": csv("text,label", "a,0.5", "b,", "c,3", "d,2")}, {"regression": True}, (2, 1),
                                           ["1 with an empty label"]),
    "headerless tsv": ({"t.tsv": csv(*sentences(20), sep="\t")}, HEADERLESS, (18, 2), None),
    "headerless csv, label last": ({"t.csv": csv(*sentences(20, label_first=False))}, {**HEADERLESS, "text_fields": [0], "label_field": 1},
                                   (18, 2), None),
    "headerless, a short row dropped": ({"t.csv": csv(*sentences(10), "1")}, HEADERLESS, (9, 1),
                                        ["t.csv: dropped 1 of 11 rows (1 with an empty text in [1]; the first is row 11)"]),
}


def write_files(tmp_path, files: dict) -> dict:
    """Write the files; the first is the train file, one named dev.* the dev file, one named test.* the test file."""
    fields = {}
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(path, index=False)
        else:
            path.write_text(content)
        fields[{"dev": "dev_file", "test": "test_file"}.get(name.split(".")[0], "train_file")] = str(path)
    return fields


def local_cfg(**fields):
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "local.yaml")
    for k, v in fields.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_file_is_one_clear_line(tmp_path, name):
    files, fields, expected = ERRORS[name]
    with pytest.raises(UserError) as e:
        local.load(local_cfg(**write_files(tmp_path, files), **fields), ("train", "validation"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg


@pytest.mark.parametrize("name", list(LOADS))
def test_usable_file_loads_with_at_most_one_warning(tmp_path, capsys, name):
    files, fields, sizes, warning = LOADS[name]
    d = local.load(local_cfg(**write_files(tmp_path, files), **fields), ("train", "validation"))
    tr, dv = d.splits["train"], d.splits["validation"]
    assert (len(tr), len(dv)) == sizes
    texts = tr.text_a + dv.text_a + (tr.text_b or []) + (dv.text_b or [])
    assert all(t.strip() and t not in ("nan", "None") for t in texts)
    assert len(tr.labels) == len(tr) and len(dv.labels) == len(dv)
    if d.label_names is not None:
        assert "" not in d.label_names and "nan" not in d.label_names and len(d.label_names) >= 2
    err = capsys.readouterr().err
    if warning is None:
        assert err == ""
    else:
        assert err.count("peftkit: warning: ") == 1 and err.startswith("peftkit: warning: ") and err.count("\n") == 1
        for part in warning:
            assert part in err


def test_dropped_rows_keep_their_row_numbers_as_ids(tmp_path):
    fields = write_files(tmp_path, {"t.csv": csv("text,label", "a,pos", ",neg", "c,neg", "d,"), "dev.csv": csv("text,label", "e,pos")})
    d = local.load(local_cfg(**fields), ("train", "validation"))
    assert d.splits["train"].text_a == ["a", "c"] and d.splits["train"].ids == [0, 2]
    assert d.label_names == ["neg", "pos"] and d.splits["train"].labels == [1, 0]


def test_null_json_labels_keep_integer_class_names(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": None}, {"text": "c", "label": 0}]
    fields = write_files(tmp_path, {"t.jsonl": jsonl(*rows), "dev.jsonl": jsonl({"text": "d", "label": 1})})
    d = local.load(local_cfg(**fields, label_names=["neg", "pos"]), ("train", "validation"))
    assert d.splits["train"].labels == [1, 0]  # 1.0 (read as float beside the null) is still class 1
    d = local.load(local_cfg(**fields), ("train", "validation"))
    assert d.label_names == ["0", "1"]


@pytest.mark.parametrize("header, needle", [
    ("text,lbl", "columns are ['text', 'lbl']"),  # a typo in a real header: no talk of data
    ("review,stars", "columns are ['review', 'stars']"),
])
def test_a_real_header_is_not_taken_for_data(tmp_path, header, needle):
    fields = write_files(tmp_path, {"t.csv": csv(header, *labelled(10))})
    with pytest.raises(UserError) as e:
        local.load(local_cfg(**fields), ("train", "validation"))
    assert needle in str(e.value) and "looks like data" not in str(e.value)


def test_a_suggested_headerless_reading_loads(tmp_path):
    """The settings the error suggests read the file: every row, the first included."""
    import re

    fields = write_files(tmp_path, {"t.tsv": csv(*sentences(20), sep="\t")})
    with pytest.raises(UserError) as e:
        local.load(local_cfg(**fields), ("train", "validation"))
    m = re.search(r"dataset\.header=false dataset\.text_fields=\[(\d)\] dataset\.label_field=(\d)", str(e.value))
    d = local.load(local_cfg(**fields, header=False, text_fields=[int(m[1])], label_field=int(m[2]), dev_fraction=0.5), ("train", "validation"))
    texts = d.splits["train"].text_a + d.splits["validation"].text_a
    assert sorted(texts) == sorted(r.split(",")[1] for r in sentences(20)) and d.label_names == ["0", "1"]
