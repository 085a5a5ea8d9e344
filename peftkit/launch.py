"""Start `train` under Hydra: single runs, sweeps (`-m`), resumed runs, multi-process launches."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from peftkit import config, rundir
from peftkit.errors import Diverged, UserError
from peftkit.evaluation import report
from peftkit.files import newest_complete, write_error

SAME_RUN_KEYS = ("backbone", "method", "dataset", "trainer", "seed")


def _run_signature(cfg: DictConfig) -> dict:
    from peftkit.train import absolute_paths

    cfg = cfg.copy()
    absolute_paths(cfg)
    c = OmegaConf.to_container(cfg, resolve=True)
    return {k: c.get(k) for k in SAME_RUN_KEYS}


def resolve_resume(recipe: str, overrides: list[str], cfg: DictConfig) -> tuple[list[str], Path | None]:
    """`resume=true`: the newest unfinished run under outputs/ with the same config; `resume=DIR`: that
    run. Returns the overrides that continue it in its folder, and the folder (None: no resume)."""
    value = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if value in (None, "false", "False"):
        return overrides, None
    rest = [o for o in overrides if not o.startswith("resume=")]
    if value in ("true", "True"):
        want = _run_signature(cfg)
        candidates = [c for run in Path("outputs").glob("*/*") if (c := newest_complete(run / "checkpoints" / "last"))]
        for ckpt in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
            run = ckpt.parent.parent
            saved = run / "config.yaml"
            finished = (run / "eval" / "report.json").is_file()
            if not finished and saved.is_file() and _run_signature(OmegaConf.load(saved)) == want:
                return [*rest, "resume=true", f"hydra.run.dir={_quote(run)}"], run
        raise UserError("resume=true found no unfinished run with this config under outputs/; pass resume=DIR")
    run = Path(value)
    if newest_complete(run / "checkpoints" / "last") is None:
        raise UserError(f"resume={value}: no checkpoint at {run}/checkpoints/last")
    return [*rest, "resume=true", f"hydra.run.dir={_quote(run)}"], run


def finished_report(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The report of a run that already finished in this directory with the same config, if any."""
    report_file, saved = run_dir / "eval" / "report.json", run_dir / "config.yaml"
    if not (report_file.is_file() and saved.is_file()):
        return None
    try:
        done = json.loads(report_file.read_text())
        same = _run_signature(OmegaConf.load(saved)) == _run_signature(cfg)
    except Exception:  # an unreadable earlier run is not a finished one
        return None
    return done if same and done.get("status", "ok") == "ok" else None


def _same_config(run_dir: Path, cfg: DictConfig) -> bool:
    try:
        return _run_signature(OmegaConf.load(run_dir / "config.yaml")) == _run_signature(cfg)
    except Exception:
        return False


def check_previous_run(owner: rundir.RunDir, cfg: DictConfig, multirun: bool, overwrite: bool) -> None:
    """A run never silently replaces another: continue it (resume=true), replace it (overwrite=true),
    or, in a sweep, re-run the same job of an earlier, unfinished sweep."""
    previous = owner.previous_run()
    if not previous or cfg.resume:
        return
    if overwrite or (multirun and _same_config(owner.path, cfg)):
        owner.clear_previous_run()
        return
    what = ", ".join(previous)
    go_on = (f"continue it with resume={owner.path}, " if newest_complete(owner.path / "checkpoints" / "last")
             else f"score it with peftkit eval run={owner.path}, " if "eval" in previous else "")
    raise UserError(
        f"{owner.path} already holds a run ({what}); {go_on}replace it with overwrite=true, "
        f"or choose another {'hydra.sweep.dir' if multirun else 'hydra.run.dir'}")


def _quote(path: str) -> str:
    """A path as a Hydra override value (quoted: paths may hold commas, spaces or '=')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


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


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(path: str | Path | None, overrides: list[str], multirun: bool) -> Path | None:
    """Fix the run (or sweep) folder before Hydra starts and create it ourselves, noting which folders
    are new: a failed run then removes only those, and an unwritable place is refused in one line.
    `path`: where Hydra would write (`config.check`); None if only a running job can resolve it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    stamp = _shared_timestamp()
    if stamp and not multirun and not any(o.startswith("hydra.run.dir=") for o in overrides):
        path = f"outputs/{stamp}"
    if path is not None and _main_process():
        rundir.prepare(Path(path), key)
    return None if path is None else Path(path)


def hydra_train(recipe: str, overrides: list[str], multirun: bool, passthrough: list[str], overwrite: bool = False,
                out: str | Path | None = None) -> int:
    """Run `train` (or a sweep) under Hydra; `out`: the run or sweep folder, resolved (`config.check`)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from peftkit import train

    # Hydra writes nothing into a run folder (no .hydra/, no log file): peftkit writes config.yaml itself,
    # and the folder's owner is known before anything lands in it
    extra = [*config.hydra_overrides(), "hydra.output_subdir=null", "hydra/job_logging=none"]
    if any(p in ("--cfg", "-c", "--info", "-i") for p in passthrough):
        out = None
    else:
        out = prepare_output_dir(out, overrides, multirun)
        if out is not None:
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            overrides = [o for o in overrides if not o.startswith(key + "=")] + [f"{key}={_quote(str(out))}"]
    exit_code = {"code": 0}

    def fail(message: str, code: int = 2) -> None:
        print(f"peftkit: error: {message}", file=sys.stderr)
        exit_code["code"] = max(exit_code["code"], code)

    def task(cfg: DictConfig):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if multirun and (done := finished_report(run_dir, cfg)):
            train.console.print(f"skip {run_dir}: finished earlier with this config (score {done['score']:.2f})")
            return done
        owner = rundir.RunDir(run_dir)
        try:
            if _main_process():  # another live run's folder, or a run that is not ours to replace: hands off
                owner.claim()
                check_previous_run(owner, cfg, multirun, overwrite)
        except (UserError, OSError) as e:
            message = write_error(e) if isinstance(e, OSError) else str(e)
            if message is None:
                raise
            owner.release()
            fail(message)
            return None
        try:
            result = train.run(cfg, run_dir)
        except Diverged as e:  # its adapter and checkpoint stay: the last finite ones
            if owner.owned:
                report.write(run_dir, e.report)
            fail(str(e))
            return None
        except UserError as e:  # bad input: a single run leaves nothing behind, a sweep's run a failed report
            fail(str(e))
            if owner.owned and not multirun:
                owner.remove_created()
            elif owner.owned:
                report.write_failed(run_dir, cfg, str(e))
            return None
        except Exception as e:  # the machine's doing (disk full, ...) is one line; in a sweep, a crash stops one run only
            message = write_error(e) if isinstance(e, OSError) else None
            if owner.owned:
                try:
                    report.write_failed(run_dir, cfg, message or f"{type(e).__name__}: {e}")
                except OSError:  # where it can be written
                    pass
            if message:
                fail(message)
                return None
            if not multirun:
                raise
            traceback.print_exc()
            exit_code["code"] = max(exit_code["code"], 1)
            return None
        finally:
            owner.release()
        if _main_process():
            from peftkit.evaluate import show

            show(result, None)
            train.console.print(f"[bold green]done[/]: adapter in {run_dir / 'adapter'}, report in {run_dir / 'eval' / 'report.md'}")
        return result

    sys.argv = ["peftkit", *(["--multirun"] if multirun else []), *passthrough, *extra, *overrides]
    try:
        hydra.main(config_path=str(config.recipes()[recipe].parent), config_name=recipe, version_base="1.3")(task)()
    finally:  # a sweep that never started a job (or a run Hydra refused) leaves no empty folders behind
        if out is not None and _main_process():
            rundir.remove_if_empty(out)
    if not multirun and exit_code["code"]:
        sys.exit(exit_code["code"])
    return exit_code["code"]
