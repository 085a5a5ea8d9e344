"""`peftkit report`: the leaderboard over fake run dirs (fast), and once over two real tiny runs."""

from __future__ import annotations

import csv
import io
import json
import statistics
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from peftkit.errors import UserError
from peftkit.evaluation import leaderboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = {"lora": {"name": "lora", "r": 8, "alpha": 16}, "ia3": {"name": "ia3", "target_modules": None}}
PARAMS = {"lora": 2626, "ia3": 354}
# score per (method, task, seed): hand-picked so means and stds are easy to check
SCORES = {
    ("lora", "rte", 0): 60.0, ("lora", "rte", 1): 64.0,
    ("lora", "mrpc", 0): 80.0, ("lora", "mrpc", 1): 82.0,
    ("ia3", "rte", 0): 55.0, ("ia3", "rte", 1): 57.0,
    ("ia3", "mrpc", 0): 70.0, ("ia3", "mrpc", 1): 76.0,
}


def make_run(d: Path, method: dict, task: str, seed: int, score: float | None, lr: float = 1e-3,
             adapter_bytes: int = 100) -> Path:
    """A run dir as `peftkit train` leaves it, minus the model: config, report, log, a fake adapter."""
    d.mkdir(parents=True)
    cfg = {"backbone": {"name": "minilm"}, "method": method, "dataset": {"name": f"glue/{task}"},
           "trainer": {"lr": lr, "max_steps": 4}, "seed": seed, "recipe": "glue_lora"}
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    (d / "eval").mkdir()
    if score is None:
        report = {"status": "failed", "error": "CUDA out of memory", "task": task, "method": method["name"]}
    else:
        n = PARAMS.get(method["name"], 1000)
        report = {"dataset": f"glue/{task}", "task": task, "method": method["name"], "backbone": "minilm",
                  "recipe": "glue_lora", "seed": seed, "metrics": {"validation": {"accuracy": score}},
                  "score": score, "best_step": 4, "total_steps": 4, "trainable_params": n,
                  "total_params": 1_000_000, "trainable_pct": 100 * n / 1_000_000, "train_time_s": 10.0 + seed,
                  "eval_time_s": 1.0, "samples_per_s": 50.0, "peak_rss_mb": 500.0 + 100 * seed,
                  "precision": "fp32", "processes": 1}
    (d / "eval" / "report.json").write_text(json.dumps(report))
    log = [{"step": s, "epoch": s / 4, "loss": 1.0 / s + seed, "lr": lr, "samples_per_s": 50.0, "elapsed_s": s}
           for s in (1, 2, 3, 4)] + [{"step": 4, "eval": {"validation": {"accuracy": score}}, "score": score}]
    (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 5, "lo')
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter.safetensors").write_bytes(b"x" * adapter_bytes)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    return d


@pytest.fixture
def sweep(tmp_path) -> Path:
    """2 methods × 2 tasks × 2 seeds, nested a level deep as Hydra sweeps are, plus one failed run."""
    root = tmp_path / "multirun"
    for i, ((m, task, seed), score) in enumerate(SCORES.items()):
        make_run(root / "day" / str(i), METHODS[m], task, seed, score, adapter_bytes=3000 if m == "lora" else 500)
    make_run(root / "day" / "failed", METHODS["lora"], "rte", 2, None)
    return root


def row(board: dict, label: str) -> dict:
    return next(r for r in board["rows"] if r["label"] == label)


def test_means_stds_average_and_failed(sweep):
    board = leaderboard.collect([sweep])
    assert board["tasks"] == ["mrpc", "rte"]
    assert [r["label"] for r in board["rows"]] == ["lora", "ia3"]  # best average first
    lora, ia3 = row(board, "lora"), row(board, "ia3")
    assert lora["scores"]["rte"]["mean"] == pytest.approx(62.0)
    assert lora["scores"]["rte"]["std"] == pytest.approx(statistics.stdev([60.0, 64.0]))  # 2.828: the failed run is out
    assert lora["scores"]["rte"]["n"] == 2 and len(lora["scores"]["rte"]["runs"]) == 2
    assert ia3["scores"]["mrpc"]["mean"] == pytest.approx(73.0)
    assert ia3["scores"]["mrpc"]["std"] == pytest.approx(4.242640687)
    assert lora["average"] == pytest.approx((62.0 + 81.0) / 2)
    assert ia3["average"] == pytest.approx((56.0 + 73.0) / 2)
    assert lora["trainable_params"] == 2626 and lora["trainable_pct"] == pytest.approx(0.2626)
    assert lora["adapter_bytes"] == 3002 and ia3["adapter_bytes"] == 502
    assert lora["train_time_s"] == pytest.approx(10.5) and lora["peak_rss_mb"] == pytest.approx(550.0)
    assert len(board["failed"]) == 1
    assert board["failed"][0]["error"] == "CUDA out of memory" and board["failed"][0]["dir"].endswith("failed")
    assert all("failed" not in d for r in board["rows"] for d in r["runs"])


def test_best_run_per_task(sweep):
    best = leaderboard.collect([sweep])["best"]
    assert best["rte"]["score"] == 64.0 and best["rte"]["label"] == "lora" and best["rte"]["dir"].endswith("/1")
    assert best["mrpc"]["score"] == 82.0 and best["mrpc"]["dir"].endswith("/3")


def test_labels_name_only_what_varies(tmp_path):
    make_run(tmp_path / "a", {"name": "lora", "r": 8, "alpha": 16}, "rte", 0, 60.0)
    make_run(tmp_path / "b", {"name": "lora", "r": 16, "alpha": 16}, "rte", 0, 61.0, lr=3e-4)
    make_run(tmp_path / "c", METHODS["ia3"], "rte", 0, 50.0, lr=1e-2)
    labels = sorted(r["label"] for r in leaderboard.collect([tmp_path])["rows"])
    # lr varies within lora, so lora's labels carry it; ia3 has one lr (its own), so its label does not
    assert labels == ["ia3", "lora r=16 lr=0.0003", "lora r=8 lr=0.001"]


def test_one_row_for_one_rate_whatever_the_method_yaml_said(tmp_path):
    """method.lr only names trainer.lr's default: a run that set trainer.lr=3e-3 while the YAML said
    1e-3, and one after the YAML said 3e-3, trained the same configuration, so they share a row."""
    make_run(tmp_path / "a", {"name": "lora", "r": 8, "lr": 1e-3}, "rte", 0, 60.0, lr=3e-3)
    make_run(tmp_path / "b", {"name": "lora", "r": 8, "lr": 3e-3}, "mrpc", 0, 80.0, lr=3e-3)
    rows = leaderboard.collect([tmp_path])["rows"]
    assert [(r["label"], sorted(r["scores"])) for r in rows] == [("lora", ["mrpc", "rte"])]


def test_an_option_left_off_before_it_was_removed_is_the_same_row(tmp_path):
    """Runs from before an option left the method (saved `train_pooler: false`) and after (no key)
    trained the same thing: one row. Set on (true), or to another value, it is a different row."""
    make_run(tmp_path / "a", {"name": "loreft", "r": 4, "train_pooler": False}, "rte", 0, 54.0)
    make_run(tmp_path / "b", {"name": "loreft", "r": 4}, "mrpc", 0, 81.0)
    rows = leaderboard.collect([tmp_path])["rows"]
    assert [(r["label"], sorted(r["scores"])) for r in rows] == [("loreft", ["mrpc", "rte"])]
    make_run(tmp_path / "c", {"name": "loreft", "r": 4, "train_pooler": True}, "rte", 0, 55.0)
    labels = sorted(r["label"] for r in leaderboard.collect([tmp_path])["rows"])
    assert labels == ["loreft train_pooler=False", "loreft train_pooler=True", "loreft train_pooler=null"]


def test_writes_every_format(sweep, tmp_path):
    out = leaderboard.run([sweep], tmp_path / "out")
    assert out == tmp_path / "out" / "leaderboard"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best_runs.md", "leaderboard.csv", "leaderboard.html", "leaderboard.json", "leaderboard.md",
                     "loss_curves.png", "score_vs_params.png", "scores.png"]  # and no temp files
    md = (out / "leaderboard.md").read_text()
    assert "| method | mrpc | rte | avg | trainable | adapter | train time | peak mem |" in md
    assert "| lora | 81.00 ± 1.41 | 62.00 ± 2.83 | 71.50 | 2,626 (0.263%) | 2.9 KB | 10 s | 550 MB |" in md
    assert "CUDA out of memory" in md
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert [r["label"] for r in rows] == ["lora", "ia3"]
    assert float(rows[1]["mrpc_mean"]) == pytest.approx(73.0) and float(rows[1]["average"]) == pytest.approx(64.5)
    assert rows[0]["trainable_params"] == "2626" and rows[0]["adapter_bytes"] == "3002"
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["tasks"] == ["mrpc", "rte"] and len(data["rows"]) == 2 and len(data["failed"]) == 1
    assert len(data["rows"][0]["scores"]["rte"]["runs"]) == 2 and data["best"]["rte"]["score"] == 64.0
    best_md = (out / "best_runs.md").read_text()
    assert "| rte | lora | 64.00 |" in best_md and "| mrpc | lora | 82.00 |" in best_md
    html = (out / "leaderboard.html").read_text()
    assert "<table id='leaderboard'>" in html and '<td data-v="81.0">81.00 ± 1.41</td>' in html and "<style>" in html
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script src" not in html  # self-contained
    for png in ("loss_curves.png", "score_vs_params.png", "scores.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)


def test_adapter_size_comes_from_the_report_once_the_adapter_is_gone(tmp_path):
    """A grid whose heavy adapters were deleted (or never copied back) still shows their size: the
    folder when it is there, else the size the run recorded in its report."""
    import shutil

    for task, size in (("rte", 3000), ("mrpc", 5000)):
        d = make_run(tmp_path / task, METHODS["lora"], task, 0, 60.0, adapter_bytes=size)
        rep = json.loads((d / "eval" / "report.json").read_text())
        (d / "eval" / "report.json").write_text(json.dumps({**rep, "adapter_bytes": size + 2}))  # + adapter_config.json
    shutil.rmtree(tmp_path / "mrpc" / "adapter")
    (tmp_path / "rte" / "adapter" / "extra.bin").write_bytes(b"x" * 10)  # the folder wins where it is there
    assert leaderboard.collect([tmp_path])["rows"][0]["adapter_bytes"] == ((3012) + (5002)) / 2


def test_read_losses_skips_eval_and_cut_lines(sweep):
    steps, losses = leaderboard.read_losses(sweep / "day" / "0")
    assert steps == [1, 2, 3, 4] and losses[0] == pytest.approx(1.0)


def test_missing_dir_and_no_runs(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        leaderboard.collect([tmp_path / "nope"])
    with pytest.raises(UserError, match="no runs with eval/report.json under"):
        leaderboard.collect([tmp_path])


def test_cli_report(sweep, tmp_path):
    proc = run_cli("report", str(sweep), cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "lora" in proc.stdout and "62.00 ± 2.83" in proc.stdout and "failed" in proc.stdout
    assert (sweep / "leaderboard" / "leaderboard.html").is_file()


def test_cli_report_out_and_help(sweep, tmp_path):
    proc = run_cli("report", str(sweep), "out=elsewhere", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "elsewhere" / "leaderboard" / "leaderboard.md").is_file()
    assert not (sweep / "leaderboard").exists()
    help_ = run_cli("report", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "usage: peftkit report DIR... [out=DIR]" in help_.stdout
    assert "report" in run_cli("--help", cwd=tmp_path).stdout


def test_cli_empty_dir_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("report", "empty", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["peftkit: error: no runs with eval/report.json under empty"]
    proc = run_cli("report", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_end_to_end_two_tiny_runs(tiny_bert, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli("train", "-m", "method=lora,ia3", "recipe=quickstart", f"backbone.path={tiny_bert}",
                   "trainer.max_steps=2", "trainer.eval_every=2", "dataset.max_train_samples=64",
                   "dataset.max_eval_samples=32", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_cli("report", str(tmp_path / "sweep"), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "sweep" / "leaderboard" / "leaderboard.json").read_text())
    assert sorted(r["label"] for r in data["rows"]) == ["ia3", "lora"]
    assert all(r["adapter_bytes"] > 0 and r["trainable_params"] > 0 for r in data["rows"])
    assert (tmp_path / "sweep" / "leaderboard" / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_scores_plot_shades_each_column_on_its_own_scale_and_marks_collapse():
    """CoLA's MCC (0-30 here) and SST-2's accuracy (80-90) each span the full shade range; the
    numbers are written in, a collapsed cell carries `!`, a missing one `–` (and so does the average
of a row that lacks a task: it compares with nothing)."""
    board = {"tasks": ["cola", "sst2"], "rows": [
        {"label": "lora", "scores": {"cola": {"mean": 29.1}, "sst2": {"mean": 85.0}}, "average": 57.05},
        {"label": "lokr", "scores": {"cola": {"mean": 0.0, "collapsed": 1}, "sst2": {"mean": 81.3}}, "average": 40.65},
        {"label": "vera", "scores": {"sst2": {"mean": 83.0}}, "average": 83.0},
    ]}
    fig = leaderboard.scores_figure(board)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["29.1", "85.0", "57.0", "0.0!", "81.3", "40.6", "–", "83.0", "–"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cola", "sst2", "avg"]
    shade = ax.images[0].get_array()
    assert shade[0, 0] == 1 and shade[1, 0] == 0 and shade[0, 1] == 1 and shade[1, 1] == 0  # each column its own range
    assert shade[2, 1] == pytest.approx((83.0 - 81.3) / (85.0 - 81.3)) and shade.mask[2, 0]  # vera has no CoLA
    one = leaderboard.scores_figure({"tasks": ["rte"], "rows": [{"label": "lora", "scores": {"rte": {"mean": 60.0}}, "average": 60.0}]})
    assert one.axes[0].images[0].get_array()[0, 0] == 0.5  # one score: no best or worst, mid shade, no avg column
    partial = {"tasks": ["cola", "sst2"], "rows": [board["rows"][2], {"label": "ia3", "scores": {"cola": {"mean": 9.0}}, "average": 9.0}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no row has both tasks: an empty avg column, and no "All-NaN slice" warning
        texts = [t.get_text() for t in leaderboard.scores_figure(partial).axes[0].texts]
    assert texts == ["–", "83.0", "–", "9.0", "–", "–"]
    nothing = leaderboard.scores_figure({"tasks": [], "rows": []})  # every run failed: a note, not a crash
    assert [t.get_text() for t in nothing.axes[0].texts] == ["no finished runs"]


def test_a_row_missing_tasks_goes_below_the_complete_ones_and_says_so(tmp_path):
    """A grid still running: ia3 has only RTE, at a score above lora's two-task average. Its average is
    over one task, so it is marked and ranked below lora, and the heat map leaves its avg cell empty."""
    make_run(tmp_path / "l1", METHODS["lora"], "rte", 0, 60.0)
    make_run(tmp_path / "l2", METHODS["lora"], "mrpc", 0, 70.0)
    make_run(tmp_path / "i1", METHODS["ia3"], "rte", 0, 90.0)
    board = leaderboard.collect([tmp_path])
    assert [(r["label"], r["tasks_scored"]) for r in board["rows"]] == [("lora", 2), ("ia3", 1)]
    md = leaderboard.to_markdown(board)
    assert "| lora | 70.00 | 60.00 | 65.00 |" in md and "| ia3 | – | 90.00 | 90.00 (1/2 tasks) |" in md
    texts = [t.get_text() for t in leaderboard.scores_figure(board).axes[0].texts]
    assert texts == ["70.0", "60.0", "65.0", "–", "90.0", "–"]


def test_loss_curves_name_each_row_once_in_one_legend(tmp_path):
    """A 12-row board on two tasks: one legend beside the plots (none inside them) naming each row
    once, in the board's order, and each row drawn alike in both subplots and unlike any other row."""
    for k in range(12):
        for task in ("mrpc", "rte"):
            make_run(tmp_path / str(k) / task, {"name": "lora", "r": k + 1, "alpha": 16}, task, 0, 60.0 + k)
    board = leaderboard.collect([tmp_path])
    fig = leaderboard.loss_curves_figure(board)
    assert len(fig.axes) == 2 and all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [r["label"] for r in board["rows"]]
    looks = [{line.get_label(): (line.get_color(), line.get_linestyle()) for line in ax.get_lines()} for ax in fig.axes]
    assert looks[0] == looks[1] and len(set(looks[0].values())) == 12


def test_score_vs_params_labels_never_overlap():
    """Methods that sit close on the plot (as on CoLA and SST-2: diablo, hydra_lora, pfeiffer,
    houlsby within a point and a factor of 4 in size) get labels whose boxes do not intersect."""
    near = [("diablo", 155138, 55.04), ("hydra_lora", 215810, 56.04), ("pfeiffer", 347970, 55.36),
            ("houlsby", 645570, 55.10), ("oft", 78146, 55.83), ("lora", 80642, 57.03), ("dora", 85634, 57.77),
            ("houlsby m=48", 490000, 55.15), ("lora r=16", 161282, 57.1)]
    board = {"rows": [{"label": n, "trainable_params": p, "average": a} for n, p, a in near]}
    fig = leaderboard.score_vs_params_figure(board)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == len(near)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "two labels overlap"
    axes_box = fig.axes[0].get_window_extent(renderer)
    assert all(axes_box.x0 <= b.x0 and b.x1 <= axes_box.x1 and axes_box.y0 <= b.y0 and b.y1 <= axes_box.y1 for b in boxes)


# ---- dev scores that chose their step, held-out test scores ----------------------------------------------

def test_an_old_report_is_marked_when_its_dev_split_chose_its_step(tmp_path):
    """Reports written before `selected_on`: the run's config (keep_best) and log (several evaluations) say it."""
    for i, (keep_best, evals) in enumerate(((True, (2, 4)), (True, (4,)), (False, (2, 4)))):
        d = make_run(tmp_path / str(i), METHODS["lora"], f"t{i}", 0, 60.0)
        cfg = OmegaConf.load(d / "config.yaml")
        cfg.trainer.keep_best = keep_best
        OmegaConf.save(cfg, d / "config.yaml")
        (d / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "eval": {}, "score": 60.0}) + "\n" for s in evals))
    board = leaderboard.collect([tmp_path])
    assert [board["rows"][0]["scores"][t]["optimistic"] for t in ("t0", "t1", "t2")] == [1, 0, 0]
    md = leaderboard.to_markdown(board)
    assert "| 60.00 * | 60.00 | 60.00 |" in md and "\\* a dev score of the step chosen on that same dev split" in md


def test_a_test_score_counts_where_a_run_has_one(tmp_path):
    for seed, test in ((0, 50.0), (1, None)):
        d = make_run(tmp_path / str(seed), METHODS["lora"], "rte", seed, 60.0 + seed)
        r = json.loads((d / "eval" / "report.json").read_text())
        r["selected_on"] = "validation"
        if test is not None:
            r.update(test_score=test, metrics={**r["metrics"], "test": {"accuracy": test}})
        (d / "eval" / "report.json").write_text(json.dumps(r))
    cell = leaderboard.collect([tmp_path])["rows"][0]["scores"]["rte"]
    assert cell["mean"] == pytest.approx((50.0 + 61.0) / 2) and (cell["on_test"], cell["optimistic"]) == (1, 1)
    best = leaderboard.collect([tmp_path])["best"]["rte"]
    assert best["score"] == 61.0 and "test_score" not in best  # the best run is chosen on its dev score


def test_one_task_name_over_different_train_files_is_a_warning(tmp_path, capsys):
    for i, folder in enumerate(("a", "b", "a")):
        d = make_run(tmp_path / str(i), METHODS["lora"], "train", i, 60.0)
        cfg = OmegaConf.load(d / "config.yaml")
        cfg.dataset = {"name": "local", "train_file": f"/data/{folder}/train.tsv"}
        OmegaConf.save(cfg, d / "config.yaml")
    leaderboard.collect([tmp_path])
    err = capsys.readouterr().err
    assert err.count("peftkit: warning:") == 1
    assert "task 'train' holds runs on 2 different train files (/data/a/train.tsv, /data/b/train.tsv)" in err and "dataset.task_name" in err
