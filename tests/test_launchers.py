"""Sweeps through Hydra's launchers: joblib (local parallel) and submitit (tested with submitit_local)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "dataset.max_train_samples=64", "dataset.max_eval_samples=32"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_runs_every_job_through_the_launcher(launcher, tiny_bert, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("train", "-m", f"hydra/launcher={launcher}", "method=lora,ia3", f"backbone.path={tiny_bert}",
                *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    reports = {json.loads((sweep / str(i) / "eval" / "report.json").read_text())["method"] for i in (0, 1)}
    assert reports == {"lora", "ia3"}
    if launcher == "submitit_local":  # submitit really ran the jobs: its own logs are there
        assert list(sweep.glob(".submitit/*/*_log.out"))


def test_slurm_preset_sets_peftkit_defaults_over_submitit(tmp_path):
    r = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    launcher = r.stdout.split("\n  launcher:\n", 1)[1]
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "partition: gpu", "gpus_per_node: 1", "timeout_min: 240", "array_parallelism: 16"):
        assert line in launcher


def test_multirun_with_cfg_is_one_clear_error(tmp_path):
    r = run_cli("train", "-m", "method=lora,ia3", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("peftkit: error:") and len(r.stderr.strip().splitlines()) == 1
