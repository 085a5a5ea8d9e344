"""Checkpoint merging: one run's kept adapter snapshots, averaged (Metrics-Weighted Averaging).

MWA (Choi & Yu, 2025, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging",
arXiv 2504.18580) averages the checkpoints of one training run with weights from a training metric
and one penalty factor. Its exact formula is not at hand; this is our reading of it:

    wᵢ = mᵢᵖ / Σⱼ mⱼᵖ,   mᵢ = 1 / train lossᵢ (weighting=loss)  or  mᵢ = stepᵢ (weighting=step)

A lower loss or a later step weighs more, and p = `penalty` says how much: p = 0 is the uniform
average, and as p grows the weight goes to the lowest-loss (or the last) checkpoint; the weights
do not depend on how many checkpoints there are. `uniform` and `last` (the newest alone) are the
baselines.

The snapshots are what `trainer.keep_checkpoints=K` keeps: RUN/snapshots/step-NNNNNN/, adapter
folders whose config records the step, the mean training loss since the previous snapshot and
that evaluation's metrics. They are points along one trajectory, so averaging their tensors is
meaningful for any method, mergeable or not: every floating tensor that changed is averaged (the
adapter's parameters and the head); integer and boolean tensors (rank masks, counters) and tensors
equal in every snapshot (frozen projections, initial factors) are the newest snapshot's, exactly.
The result is a run-shaped folder, so `peftkit eval run=OUT` scores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.table import Table

from peftkit import adapter
from peftkit.errors import UserError
from peftkit.merge import sources
from peftkit.train import snapshots

WEIGHTINGS = ("loss", "step", "uniform", "last")
SNAPSHOT_KEYS = ("step", "train_loss", "score")  # what a snapshot's config adds to an adapter's


@dataclass
class Snapshot:
    step: int
    path: Path
    meta: dict  # its adapter config: step, train_loss, score, metrics
    tensors: dict[str, torch.Tensor]


def mwa_weights(weighting: str, penalty: float, steps: list[int], losses: list[float]) -> list[float]:
    """The checkpoints' weights, summing to 1: wᵢ ∝ mᵢ^penalty (see the module docstring)."""
    n = len(steps)
    if weighting == "uniform":
        return [1.0 / n] * n
    if weighting == "last":
        return [0.0] * (n - 1) + [1.0]
    metric = [1.0 / loss for loss in losses] if weighting == "loss" else [float(s) for s in steps]
    logs = [penalty * math.log(m) for m in metric]  # in logs, so a large penalty does not overflow
    top = max(logs)
    unnormalised = [math.exp(x - top) for x in logs]
    return [u / sum(unnormalised) for u in unnormalised]


def average(tensor_sets: list[dict[str, torch.Tensor]], weights: list[float]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Σ wᵢ tᵢ per tensor (in float64, stored in its dtype); the names copied from the last set instead."""
    out, copied = {}, []
    newest = tensor_sets[-1]
    for name, last in newest.items():
        all_t = [ts[name] for ts in tensor_sets]
        if not last.is_floating_point() or all(torch.equal(t, last) for t in all_t):
            out[name] = last
            copied.append(name)
        else:
            out[name] = sum(w * t.double() for w, t in zip(weights, all_t)).to(last.dtype)
    return out, copied


def read_snapshots(run: Path, last: int | None) -> list[Snapshot]:
    """The run's snapshots, oldest first (the newest `last` of them); all of one base, method and shape."""
    found = snapshots(run)
    if not found:
        raise UserError(f"{run} has no checkpoint snapshots (snapshots/step-*/); train it with trainer.keep_checkpoints=K "
                        f"(e.g. K=5) to keep the adapter at each of the last K evaluations")
    if last is not None:
        found = found[-last:]
    out = []
    for step, path in found:
        tensors = adapter.read_tensors(path / adapter.WEIGHTS, "snapshot file", "delete that snapshot folder")
        out.append(Snapshot(step, path, adapter.read_config(path), tensors))
    newest = out[-1]
    for s in out[:-1]:
        same = (s.meta["base_fingerprint"] == newest.meta["base_fingerprint"] and s.meta["method"] == newest.meta["method"]
                and {n: (t.shape, t.dtype) for n, t in s.tensors.items()} == {n: (t.shape, t.dtype) for n, t in newest.tensors.items()})
        if not same:
            raise UserError(f"snapshot {s.path.name} has another base, method or tensor shapes than {newest.path.name}; "
                            f"delete the snapshots left by another run, or pass last=N to average only the newest N")
    return out


def check_knobs(cfg: DictConfig) -> tuple[str, float, int | None]:
    return str(cfg.weighting), float(cfg.penalty), cfg.get("last")  # `schema` checked them


def check_losses(snaps: list[Snapshot]) -> list[float]:
    losses = []
    for s in snaps:
        loss = s.meta.get("train_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss <= 0:
            raise UserError(f"snapshot {s.path.name} records train loss {loss}, which cannot weigh it; use weighting=step, "
                            f"or last=N to leave the older snapshots out")
        losses.append(float(loss))
    return losses


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    weighting, penalty, last = check_knobs(cfg)
    run_dir, out = Path(cfg.run).resolve(), Path(cfg.out).resolve()
    snaps = read_snapshots(run_dir, last)
    steps = [s.step for s in snaps]
    losses = check_losses(snaps) if weighting == "loss" else [s.meta.get("train_loss") for s in snaps]
    weights = mwa_weights(weighting, penalty, steps, losses)
    tensors, copied = average([s.tensors for s in snaps], weights)
    checkpoints = [{"step": st, "train_loss": loss, "score": s.meta.get("score"), "weight": w}
                   for s, st, loss, w in zip(snaps, steps, losses, weights)]
    info = {"mode": "mwa", "weighting": weighting, "penalty": penalty if weighting in ("loss", "step") else None,
            "run": str(run_dir), "checkpoints": checkpoints, "tensors_averaged": len(tensors) - len(copied),
            "tensors_copied": sorted(copied)}
    newest = {k: v for k, v in snaps[-1].meta.items() if k not in (*SNAPSHOT_KEYS, "peftkit_version")}
    sources.write_adapter_run(out, tensors, {**newest, "metrics": {}, "merge": info}, run_dir)
    show(info, cfg.out)
    return info


def show(info: dict, out: str) -> None:
    knob = f" penalty={info['penalty']:g}" if info["penalty"] is not None else ""
    table = Table(title=f"mwa: weighting={info['weighting']}{knob}", title_justify="left")
    for col in ("step", "train loss", "dev score", "weight"):
        table.add_column(col, justify="right")
    for c in info["checkpoints"]:
        loss = "-" if c["train_loss"] is None else f"{c['train_loss']:.4f}"
        dev = "-" if c["score"] is None else f"{c['score']:.2f}"
        table.add_row(str(c["step"]), loss, dev, f"{c['weight']:.4f}")
    sources.console.print(table)
    sources.console.print(f"mwa: {len(info['checkpoints'])} checkpoints averaged ({info['tensors_averaged']} tensors; "
                          f"{len(info['tensors_copied'])} taken from the newest) → {out}")
