"""dataset=local: CSV/TSV/JSON/JSONL/Parquet files with a column mapping."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from peftkit import data
from peftkit.errors import UserError

WRITERS = {
    "csv": lambda df, p: df.to_csv(p, index=False),
    "tsv": lambda df, p: df.to_csv(p, sep="\t", index=False),
    "json": lambda df, p: df.to_json(p, orient="records"),
    "jsonl": lambda df, p: df.to_json(p, orient="records", lines=True),
    "parquet": lambda df, p: df.to_parquet(p, index=False),
}


def local_cfg(**fields):
    """configs/dataset/local.yaml with fields set."""
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "local.yaml")
    for k, v in fields.items():
        cfg[k] = v
    return cfg


def write(df: pd.DataFrame, path):
    WRITERS[path.name.split(".", 1)[1]](df, path)
    return path


def reviews(n: int = 40) -> pd.DataFrame:
    """Unique texts (so rows can be told apart), with commas, quotes and tabs a naive reader would split on."""
    return pd.DataFrame({
        "review": [f'review {i}, "quoted"\tand tabbed' for i in range(n)],
        "stars": ["pos" if i % 3 else "neg" for i in range(n)],
        "other": range(n),
    })


@pytest.mark.parametrize("ext", list(WRITERS))
def test_one_text_field_every_format(tmp_path, ext):
    df = reviews()
    train = write(df, tmp_path / f"train.{ext}")
    dev = write(df.iloc[:5], tmp_path / f"dev.{ext}")
    d = data.load(local_cfg(train_file=str(train), dev_file=str(dev), text_fields=["review"], label_field="stars"))
    assert d.name == "local" and d.task == tmp_path.name  # train.EXT says nothing of the task: its folder's name does
    assert d.label_names == ["neg", "pos"]  # inferred: sorted distinct labels of train
    assert d.metrics == ("accuracy",) and d.problem_type == "single_label_classification"
    tr = d.splits["train"]
    assert tr.text_a == df["review"].tolist() and tr.text_b is None
    assert tr.labels == [1 if s == "pos" else 0 for s in df["stars"]]
    assert tr.ids == list(range(len(df)))
    assert d.splits["validation"].text_a == df["review"].tolist()[:5]


@pytest.mark.parametrize("ext", list(WRITERS))
def test_two_text_fields_every_format(tmp_path, ext):
    df = pd.DataFrame({
        "premise": ["A man is eating.", "A dog runs.", "Kids play, loudly.", "It rains."],
        "hypothesis": ["Someone eats.", "A cat sleeps.", "Children are playing.", 'Weather is "bad".'],
        "gold": ["yes", "no", "yes", "no"],
        "uid": ["a1", "a2", "a3", "a4"],
    })
    train = write(df, tmp_path / f"pairs.{ext}")
    dev = write(df.iloc[::-1], tmp_path / f"pairs_dev.{ext}")
    cfg = local_cfg(train_file=str(train), dev_file=str(dev), text_fields=["premise", "hypothesis"],
                    label_field="gold", label_names=["no", "yes"], id_field="uid")
    d = data.load(cfg)
    tr, dv = d.splits["train"], d.splits["validation"]
    assert tr.text_a == df["premise"].tolist() and tr.text_b == df["hypothesis"].tolist()
    assert tr.labels == [1, 0, 1, 0]
    assert tr.ids == ["a1", "a2", "a3", "a4"]
    assert dv.ids == ["a4", "a3", "a2", "a1"] and dv.labels == [0, 1, 0, 1]


def test_given_label_names_fix_the_order_and_accept_integer_ids(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["positive", "negative", "1", "0"]})
    f = write(df, tmp_path / "t.csv")
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f), label_names=["positive", "negative"]))
    assert d.label_names == ["positive", "negative"] and d.num_labels == 2
    assert d.splits["train"].labels == [0, 1, 1, 0]


def test_integer_labels_in_json_are_inferred(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d", "e"], "label": [2, 0, 1, 2, 0]})
    f = write(df, tmp_path / "t.jsonl")
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f)))
    assert d.label_names == ["0", "1", "2"]
    assert d.splits["train"].labels == [2, 0, 1, 2, 0]


def test_label_outside_the_given_names_is_a_user_error(tmp_path):
    f = write(pd.DataFrame({"text": ["a", "b"], "label": ["pos", "meh"]}), tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"label 'meh' is not one of \['neg', 'pos'\]"):
        data.load(local_cfg(train_file=str(f), dev_file=str(f), label_names=["neg", "pos"]))


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_regression(tmp_path, ext):
    df = pd.DataFrame({"s1": ["a", "b", "c"], "s2": ["x", "y", "z"], "score": [0.5, 4.25, 3.0]})
    f = write(df, tmp_path / f"r.{ext}")
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f), text_fields=["s1", "s2"], label_field="score", regression=True))
    assert d.label_names is None and d.problem_type == "regression" and d.num_labels == 1
    assert d.metrics == ("pearson", "spearman")
    assert d.splits["train"].labels == [0.5, 4.25, 3.0]
    assert all(isinstance(v, float) for v in d.splits["validation"].labels)


def test_regression_labels_must_be_numbers(tmp_path):
    f = write(pd.DataFrame({"text": ["a"], "label": ["high"]}), tmp_path / "r.csv")
    with pytest.raises(UserError, match="regression labels must be numbers"):
        data.load(local_cfg(train_file=str(f), dev_file=str(f), regression=True))


def test_dev_carved_with_split_seed_is_deterministic_and_disjoint(tmp_path):
    df = reviews(100)
    f = write(df, tmp_path / "all.csv")
    a = data.load(local_cfg(train_file=str(f), text_fields=["review"], label_field="stars"))
    b = data.load(local_cfg(train_file=str(f), text_fields=["review"], label_field="stars"))
    c = data.load(local_cfg(train_file=str(f), text_fields=["review"], label_field="stars", split_seed=1))
    tr, dv = a.splits["train"], a.splits["validation"]
    assert (len(tr), len(dv)) == (90, 10)  # dev_fraction 0.1
    assert set(tr.text_a).isdisjoint(dv.text_a)
    assert sorted(tr.text_a + dv.text_a) == sorted(df["review"])
    # labels travel with their rows
    by_text = dict(zip(df["review"], df["stars"]))
    assert [a.label_names[y] for y in dv.labels] == [by_text[t] for t in dv.text_a]
    # rows keep the file's order inside each split
    pos = {t: i for i, t in enumerate(df["review"])}
    assert [pos[t] for t in tr.text_a] == sorted(pos[t] for t in tr.text_a)
    assert b.splits["validation"].text_a == dv.text_a and b.splits["train"].text_a == tr.text_a
    assert c.splits["validation"].text_a != dv.text_a


def test_dev_fraction(tmp_path):
    f = write(reviews(50), tmp_path / "all.csv")
    d = data.load(local_cfg(train_file=str(f), text_fields=["review"], label_field="stars", dev_fraction=0.3))
    assert (len(d.splits["train"]), len(d.splits["validation"])) == (35, 15)


def test_dev_file_is_used_when_given(tmp_path):
    df = reviews(30)
    train = write(df, tmp_path / "train.csv")
    dev_df = pd.DataFrame({"review": ["only dev A", "only dev B"], "stars": ["neg", "pos"]})
    dev = write(dev_df, tmp_path / "dev.tsv")
    d = data.load(local_cfg(train_file=str(train), dev_file=str(dev), text_fields=["review"], label_field="stars"))
    assert d.splits["train"].text_a == df["review"].tolist()  # nothing carved out
    assert d.splits["validation"].text_a == ["only dev A", "only dev B"]
    assert d.splits["validation"].labels == [0, 1]


def test_max_samples(tmp_path):
    df = reviews(30)
    train = write(df, tmp_path / "train.csv")
    d = data.load(local_cfg(train_file=str(train), dev_file=str(train), text_fields=["review"], label_field="stars",
                            max_train_samples=4, max_eval_samples=3))
    assert d.splits["train"].text_a == df["review"].tolist()[:4]
    assert len(d.splits["validation"]) == 3


def test_no_train_file_names_the_setting():
    with pytest.raises(UserError, match=r"dataset\.train_file=PATH"):
        data.load(local_cfg())


@pytest.mark.parametrize("which", ["train_file", "dev_file"])
def test_missing_file_names_the_path_and_the_setting(tmp_path, which):
    real = write(reviews(5), tmp_path / "real.csv")
    paths = {"train_file": str(real), "dev_file": str(real)}
    paths[which] = str(tmp_path / "nope.csv")
    with pytest.raises(UserError) as e:
        data.load(local_cfg(text_fields=["review"], label_field="stars", **paths))
    msg = str(e.value)
    assert "nope.csv" in msg and "not found" in msg
    assert f"dataset.{which}" in msg


def test_unknown_file_type_lists_the_known_ones(tmp_path):
    f = tmp_path / "data.xlsx"
    f.write_text("x")
    with pytest.raises(UserError) as e:
        data.load(local_cfg(train_file=str(f)))
    for ext in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        assert ext in str(e.value)


def test_missing_label_column_names_the_columns_and_the_setting(tmp_path):
    f = write(pd.DataFrame({"text": ["a", "b"], "sentiment": ["x", "y"]}), tmp_path / "t.csv")
    with pytest.raises(UserError) as e:
        data.load(local_cfg(train_file=str(f)))
    msg = str(e.value)
    assert "'label'" in msg and "'sentiment'" in msg and "dataset.label_field" in msg


def test_missing_text_column_names_the_columns_and_the_setting(tmp_path):
    f = write(pd.DataFrame({"sentence": ["a", "b"], "label": ["x", "y"]}), tmp_path / "t.csv")
    with pytest.raises(UserError) as e:
        data.load(local_cfg(train_file=str(f), dev_file=str(f)))
    msg = str(e.value)
    assert "['text']" in msg and "'sentence'" in msg and "dataset.text_fields" in msg


def test_missing_column_in_dev_file_names_the_dev_file(tmp_path):
    train = write(pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}), tmp_path / "train.csv")
    dev = write(pd.DataFrame({"text": ["a", "b"], "lbl": ["x", "y"]}), tmp_path / "dev.csv")
    with pytest.raises(UserError, match=r"dev\.csv: missing column\(s\) \['label'\]"):
        data.load(local_cfg(train_file=str(train), dev_file=str(dev)))


def test_three_text_fields_are_refused(tmp_path):
    f = write(pd.DataFrame({"a": ["x"], "b": ["y"], "c": ["z"], "label": ["0"]}), tmp_path / "t.csv")
    with pytest.raises(UserError, match="one or two columns"):
        data.load(local_cfg(train_file=str(f), dev_file=str(f), text_fields=["a", "b", "c"]))


@pytest.mark.parametrize("name, content", [
    ("broken.json", '[{"text": "a", "label": "x"}, {"text": '),
    ("broken.csv", 'text,label\n"an unclosed quote,x\nb,y\n'),
])
def test_unparseable_file_is_a_user_error(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        data.load(local_cfg(train_file=str(f)))


def test_unknown_metric_is_refused_before_training(tmp_path):
    f = write(pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}), tmp_path / "t.csv")
    with pytest.raises(UserError) as e:
        data.load(local_cfg(train_file=str(f), dev_file=str(f), metrics=["accuracy", "auc"]))
    msg = str(e.value)
    assert "'auc'" in msg and "accuracy" in msg and "f1" in msg and "matthews" in msg


def test_classification_metrics_are_kept(tmp_path):
    f = write(pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}), tmp_path / "t.csv")
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f), metrics=["f1", "matthews"]))
    assert d.metrics == ("f1", "matthews")


# ---- a CSV/TSV without a header row -------------------------------------------------------------------

@pytest.mark.parametrize("ext, sep", [("tsv", "\t"), ("csv", ",")])
def test_headerless_file_is_read_by_column_index(tmp_path, ext, sep):
    rows = [("1", f"a fine film number {i}", f"id{i}") if i % 2 else ("0", f"a dull film number {i}", f"id{i}") for i in range(6)]
    f = tmp_path / f"sst.{ext}"
    f.write_text("".join(sep.join(r) + "\n" for r in rows))
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f), header=False, text_fields=[1], label_field=0, id_field=2))
    tr = d.splits["train"]
    assert tr.text_a == [r[1] for r in rows]  # the first row is data, not column names
    assert d.label_names == ["0", "1"] and tr.labels == [int(r[0]) for r in rows]
    assert tr.ids == [r[2] for r in rows]


def test_headerless_sentence_pairs_and_row_numbers_as_ids(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("A man eats.\tSomeone eats.\tyes\nA dog runs.\tA cat sleeps.\tno\nIt rains.\tIt is wet.\tyes\n")
    d = data.load(local_cfg(train_file=str(f), dev_file=str(f), header=False, text_fields=[0, 1], label_field=2))
    tr = d.splits["train"]
    assert tr.text_a == ["A man eats.", "A dog runs.", "It rains."] and tr.text_b == ["Someone eats.", "A cat sleeps.", "It is wet."]
    assert tr.labels == [1, 0, 1] and tr.ids == [0, 1, 2]


# ---- the task's name -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel, expected", [
    ("sst2/train.tsv", "sst2"),  # a split's name says nothing: the folder's does
    ("sst2/dev.csv", "sst2"),
    ("imdb/train-00000-of-00001.parquet", "imdb"),
    ("data/Train.tsv.gz", "data"),
    ("corpora/reviews.csv", "reviews"),  # a file's own name, when it has one
    ("corpora/reviews.tsv.gz", "reviews"),
])
def test_task_name_from_the_file_or_its_folder(tmp_path, rel, expected):
    from peftkit.data import local

    assert local.task_name(local_cfg(train_file=str(tmp_path / rel))) == expected


def test_task_name_does_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    """`peftkit eval` from another folder must name the task as training did (its report's column)."""
    from peftkit.data import local

    train = tmp_path / "sst2" / "train.tsv"
    train.parent.mkdir()
    names = set()
    for cwd in (tmp_path, train.parent, tmp_path.parent):
        monkeypatch.chdir(cwd)
        names.add(local.task_name(local_cfg(train_file=str(train))))
    assert names == {"sst2"}
    monkeypatch.chdir(train.parent)
    assert local.task_name(local_cfg(train_file="train.tsv")) == "sst2"  # relative: the same file, the same name
    assert local.task_name(local_cfg(train_file="train.tsv", task_name="sentiment")) == "sentiment"


def test_loaded_task_is_named_by_task_name(tmp_path):
    (tmp_path / "sst2").mkdir()
    f = write(pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"]}), tmp_path / "sst2" / "train.csv")
    assert data.load(local_cfg(train_file=str(f), dev_file=str(f))).task == "sst2"
    assert data.load(local_cfg(train_file=str(f), dev_file=str(f), task_name="mine")).task == "mine"


# ---- a held-out test file --------------------------------------------------------------------------------

def test_test_file_is_a_labelled_split_beside_validation(tmp_path):
    df = reviews(30)
    train = write(df, tmp_path / "train.csv")
    test = write(pd.DataFrame({"review": [f"held out {i}" for i in range(9)], "stars": ["pos"] * 6 + ["neg"] * 3}), tmp_path / "test.jsonl")
    d = data.load(local_cfg(train_file=str(train), test_file=str(test), text_fields=["review"], label_field="stars", max_eval_samples=2))
    assert d.eval_splits == ["validation"] and d.held_out_splits == ["test"]  # scored, but never in the score that picks a step
    assert d.splits["test"].labels == [1] * 6 + [0] * 3 and d.splits["test"].text_a[0] == "held out 0"
    assert len(d.splits["validation"]) == 2 and len(d.splits["test"]) == 9  # scored in full
    assert set(d.splits["test"].text_a).isdisjoint(d.splits["train"].text_a + d.splits["validation"].text_a)


@pytest.mark.parametrize("same_as", ["train_file", "dev_file"])
def test_test_file_may_not_be_the_train_or_dev_file(tmp_path, same_as):
    f = write(reviews(10), tmp_path / "all.csv")
    dev = write(reviews(4), tmp_path / "dev.csv")
    paths = {"train_file": str(f), "dev_file": str(dev)}
    with pytest.raises(UserError) as e:
        data.load(local_cfg(**paths, test_file=paths[same_as].replace(str(tmp_path), str(tmp_path / ".")),
                            text_fields=["review"], label_field="stars"))
    assert f"is also dataset.{same_as}" in str(e.value) and "separate labelled file" in str(e.value)


def test_test_file_labels_must_be_known_classes(tmp_path):
    train = write(reviews(20), tmp_path / "train.csv")
    test = write(pd.DataFrame({"review": ["a", "b"], "stars": ["pos", "meh"]}), tmp_path / "test.csv")
    with pytest.raises(UserError, match=r"test\.csv: row 2: label 'meh' is not one of \['neg', 'pos'\]"):
        data.load(local_cfg(train_file=str(train), test_file=str(test), text_fields=["review"], label_field="stars"))


# ---- the schema: names with a header row, indexes without ----------------------------------------------

@pytest.mark.parametrize("overrides, needles", [
    (["dataset.text_fields=[1]", "dataset.label_field=0"], ["dataset.text_fields=[1]", "needs dataset.header=false"]),
    (["dataset.label_field=0"], ["dataset.label_field=0", "needs dataset.header=false", "dataset.label_field=label"]),
    (["dataset.header=false", "dataset.label_field=0"], ["dataset.text_fields=[text]", "header=false", "dataset.text_fields=[1]"]),
    (["dataset.header=false", "dataset.text_fields=[1]"], ["dataset.label_field=label", "dataset.label_field=0"]),
    (["dataset.header=false", "dataset.text_fields=[1]", "dataset.label_field=0", "dataset.id_field=uid"], ["dataset.id_field=uid"]),
    (["dataset.header=false", "dataset.text_fields=[1]", "dataset.label_field=-1"], ["dataset.label_field=-1", "index from 0"]),
    (["dataset.header=no"], ["dataset.header=no", "true or false"]),
    (["dataset.task_name=glue/sst2"], ["dataset.task_name=glue/sst2", "without spaces or '/'"]),
    (["dataset.task_name=''"], ["dataset.task_name=''"]),
    (["dataset.test_file=''"], ["dataset.test_file=''", "labelled data file"]),
])
def test_schema_refuses_columns_that_do_not_fit_the_header_setting(overrides, needles):
    from peftkit import config

    cfg = config.compose("quickstart", ["dataset=local", "dataset.train_file=reviews.csv", *overrides])
    with pytest.raises(UserError) as e:
        config.validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_schema_takes_indexes_with_header_false(tmp_path):
    from peftkit import config

    cfg = config.compose("quickstart", ["dataset=local", "dataset.train_file=reviews.tsv", "dataset.header=false",
                                        "dataset.text_fields=[1,2]", "dataset.label_field=0", "dataset.id_field=3",
                                        "dataset.task_name=sst2", f"dataset.test_file={tmp_path / 'test.tsv'}"])
    config.validate(cfg)
