"""`eval/report.json` and `eval/report.md`, and GLUE-server submission files."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.files import atomic_write_json, atomic_write_text


def write(run_dir: Path, report: dict) -> None:
    report = {**report, **selection(run_dir, report)}
    out = Path(run_dir) / "eval"
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", to_markdown(report))


def selection(run_dir: Path, r: dict) -> dict:
    """How far to trust a report's score. `selected_on`: the split whose score chose the kept step among
    several evaluations (trainer.keep_best), so that score is optimistic; null when nothing was chosen
    (one evaluation, or keep_best=false: the last step); absent when the run folder has no config.yaml.
    `test_score`: the mean of the held-out test split's metrics (dataset.test_file), which chose nothing."""
    from peftkit.evaluation.metrics import task_score

    out = {}
    test = None if r.get("task_scores") else (r.get("metrics") or {}).get("test")  # multi-task: keys are tasks
    if isinstance(test, dict) and test and all(isinstance(v, (int, float)) for v in test.values()):
        out["test_score"] = task_score({"test": test})
    try:
        from omegaconf import OmegaConf

        keep_best = OmegaConf.load(Path(run_dir) / "config.yaml").trainer.keep_best is True
    except Exception:  # no config (a merge's output) or not a run's: say nothing
        return out
    out["selected_on"] = "validation" if keep_best and len(eval_steps(run_dir)) > 1 else None
    return out


def eval_steps(run_dir: Path) -> set[int]:
    """The steps whose evaluation could be kept (train_log.jsonl; step 0 is trainer.eval_before's base model)."""
    steps = set()
    try:
        lines = (Path(run_dir) / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return steps
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short
            continue
        if isinstance(rec, dict) and "eval" in rec and isinstance(rec.get("step"), int) and rec["step"] > 0:
            steps.add(rec["step"])
    return steps


def write_failed(run_dir: Path, cfg, error: str) -> None:
    """A sweep's crashed run still gets a report: marked failed, with the reason."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    r = {"status": "failed", "error": error, "dataset": cfg.dataset.name, "method": cfg.method.name,
         "backbone": cfg.backbone.name, "recipe": cfg.get("recipe"), "seed": cfg.seed}
    out = run_dir / "eval"
    atomic_write_json(out / "report.json", r)
    atomic_write_text(out / "report.md", f"# {r['dataset']} · {r['method']} on {r['backbone']}\n\n**failed**: {error}\n")


FINISHED = ("ok", "collapsed")  # trained to the end and scored; `collapsed`: its kept adapter predicts one thing


def _num(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def to_markdown(r: dict) -> str:
    metric_rows = [
        f"| {split} | {name} | {_num(value)} |" for split, ms in r["metrics"].items() for name, value in ms.items()
    ]
    status = [] if r.get("status", "ok") == "ok" else [f"**{r['status']}**: {r.get('error', '')}", ""]
    if r.get("task_scores"):  # a multi-task run
        summary = (f"**score: {_num(r.get('score'))}** (the mean of its task scores: "
                   + " · ".join(f"{t} {_num(v)}" for t, v in r["task_scores"].items()) + ")")
    elif r.get("glue_average") is not None:
        summary = (f"**{r['task']} score: {_num(r['score'])}** (mean of its metrics) · GLUE average over tasks present: "
                   f"{_num(r['glue_average'])}")
    else:
        summary = f"**score: {_num(r.get('score'))}**"
    step = "the kept adapter" if r.get("best_step") is None else f"the adapter of step {r['best_step']}"
    if r.get("test_score") is not None:
        chosen = f", chosen on {r['selected_on']}" if r.get("selected_on") else ""
        held_out = [f"**test score: {_num(r['test_score'])}**, on the held-out test file (dataset.test_file) with {step}{chosen}; "
                    "no choice saw it.", ""]
    elif r.get("selected_on"):
        held_out = [f"Step {r.get('best_step')} was kept for its {r['selected_on']} score, so that score is optimistic: the split "
                    "that chose the step also reports it (a held-out split, dataset.test_file=PATH for local data, gives an unbiased one).", ""]
    else:
        held_out = []
    lines = [
        f"# {r['dataset']} · {r['method']} on {r['backbone']}",
        "",
        *status,
        f"| {'task' if r.get('task_scores') else 'split'} | metric | score |",
        "|---|---|---|",
        *metric_rows,
        "",
        summary,
        "",
        *held_out,
        "| trainable params | % of total | best step | train time | peak RSS |",
        "|---|---|---|---|---|",
        f"| {r['trainable_params']:,} | {r['trainable_pct']:.3f}% | {'–' if r.get('best_step') is None else r['best_step']} | "
        f"{r.get('train_time_s', 0):.0f} s | {r.get('peak_rss_mb', 0):.0f} MB |",
        "",
        *samples_markdown(r.get("samples")),
    ]
    return "\n".join(lines)


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def samples_markdown(samples: dict | None) -> list[str]:
    """A causal LM's sample generations: the end of the prompt, the reply, the gold answer."""
    if not samples:
        return []
    lines = ["## Sample generations", "", "| split | prompt (its end) | reply | gold |", "|---|---|---|---|"]
    for split, xs in samples.items():
        lines += [f"| {split} | …{_cell(x['prompt'][-120:])} | {_cell(x['reply'])} | {_cell(x['gold'])} |" for x in xs]
    return lines + [""]


def write_test(run_dir: Path, r: dict) -> None:
    """`peftkit eval split=test` on a causal LM: the test sets' scores beside (never over) the dev report."""
    out = Path(run_dir) / "eval"
    atomic_write_json(out / "test_report.json", r)
    names = sorted({k for ms in r["metrics"].values() for k in ms})
    lines = [f"# {r['dataset']} · {r['method']} on {r['backbone']} · test sets", "",
             "| set | examples | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {split.removeprefix('test_')} | {r['examples'][split]} | " + " | ".join(_num(ms.get(n)) for n in names) + " |"
              for split, ms in r["metrics"].items()]
    lines += ["", f"**score: {_num(r.get('score'))}** (the first metric, averaged over the sets)", "", *samples_markdown(r.get("samples"))]
    atomic_write_text(out / "test_report.md", "\n".join(lines))


def write_submission(out_dir: Path, file_name: str, ids: list, predictions: list, label_names, as_names: bool) -> Path:
    """One GLUE-server TSV: `index<TAB>prediction`; MNLI, QNLI and RTE take label names, others ids."""
    if label_names is None:
        values = [f"{min(5.0, max(0.0, float(p))):.3f}" for p in predictions]
    elif as_names:
        values = [label_names[int(p)] for p in predictions]
    else:
        values = [str(int(p)) for p in predictions]
    text = "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in zip(ids, values))
    path = Path(out_dir) / f"{file_name}.tsv"
    atomic_write_text(path, text)
    return path
