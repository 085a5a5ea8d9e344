"""dataset=local through the CLI: headerless files, tasks named by their folders in one leaderboard,
and a held-out test file scored beside (never in) the score that chooses the kept step."""

from __future__ import annotations

import json

import pytest

from _train_helpers import check, cli, read_log, report, tiny

WORDS = {"1": ["fine", "great", "moving", "sharp"], "0": ["dull", "flat", "tired", "slow"]}


def rows(n: int, seed: int, positive_share: float = 0.5) -> list[tuple[str, str]]:
    """(label, sentence) pairs; the label's words make it learnable."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "1" if rng.random() < positive_share else "0"
        out.append((label, f"a {rng.choice(WORDS[label])} film, scene {i} and {rng.choice(WORDS[label])} acting"))
    return out


def headerless(path, n: int, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows(n, seed)))
    return path


def leaderboard_of(root, cwd) -> tuple[dict, str]:
    proc = cli("report", str(root), cwd=cwd)
    check(proc, "peftkit report")
    out = root / "leaderboard"
    return json.loads((out / "leaderboard.json").read_text()), (out / "leaderboard.md").read_text()


def test_three_train_tsv_in_three_folders_are_three_tasks(tmp_path, tiny_bert):
    """SST-2-style `label<TAB>sentence` files without a header, each called train.tsv: each run is named
    by its folder, and `peftkit report` shows three columns, not one task averaged over three datasets."""
    files = [headerless(tmp_path / task / "train.tsv", 60, seed) for seed, task in enumerate(("sst", "cola", "rte"))]
    sweep = tmp_path / "sweep"
    proc = cli("train", "-m", *tiny(tiny_bert, "dataset=local", "dataset.header=false", "dataset.text_fields=[1]", "dataset.label_field=0",
                                     f"dataset.train_file={','.join(map(str, files))}", "dataset.dev_fraction=0.2",
                                     "trainer.batch_size=16", "trainer.max_steps=4", "trainer.eval_every=2",
                                     f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    check(proc, "peftkit train -m")
    runs = {report(d)["task"]: d for d in sweep.iterdir() if (d / "eval" / "report.json").is_file()}
    assert sorted(runs) == ["cola", "rte", "sst"]
    for task, run in runs.items():
        r = report(run)
        assert r["dataset"] == "local" and r["metrics"].keys() == {"validation"}
        assert r["selected_on"] == "validation" and "test_score" not in r  # two evaluations, the best kept: chosen on dev
        assert "so that score is optimistic" in (run / "eval" / "report.md").read_text()
        assert f"{task} score" in proc.stdout + proc.stderr  # the eval lines name the task, not 'train'
    board, md = leaderboard_of(sweep, tmp_path)
    assert board["tasks"] == ["cola", "rte", "sst"]
    (row,) = board["rows"]
    for task in board["tasks"]:
        cell = row["scores"][task]
        assert cell["n"] == 1 and cell["mean"] == pytest.approx(report(runs[task])["score"]) and cell["optimistic"] == 1
    table_row = next(line for line in md.splitlines() if line.startswith("| lora"))
    assert table_row.count(" *") == 3  # each dev score marked (tiny models may also read "(collapsed 1/1)")
    assert "\\* a dev score of the step chosen on that same dev split" in md  # ...and the mark explained


def test_test_file_is_scored_with_the_kept_adapter_and_counts_on_the_leaderboard(tmp_path, tiny_bert):
    data = tmp_path / "reviews"
    data.mkdir()
    for name, n, seed, share in (("train", 120, 1, 0.5), ("dev", 24, 2, 0.5), ("test", 30, 3, 0.8)):
        (data / f"{name}.csv").write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for lab, t in rows(n, seed, share)))
    run = tmp_path / "run"
    proc = cli("train", *tiny(tiny_bert, "dataset=local", f"dataset.train_file={data / 'train.csv'}", f"dataset.dev_file={data / 'dev.csv'}",
                              f"dataset.test_file={data / 'test.csv'}", "trainer.batch_size=16", "trainer.max_steps=6",
                              "trainer.eval_every=2", f"hydra.run.dir={run}"), cwd=tmp_path)
    check(proc, "peftkit train")
    r = report(run)
    assert r["task"] == "reviews" and list(r["metrics"]) == ["validation", "test"]
    dev, test = r["metrics"]["validation"]["accuracy"], r["metrics"]["test"]["accuracy"]
    assert dev != test  # (80% positive test rows against 50% dev: else the next line could not tell)
    assert r["score"] == pytest.approx(dev)  # chosen on validation alone: the test split never enters the score
    assert r["test_score"] == pytest.approx(test) and r["selected_on"] == "validation"
    _, evals = read_log(run)
    assert [e["step"] for e in evals] == [2, 4, 6]
    kept = next(e for e in evals if e["step"] == r["best_step"])
    assert kept["eval"]["test"] == r["metrics"]["test"]  # the test score is the kept adapter's
    assert max(e["score"] for e in evals) == r["score"] and all(e["score"] == pytest.approx(e["eval"]["validation"]["accuracy"]) for e in evals)
    md = (run / "eval" / "report.md").read_text()
    assert "| test | accuracy |" in md and f"**test score: {test:.2f}**" in md and "optimistic" not in md

    proc = cli("eval", f"run={run}", cwd=tmp_path)  # re-scoring reads the test file again and reproduces both
    check(proc, "peftkit eval")
    assert "reproduces the training-time scores exactly" in proc.stdout
    assert report(run)["test_score"] == r["test_score"]

    board, md = leaderboard_of(run, tmp_path)
    cell = board["rows"][0]["scores"]["reviews"]
    assert cell["mean"] == pytest.approx(test) and cell["on_test"] == 1 and cell["optimistic"] == 0
    assert "counts with its test score" in md and "\\* a dev score" not in md
    assert board["best"]["reviews"]["score"] == pytest.approx(dev) and board["best"]["reviews"]["test_score"] == pytest.approx(test)


@pytest.mark.parametrize("args, needles", [
    ([], ["sst/train.tsv: missing column(s) ['text', 'label']; its first row looks like data",
          "read it with dataset.header=false dataset.text_fields=[1] dataset.label_field=0"]),
    (["dataset.text_fields=[1]", "dataset.label_field=0"], ["dataset.text_fields=[1]: a column index needs dataset.header=false"]),
    (["dataset.header=false", "dataset.text_fields=[2]", "dataset.label_field=0"],
     ["sst/train.tsv: dataset.text_fields asks for column 2, but the file has 2 column(s)"]),
    (["dataset.header=false", "dataset.text_fields=[1]", "dataset.label_field=0", "dataset.test_file=sst/train.tsv"],
     ["dataset.test_file=", "is also dataset.train_file"]),
])
def test_bad_column_settings_are_one_line_and_exit_2_with_nothing_written(tmp_path, tiny_bert, args, needles):
    headerless(tmp_path / "sst" / "train.tsv", 30, 0)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = cli("train", *tiny(tiny_bert, "dataset=local", "dataset.train_file=sst/train.tsv", *args), cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("peftkit: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_dry_run_reads_the_data_as_the_run_would_and_sizes_the_head_to_its_labels(tmp_path, tiny_bert):
    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(f'"{t}",{"abc"[i % 3]}\n' for i, (_, t) in enumerate(rows(30, 0))))
    proc = cli("train", *tiny(tiny_bert, "dataset=local", "dataset.train_file=revews.csv"), "--dry-run", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "set dataset.train_file=PATH" in lines[0], proc.stderr
    proc = cli("train", *tiny(tiny_bert, "dataset=local", "dataset.train_file=reviews.csv"), "--dry-run", cwd=tmp_path)
    check(proc, "peftkit train --dry-run")
    head = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("classifier"))
    assert head.split()[-1] == "99" and "sized for 2 labels" not in proc.stdout  # 32 x 3 + 3: the file's three classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.csv"]


def test_a_class_named_like_a_missing_value_is_warned_of(tmp_path, tiny_bert):
    labels = ["1", "0", "NaN"]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(f'"{t}",{labels[i % 3]}\n' for i, (_, t) in enumerate(rows(30, 0))))
    proc = cli("train", *tiny(tiny_bert, "dataset=local", "dataset.train_file=reviews.csv"), "--dry-run", cwd=tmp_path)
    check(proc, "peftkit train --dry-run")
    assert "10 row(s) have the label 'NaN' in column 'label' (the first is row 3), which reads like a missing value" in proc.stderr
    assert "dataset.label_names=[...,'NaN']" in proc.stderr
    proc = cli("train", *tiny(tiny_bert, "dataset=local", "dataset.train_file=reviews.csv", "dataset.label_names=[0,1,'NaN']"),
               "--dry-run", cwd=tmp_path)
    check(proc, "peftkit train --dry-run")
    assert "missing value" not in proc.stderr  # declared: a real class
