"""`peftkit eval`: re-scoring a run from disk reproduces its training-time scores; split=test writes GLUE files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from _train_helpers import cli, copy_run, reference_run, report, train
from conftest import GLUE_DIR, needs_glue

SAME = "reproduces the training-time scores exactly"


def evaluate(run, *args, cwd):
    proc = cli("eval", f"run={run}", *args, cwd=cwd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_eval_reproduces_training_scores(tmp_path, tmp_path_factory, tiny_bert):
    run = copy_run(reference_run(tmp_path_factory, tiny_bert)[0], tmp_path / "run")
    before = report(run)
    out = evaluate(run, cwd=tmp_path)
    after = report(run)
    assert SAME in " ".join(out.split())
    assert after["metrics"] == before["metrics"] and after["score"] == before["score"]
    for k in ("best_step", "trainable_params", "trainable_pct", "method", "seed"):  # the rest of the report is kept
        assert after[k] == before[k], k


def test_eval_scores_the_adapter_on_disk(tmp_path, tmp_path_factory, tiny_bert):
    """A head biased to one class scores that class's share of dev, and eval says it differs."""
    from omegaconf import OmegaConf

    from peftkit import data

    run = copy_run(reference_run(tmp_path_factory, tiny_bert)[0], tmp_path / "run")
    labels = data.load(OmegaConf.load(run / "config.yaml").dataset).splits["validation"].labels
    assert len(labels) == 64
    trained = report(run)["score"]
    cls = next(c for c in (0, 1) if 100 * labels.count(c) / 64 != trained)  # a score training did not get
    f = run / "adapter" / "adapter.safetensors"
    tensors = load_file(str(f))
    tensors["classifier.bias"] = torch.tensor([1e4, -1e4] if cls == 0 else [-1e4, 1e4])
    save_file(tensors, str(f), metadata={"format": "pt"})

    out = evaluate(run, cwd=tmp_path)
    assert report(run)["metrics"]["validation"]["accuracy"] == pytest.approx(100 * labels.count(cls) / 64)
    assert "differs from the training-time scores" in " ".join(out.split())


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("rte")
    run = root / "run"
    train(root, f"backbone.path={tiny_bert}", "dataset=glue/rte", f"dataset.data_dir={GLUE_DIR}",
          "dataset.max_train_samples=128", "dataset.max_eval_samples=64", "trainer.max_steps=4",
          "trainer.batch_size=32", "seed=0", f"hydra.run.dir={run}")
    return run


@needs_glue
def test_eval_reproduces_glue_rte_scores(rte_run, tmp_path):
    run = copy_run(rte_run, tmp_path / "run")
    before = report(run)
    assert before["dataset"] == "glue/rte" and before["glue_average"] == before["score"]
    out = evaluate(run, cwd=tmp_path)
    assert SAME in " ".join(out.split())
    after = report(run)
    assert after["metrics"] == before["metrics"] and after["score"] == before["score"]


def rte_test_dir(tmp_path):
    """A GLUE folder whose RTE/test.tsv is dev.tsv without labels; returns it and the dev rows."""
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    dev = [line.split("\t") for line in (GLUE_DIR / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()]
    header, rows = dev[0], dev[1:]
    assert header == ["index", "sentence1", "sentence2", "label"] and all(len(r) == 4 for r in rows)
    (glue / "RTE" / "test.tsv").write_text("".join("\t".join(r[:3]) + "\n" for r in dev), encoding="utf-8")
    return glue, rows


@needs_glue
def test_report_assembles_glue_submission_from_best_runs(rte_run, tmp_path):
    """`peftkit report DIR submission=true`: the best RTE run predicts test; TSV, zip and a note on the rest."""
    import zipfile

    glue, rows = rte_test_dir(tmp_path)
    run = copy_run(rte_run, tmp_path / "sweep" / "run")
    proc = cli("report", str(tmp_path / "sweep"), "submission=true", f"data_dir={glue}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = tmp_path / "sweep" / "leaderboard"
    tsv = (board / "submission" / "RTE.tsv").read_text()
    assert tsv == (run / "eval" / "submission" / "RTE.tsv").read_text()  # the best run's own predictions
    assert len(tsv.splitlines()) == len(rows) + 1
    with zipfile.ZipFile(board / "submission.zip") as z:
        assert z.namelist() == ["RTE.tsv"] and z.read("RTE.tsv").decode() == tsv
    note = (board / "submission" / "README.md").read_text()
    assert "CoLA.tsv" in note and "AX.tsv" in note and "RTE.tsv" in note


@needs_glue
def test_report_submission_without_test_data_is_one_line_error(rte_run, tmp_path):
    copy_run(rte_run, tmp_path / "sweep" / "run")
    proc = cli("report", str(tmp_path / "sweep"), "submission=true", f"data_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "submission: rte" in proc.stderr and "test.tsv not found" in proc.stderr
    assert not (tmp_path / "sweep" / "leaderboard").exists()  # nothing half-written


@needs_glue
def test_eval_split_test_writes_glue_submission(rte_run, tmp_path):
    """dev.tsv without its labels as test.tsv: one `index<TAB>label name` row per example, in file order."""
    glue, rows = rte_test_dir(tmp_path)
    # The briefly trained tiny model predicts one class for every example. Shift the head's bias so
    # that half the examples fall on each side, then compare the file with predictions made here.
    run = copy_run(rte_run, tmp_path / "run")
    expected = _split_head_at_median(run, [r[1] for r in rows], [r[2] for r in rows])
    assert 0 < expected.count("entailment") < len(rows)
    before = (run / "eval" / "report.json").read_text()

    evaluate(run, "split=test", f"dataset.data_dir={glue}", cwd=tmp_path)
    lines = (run / "eval" / "submission" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    sub = [line.split("\t") for line in lines[1:]]
    assert [i for i, _ in sub] == [r[0] for r in rows]
    assert {p for _, p in sub} == {"entailment", "not_entailment"}
    agree = sum(p == e for (_, p), e in zip(sub, expected))
    assert agree >= len(rows) - 2, f"{len(rows) - agree} of {len(rows)} predictions differ"  # batches pad differently
    assert (run / "eval" / "report.json").read_text() == before  # split=test leaves the dev report alone


def _split_head_at_median(run, text_a: list[str], text_b: list[str]) -> list[str]:
    """Move the adapter's classifier bias so the logit margin is 0 at the median example; return the label names it predicts."""
    from omegaconf import OmegaConf

    from peftkit import model

    a, cfg = model.from_adapter(run / "adapter")
    enc = a.tokenizer(text_a, text_b, truncation=True, max_length=OmegaConf.load(run / "config.yaml").backbone.max_length,
                      padding=True, return_tensors="pt")
    a.model.eval()
    with torch.no_grad():
        logits = a.model(**enc).logits
    margin = (logits[:, 0] - logits[:, 1]).sort().values
    mid = float(margin[len(margin) // 2 - 1] + margin[len(margin) // 2]) / 2
    f = run / "adapter" / "adapter.safetensors"
    tensors = load_file(str(f))
    tensors["classifier.bias"] = tensors["classifier.bias"] + torch.tensor([-mid / 2, mid / 2])
    save_file(tensors, str(f), metadata={"format": "pt"})
    shifted = logits[:, 0] - logits[:, 1] - mid
    return [cfg["label_names"][0] if m >= 0 else cfg["label_names"][1] for m in shifted.tolist()]


def test_agreement_says_exactly_rounding_or_differs():
    """An ulp of float32 in a loss (a process's heap moves it on some CPUs) is not 'differs'; a real change is."""
    from peftkit.evaluate import agreement

    before = {"validation": {"loss": 10.359952926635742, "exact_match": 0.0}}
    assert "exactly" in agreement(before, {"validation": dict(before["validation"])})
    assert "up to float32 rounding" in agreement(before, {"validation": {"loss": 10.359951972961426, "exact_match": 0.0}})
    assert "differs" in agreement(before, {"validation": {"loss": 10.35, "exact_match": 0.0}})
    assert "differs" in agreement(before, {"validation": {"loss": 10.359952926635742, "exact_match": 1.0}})
    assert "differs" in agreement(before, {"validation": {"loss": 10.359952926635742}})
