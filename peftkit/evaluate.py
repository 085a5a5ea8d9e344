"""`peftkit eval`: rebuild base + adapter from a run directory, re-score, report.

With the run's own config (precision, batch size, max length) the dev scores reproduce the
training-time report exactly. `split=test` writes GLUE-server submission files instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from peftkit import config, model, rundir, schema, tasks
from peftkit.errors import UserError
from peftkit.evaluation import report
from peftkit.evaluation.scoring import predict
from peftkit.files import newest_complete
from peftkit.train import make_accelerator, prepare_model

console = Console()


def load_run_config(run_dir: Path, overrides: dict[str, str]):
    f = run_dir / "config.yaml"
    if not f.is_file():
        raise UserError(f"{run_dir} is not a peftkit run directory (no config.yaml)")
    fix = "restore it from the run's adapter/adapter_config.json or retrain"
    try:
        cfg = OmegaConf.load(f)
    except Exception as e:
        raise UserError(f"corrupt run config {f}: {' '.join(str(e).split())}; {fix}") from None
    schema.check_file(schema.RunConfigFile, OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else
                      (None if cfg is None else list(cfg)), f, "run config", fix)
    if "dataset" in overrides:  # another dataset to score on: `dataset=math dataset.data_dir=DIR split=test`
        options = config.group_options("dataset")
        name = overrides.pop("dataset")
        if name not in options:
            raise UserError(f"peftkit eval: dataset={name}: no such dataset; choose one of: {', '.join(sorted(options))}")
        cfg.dataset = OmegaConf.load(options[name])
    as_written = cfg.copy()
    OmegaConf.set_struct(cfg, True)  # an override names a key the run has: a typo is refused, not added
    for key, value in overrides.items():
        try:
            cfg.merge_with(OmegaConf.from_dotlist([f"{key}={value}"]))
        except Exception:
            raise UserError(f"peftkit eval: {key}={value}: the run's config has no key {key} "
                            f"(override keys it has, e.g. dataset.data_dir=DIR or backbone.path=DIR)") from None
    OmegaConf.set_struct(cfg, False)
    try:
        config.validate(cfg)
    except UserError as e:  # a bad value the run's file holds, not one given here: name the file
        if overrides and _valid(as_written):
            raise
        raise UserError(f"{f}: {e} (edit it there, or override it: peftkit eval run={run_dir} KEY=VALUE)") from None
    return cfg


def _valid(cfg) -> bool:
    try:
        config.validate(cfg)
    except UserError:
        return False
    return True


def run(run_dir: Path, split: str, overrides: dict[str, str]) -> dict:
    if split not in ("validation", "test"):
        raise UserError(f"split must be validation or test, got '{split}'")
    cfg = load_run_config(run_dir, overrides)
    previous = read_report(run_dir)
    with rundir.RunDir(run_dir) as owned:  # eval writes into the run folder: not while a run trains there
        return score_run(owned.path, split, cfg, previous)


def unfinished(run_dir: Path, previous: dict | None) -> str | None:
    """Why a run is unfinished (stopped mid-way by a kill or Ctrl-C: a checkpoint and no final report),
    or None. Its report then says so: a plain `ok` report would mark it finished, and `resume=true`
    would no longer find it."""
    ckpt = newest_complete(run_dir / "checkpoints" / "last")
    if ckpt is None or (previous is not None and previous.get("status") != UNFINISHED):
        return None
    try:
        step = f" at step {json.loads((ckpt / 'trainer_state.json').read_text())['state']['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        step = ""
    return (f"scored from the best adapter so far: the run stopped{step}, before its final report; "
            f"continue it with peftkit train resume={run_dir}")


UNFINISHED = "unfinished"


def score_run(run_dir: Path, split: str, cfg, previous: dict | None) -> dict:
    kind = tasks.of(cfg.dataset)
    task = kind.load_data(cfg.dataset, splits=(split,))
    found = newest_complete(run_dir / "adapter")
    if found is None:
        raise UserError(f"{run_dir} has no adapter/ (the run stopped before its first evaluation); train it again or resume it")
    a, adapter_cfg = model.from_adapter(found, cfg.backbone.get("path"))
    if adapter_cfg["label_names"] != task.label_names:
        raise UserError(f"the adapter's labels {adapter_cfg['label_names']} differ from {cfg.dataset.name}'s {task.label_names}")
    accelerator = make_accelerator(cfg.trainer)
    prepare_model(accelerator, a, kind)
    net = accelerator.prepare(a.model)
    encoded = kind.encode(task, a.tokenizer, cfg)
    if split == "test" and kind.NAME == "classification":
        return write_submissions(accelerator, net, task, encoded, cfg, run_dir)
    if split == "test" and kind.NAME == "multitask":  # each task's files, from its own head
        from peftkit.tasks.multitask import active

        written = {}
        for t, key in enumerate(task.tasks):
            with active(net, t):
                written.update(write_submissions(accelerator, net, task.tasks[key], encoded["tasks"][key], cfg, run_dir))
        return written
    result = kind.evaluate(accelerator, net, task, encoded, cfg.trainer.eval_batch_size)
    if split == "test":  # a causal LM's test sets: their own report beside the dev one
        new = {**first_report(cfg, task, adapter_cfg), **result, "examples": {s: len(task.splits[s]) for s in result["metrics"]}}
        if accelerator.is_main_process:
            report.write_test(run_dir, new)
            show(new, None)
            console.print(f"wrote {run_dir / 'eval' / 'test_report.md'}")
        return new
    new = {**first_report(cfg, task, adapter_cfg), **(previous or {}), **result}  # a failed run's report lacks some keys
    if "collapsed" in result:
        from peftkit.train import collapse_message

        new.update(status="collapsed", error=collapse_message(result["collapsed"], new.get("best_step"), cfg.trainer.lr))
    elif new.get("status") == "collapsed":  # scored again (another dataset), it no longer is
        new.update(status="ok")
        new.pop("error", None)
        new.pop("collapsed", None)
    if why := unfinished(run_dir, previous):
        new.update(status=UNFINISHED, error=why)
        print(f"peftkit: notice: {run_dir} is unfinished; its report says so ({why})", file=sys.stderr)
    if accelerator.is_main_process:
        report.write(run_dir, new)
        show(new, previous)
    return new


def read_report(run_dir: Path) -> dict | None:
    f = run_dir / "eval" / "report.json"
    if not f.is_file():
        return None
    fix = "move it away and run peftkit eval again to write a new one"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"corrupt report {f}: {e}; {fix}") from None
    return schema.check_file(schema.ReportFile, data, f, "report", fix)


def first_report(cfg, task, adapter_cfg: dict) -> dict:
    """What a report holds besides the scores, for a run scored for the first time (a merge's output)."""
    n, total = adapter_cfg["trainable_params"], adapter_cfg["total_params"]
    return {"status": "ok", "dataset": cfg.dataset.name, "task": task.task, "method": cfg.method.name,
            "backbone": cfg.backbone.name, "recipe": cfg.get("recipe"), "seed": cfg.get("seed"),
            "trainable_params": n, "total_params": total, "trainable_pct": 100 * n / total}


def show(new: dict, previous: dict | None) -> None:
    title = f"{new.get('dataset')} · {new.get('method')} on {new.get('backbone')}"
    if new.get("best_step") is not None:
        title += f" · best step {new['best_step']} of {new['total_steps']}"
    table = Table(title=title)
    table.add_column("task" if new.get("task_scores") else "split")
    table.add_column("metric")
    table.add_column("score", justify="right")
    before = (previous or {}).get("metrics")  # a failed or diverged run's report may have none
    if before:
        table.add_column("at training", justify="right")
    for split, ms in new["metrics"].items():
        for k, v in ms.items():
            row = [split, k, _fmt(v)]
            if before:
                row.append(_fmt(before.get(split, {}).get(k)))
            table.add_row(*row)
    console.print(table)
    if before:
        console.print(agreement(before, new["metrics"]))


def agreement(before: dict, after: dict) -> str:
    """Whether a re-scoring matches the training-time scores: exactly, up to float32 rounding (a
    process's heap can move a float32 sum by an ulp on some CPUs, AVX2-only ones among them), or not."""
    if before == after:
        return "[green]reproduces the training-time scores exactly[/]"
    close = before.keys() == after.keys() and all(
        before[s].keys() == after[s].keys() and all(_close(before[s][k], after[s][k]) for k in before[s])
        for s in before)
    return "[green]reproduces the training-time scores up to float32 rounding[/]" if close else "[yellow]differs from the training-time scores[/]"


def _close(a, b) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=1e-5) if numbers else a == b


def _fmt(v) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:.2f}"


def write_submissions(accelerator, net, task, encoded, cfg, run_dir: Path) -> dict:
    """{GLUE-server file name (MNLI-m): the TSV written}."""
    from peftkit.data.glue import TASKS

    if not task.name.startswith("glue/"):
        raise UserError(f"split=test writes GLUE-server files, so it needs a glue/ dataset, not {task.name}")
    spec = TASKS[task.task]
    out = run_dir / "eval" / "submission"
    written = {}
    regression = task.label_names is None
    for s, file_name in zip([s for s in encoded if s.startswith("test")], spec.submission):
        preds = predict(accelerator, net, encoded[s], cfg.trainer.eval_batch_size, regression)
        if accelerator.is_main_process:
            path = report.write_submission(out, file_name, encoded[s].ids, preds.tolist(), task.label_names,
                                           as_names=task.task in ("mnli", "qnli", "rte"))
            written[file_name] = str(path)
            console.print(f"wrote {path} ({len(preds)} predictions)")
    return written
