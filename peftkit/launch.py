"""Start `train` under Hydra: single runs, sweeps (`-m`), resumed runs, multi-process launches."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from peftkit import config, rundir
from peftkit.errors import Diverged, Interrupted, Terminated, UserError
from peftkit.evaluation import report
from peftkit.files import newest_complete, user_path, write_error

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
        candidates = [c for run in Path("outputs").glob("*/*") if (c := newest_complete(run / "checkpoints" / "last"))]
        for ckpt in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
            run = ckpt.parent.parent
            saved = run / "config.yaml"
            finished = _report_status(run) not in (None, "unfinished")  # `peftkit eval` of a stopped run says unfinished
            if not finished and saved.is_file() and _same_config(run, cfg):
                from peftkit import checkpoint

                checkpoint.check(ckpt)
                return [*rest, "resume=true", f"hydra.run.dir={_quote(run)}"], run
        raise UserError("resume=true found no unfinished run with this config under outputs/; pass resume=DIR")
    run = user_path(value, "resume")
    found = newest_complete(run / "checkpoints" / "last")
    if found is None:
        raise UserError(f"resume={value}: no checkpoint at {run}/checkpoints/last")
    from peftkit import checkpoint

    checkpoint.check(found)
    check_same_model(run, cfg, f"resume={value}")
    return [*rest, "resume=true", f"hydra.run.dir={_quote(run)}"], run


def check_same_model(run: Path, cfg: DictConfig, what: str) -> None:
    """A resumed run continues the model its checkpoint holds: the same method and backbone settings."""
    saved_file = run / "config.yaml"
    try:
        saved = OmegaConf.load(saved_file)
        if not isinstance(saved, DictConfig):
            raise ValueError("not a mapping of keys")
        theirs = _run_signature(saved)
    except FileNotFoundError:
        raise UserError(f"{what}: {saved_file} is missing, so the run's settings are unknown; start a new run") from None
    except Exception as e:
        raise UserError(f"{what}: corrupt run config {saved_file}: {' '.join(str(e).split())}; start a new run") from None
    ours = _run_signature(cfg)
    named = [(theirs.get(k) or {}).get("name") for k in ("method", "backbone")], [(ours.get(k) or {}).get("name") for k in ("method", "backbone")]
    if named[0] != named[1]:  # another method or backbone: that says it, its options would only add noise
        diffs = [f"{k}={a} (this command: {b})" for k, a, b in zip(("method", "backbone"), *named) if a != b]
    else:
        diffs = [f"{k}={_show(a)} (this command: {_show(b)})" for k, a, b in _differences(theirs, ours, ("method", "backbone"))]
    if diffs:
        raise UserError(f"{what}: the run was trained with {', '.join(diffs[:3])}{' and more' if len(diffs) > 3 else ''}; "
                        f"to continue it, resume with its settings; to train anew, choose another hydra.run.dir "
                        f"(or pass overwrite=true without resume=)")


def _differences(a: dict, b: dict, keys: tuple[str, ...], prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in keys:
        x, y = (a or {}).get(k), (b or {}).get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, tuple(dict.fromkeys([*x, *y])), f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def _show(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


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
    from peftkit.evaluation.report import FINISHED

    return done if same and done.get("status", "ok") in FINISHED else None


def _report_status(run: Path) -> str | None:
    """The status in a run's eval/report.json (None: no report); an unreadable one counts as a report."""
    f = run / "eval" / "report.json"
    if not f.is_file():
        return None
    try:
        return str(json.loads(f.read_text()).get("status", "ok"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def _same_config(run_dir: Path, cfg: DictConfig) -> bool:
    try:
        return _run_signature(OmegaConf.load(run_dir / "config.yaml")) == _run_signature(cfg)
    except Exception:
        return False


def check_previous_run(owner: rundir.RunDir, cfg: DictConfig, multirun: bool, overwrite: bool) -> bool:
    """A run never silently replaces another: continue it (resume=true), replace it (overwrite=true),
    or, in a sweep, re-run the same job of an earlier, unfinished sweep. True: the earlier run is to be
    replaced, which `train.run` does once its data and model are ready (bad input leaves it whole).
    Files of the user's that a run would write over are never replaced."""
    previous = owner.previous_run()
    if not previous or cfg.resume:
        return False
    what = ", ".join(dict.fromkeys(n.split("/")[0] for n in previous))
    if not owner.holds_run():
        raise UserError(f"{owner.path} holds {', '.join(previous)}, which peftkit did not write and a run would "
                        f"replace; move them away or choose another {'hydra.sweep.dir' if multirun else 'hydra.run.dir'}")
    if overwrite or (multirun and _same_config(owner.path, cfg)):
        return True
    go_on = (f"continue it with resume={owner.path}, " if newest_complete(owner.path / "checkpoints" / "last")
             else f"score it with peftkit eval run={owner.path}, " if "eval/report.json" in previous else "")
    raise UserError(
        f"{owner.path} already holds a run ({what}); {go_on}replace it with overwrite=true, "
        f"or choose another {'hydra.sweep.dir' if multirun else 'hydra.run.dir'}")


def interrupted_state(run_dir: Path) -> str | None:
    """What an interrupted run leaves to go on from: its last checkpoint and its best adapter so far."""
    kept = []
    ckpt = newest_complete(run_dir / "checkpoints" / "last")
    if ckpt is not None:
        try:
            kept.append(f"the checkpoint of step {json.loads((ckpt / 'trainer_state.json').read_text())['state']['step']}")
        except (OSError, ValueError, KeyError, TypeError):
            kept.append("its last checkpoint")
    found = newest_complete(run_dir / "adapter")
    if found is not None:
        try:
            kept.append(f"the adapter of step {json.loads((found / 'adapter_config.json').read_text())['step']}")
        except (OSError, ValueError, KeyError, TypeError):
            kept.append("its best adapter so far")
    return f"kept {' and '.join(kept)} in {run_dir}" if kept else None


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
                out: str | Path | None = None, composed: DictConfig | None = None) -> int:
    """Run `train` (or a sweep) under Hydra; `out`: the run or sweep folder, resolved (`config.check`);
    `composed`: the run's config with its `hydra:` node, composed from these overrides (a single run
    starts from it instead of composing it again)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peftkit import train

    extra = config.hydra_overrides()
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
        replace = False
        try:
            if _main_process():  # another live run's folder, or a run that is not ours to replace: hands off
                owner.claim()
                replace = check_previous_run(owner, cfg, multirun, overwrite)
        except (UserError, OSError) as e:
            message = write_error(e) if isinstance(e, OSError) else str(e)
            if message is None:
                raise
            owner.release()
            fail(message)
            return None
        started = {"writing": not replace}  # an earlier run here stays whole until this one is ready to write

        def before_writing() -> None:
            if replace:
                owner.clear_previous_run()
            started["writing"] = True

        group = Path(str(HydraConfig.get().sweep.dir)).name if multirun else None  # the trackers' group
        try:
            result = train.run(cfg, run_dir, before_writing, group)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: keep what resumes the run, say what that is, stop (a sweep too)
            what, code = ("stopped (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted (Ctrl-C)", 130)
            kept = interrupted_state(run_dir)
            if kept is None:
                if owner.owned and started["writing"]:
                    owner.remove_created()
                raise Interrupted(f"{what} before the run's first evaluation; nothing was kept", code) from None
            go_on = (f"; continue it with peftkit train resume={run_dir}"
                     if newest_complete(run_dir / "checkpoints" / "last") else "")
            raise Interrupted(f"{what}; {kept}{go_on}", code) from None
        except Diverged as e:  # its adapter and checkpoint stay: the last finite ones
            if owner.owned:
                report.write(run_dir, e.report)
            fail(str(e))
            return None
        except UserError as e:  # bad input: a single run leaves nothing behind, a sweep's run a failed report
            fail(str(e))
            if owner.owned and not multirun:
                owner.remove_created()
            elif owner.owned and started["writing"]:
                report.write_failed(run_dir, cfg, str(e))
            return None
        except Exception as e:  # the machine's doing (disk full, ...) is one line; in a sweep, a crash stops one run only
            message = write_error(e) if isinstance(e, OSError) else None
            if owner.owned and started["writing"]:
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

    try:
        if composed is not None and not multirun and not passthrough and composed.hydra.mode != RunMode.MULTIRUN:
            run_composed(task, composed, recipe, out)
        else:
            sys.argv = ["peftkit", *(["--multirun"] if multirun else []), *passthrough, *extra, *overrides]
            hydra.main(config_path=str(config.recipes()[recipe].parent), config_name=recipe, version_base="1.3")(task)()
    finally:  # a sweep that never started a job (or a run Hydra refused) leaves no empty folders behind
        if out is not None and _main_process():
            rundir.remove_if_empty(out)
    if not multirun and exit_code["code"]:
        sys.exit(exit_code["code"])
    return exit_code["code"]


def run_composed(task, cfg: DictConfig, recipe: str, out: Path | None) -> None:
    """One run of an already composed config, as `hydra.main` runs it (logging, callbacks,
    `hydra.job.env_set`, `HydraConfig`), without the two compositions of the same config `hydra.main`
    would do first (0.8 s of a 2.5-s tiny run). A failed job raises its exception here."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode

    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        if out is not None:
            cfg.hydra.run.dir = str(out)
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=recipe)
    ret = run_job(task_function=task, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                  hydra_context=HydraContext(config_loader=None, callbacks=callbacks), configure_logging=True)
    callbacks.on_run_end(config=cfg, config_name=recipe, job_return=ret)
    ret.return_value  # noqa: B018 (raises the job's exception)
