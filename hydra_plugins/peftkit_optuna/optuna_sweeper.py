"""Optuna search as a Hydra sweeper: `peftkit train -m hydra/sweeper=optuna ...`.

Hydra's own Optuna sweeper pins optuna<3, so peftkit ships this one (it has to live under
`hydra_plugins/` for Hydra to accept it). Each trial is one ordinary training run, started through
whichever launcher is configured (basic, joblib, submitit), and its objective is the run's dev score.
A failed run is a failed trial. The search space comes from `hydra.sweeper.params` and from
command-line sweeps: `a,b,c` or `choice(a,b,c)` (categorical), `range(lo,hi,step)` (integers),
`interval(lo,hi)` (uniform), `tag(log, interval(lo,hi))` (log-uniform). The sampler is seeded and
finished runs are skipped, so re-running the same command resumes the same search.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

RESULTS_FILE = "optimization_results.yaml"


def fail(message: str):
    """Bad sweep input: peftkit's one-line error and exit code 2 (Hydra would print a traceback)."""
    print(f"peftkit: error: {message}", file=sys.stderr)
    sys.exit(2)


def distribution(o: Override):
    """An Optuna distribution for one sweep override (None: a fixed value)."""
    import optuna.distributions as d

    if not o.is_sweep_override():
        return None
    v = o.value()
    if isinstance(v, ChoiceSweep):
        return d.CategoricalDistribution([x for x in o.sweep_iterator()])
    if isinstance(v, RangeSweep):
        if all(isinstance(x, int) for x in (v.start, v.stop, v.step)):
            return d.IntDistribution(v.start, v.stop - 1, step=v.step)
        return d.CategoricalDistribution(list(o.sweep_iterator()))
    if isinstance(v, IntervalSweep):
        use_log = "log" in v.tags
        if isinstance(v.start, int) and isinstance(v.end, int):
            return d.IntDistribution(v.start, v.end, log=use_log)
        return d.FloatDistribution(float(v.start), float(v.end), log=use_log)
    fail(f"{o.input_line}: the optuna sweeper takes a,b,c / choice() / range() / interval() / tag(log, interval())")


class OptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, n_jobs: int, direction: str, sampler: str, seed: int | None,
                 params: dict[str, str] | None = None) -> None:
        super().__init__()
        if direction not in ("maximize", "minimize"):
            fail(f"hydra.sweeper.direction must be maximize or minimize, got '{direction}'")
        if sampler not in ("tpe", "random"):
            fail(f"hydra.sweeper.sampler must be tpe or random, got '{sampler}'")
        self.n_trials, self.n_jobs, self.direction = n_trials, max(1, n_jobs), direction
        self.sampler, self.seed, self.params = sampler, seed, dict(params or {})

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def search_space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any]]:
        """(fixed overrides, {key: distribution}); command-line values win over `params`."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        merged: dict[str, Override] = {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            merged[o.get_key_element()] = o
        fixed, space = [], {}
        for key, o in merged.items():
            dist = distribution(o)
            if dist is None:
                fixed.append(f"{key}={o.get_value_element_as_str()}")
            else:
                space[key] = dist
        if not space:
            fail("the optuna sweeper has nothing to search: give a range, e.g. "
                 "'trainer.lr=tag(log,interval(1e-5,1e-2))' or method.r=4,8,16")
        return fixed, space

    def sweep(self, arguments: list[str]) -> list:
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        fixed, space = self.search_space(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        sampler = (optuna.samplers.TPESampler(seed=self.seed) if self.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=self.seed))
        study = optuna.create_study(direction=self.direction, sampler=sampler)
        returns, job_idx = [], 0
        while job_idx < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - job_idx))]
            batch = [fixed + [f"{k}={t.params[k]}" for k in space] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for t, r in zip(trials, results):
                value = objective(r)
                if value is None:
                    study.tell(t, state=TrialState.FAIL)
                else:
                    study.tell(t, value)
            job_idx += len(batch)
            returns.append(results)
        write_results(study, space, sweep_dir)
        return returns


def objective(job_return) -> float | None:
    """The run's dev score, or None for a run that failed (it then has a `failed` report)."""
    try:
        result = job_return.return_value
    except Exception:  # the launcher re-raises the job's exception here
        return None
    if isinstance(result, dict) and isinstance(result.get("score"), (int, float)):
        return float(result["score"])
    return None


def write_results(study, space: dict, sweep_dir: Path) -> None:
    """optimization_results.yaml (best params and every trial), and the best trial on the terminal."""
    from peftkit.files import atomic_write_text

    done = [t for t in study.trials if t.value is not None]
    out = {
        "direction": study.direction.name.lower(),
        "best_value": study.best_value if done else None,
        "best_params": dict(study.best_params) if done else None,
        "best_trial": study.best_trial.number if done else None,
        "trials": [{"number": t.number, "dir": str(sweep_dir / str(t.number)), "state": t.state.name.lower(),
                    "value": t.value, "params": dict(t.params)} for t in study.trials],
    }
    atomic_write_text(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(out)))
    if done:
        best = " ".join(f"{k}={v}" for k, v in study.best_params.items())
        print(f"best of {len(done)} finished trials: {study.best_value:.2f} with {best} "
              f"(run {sweep_dir / str(study.best_trial.number)}); all trials in {sweep_dir / RESULTS_FILE}")
    else:
        print(f"no trial finished; see the failed reports under {sweep_dir}")
