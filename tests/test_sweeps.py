"""Sweeps: a crashed run is reported as failed and the others go on; re-running skips finished runs."""

from __future__ import annotations

import json

from tests.conftest import run_cli

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
    assert ok["status"] == "ok" and (sweep / "0" / "adapter" / "adapter.safetensors").is_file()  # ...but run 0 finished
    assert failed["status"] == "failed" and "missing.csv not found" in failed["error"]
    assert (sweep / "1" / "config.yaml").is_file()

    adapter = sweep / "0" / "adapter" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run_cli(*args, cwd=tmp_path, env=ENV)
    assert "skip" in again.stdout + again.stderr
    assert adapter.stat().st_mtime_ns == before  # nothing trained twice
    assert json.loads((sweep / "1" / "eval" / "report.json").read_text())["status"] == "failed"
