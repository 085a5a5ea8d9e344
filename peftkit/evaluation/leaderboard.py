"""`peftkit report`: compare many runs in one leaderboard (Markdown, CSV, JSON, HTML, plots).

A row is a method configuration (method name plus the hyperparameters that differ between runs),
a column a task; a cell is the mean ± std of the task score over that configuration's seeds: a run's
held-out test score where it has one (dataset.test_file), else its dev score, marked `*` when the
same dev split chose the run's kept step (trainer.keep_best), which makes it optimistic.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from peftkit.config import changed_keys, method_options
from peftkit.errors import UserError
from peftkit.evaluation.report import FINISHED  # a collapsed run's score is real (the majority class's): averaged, its cell marked
from peftkit.files import atomic_dir, folder_bytes

OUT_NAME = "leaderboard"


@dataclass
class Run:
    """One run directory, read once: its report, its resolved config and its adapter's size."""

    dir: Path
    report: dict
    config: dict
    adapter_bytes: float = 0
    label: str = ""
    multitask: bool = False  # one task of a multi-task run (`per_task`)

    @property
    def failed(self) -> bool:
        """Failed, diverged, or unreadable: listed apart, never averaged."""
        return self.report.get("status", "ok") not in FINISHED or not isinstance(self.report.get("score"), (int, float))

    @property
    def task(self) -> str:
        return str(self.report.get("task") or self.report.get("dataset") or "?")

    @property
    def on_test(self) -> bool:
        return isinstance(self.report.get("test_score"), (int, float))

    @property
    def score(self) -> float:
        """What the leaderboard counts: the held-out test score where the run has one, else the dev score."""
        return float(self.report["test_score"] if self.on_test else self.report["score"])

    @property
    def optimistic(self) -> bool:
        """A dev score measured on the split that chose the kept step."""
        return not self.on_test and bool(self.report.get("selected_on"))


@dataclass
class Row:
    """One method configuration: its runs, grouped by task."""

    label: str
    method: str
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def all_runs(self) -> list[Run]:
        return [r for rs in self.runs.values() for r in rs]


# ---------------------------------------------------------------------------------------- collect


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every folder under `dirs` with eval/report.json and config.yaml, sorted by path for stable output."""
    for d in dirs:
        if not Path(d).is_dir():
            raise UserError(f"no such directory: {d}")
    seen, runs = set(), []
    for d in dirs:
        for rep in sorted(Path(d).rglob("eval/report.json")):
            run_dir = rep.parent.parent
            key = run_dir.resolve()
            if key in seen or not (run_dir / "config.yaml").is_file():
                continue
            seen.add(key)
            runs += per_task(read_run(run_dir))
    if not runs:
        raise UserError(f"no runs with eval/report.json under {', '.join(str(d) for d in dirs)}")
    return runs


def read_run(run_dir: Path) -> Run:
    """A run as the leaderboard needs it; an unreadable report or config counts as a failed run (with a
    one-line warning), not a crash: one damaged folder must not hide a sweep's leaderboard."""
    from peftkit import schema

    try:
        report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
        wrong = schema.file_problem(schema.ReportFile, report)
        if wrong:
            raise ValueError(wrong)
    except (ValueError, OSError) as e:
        report = {"status": "failed", "error": f"unreadable eval/report.json: {' '.join(str(e).split())}"}
    try:
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
        wrong = schema.file_problem(schema.RunConfigFile, config)
        if wrong:
            raise ValueError(wrong)
    except Exception as e:
        config = {}
        report = {**report, "status": "failed", "error": f"unreadable config.yaml: {' '.join(str(e).split())}"}
    if report.get("error", "").startswith("unreadable"):
        print(f"peftkit: warning: {run_dir}: {report['error']}; listed as failed", file=sys.stderr)
    elif "selected_on" not in report:  # a report written before reports said how their step was chosen
        from peftkit.evaluation.report import selection

        report = {**report, **selection(run_dir, report)}
    # the folder as it is now; the size the run recorded where the adapter was moved or deleted to save space
    recorded = report.get("adapter_bytes")
    size = folder_bytes(run_dir / "adapter") or (recorded if isinstance(recorded, int) else 0)
    return Run(run_dir, report, config, size)


def per_task(run: Run) -> list[Run]:
    """A multi-task run as one run per task, with that task's score and metrics, so its tasks fill
    the same columns as single-task runs (in a row of their own: `houlsby multi-task`). Trainable
    parameters and adapter size are per task: the run's divided by its number of tasks."""
    scores = run.report.get("task_scores")
    if run.failed or not isinstance(scores, dict) or not scores:
        return [run]
    n = len(scores)
    out = []
    for task, score in scores.items():
        def own(d: dict | None) -> dict:  # keyed `rte`, or `mnli/validation_matched`
            return {k: v for k, v in (d or {}).items() if k == task or k.startswith(task + "/")}

        report = {**run.report, "task": task, "score": score, "metrics": own(run.report.get("metrics"))}
        if report.get("status") == "collapsed":  # only the tasks that did
            report["status"] = "collapsed" if own(report.get("collapsed")) else "ok"
        if isinstance(report.get("trainable_params"), int):
            report["trainable_params"] = round(report["trainable_params"] / n)
        if isinstance(report.get("trainable_pct"), (int, float)):
            report["trainable_pct"] = report["trainable_pct"] / n
        out.append(Run(run.dir, report, run.config, run.adapter_bytes / n, multitask=True))
    return out


# ------------------------------------------------------------------------------------------ group


def _method_params(run: Run) -> dict:
    """The method's options (a run that set trainer.lr before its YAML's lr changed is the same
    configuration as one after)."""
    return method_options(run.config.get("method"))


def _lr(run: Run):
    return (run.config.get("trainer") or {}).get("lr")


def label_runs(runs: list[Run]) -> None:
    """Name each run's configuration by only what varies within its method, so labels stay short:
    `lora r=8`. Methods train at their own learning rates, so lr shows only where one method has several."""
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(method_name(r), []).append(r)
    for name, group in by_method.items():
        distinct = list({repr(sorted(p.items())): p for p in map(_method_params, group)}.values())
        varying = sorted(set().union(*(changed_keys(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:])))
        lr_varies = len({repr(_lr(r)) for r in group}) > 1
        for r in group:
            parts = [name] + [f"{k}={_fmt_value(_method_params(r).get(k))}" for k in varying]
            if lr_varies:
                parts.append(f"lr={_fmt_value(_lr(r))}")
            r.label = " ".join(parts)


def method_name(run: Run) -> str:
    name = str((run.config.get("method") or {}).get("name") or run.report.get("method") or "?")
    return f"{name} multi-task" if run.multitask else name


def _fmt_value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "null" if v is None else str(v)


def build_rows(runs: list[Run]) -> list[Row]:
    """One row per configuration, best average first, each holding its finished runs per task."""
    rows: dict[str, Row] = {}
    for r in runs:
        if r.failed:
            continue
        row = rows.setdefault(r.label, Row(r.label, method_name(r)))
        row.runs.setdefault(r.task, []).append(r)
    tasks = len({t for row in rows.values() for t in row.runs})
    return sorted(rows.values(), key=lambda row: _average_key(row, tasks))


def _average_key(row: Row, tasks: int) -> tuple[int, float]:
    """Best average first: a leaderboard reads top-down. A row missing tasks (a grid still running, a
    failed run) goes below the complete ones: its average is over other tasks, not comparable."""
    means = [statistics.fmean(r.score for r in rs) for rs in row.runs.values()]
    return tasks - len(means), -statistics.fmean(means)


# ------------------------------------------------------------------------------------------ stats


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n-1); std is None for a single seed, where it means nothing."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def _mean_of(runs: list[Run], key: str) -> float | None:
    vals = [r.report[key] for r in runs if isinstance(r.report.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def lm_dev_loss(run: Run) -> float | None:
    """A causal-LM run's mean response-token loss over its dev splits (its report has perplexities)."""
    splits = [m for m in (run.report.get("metrics") or {}).values() if isinstance(m, dict) and "perplexity" in m]
    losses = [m["loss"] for m in splits if isinstance(m.get("loss"), (int, float))]
    return statistics.fmean(losses) if losses else None


def row_record(row: Row, tasks: list[str]) -> dict:
    """All numbers of one row, plus the run dirs behind each cell so any value can be traced."""
    cells = {}
    for task in tasks:
        runs = row.runs.get(task)
        if not runs:
            continue
        m, s = mean_std([r.score for r in runs])
        cells[task] = {"mean": m, "std": s, "n": len(runs), "runs": [str(r.dir) for r in runs],
                       "on_test": sum(r.on_test for r in runs), "optimistic": sum(r.optimistic for r in runs),
                       "collapsed": sum(r.report.get("status") == "collapsed" for r in runs)}
        losses = [x for x in map(lm_dev_loss, runs) if x is not None]
        if losses:  # a causal LM's reply scores sit at the floor long before its loss stops falling
            cells[task]["loss"] = statistics.fmean(losses)
    everything = row.all_runs()
    first = everything[0].report
    return {
        "label": row.label,
        "method": row.method,
        "scores": cells,
        "average": statistics.fmean(c["mean"] for c in cells.values()) if cells else None,
        "tasks_scored": len(cells),  # the average is over these; fewer than the board's tasks: not comparable
        "trainable_params": first.get("trainable_params"),
        "trainable_pct": first.get("trainable_pct"),
        "adapter_bytes": round(statistics.fmean(r.adapter_bytes for r in everything)),
        "train_time_s": _mean_of(everything, "train_time_s"),
        "peak_rss_mb": _mean_of(everything, "peak_rss_mb"),
        "runs": [str(r.dir) for r in everything],
    }


def best_runs(runs: list[Run]) -> dict[str, dict]:
    """The highest-scoring finished run per task: the one to ship or re-evaluate. Chosen on the dev
    score, never the test score (choosing on it would make the test score a dev score too)."""
    best: dict[str, Run] = {}
    for r in runs:
        if not r.failed and (r.task not in best or r.report["score"] > best[r.task].report["score"]):
            best[r.task] = r
    return {t: {"label": r.label, "score": r.report["score"], "seed": r.report.get("seed"), "dir": str(r.dir),
                "dataset": r.report.get("dataset"), **({"test_score": r.score} if r.on_test else {})}
            for t, r in sorted(best.items())}


def warn_mixed_data(runs: list[Run]) -> None:
    """A task column averages its runs as seeds of one task: runs on different train files under one
    task name (every train.tsv was task `train` before dataset.task_name) get a warning."""
    files: dict[str, set] = {}
    for r in runs:
        f = (r.config.get("dataset") or {}).get("train_file")
        if not r.failed and not r.multitask and f:
            files.setdefault(r.task, set()).add(str(f))
    for task, fs in sorted(files.items()):
        if len(fs) > 1:
            shown = sorted(fs)
            print(f"peftkit: warning: task '{task}' holds runs on {len(fs)} different train files ({', '.join(shown[:3])}"
                  f"{', ...' if len(fs) > 3 else ''}), averaged as one task; train each with its own dataset.task_name=NAME",
                  file=sys.stderr)


def collect(dirs: list[Path]) -> dict:
    """The whole leaderboard as plain data: what every writer below renders."""
    runs = find_runs([Path(d) for d in dirs])
    warn_mixed_data(runs)
    label_runs(runs)
    rows = build_rows(runs)
    tasks = sorted({r.task for r in runs if not r.failed})
    return {
        "tasks": tasks,
        "rows": [row_record(row, tasks) for row in rows],
        "best": best_runs(runs),
        "failed": [{"dir": str(r.dir), "label": r.label, "task": r.task, "error": r.report.get("error", ""),
                    "status": r.report.get("status", "failed")} for r in runs if r.failed],
        "_rows": rows,  # for the loss plot; dropped before writing JSON
    }


# ---------------------------------------------------------------------------------------- format


def human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def fmt_cell(cell: dict | None) -> str:
    if not cell:
        return "–"
    text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
    return (text + (f" (loss {cell['loss']:.3f})" if "loss" in cell else "") + (" *" if cell.get("optimistic") else "")
            + (f" (collapsed {cell['collapsed']}/{cell['n']})" if cell.get("collapsed") else ""))


def fmt_average(row: dict, tasks: int) -> str:
    """The row's average, with how many tasks it covers when that is not all of them."""
    n = row.get("tasks_scored", tasks)
    return _num(row["average"], ".2f") + (f" ({n}/{tasks} tasks)" if row["average"] is not None and n < tasks else "")


SCORED = "A run with a held-out test file (dataset.test_file) counts with its test score, not its dev score."
OPTIMISTIC = ("* a dev score of the step chosen on that same dev split (trainer.keep_best), so optimistic; "
              "a held-out test file (dataset.test_file) gives an unbiased score.")


def any_optimistic(board: dict) -> bool:
    return any(c.get("optimistic") for r in board["rows"] for c in r["scores"].values())


def _num(v, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def table(board: dict) -> tuple[list[str], list[list[str]]]:
    """Header and display rows shared by Markdown, HTML and the terminal table."""
    header = ["method", *board["tasks"], "avg", "trainable", "adapter", "train time", "peak mem"]
    body = []
    for r in board["rows"]:
        body.append([
            r["label"], *[fmt_cell(r["scores"].get(t)) for t in board["tasks"]], fmt_average(r, len(board["tasks"])),
            f"{_num(r['trainable_params'], ',')} ({_num(r['trainable_pct'], '.3f', '%')})",
            human_bytes(r["adapter_bytes"]), _num(r["train_time_s"], ".0f", " s"), _num(r["peak_rss_mb"], ".0f", " MB"),
        ])
    return header, body


def to_markdown(board: dict) -> str:
    header, body = table(board)
    lines = ["# Leaderboard", "", "Task scores: mean ± std over seeds (sample std). " + SCORED + " Causal-LM tasks: the mean reply "
             "metric (exact match, answer accuracy, ...), with the mean dev response-token loss in brackets.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if any_optimistic(board):
        lines += ["", "\\" + OPTIMISTIC]
    if board["failed"]:
        lines += ["", "## Failed runs", ""] + [f"- `{f['dir']}` ({f['label']}): {f['status']}: {f['error']}" for f in board["failed"]]
    return "\n".join(lines) + "\n"


def best_markdown(board: dict) -> str:
    lines = ["# Best run per task", "", "| task | method | score | seed | run |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {b['label']} | {b['score']:.2f}{_test_note(b)} | {b['seed']} | `{b['dir']}` |" for t, b in board["best"].items()]
    return "\n".join(lines) + "\n"


def _test_note(best: dict) -> str:
    return f" (test {best['test_score']:.2f})" if "test_score" in best else ""


def to_csv(board: dict) -> str:
    """Plain numbers, one column per statistic, for spreadsheets and pandas."""
    header = ["method", "label"]
    for t in board["tasks"]:
        header += [f"{t}_mean", f"{t}_std", f"{t}_n", f"{t}_loss"]
    header += ["average", "trainable_params", "trainable_pct", "adapter_bytes", "train_time_s", "peak_rss_mb"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in board["rows"]:
        line = [r["method"], r["label"]]
        for t in board["tasks"]:
            c = r["scores"].get(t) or {}
            line += [c.get("mean", ""), "" if c.get("std") is None else c["std"], c.get("n", 0), c.get("loss", "")]
        line += [r[k] if r[k] is not None else "" for k in
                 ("average", "trainable_params", "trainable_pct", "adapter_bytes", "train_time_s", "peak_rss_mb")]
        w.writerow(line)
    return buf.getvalue()


def to_json(board: dict) -> str:
    return json.dumps({k: v for k, v in board.items() if not k.startswith("_")}, indent=2) + "\n"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f0f0f0;cursor:pointer}th[data-sorted=asc]::after{content:" ▲"}th[data-sorted=desc]::after{content:" ▼"}td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#fafafa}
img{max-width:100%;margin:1em 0;border:1px solid #eee}.failed{color:#b00}"""


SORT_JS = """
function sortTable(col, asc) {
  const table = document.getElementById('leaderboard'), body = table.tBodies[0];
  const key = tr => { const v = tr.cells[col].dataset.v; return v === '' ? null : (isNaN(v) ? v : Number(v)); };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  // empty cells last, either way
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
  rows.forEach(r => body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => th.dataset.sorted = i === col ? (asc ? 'asc' : 'desc') : '');
  history.replaceState(null, '', '#sort=' + encodeURIComponent(table.tHead.rows[0].cells[col].textContent) + (asc ? ':asc' : ''));
}
document.addEventListener('DOMContentLoaded', () => {
  const heads = Array.from(document.getElementById('leaderboard').tHead.rows[0].cells);
  heads.forEach((th, i) => th.addEventListener('click', () => sortTable(i, i === 0 ? th.dataset.sorted !== 'asc' : th.dataset.sorted === 'desc')));
  const m = decodeURIComponent(location.hash).match(/^#sort=([^:]+)(:asc)?$/);  // a shared link keeps its order
  const col = m ? heads.findIndex(th => th.textContent === m[1]) : -1;
  if (col >= 0) sortTable(col, !!m[2]);
});
window.addEventListener('load', () => {  // a plot that did not load is said, not left as a blank box
  const broken = Array.from(document.images).filter(img => !img.complete || img.naturalWidth === 0);
  if (broken.length) document.getElementById('warnings').textContent = 'plots that did not load: ' + broken.map(i => i.alt).join(', ');
});
"""


def sort_values(board: dict) -> list[list]:
    """Each displayed row's cells as the numbers they show (score means, parameters, bytes, seconds,
    MB), for sorting in the page: '2.9 KB' must sort above '850 B'."""
    out = []
    for r in board["rows"]:
        scores = [(r["scores"].get(t) or {}).get("mean") for t in board["tasks"]]
        out.append([r["label"], *scores, r["average"], r["trainable_params"], r["adapter_bytes"], r["train_time_s"], r["peak_rss_mb"]])
    return out


def to_html(board: dict, images: dict[str, bytes]) -> str:
    """One self-contained page (inline CSS and script, plots as base64 data URIs, no external assets):
    the leaderboard first (click a column to sort; `#sort=avg` in the address keeps an order),
    then the plots, the best run per task and the failed runs."""
    from html import escape

    header, body = table(board)
    th = "".join(f"<th title='click to sort'>{escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f'<td data-v="{escape("" if v is None else str(v))}">{escape(c)}</td>' for c, v in zip(row, keys))
                  + "</tr>" for row, keys in zip(body, sort_values(board)))
    best = "".join(f"<tr><td>{escape(t)}</td><td>{escape(b['label'])}</td><td>{b['score']:.2f}</td>"
                   f"<td>{escape(b['dir'])}</td></tr>" for t, b in board["best"].items())
    imgs = "".join(f'<h2>{escape(name)}</h2><img alt="{escape(name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}">' for name, png in images.items())
    failed = "".join(f'<li class="failed">{escape(f["dir"])}: {escape(f["status"])}: {escape(str(f["error"]))}</li>'
                     for f in board["failed"])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>peftkit leaderboard</title>"
            f"<style>{CSS}</style><script>{SORT_JS}</script></head><body><h1>Leaderboard</h1>"
            f"<p>Task scores: mean ± std over seeds. {escape(SCORED)} Click a column to sort.</p><p id='warnings' class='failed'></p>"
            f"<table id='leaderboard'><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
            + (f"<p>{escape(OPTIMISTIC)}</p>" if any_optimistic(board) else "") + f"{imgs}"
            f"<h2>Best run per task</h2><table><tr><th>task</th><th>method</th><th>score</th><th>run</th></tr>{best}</table>"
            + (f"<h2>Failed runs</h2><ul>{failed}</ul>" if failed else "") + "</body></html>\n")


# ------------------------------------------------------------------------------------------ plots


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_vs_params_figure(board: dict):
    """The PEFT trade-off: how much score each method buys per trainable parameter. Labels are
    placed by adjustText so methods that sit close (hydra_lora, pfeiffer, houlsby) stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(r["trainable_params"], r["average"], r["label"]) for r in board["rows"]
              if r["trainable_params"] and r["average"] is not None]
    for x, y, _ in points:
        ax.scatter(x, y, s=40)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)  # room for the labels at the edges
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("average score")
    ax.set_title("score vs trainable parameters")
    ax.grid(True, alpha=0.3)
    texts = [ax.text(x, y, label, fontsize=9) for x, y, label in points]
    if len(texts) > 1:
        adjust_text(texts, ax=ax, x=[p[0] for p in points], y=[p[1] for p in points], ensure_inside_axes=True,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    return fig


def plot_score_vs_params(board: dict) -> bytes:
    return _png(score_vs_params_figure(board))


def scores_figure(board: dict):
    """Every row on every task at a glance, for boards too large to read as a table (a method grid):
    each column shaded from its lowest score to its highest (CoLA's MCC and SST-2's accuracy live on
    different scales), the number written in, and a cell with a collapsed run marked `!`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, rows = board["tasks"], board["rows"]
    if not rows:  # every run failed or diverged: they are listed apart, nothing to shade
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center")
        return fig
    columns = [*tasks, "avg"] if len(tasks) > 1 else list(tasks)
    values = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        for j, t in enumerate(tasks):
            if t in r["scores"]:
                values[i, j] = r["scores"][t]["mean"]
        if len(columns) > len(tasks) and len(r["scores"]) == len(tasks):  # a partial average compares with nothing
            values[i, -1] = r["average"]
    low, high = np.full(len(columns), np.nan), np.full(len(columns), np.nan)
    scored = ~np.isnan(values).all(axis=0)  # "avg" is empty when no row has every task
    low[scored], high[scored] = np.nanmin(values[:, scored], axis=0), np.nanmax(values[:, scored], axis=0)
    shade = np.where(high > low, (values - low) / np.where(high > low, high - low, 1.0), 0.5)
    fig, ax = plt.subplots(figsize=(2.5 + 1.0 * len(columns), 1.2 + 0.3 * len(rows)))
    ax.imshow(np.ma.masked_invalid(shade), cmap="RdYlGn", vmin=-0.3, vmax=1.3, aspect="auto")  # no darkest ends: the numbers stay legible
    for i, r in enumerate(rows):
        for j, col in enumerate(columns):
            collapsed = col in r["scores"] and r["scores"][col].get("collapsed")
            text = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}" + ("!" if collapsed else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight="bold" if collapsed else "normal")
    ax.set_xticks(range(len(columns)), columns)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel("each column shaded from its lowest to its highest score; ! a run collapsed to one prediction (or nearly, in regression)")
    return fig


def plot_scores(board: dict) -> bytes:
    return _png(scores_figure(board))


def read_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from train_log.jsonl, skipping eval records and lines cut short."""
    steps, losses = [], []
    path = Path(run_dir) / "train_log.jsonl"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, ValueError) as e:  # not text: no curve for this run, and a word why
        print(f"peftkit: warning: {run_dir}: unreadable train_log.jsonl ({' '.join(str(e).split())}); its loss curve is left out",
              file=sys.stderr)
        text = ""
    if text:
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "loss" in rec and "step" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    return steps, losses


def loss_curves_figure(board: dict):
    """Training loss per task (one subplot each), one line per method row: its first run on that task.
    A row keeps its colour and line style in every subplot, and one legend beside them names each row
    once, so a board of 30 methods stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = board["tasks"] or ["?"], board["_rows"]
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    look = {row.label: {"color": palette(i % palette.N), "linestyle": ("-", "--", ":")[i // palette.N % 3]}
            for i, row in enumerate(rows)}
    columns = 1 + len(rows) // 18
    legend_in = 0.4 + 0.055 * max((len(row.label) for row in rows), default=0) * columns  # room for the legend: no squeezed axes
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + legend_in, 3.5), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        for row in rows:
            runs = row.runs.get(task)
            if runs:
                steps, losses = read_losses(runs[0].dir)
                if steps:
                    ax.plot(steps, losses, marker="." if len(steps) < 20 else None, label=row.label, **look[row.label])
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
    drawn = {line.get_label(): line for ax in axes[0] for line in ax.get_lines()}
    if drawn:
        labels = [row.label for row in rows if row.label in drawn]  # the board's order: best average first
        fig.legend([drawn[x] for x in labels], labels, loc="outside right upper", fontsize="small", ncol=columns)
    return fig


def plot_loss_curves(board: dict) -> bytes:
    return _png(loss_curves_figure(board))


# ------------------------------------------------------------------------------------------ write


# what `write` puts in out/leaderboard/: the folder is replaced whole, so it may hold nothing else
FILES = {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "leaderboard.html", "best_runs.md",
         "score_vs_params.png", "scores.png", "loss_curves.png", "submission", "submission.zip"}


def check_target(out: Path, key: str) -> None:
    """Before any work: out/leaderboard/ can be written, and replacing it loses none of the user's files."""
    from peftkit.files import check_writable, resolved

    target = resolved(Path(out) / OUT_NAME, key)
    check_writable(target, "output folder", key)
    if target.is_dir():
        ours = FILES if _written_by_report(target) else set()  # by content: a file of yours may have one of our names
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
        if foreign:
            raise UserError(f"{target} holds files peftkit did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); a report replaces that folder whole: "
                            f"move them away, or write the leaderboard elsewhere with out=DIR")


def _written_by_report(folder: Path) -> bool:
    """The folder is an earlier report's: its leaderboard.json is what `to_json` writes."""
    try:
        board = json.loads((folder / "leaderboard.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(board, dict) and {"tasks", "rows", "best", "failed"} <= board.keys()


def write(board: dict, out: Path, submission_files: dict[str, Path] | None = None) -> Path:
    """Everything into out/leaderboard/ in one atomic rename: readers never see a half-built folder."""
    from peftkit.evaluation import submission

    images = {"score_vs_params.png": plot_score_vs_params(board), "scores.png": plot_scores(board),
              "loss_curves.png": plot_loss_curves(board)}
    target = Path(out) / OUT_NAME
    with atomic_dir(target) as tmp:
        (tmp / "leaderboard.md").write_text(to_markdown(board), encoding="utf-8")
        (tmp / "leaderboard.csv").write_text(to_csv(board), encoding="utf-8")
        (tmp / "leaderboard.json").write_text(to_json(board), encoding="utf-8")
        (tmp / "leaderboard.html").write_text(to_html(board, images), encoding="utf-8")
        (tmp / "best_runs.md").write_text(best_markdown(board), encoding="utf-8")
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        if submission_files:
            submission.write(submission_files, tmp)
    return target


def print_table(board: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    header, body = table(board)
    t = Table(title="peftkit leaderboard")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in body:
        t.add_row(*row)
    console = Console()
    console.print(t)
    if any_optimistic(board):
        console.print(escape(OPTIMISTIC), highlight=False)
    for f in board["failed"]:
        console.print(f"[red]{f['status']}[/red] {escape(f['dir'])}: {escape(str(f['error']))}", highlight=False)


def run(dirs: list[Path], out: Path | None = None, submission: bool = False, data_dir: str | None = None) -> Path:
    """`peftkit report`: collect, print, write; returns the leaderboard folder.

    `submission`: the best run of each GLUE task predicts its test split for a GLUE-server zip.
    """
    from peftkit.evaluation import submission as glue_submission

    if not dirs:
        raise UserError("peftkit report needs at least one DIR (see peftkit report --help)")
    out = Path(out) if out else Path(dirs[0])
    check_target(out, "out")
    board = collect(dirs)
    print_table(board)
    files = glue_submission.predict_best(board, data_dir) if submission else None
    target = write(board, out, files)
    print(f"wrote {target}")
    return target
