"""Sweeps: a crashed run is reported as failed and the others go on; re-running skips finished runs."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)

ENV = {"OMP_NUM_THREADS": "1"}


def test_failed_run_is_reported_and_finished_runs_are_skipped(tiny_bert, tmp_path):
    rows = "".join(f"{'great fun' if i % 2 else 'dull mess'} number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(80))
    (tmp_path / "good.csv").write_text("text,label\n" + rows)
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "recipe=quickstart", "dataset=local", f"backbone.path={tiny_bert}",
            f"dataset.train_file={tmp_path / 'good.csv'},{tmp_path / 'missing.csv'}",
            "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.sweep.dir={sweep}"]
    first = run_cli(*args, cwd=tmp_path, env=ENV)
    assert first.returncode != 0  # the sweep as a whole did not succeed...
    ok, failed = (json.loads((sweep / str(i) / "eval" / "report.json").read_text()) for i in (0, 1))
    assert ok["status"] in FINISHED and (sweep / "0" / "adapter" / "adapter.safetensors").is_file()  # ...but run 0 finished
    assert failed["status"] == "failed" and "missing.csv not found" in failed["error"]
    assert (sweep / "1" / "config.yaml").is_file()

    adapter = sweep / "0" / "adapter" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run_cli(*args, cwd=tmp_path, env=ENV)
    assert "skip" in again.stdout + again.stderr
    assert adapter.stat().st_mtime_ns == before  # nothing trained twice
    assert json.loads((sweep / "1" / "eval" / "report.json").read_text())["status"] == "failed"


def test_hydra_mode_multirun_without_m_sweeps_as_hydra_does(tiny_bert, tmp_path):
    """A single run starts from the config peftkit composed (launch.run_composed); a config that asks for
    Hydra's multirun mode still goes through Hydra: the job lands in the sweep folder."""
    sweep = tmp_path / "sweep"
    proc = run_cli("train", f"backbone.path={tiny_bert}", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}",
                   "dataset.max_train_samples=64", "dataset.max_eval_samples=32", "trainer.max_steps=2",
                   cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((sweep / "0" / "eval" / "report.json").read_text())["status"] in FINISHED
    assert not (tmp_path / "outputs").exists()


def test_optuna_sweeper_searches_the_dev_score_and_resumes(tiny_bert, tmp_path):
    """hydra/sweeper=optuna: n trials with sampled lr and rank, results file, and a re-run trains nothing."""
    import yaml

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "recipe=quickstart", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2", f"backbone.path={tiny_bert}", "dataset.max_train_samples=64",
            "dataset.max_eval_samples=32", "trainer.max_steps=2", "trainer.eval_every=2",
            "trainer.lr=tag(log,interval(1e-4,1e-2))", "method.r=choice(2,4)", f"hydra.sweep.dir={sweep}"]
    first = run_cli(*args, cwd=tmp_path, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1, 2]
    for t in results["trials"]:
        assert t["state"] == "complete" and 1e-4 <= t["params"]["trainer.lr"] <= 1e-2 and t["params"]["method.r"] in (2, 4)
        run = json.loads((sweep / str(t["number"]) / "eval" / "report.json").read_text())
        assert run["score"] == t["value"]  # the objective is the run's dev score
        saved = yaml.safe_load((sweep / str(t["number"]) / "config.yaml").read_text())
        assert saved["trainer"]["lr"] == t["params"]["trainer.lr"] and saved["method"]["r"] == t["params"]["method.r"]
    assert results["best_value"] == max(t["value"] for t in results["trials"])
    assert "best of 3 finished trials" in first.stdout

    again = run_cli(*args, cwd=tmp_path, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skip") == 3  # seeded sampler: the same trials, all finished
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["trials"] == results["trials"]


def test_optuna_sweeper_without_a_range_is_one_clear_error(tiny_bert, tmp_path):
    r = run_cli("train", "-m", "recipe=quickstart", "hydra/sweeper=optuna", "hydra.sweeper.params=null",
                f"backbone.path={tiny_bert}", cwd=tmp_path, env=ENV)
    assert r.returncode == 2 and "nothing to search" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "multirun").exists()  # nothing started, nothing written


def test_every_method_trains_from_the_quickstart_recipe(tiny_bert, tmp_path):
    """`peftkit train recipe=quickstart method=<name>` for every registered method, as one sweep."""
    from peftkit.methods import METHODS

    sweep = tmp_path / "sweep"
    # llama_adapter: decoder attention only, refused on MiniLM; adapter_fusion and scalearn compose earlier
    # runs, which a sweep over methods has none of (their two-stage recipe: tests/methods/test_fusion.py)
    names = sorted(set(METHODS) - {"llama_adapter", "adapter_fusion", "scalearn"})
    r = run_cli("train", "-m", "recipe=quickstart", f"method={','.join(names)}", f"backbone.path={tiny_bert}",
                "dataset.max_train_samples=64", "dataset.max_eval_samples=32", "trainer.max_steps=2",
                "trainer.eval_every=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=ENV, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, name in enumerate(names):
        report = json.loads((sweep / str(i) / "eval" / "report.json").read_text())
        assert report["status"] in FINISHED and report["method"] == name, report
        assert (sweep / str(i) / "adapter" / "adapter.safetensors").is_file()
