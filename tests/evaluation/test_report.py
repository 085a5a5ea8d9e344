"""eval/report.{json,md} and GLUE-server submission files."""

from __future__ import annotations

import json

import pytest

from peftkit.evaluation import report


def a_report(**over) -> dict:
    r = {
        "dataset": "glue/mnli", "task": "mnli", "method": "lora", "backbone": "minilm", "recipe": "glue_lora",
        "seed": 42,
        "metrics": {"validation_matched": {"accuracy": 80.1234}, "validation_mismatched": {"accuracy": 81.0}},
        "score": 80.5617, "glue_average": 80.5617, "best_step": 300, "total_steps": 400,
        "trainable_params": 1234567, "total_params": 22713216, "trainable_pct": 5.43543,
        "train_time_s": 612.4, "eval_time_s": 30.0, "samples_per_s": 300.0, "peak_rss_mb": 1290.6,
        "precision": "fp32", "processes": 1,
    }
    return {**r, **over}


def test_write_puts_json_and_markdown_in_eval(tmp_path):
    r = a_report()
    report.write(tmp_path, r)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["report.json", "report.md"]  # no temp files
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == r
    md = (tmp_path / "eval" / "report.md").read_text()
    assert md.startswith("# glue/mnli · lora on minilm\n")
    assert "| validation_matched | accuracy | 80.12 |" in md
    assert "| validation_mismatched | accuracy | 81.00 |" in md
    assert "**mnli score: 80.56**" in md and "GLUE average over tasks present: 80.56" in md
    assert "| 1,234,567 | 5.435% | 300 | 612 s | 1291 MB |" in md


def test_markdown_without_glue_average(tmp_path):
    r = a_report(dataset="quickstart", task="rotten_tomatoes", glue_average=None, score=71.25,
                 metrics={"validation": {"accuracy": 71.25}})
    report.write(tmp_path, r)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "**score: 71.25**" in md and "GLUE average" not in md
    assert "| validation | accuracy | 71.25 |" in md


def test_write_replaces_a_previous_report(tmp_path):
    report.write(tmp_path, a_report(score=1.0))
    report.write(tmp_path, a_report(score=2.0))
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["score"] == 2.0
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["report.json", "report.md"]


def test_a_failed_write_leaves_the_previous_report_whole(tmp_path):
    report.write(tmp_path, a_report())
    before = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    with pytest.raises(TypeError):
        report.write(tmp_path, a_report(score=object()))  # not JSON-serialisable
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()} == before


# ---- how the kept step was chosen ---------------------------------------------------------------------------

def a_run(tmp_path, keep_best: bool = True, eval_steps=(0, 2, 4), cut: bool = False):
    """A run folder as training leaves it for the report: config.yaml and train_log.jsonl."""
    (tmp_path / "config.yaml").write_text(f"trainer:\n  keep_best: {str(keep_best).lower()}\n")
    log = [{"step": s, "loss": 0.5} for s in (1, 2, 3, 4)] + [{"step": s, "eval": {"validation": {"accuracy": 50.0}}, "score": 50.0}
                                                            for s in eval_steps]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + ('{"step": 6, "ev' if cut else ""))
    return tmp_path


@pytest.mark.parametrize("keep_best, steps, expected", [
    (True, (0, 2, 4), "validation"),  # two evaluations compared (step 0 is the base model, never kept)
    (True, (0, 4), None),  # one evaluation: nothing was chosen
    (False, (2, 4), None),  # the last step is kept, whatever it scores
])
def test_report_says_whether_its_score_chose_its_step(tmp_path, keep_best, steps, expected):
    r = a_report(dataset="local", task="reviews", glue_average=None, score=71.25, metrics={"validation": {"accuracy": 71.25}})
    report.write(a_run(tmp_path, keep_best, steps, cut=True), r)
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["selected_on"] == expected and "test_score" not in written
    md = (tmp_path / "eval" / "report.md").read_text()
    assert ("Step 300 was kept for its validation score, so that score is optimistic" in md) == (expected is not None)
    assert "dataset.test_file=PATH" in md or expected is None


def test_report_with_a_test_split_shows_both_scores(tmp_path):
    r = a_report(dataset="local", task="reviews", glue_average=None, score=71.25,
                 metrics={"validation": {"accuracy": 71.25, "f1": 70.0}, "test": {"accuracy": 64.0, "f1": 62.0}})
    report.write(a_run(tmp_path), r)
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["score"] == 71.25 and written["test_score"] == pytest.approx(63.0) and written["selected_on"] == "validation"
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| test | f1 | 62.00 |" in md and "**score: 71.25**" in md
    assert "**test score: 63.00**, on the held-out test file (dataset.test_file) with the adapter of step 300, chosen on validation" in md
    assert "optimistic" not in md


def test_a_multi_task_run_named_test_is_no_test_split(tmp_path):
    r = a_report(task="test+rte", metrics={"test": {"accuracy": 60.0}, "rte": {"accuracy": 50.0}}, task_scores={"test": 60.0, "rte": 50.0})
    report.write(a_run(tmp_path), r)
    assert "test_score" not in json.loads((tmp_path / "eval" / "report.json").read_text())


# ---- submissions -----------------------------------------------------------------------------------------

def read_tsv(path):
    lines = path.read_text().split("\n")
    assert lines[-1] == ""  # ends with a newline
    return [line.split("\t") for line in lines[:-1]]


@pytest.mark.parametrize("task, names", [
    ("MNLI-m", ["entailment", "neutral", "contradiction"]),
    ("QNLI", ["entailment", "not_entailment"]),
    ("RTE", ["entailment", "not_entailment"]),
])
def test_submission_with_label_names(tmp_path, task, names):
    preds = [0, len(names) - 1, 1, 0]
    path = report.write_submission(tmp_path / "submission", task, [10, 11, 12, 13], preds, names, as_names=True)
    assert path == tmp_path / "submission" / f"{task}.tsv"
    rows = read_tsv(path)
    assert rows[0] == ["index", "prediction"]
    assert rows[1:] == [[str(i), names[p]] for i, p in zip([10, 11, 12, 13], preds)]


@pytest.mark.parametrize("task", ["CoLA", "SST-2", "MRPC", "QQP", "WNLI"])
def test_submission_with_integer_ids(tmp_path, task):
    import numpy as np

    preds = np.array([1, 0, 0, 1])  # numpy ints, as predict() returns
    path = report.write_submission(tmp_path, task, ["0", "1", "2", "3"], list(preds), ["a", "b"], as_names=False)
    assert read_tsv(path) == [["index", "prediction"], ["0", "1"], ["1", "0"], ["2", "0"], ["3", "1"]]


def test_stsb_submission_floats_clipped_to_0_5(tmp_path):
    path = report.write_submission(tmp_path, "STS-B", [0, 1, 2, 3, 4], [-0.7, 2.34567, 5.8, 0.0, 4.9999], None, as_names=False)
    rows = read_tsv(path)
    assert rows[0] == ["index", "prediction"]
    values = [float(v) for _, v in rows[1:]]
    assert [i for i, _ in rows[1:]] == ["0", "1", "2", "3", "4"]
    assert values == pytest.approx([0.0, 2.346, 5.0, 0.0, 5.0], abs=1e-9)
    assert all(0.0 <= v <= 5.0 for v in values)


def test_submission_leaves_no_temp_files(tmp_path):
    report.write_submission(tmp_path, "RTE", [0], [1], ["entailment", "not_entailment"], as_names=True)
    report.write_submission(tmp_path, "RTE", [0], [0], ["entailment", "not_entailment"], as_names=True)
    assert [p.name for p in tmp_path.iterdir()] == ["RTE.tsv"]
    assert read_tsv(tmp_path / "RTE.tsv")[1] == ["0", "entailment"]
