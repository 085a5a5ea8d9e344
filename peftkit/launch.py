"""Start `train` under Hydra: single runs, sweeps (`-m`), resumed runs, multi-process launches."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from peftkit import config
from peftkit.evaluation import report
from peftkit.errors import UserError

SAME_RUN_KEYS = ("backbone", "method", "dataset", "trainer", "seed")


def _run_signature(cfg: DictConfig) -> dict:
    from peftkit.train import absolute_paths

    cfg = cfg.copy()
    absolute_paths(cfg)
    c = OmegaConf.to_container(cfg, resolve=True)
    return {k: c.get(k) for k in SAME_RUN_KEYS}


def resolve_resume(recipe: str, overrides: list[str], cfg: DictConfig) -> list[str]:
    """`resume=true`: the newest unfinished run under outputs/ with the same config; `resume=DIR`: that run."""
    value = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if value in (None, "false", "False"):
        return overrides
    rest = [o for o in overrides if not o.startswith("resume=")]
    if value in ("true", "True"):
        want = _run_signature(cfg)
        candidates = sorted(Path("outputs").glob("*/*/checkpoints/last"), key=lambda p: p.stat().st_mtime, reverse=True)
        for ckpt in candidates:
            run = ckpt.parent.parent
            saved = run / "config.yaml"
            finished = (run / "eval" / "report.json").is_file()
            if not finished and saved.is_file() and _run_signature(OmegaConf.load(saved)) == want:
                return [*rest, "resume=true", f"hydra.run.dir={run}"]
        raise UserError("resume=true found no unfinished run with this config under outputs/; pass resume=DIR")
    run = Path(value)
    if not (run / "checkpoints" / "last").is_dir():
        raise UserError(f"resume={value}: no checkpoint at {run}/checkpoints/last")
    return [*rest, "resume=true", f"hydra.run.dir={run}"]


def finished_report(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The report of a run that already finished in this directory with the same config, if any."""
    report_file, saved = run_dir / "eval" / "report.json", run_dir / "config.yaml"
    if not (report_file.is_file() and saved.is_file()):
        return None
    done = json.loads(report_file.read_text())
    same = _run_signature(OmegaConf.load(saved)) == _run_signature(cfg)
    return done if same and done.get("status", "ok") == "ok" else None


def cleanup_failed_run(run_dir: Path) -> None:
    """Remove what a run that failed on bad input wrote, and its date folder if now empty.

    Under the working directory, every folder that is now empty goes, up to it (outputs/ too).
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = Path(run_dir).resolve().parent
    while parent != cwd and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        if cwd not in parent.parents:
            break
        parent = parent.parent


def _shared_timestamp() -> str | None:
    """Under torchrun / accelerate launch, every process must write to one run dir: rank 0 names it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # accelerate reuses this group
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") else "gloo")
    stamp = [time.strftime("%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def hydra_train(recipe: str, overrides: list[str], multirun: bool, passthrough: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from peftkit import train

    extra = config.hydra_overrides()
    stamp = _shared_timestamp()
    if stamp and not multirun and not any(o.startswith("hydra.run.dir=") for o in overrides):
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    exit_code = {"code": 0}

    def task(cfg: DictConfig):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if multirun and (done := finished_report(run_dir, cfg)):
            train.console.print(f"skip {run_dir}: finished earlier with this config (score {done['score']:.2f})")
            return done
        try:
            result = train.run(cfg, run_dir)
        except UserError as e:
            print(f"peftkit: error: {e}", file=sys.stderr)
            exit_code["code"] = 2
            if not multirun:
                if not cfg.resume:
                    cleanup_failed_run(run_dir)
                sys.exit(2)
            report.write_failed(run_dir, cfg, str(e))
            return None
        except Exception as e:  # in a sweep, one crash must not stop the other runs
            if not multirun:
                raise
            traceback.print_exc()
            report.write_failed(run_dir, cfg, f"{type(e).__name__}: {e}")
            exit_code["code"] = 1
            return None
        if int(os.environ.get("RANK", "0")) == 0:
            from peftkit.evaluate import show

            show(result, None)
            train.console.print(f"[bold green]done[/]: adapter in {run_dir / 'adapter'}, report in {run_dir / 'eval' / 'report.md'}")
        return result

    sys.argv = ["peftkit", *(["--multirun"] if multirun else []), *passthrough, *extra, *overrides]
    hydra.main(config_path=str(config.recipes()[recipe].parent), config_name=recipe, version_base="1.3")(task)()
    return exit_code["code"]
