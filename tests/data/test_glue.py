"""The GLUE reader: the real TSVs in ../shared/glue, and tiny files in the original layout for the rest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import GLUE_DIR, ROOT, needs_glue
from peftkit import data
from peftkit.errors import UserError


def glue_cfg(task: str, data_dir: Path | None, **extra):
    """The shipped configs/dataset/glue/<task>.yaml with data_dir (and any other field) set."""
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / "glue" / f"{task}.yaml")
    cfg.data_dir = str(data_dir) if data_dir is not None else None
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def naive_rows(path: Path, header: bool) -> tuple[list[str] | None, list[list[str]]]:
    """An independent reading of a GLUE TSV: one line is one row, fields split on tabs, no quoting."""
    text = path.read_text(encoding="utf-8")
    text = text.removeprefix("\ufeff")
    lines = [line for line in text.split("\n") if line != ""]
    rows = [line.split("\t") for line in lines]
    return (rows[0], rows[1:]) if header else (None, rows)


# task key, folder, official (train, dev) counts and label distributions from MANIFEST.md, as class ids
OFFICIAL = {
    "cola": ("CoLA", (8551, {0: 2528, 1: 6023}), (1043, {0: 322, 1: 721})),
    "sst2": ("SST-2", (67349, {0: 29780, 1: 37569}), (872, {0: 428, 1: 444})),
    "mrpc": ("MRPC", (3668, {0: 1194, 1: 2474}), (408, {0: 129, 1: 279})),
    # RTE's strings map to the Hub's order: entailment=0, not_entailment=1
    "rte": ("RTE", (2490, {0: 1249, 1: 1241}), (277, {0: 146, 1: 131})),
    "wnli": ("WNLI", (635, {0: 323, 1: 312}), (71, {0: 40, 1: 31})),
}


def _needs_file(folder: str, name: str):
    return pytest.mark.skipif(not (GLUE_DIR / folder / name).is_file(), reason=f"../shared/glue/{folder}/{name} is absent")


@needs_glue
@pytest.mark.parametrize("task", list(OFFICIAL))
def test_official_counts_and_label_distributions(task):
    folder, (n_train, train_dist), (n_dev, dev_dist) = OFFICIAL[task]
    if not (GLUE_DIR / folder / "train.tsv").is_file():
        pytest.skip(f"../shared/glue/{folder} is absent")
    d = data.load(glue_cfg(task, GLUE_DIR))
    assert list(d.splits) == ["train", "validation"]
    assert d.eval_splits == ["validation"]
    train, dev = d.splits["train"], d.splits["validation"]
    assert len(train) == n_train and len(dev) == n_dev
    assert dict(Counter(train.labels)) == train_dist
    assert dict(Counter(dev.labels)) == dev_dist
    assert d.problem_type == "single_label_classification" and d.num_labels == 2
    for sp in (train, dev):
        assert len(sp.ids) == len(sp.labels) == len(sp.text_a)
        assert (sp.text_b is None) == (task in ("cola", "sst2"))
        if sp.text_b is not None:
            assert len(sp.text_b) == len(sp)


@needs_glue
@pytest.mark.parametrize(
    "task, folder, header, text_cols, label_col, to_id",
    [
        ("cola", "CoLA", False, (3,), 1, int),
        ("sst2", "SST-2", True, ("sentence",), "label", int),
        ("mrpc", "MRPC", True, ("#1 String", "#2 String"), "Quality", int),
        ("rte", "RTE", True, ("sentence1", "sentence2"), "label", ["entailment", "not_entailment"].index),
        ("wnli", "WNLI", True, ("sentence1", "sentence2"), "label", int),
        ("stsb", "STS-B", True, ("sentence1", "sentence2"), "score", float),
    ],
)
@pytest.mark.parametrize("file", ["train", "dev"])
def test_rows_equal_an_independent_line_by_line_parse(task, folder, header, text_cols, label_col, to_id, file):
    """Every row, in order, with quotes and trailing spaces kept: nothing merged, dropped or re-quoted."""
    path = GLUE_DIR / folder / f"{file}.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    names, rows = naive_rows(path, header)
    col = (lambda c: names.index(c)) if header else (lambda c: c)
    d = data.load(glue_cfg(task, GLUE_DIR))
    sp = d.splits["train" if file == "train" else "validation"]
    assert sp.text_a == [r[col(text_cols[0])] for r in rows]
    if len(text_cols) == 2:
        assert sp.text_b == [r[col(text_cols[1])] for r in rows]
    assert sp.labels == [to_id(r[col(label_col)]) for r in rows]


@needs_glue
@_needs_file("MRPC", "train.tsv")
def test_mrpc_bom_header_and_quotes():
    assert (GLUE_DIR / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    d = data.load(glue_cfg("mrpc", GLUE_DIR))
    first = d.splits["train"]
    assert first.text_a[0] == 'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .'
    assert first.text_b[0].startswith('Referring to him as only " the witness " ,')
    assert first.labels[0] == 1
    assert d.label_names == ["not_equivalent", "equivalent"]
    assert d.metrics == ("f1", "accuracy")


def test_bom_header_in_a_tiny_mrpc(tmp_path):
    (tmp_path / "MRPC").mkdir()
    body = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tA b .\tA c .\n0\t13\t14\t\" x\ty \"\n"
    for f in ("train", "dev"):
        (tmp_path / "MRPC" / f"{f}.tsv").write_text(body, encoding="utf-8")
    sp = data.load(glue_cfg("mrpc", tmp_path)).splits["validation"]
    assert sp.labels == [1, 0]
    assert sp.text_a == ["A b .", '" x'] and sp.text_b == ["A c .", 'y "']


@needs_glue
@_needs_file("STS-B", "train.tsv")
def test_stsb_is_regression_with_float_labels():
    d = data.load(glue_cfg("stsb", GLUE_DIR))
    assert d.label_names is None and d.problem_type == "regression" and d.num_labels == 1
    assert d.metrics == ("pearson", "spearman")
    train, dev = d.splits["train"], d.splits["validation"]
    assert (len(train), len(dev)) == (5749, 1500)
    for sp, mean in ((train, 2.7010), (dev, 2.3639)):
        assert all(isinstance(v, float) for v in sp.labels)
        assert min(sp.labels) == 0.0 and max(sp.labels) == 5.0
        assert np.mean(sp.labels) == pytest.approx(mean, abs=5e-5)
    assert train.labels[0] == 5.0 and train.ids[0] == "0"


@needs_glue
@_needs_file("RTE", "train.tsv")
def test_rte_string_labels_map_to_hub_order():
    d = data.load(glue_cfg("rte", GLUE_DIR))
    assert d.label_names == ["entailment", "not_entailment"]
    sp = d.splits["train"]
    # row 0 of RTE train is not_entailment, row 1 entailment
    assert sp.labels[:2] == [1, 0]
    assert sp.ids[:3] == ["0", "1", "2"]


@needs_glue
@_needs_file("QNLI", "dev.tsv")
def test_qnli_dev_counts():
    d = data.load(glue_cfg("qnli", GLUE_DIR), splits=("validation",))
    assert list(d.splits) == ["validation"]
    dev = d.splits["validation"]
    assert len(dev) == 5463
    assert dict(Counter(dev.labels)) == {0: 2702, 1: 2761}  # entailment, not_entailment


@needs_glue
@_needs_file("RTE", "train.tsv")
def test_max_train_samples_keeps_the_first_rows():
    full = data.load(glue_cfg("rte", GLUE_DIR))
    cut = data.load(glue_cfg("rte", GLUE_DIR, max_train_samples=10, max_eval_samples=7))
    assert cut.splits["train"].text_a == full.splits["train"].text_a[:10]
    assert cut.splits["train"].labels == full.splits["train"].labels[:10]
    assert cut.splits["train"].ids == full.splits["train"].ids[:10]
    assert cut.splits["validation"].text_b == full.splits["validation"].text_b[:7]
    big = data.load(glue_cfg("rte", GLUE_DIR, max_train_samples=10**9))
    assert len(big.splits["train"]) == 2490


def test_glue_dir_from_environment(tmp_path, monkeypatch):
    _write(tmp_path / "QNLI" / "train.tsv", QNLI_HEADER, QNLI_ROWS)
    _write(tmp_path / "QNLI" / "dev.tsv", QNLI_HEADER, QNLI_ROWS[:1])
    monkeypatch.setenv("PEFTKIT_GLUE_DIR", str(tmp_path))
    d = data.load(glue_cfg("qnli", None))
    assert (len(d.splits["train"]), len(d.splits["validation"])) == (3, 1)


# ---- tasks absent from ../shared/glue, written in the original GLUE layout --------------------------

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:10], "label1", "label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER[:10]
QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QNLI_HEADER = ["index", "question", "sentence", "label"]
QNLI_ROWS = [
    ["0", "What came into force after the new constitution was herald?", "As of that day, the new constitution heralding the Second Republic came into force.", "entailment"],
    ["1", 'What is the first major city in the stream of the "Rhine?', "The most important tributaries in this area are the Ill below of Strasbourg.", "not_entailment"],
    ["2", "What is the minimum required if you want to teach in Canada?", "In most provinces a second Bachelor's Degree is required.", "not_entailment"],
]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def _mnli_row(i: int, s1: str, s2: str, labels: list[str], genre="fiction") -> list[str]:
    parse1, parse2 = f"( ( {s1} ) )", f"( ( {s2} ) )"
    return [str(i), str(1000 + i), f"{1000 + i}e", genre, parse1, parse2, f"(ROOT {parse1})", f"(ROOT {parse2})", s1, s2, *labels]


@pytest.fixture
def mnli_dir(tmp_path) -> Path:
    d = tmp_path / "MNLI"
    _write(d / "train.tsv", MNLI_TRAIN_HEADER, [
        _mnli_row(0, "Conceptually cream skimming has two basic dimensions.", "Product and geography are what make cream skimming work.", ["neutral", "neutral"]),
        _mnli_row(1, 'you know during the season and i guess at "your level', "You lose the things to the following level.", ["entailment", "entailment"]),
        _mnli_row(2, "One of our number will carry out your instructions.", "A member of my team will execute your orders.", ["entailment", "entailment"]),
        _mnli_row(3, "How do you know? All this is their information again.", "This information belongs to them.", ["contradiction", "contradiction"]),
    ])
    _write(d / "dev_matched.tsv", MNLI_DEV_HEADER, [
        _mnli_row(0, "The new rights are nice enough", "Everyone really likes the newest benefits", ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"]),
        _mnli_row(1, "This site includes a list of all award winners.", "The Government Executive articles housed on the website are not able to be searched.", ["contradiction"] * 6),
    ])
    _write(d / "dev_mismatched.tsv", MNLI_DEV_HEADER, [
        _mnli_row(0, "Your contribution helped make it possible for us to provide our students.", "Your contributions were of no help.", ["contradiction"] * 6, genre="letters"),
        _mnli_row(1, "The answer has nothing to do with their cause.", "Their cause is not related to the answer.", ["entailment"] * 6, genre="verbatim"),
        _mnli_row(2, "But a few Christian mystics held views.", "Christian mystics have views.", ["neutral"] * 6, genre="oup"),
    ])
    _write(d / "test_matched.tsv", MNLI_TEST_HEADER, [_mnli_row(0, "Hierbas, ans seco, ans dulce.", "Hierbas is a name.", [])])
    _write(d / "test_mismatched.tsv", MNLI_TEST_HEADER, [
        _mnli_row(0, "What have you decided?", "What have you chosen?", []),
        _mnli_row(1, "Yes, he said.", "He said no.", []),
    ])
    return tmp_path


def test_mnli_train_and_matched_mismatched_validation(mnli_dir):
    d = data.load(glue_cfg("mnli", mnli_dir))
    assert list(d.splits) == ["train", "validation_matched", "validation_mismatched"]
    assert d.eval_splits == ["validation_matched", "validation_mismatched"]
    assert d.label_names == ["entailment", "neutral", "contradiction"] and d.num_labels == 3
    train = d.splits["train"]
    assert train.labels == [1, 0, 0, 2]  # gold_label by name, not label1 nor a position
    assert train.text_a[1] == 'you know during the season and i guess at "your level'
    assert train.text_b[0] == "Product and geography are what make cream skimming work."
    assert d.splits["validation_matched"].labels == [1, 2]  # gold_label, not the first annotator's label
    assert d.splits["validation_mismatched"].labels == [2, 0, 1]
    assert d.splits["validation_mismatched"].text_a[2] == "But a few Christian mystics held views."
    assert d.splits["validation_mismatched"].ids == ["0", "1", "2"]


def test_mnli_max_eval_samples_cuts_both_validation_splits(mnli_dir):
    d = data.load(glue_cfg("mnli", mnli_dir, max_eval_samples=1, max_train_samples=2))
    assert [len(d.splits[s]) for s in ("train", "validation_matched", "validation_mismatched")] == [2, 1, 1]
    assert d.splits["validation_mismatched"].labels == [2]


def test_mnli_test_splits_have_ids_and_no_labels(mnli_dir):
    d = data.load(glue_cfg("mnli", mnli_dir), splits=("test",))
    assert list(d.splits) == ["test_matched", "test_mismatched"]
    assert d.eval_splits == []
    m, mm = d.splits["test_matched"], d.splits["test_mismatched"]
    assert m.labels is None and mm.labels is None
    assert m.ids == ["0"] and mm.ids == ["0", "1"]
    assert mm.text_a == ["What have you decided?", "Yes, he said."]
    assert mm.text_b == ["What have you chosen?", "He said no."]


def test_qqp(tmp_path):
    rows = [
        ["133273", "213221", "213222", "How is the life of a math student? Could you describe your own experiences?", "Which level of prepration is enough for the exam jlpt5?", "0"],
        ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?", "1"],
        ["360472", "364011", "490273", 'What causes stool color to change to "yellow?', "What can cause stool to come out as little balls?", "0"],
    ]
    _write(tmp_path / "QQP" / "train.tsv", QQP_HEADER, rows)
    _write(tmp_path / "QQP" / "dev.tsv", QQP_HEADER, rows[1:])
    _write(tmp_path / "QQP" / "test.tsv", ["id", "question1", "question2"], [["0", "Why do rockets look white?", "Why are rockets white?"]])
    d = data.load(glue_cfg("qqp", tmp_path))
    assert d.label_names == ["not_duplicate", "duplicate"] and d.metrics == ("f1", "accuracy")
    train = d.splits["train"]
    assert train.labels == [0, 1, 0]
    assert train.ids == ["133273", "402555", "360472"]  # the id column
    assert train.text_a[2] == 'What causes stool color to change to "yellow?'
    assert train.text_b[1] == "How do you control your horniness?"
    assert d.splits["validation"].labels == [1, 0]
    test = data.load(glue_cfg("qqp", tmp_path), splits=("test",)).splits["test"]
    assert test.labels is None and test.ids == ["0"] and test.text_b == ["Why are rockets white?"]


def test_qnli_train_and_test(tmp_path):
    _write(tmp_path / "QNLI" / "train.tsv", QNLI_HEADER, QNLI_ROWS)
    _write(tmp_path / "QNLI" / "dev.tsv", QNLI_HEADER, QNLI_ROWS[1:])
    _write(tmp_path / "QNLI" / "test.tsv", QNLI_HEADER[:3], [["0", "What organization is devoted to Jihad?", "For some decades prior to the First Palestine Intifada."]])
    d = data.load(glue_cfg("qnli", tmp_path))
    assert d.label_names == ["entailment", "not_entailment"]
    assert d.splits["train"].labels == [0, 1, 1]
    assert d.splits["train"].text_a[1] == 'What is the first major city in the stream of the "Rhine?'
    assert d.splits["validation"].labels == [1, 1]
    test = data.load(glue_cfg("qnli", tmp_path), splits=("test",)).splits["test"]
    assert test.labels is None and test.ids == ["0"] and test.text_a == ["What organization is devoted to Jihad?"]


def test_cola_test_split_has_a_header(tmp_path):
    """CoLA's train/dev have no header, but its test.tsv has `index<TAB>sentence`."""
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tBill whistled past the house.\n1\tThe car honked its way.\n")
    sp = data.load(glue_cfg("cola", tmp_path), splits=("test",)).splits["test"]
    assert sp.text_a == ["Bill whistled past the house.", "The car honked its way."]
    assert sp.ids == ["0", "1"] and sp.labels is None and sp.text_b is None


def test_stsb_test_split(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    _write(tmp_path / "STS-B" / "test.tsv", header, [["0", "main-captions", "MSRvid", "2012test", "0024", "none", "none", "A girl is styling her hair.", "A girl is brushing her hair."]])
    d = data.load(glue_cfg("stsb", tmp_path), splits=("test",))
    sp = d.splits["test"]
    assert sp.labels is None and sp.ids == ["0"] and sp.text_b == ["A girl is brushing her hair."]


@pytest.mark.parametrize("task, folder, missing", [("rte", "RTE", "train.tsv"), ("mnli", "MNLI", "dev_mismatched.tsv")])
def test_missing_file_names_the_expected_layout(tmp_path, mnli_dir, task, folder, missing):
    root = mnli_dir
    (root / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(UserError) as e:
        data.load(glue_cfg(task, root))
    msg = str(e.value)
    assert str(root / folder / missing) in msg
    assert "dataset.data_dir" in msg and "GLUE layout" in msg
    assert "/RTE/train.tsv" in msg and "/RTE/dev.tsv" in msg  # the layout, by example


def test_missing_label_column_is_a_user_error(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "gold"], [["0", "a", "b", "entailment"]])
    with pytest.raises(UserError, match="missing label column 'label'"):
        data.load(glue_cfg("rte", tmp_path), splits=("train",))


def test_unknown_label_string_is_a_user_error(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "a", "b", "neutral"]])
    with pytest.raises(UserError, match="label 'neutral' is not one of"):
        data.load(glue_cfg("rte", tmp_path), splits=("train",))


def test_without_data_dir_offline_says_to_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTKIT_GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        data.load(glue_cfg("rte", None))
    assert "dataset.data_dir" in str(e.value) and "PEFTKIT_GLUE_DIR" in str(e.value)
