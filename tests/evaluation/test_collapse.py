"""Collapse: a kept adapter that predicts one class (or one number) for every dev example is
reported as `collapsed`, with a hint, never as a plain `ok` (issue 17). Forced through the CLI with
a dataset whose texts are all the same: no model can tell its examples apart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _train_helpers import cli, report
from peftkit.evaluation.scoring import collapse


def test_collapse_by_hand():
    assert collapse(np.array([1, 1, 1, 1]), ["neg", "pos"]) == "predicts 'pos' for all 4 examples"
    assert collapse(np.array([1, 0, 1, 1]), ["neg", "pos"]) is None
    assert collapse(np.array([2.5, 2.5, 2.5]), None) == "predicts 2.5 for all 3 examples"
    assert collapse(np.array([2.5, 2.5, 2.51]), None) is None  # a narrow spread is still a spread: the metrics judge it
    assert collapse(np.array([1]), ["neg", "pos"]) is None  # one example tells nothing


def test_a_regression_output_nearly_constant_against_the_labels_spread_is_collapsed():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # STS-B's scale: spread 1.71
    narrow = np.array([2.5, 2.55, 2.45, 2.6, 2.4, 2.5])  # spread 0.065: under a tenth of the labels'
    why = collapse(narrow, None, labels)
    assert why is not None and why.startswith("predicts 2.5 ± 0.065 for all 6 examples") and "(1.7)" in why
    assert collapse(narrow * 3 - 5, None, labels) is None  # spread 0.19: a weak model, not a collapsed one; the metrics judge it
    assert collapse(narrow, None, labels * 0.05) is None  # against labels as narrow, it is a real spread
    assert collapse(narrow, None, np.full(6, 3.0)) is None  # labels with no spread: nothing to compare with


@pytest.fixture(scope="module")
def same_text_run(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("collapse")
    rows = ["text,label"] + [f"the same words every time,{'pos' if i % 3 else 'neg'}" for i in range(60)]
    (root / "same.csv").write_text("\n".join(rows) + "\n")
    proc = cli("train", "recipe=quickstart", "dataset=local", f"dataset.train_file={root / 'same.csv'}", "dataset.dev_fraction=0.25",
               f"backbone.path={tiny_bert}", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=8",
               f"hydra.run.dir={root / 'run'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", proc


def test_a_collapsed_run_says_so_in_the_report_the_log_and_the_console(same_text_run):
    run, proc = same_text_run
    r = report(run)
    assert r["status"] == "collapsed" and set(r["collapsed"]) == {"validation"}
    assert "collapsed to one prediction" in r["error"] and "try a lower trainer.lr" in r["error"]
    assert "**collapsed**" in (run / "eval" / "report.md").read_text()
    evals = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and all("collapsed" in e for e in evals)
    assert "collapsed on validation" in proc.stderr
    assert (run / "adapter" / "adapter.safetensors").is_file()  # the adapter is kept: the report says what it is


def test_eval_keeps_the_verdict_and_the_leaderboard_marks_the_cell(same_text_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(same_text_run[0], run)
    proc = cli("eval", f"run={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report(run)["status"] == "collapsed"
    proc = cli("report", str(run), f"out={tmp_path / 'board'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "board" / "leaderboard" / "leaderboard.md").read_text()
    assert "(collapsed 1/1)" in md and "Failed runs" not in md  # scored and averaged, and marked


def test_a_multi_task_run_marks_only_the_tasks_that_collapsed(tmp_path):
    from peftkit.evaluation.leaderboard import Run, per_task

    rep = {"status": "collapsed", "score": 60.0, "task_scores": {"rte": 50.0, "mrpc": 70.0},
           "metrics": {"rte": {"accuracy": 50.0}, "mrpc": {"f1": 80.0, "accuracy": 60.0}},
           "collapsed": {"rte": "predicts 'entailment' for all 277 examples"}, "trainable_params": 100}
    runs = {r.task: r for r in per_task(Run(tmp_path, rep, {"method": {"name": "houlsby"}}))}
    assert runs["rte"].report["status"] == "collapsed" and runs["mrpc"].report["status"] == "ok"
    assert not runs["rte"].failed  # scored, averaged, marked


class _Accel:
    """What predict needs of an Accelerator, in one process."""
    device, process_index, num_processes, is_main_process = __import__("torch").device("cpu"), 0, 1, True

    def unwrap_model(self, m):
        return m

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


class _Split:
    lengths = [5, 3, 4, 2, 6]

    def __len__(self):
        return 5

    def batch(self, idx):
        import torch

        return {"x": torch.tensor(idx, dtype=torch.float32)}


class _Net(__import__("torch").nn.Module):
    def forward(self, x):
        import types

        import torch

        assert torch.is_inference_mode_enabled()  # no autograd bookkeeping while scoring
        return types.SimpleNamespace(logits=x.unsqueeze(-1))  # one output: a regression head


@pytest.mark.parametrize("after, shown", [(0.0, True), (1e9, False)])
def test_predictions_keep_the_split_order_and_a_long_eval_shows_a_bar(monkeypatch, after, shown):
    from rich.progress import Progress

    from peftkit.evaluation import scoring

    started = []
    monkeypatch.setattr(scoring, "SHOW_AFTER_S", after)
    monkeypatch.setattr(Progress, "start", lambda self: started.append(True))
    preds = scoring.predict(_Accel(), _Net(), _Split(), 2, regression=True)
    assert preds.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # batched longest first, returned in order
    assert bool(started) == shown


def test_scoring_judges_a_regression_split_against_its_own_labels():
    """`score` hands each split's labels to the detector: 2.5 + 0.01·i against labels 0..4 is flagged."""
    import types

    from peftkit.evaluation import scoring

    class Near(_Net):
        def forward(self, x):
            return types.SimpleNamespace(logits=(2.5 + 0.01 * x).unsqueeze(-1))

    split = _Split()
    split.labels = [0.0, 1.0, 2.0, 3.0, 4.0]
    task = types.SimpleNamespace(label_names=None, eval_splits=["validation"], held_out_splits=[], metrics=("pearson",))
    result = scoring.score(_Accel(), Near(), task, {"validation": split}, 2)
    assert result["collapsed"]["validation"].startswith("predicts 2.52 ± 0.014 for all 5 examples")
    assert "collapsed" not in scoring.score(_Accel(), _Net(), task, {"validation": split}, 2)  # 0..4 against 0..4
