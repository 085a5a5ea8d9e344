"""Scoring a model on a task's eval splits: predictions in split order (across processes), GLUE metrics."""

from __future__ import annotations

import time

import numpy as np
import torch

from peftkit import data
from peftkit.data.batching import Encoded, eval_batches, to_device
from peftkit.evaluation import metrics


SHOW_AFTER_S = 3.0  # an evaluation expected to take longer gets a progress bar


@torch.inference_mode()
def predict(accelerator, net: torch.nn.Module, enc: Encoded, batch_size: int, regression: bool) -> np.ndarray:
    """Predictions in the split's order; batches are sorted by length (longest first, so the first
    batch's time bounds the rest) and shared across processes. A bar shows once the first batch
    says the split will take more than `SHOW_AFTER_S`."""
    from accelerate.utils import gather_object
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    net.eval()
    # Forward through the unwrapped model: DDP's forward syncs buffers collectively, which hangs
    # when processes get different numbers of eval batches (e.g. one batch for two processes).
    inner = accelerator.unwrap_model(net)
    batches = eval_batches(enc.lengths, batch_size)[accelerator.process_index :: accelerator.num_processes]
    idx, out, t0 = [], [], time.perf_counter()
    bar = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    job = bar.add_task("eval", total=len(batches))
    try:
        for k, b in enumerate(batches):
            batch = to_device({key: v for key, v in enc.batch(b).items() if key != "labels"}, accelerator.device)
            with accelerator.autocast():
                logits = inner(**batch).logits.float()
            out.append(logits.squeeze(-1) if regression else logits.argmax(-1))
            idx += b
            if k == 0 and accelerator.is_main_process and (time.perf_counter() - t0) * len(batches) > SHOW_AFTER_S:
                bar.start()
            bar.update(job, completed=k + 1)
    finally:
        bar.stop()
    local = list(zip(idx, torch.cat(out).cpu().tolist())) if out else []
    pairs = gather_object(local) if accelerator.num_processes > 1 else local
    preds = np.empty(len(enc), dtype=np.float64 if regression else np.int64)
    for i, p in pairs:
        preds[i] = p
    net.train()
    return preds


def score(accelerator, net, task: data.TaskData, encoded: dict[str, Encoded], batch_size: int) -> dict:
    """Metrics per eval split, and the task score (the mean of them). A held-out test split
    (`dataset.test_file`) is scored too, under `metrics["test"]`, but never enters the score: the
    trainer keeps the step whose score is best, and the test split must not choose it. The trainer
    calls this at every evaluation, so the test split costs one more pass each time."""
    regression = task.label_names is None
    per_split, collapsed = {}, {}
    for s in task.eval_splits + task.held_out_splits:
        preds = predict(accelerator, net, encoded[s], batch_size, regression)
        per_split[s] = metrics.compute(task.metrics, preds, encoded[s].labels)
        if why := collapse(preds, task.label_names, encoded[s].labels):
            collapsed[s] = why
    chosen_on = {s: m for s, m in per_split.items() if s in task.eval_splits}
    return {"metrics": per_split, "score": metrics.task_score(chosen_on), **({"collapsed": collapsed} if collapsed else {})}


NEAR_CONSTANT = 0.1  # a regression output whose spread is under this share of the labels' has collapsed


def collapse(preds: np.ndarray, label_names: list[str] | None, labels=None) -> str | None:
    """How the predictions collapsed, or None: one class for every example (the majority-class
    predictor a too-high learning rate often ends in), or in regression one number for every
    example, or nearly one: a spread under a tenth of the labels' (`labels`). A model fit by squared
    error spreads its outputs by about √R² of the labels' spread, so a tenth means it explains
    about 1% of their variance: it learnt the mean. A metric alone hides it: CoLA's MCC is 0,
    accuracy can look fine, a correlation can be 20."""
    if len(preds) < 2:
        return None
    if label_names is None:
        mean, spread = float(np.mean(preds)), float(np.std(preds))
        if spread <= 1e-6 * (1 + abs(mean)):
            return f"predicts {mean:.4g} for all {len(preds)} examples"
        label_spread = float(np.std(labels)) if labels is not None and len(labels) > 1 else 0.0
        if spread < NEAR_CONSTANT * label_spread:
            return (f"predicts {mean:.3g} ± {spread:.2g} for all {len(preds)} examples, "
                    f"under a tenth of the labels' spread ({label_spread:.2g})")
        return None
    if np.all(preds == preds[0]):
        return f"predicts '{label_names[int(preds[0])]}' for all {len(preds)} examples"
    return None
