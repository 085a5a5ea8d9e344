"""Experiment trackers (`trainer.log_with=[tensorboard,wandb,mlflow]`), through accelerate's.

A run logs what train_log.jsonl holds (loss, learning rate, throughput, the method's stats, every
evaluation), its resolved config as hyperparameters, and its report's key numbers at the end. The
files stay in the run directory (`tracking/`), so they go with the run. The tracker's run is named
after the run directory; a sweep's runs share a group (wandb) or experiment (MLflow): the sweep
directory's name. Offline by default: TensorBoard event files, wandb in offline mode unless
WANDB_MODE says otherwise, MLflow in a SQLite store unless MLFLOW_TRACKING_URI names another.
Only the main process logs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from peftkit.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # pip install ...
TRAIN_KEYS = ("loss", "lr", "samples_per_s", "tokens_per_s", "epoch", "elapsed_s")  # the rest of a step record: method stats


def wanted(trainer) -> list[str]:
    return list(dict.fromkeys(trainer.get("log_with") or []))


def check(trainer) -> None:
    """One line before anything is written when a tracker's package is missing."""
    for name in wanted(trainer):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"trainer.log_with=[{name}]: the {name} package is not installed; pip install {INSTALL[name]}")


def flat(values: dict, sep: str = ".", prefix: str = "") -> dict:
    """Nested values as `a.b.c` keys with scalar values (lists as JSON text): a config as trackers take
    hyperparameters; metrics with `sep="/"`."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def record_values(record: dict) -> dict[str, float]:
    """A train_log.jsonl record as tracker values: `train/loss`, `train/lr`, `train/samples_per_s`, ...,
    `method/<stat>`; an evaluation as `eval/<split>/<metric>` and `eval/score`."""
    if "eval" in record:
        return {**{f"eval/{k}": v for k, v in flat(record["eval"], "/").items() if _number(v)}, "eval/score": record["score"]}
    if "loss" not in record:  # a divergence note
        return {}
    return {f"{'train' if k in TRAIN_KEYS else 'method'}/{k}": v for k, v in record.items() if k != "step" and _number(v)}


def report_values(report: dict) -> dict[str, float]:
    """The report's key numbers: `report/score`, the best step's metrics, throughput, time, size, memory."""
    keys = ("score", "glue_average", "best_step", "samples_per_s", "tokens_per_s", "train_time_s", "eval_time_s",
            "trainable_params", "trainable_pct", "peak_rss_mb", "peak_gpu_mb")
    values = {f"report/{k}": report[k] for k in keys if _number(report.get(k))}
    values.update({f"report/{k}": v for k, v in flat(report.get("metrics") or {}, "/").items() if _number(v)})
    return values


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Trackers:
    """The run's trackers. A context: what was started is finished on the way out, also when training
    stops on an error, so that a sweep's next run starts clean."""

    def __init__(self, names: list[str], run_dir: Path, group: str | None = None):
        self.names, self.dir = names, Path(run_dir) / "tracking"
        self.run, self.group = Path(run_dir).name, group
        self.accelerator = None
        self.own_mlflow_store = False  # MLflow's tracking URI is process-wide (and copied into the environment)

    def instances(self) -> list:
        """accelerate's trackers, for `Accelerator(log_with=...)`; each starts in `start`."""
        if not self.names:
            return []
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        out = []
        if "tensorboard" in self.names:  # events in tracking/tensorboard/
            out.append(TensorBoardTracker("tensorboard", self.dir))
        if "wandb" in self.names:  # tracking/wandb/offline-run-*/ (wandb sync uploads it)
            mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
            out.append(WandBTracker(os.environ.get("WANDB_PROJECT", "peftkit"), name=self.run, group=self.group,
                                    dir=str(self.dir), settings={"console": "off", "silent": True}, **mode))
        if "mlflow" in self.names:
            local = not os.environ.get("MLFLOW_TRACKING_URI")
            out.append(MLflowTracker(self.group or "peftkit", logging_dir=str(self.dir / "mlartifacts") if local else None,
                                     run_name=self.run))
        return out

    def start(self, accelerator, config: dict) -> str | None:
        """Start logging (the main process only); returns a line saying where it goes."""
        self.accelerator = accelerator
        if not self.names or not accelerator.is_main_process:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        store = os.environ.get("MLFLOW_TRACKING_URI")
        if "mlflow" in self.names and not store:
            import mlflow  # a SQLite store: MLflow's own local default (its file store refuses to start since 3.x)

            mlflow.set_tracking_uri(f"sqlite:///{self.dir / 'mlflow.db'}")
            self.own_mlflow_store = True
        accelerator.init_trackers(self.group or "peftkit", config=flat(config))
        shown = {"wandb": f"wandb ({os.environ.get('WANDB_MODE') or 'offline'})", "mlflow": f"mlflow ({store or 'mlflow.db'})"}
        return f"tracking: {', '.join(shown.get(n, n) for n in self.names)} in {self.dir}"

    def log(self, values: dict, step: int) -> None:
        if self.accelerator is not None and values:
            self.accelerator.log(values, step=step)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        """Finish each tracker (accelerate's `end_training` would also end a multi-process run's process group)."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
            self.accelerator = None
        if self.own_mlflow_store:  # unset again: a sweep's next run has its own store
            import mlflow

            mlflow.set_tracking_uri(None)
            self.own_mlflow_store = False
