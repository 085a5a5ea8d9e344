"""Resuming: a run that dies mid-way and is resumed ends bitwise where an uninterrupted run ends.

The reference run trains 8 steps straight (eval + checkpoint every 4, 6 steps per epoch). The
interrupted run is the same command in a process that dies (`os._exit`, like a kill -9) while
taking step 8: it leaves the step-4 checkpoint (epoch 0, batch 4) plus log records for steps
5–7 that the checkpoint does not cover. Dying at a fixed step, rather than killing the process
when a checkpoint appears, makes the test deterministic.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _train_helpers import adapter_tensors, cli, assert_same_tensors, read_log, reference_run, report, tiny, train

@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    return reference_run(tmp_path_factory, tiny_bert)


def interrupted(cwd, *args, fault: str = "train_step@8") -> None:
    """`peftkit train ARGS`, killed with SIGKILL at the named point (`files.fault_point`): by default
    while taking step 8, after its optimizer step and before the scheduler's."""
    proc = cli("train", *args, cwd=cwd, env={"PEFTKIT_FAULT": fault})
    assert proc.returncode == -9, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def assert_interrupted_at_step_7(run) -> None:
    meta = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert (meta["state"]["step"], meta["state"]["epoch"], meta["state"]["batch"]) == (4, 0, 4)
    steps, evals = read_log(run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6, 7]  # 5-7 are past the checkpoint
    assert [e["step"] for e in evals] == [4]
    assert not (run / "eval").exists()


def checkpoint_tensors(run) -> dict:
    return load_file(str(run / "checkpoints" / "last" / "state.safetensors"))


def assert_same_as_reference(run, ref) -> None:
    """Adapter, final checkpoint (weights, optimizer moments, RNG), per-step losses and report: all equal."""
    assert_same_tensors(adapter_tensors(run), adapter_tensors(ref))
    assert_same_tensors(checkpoint_tensors(run), checkpoint_tensors(ref))
    steps, evals = read_log(run)
    ref_steps, ref_evals = read_log(ref)
    assert [s["step"] for s in steps] == list(range(1, 9)), "each step is logged exactly once"
    assert [(s["step"], s["loss"], s["lr"]) for s in steps] == [(s["step"], s["loss"], s["lr"]) for s in ref_steps]
    assert [(e["step"], e["eval"]) for e in evals] == [(e["step"], e["eval"]) for e in ref_evals]
    r, rr = report(run), report(ref)
    for k in ("metrics", "score", "best_step", "total_steps", "trainable_params"):
        assert r[k] == rr[k], k


def test_step4_checkpoint_holds_the_uninterrupted_runs_step4_weights(tmp_path, tiny_bert, reference):
    """Sanity of the setup: up to the checkpoint the two runs are the same computation."""
    ref, _ = reference
    run = tmp_path / "run"
    interrupted(tmp_path, *tiny(tiny_bert, f"hydra.run.dir={run}"))
    assert_interrupted_at_step_7(run)
    ref_steps, _ = read_log(ref)
    assert [s["loss"] for s in read_log(run)[0]] == [s["loss"] for s in ref_steps[:7]]
    if report(ref)["best_step"] == 4:  # then the reference's adapter/ holds its step-4 weights
        ckpt = {k[len("model."):]: v for k, v in checkpoint_tensors(run).items() if k.startswith("model.")}
        assert_same_tensors(ckpt, adapter_tensors(ref))
    # resume=DIR continues it from step 4
    proc = train(tmp_path, *tiny(tiny_bert), f"resume={run}")
    assert "resumed from" in proc.stderr + proc.stdout and "at step 4" in proc.stderr + proc.stdout
    assert_same_as_reference(run, ref)


def test_resume_true_picks_the_unfinished_run_with_the_same_config(tmp_path, tiny_bert, reference):
    ref, _ = reference
    run = tmp_path / "outputs" / "2026-01-01" / "00-00-00"
    interrupted(tmp_path, *tiny(tiny_bert, "hydra.run.dir=outputs/2026-01-01/00-00-00"))
    assert_interrupted_at_step_7(run)
    # a newer unfinished run with another seed must be left alone
    other = tmp_path / "outputs" / "2026-01-02" / "00-00-00"
    shutil.copytree(run, other)
    cfg = OmegaConf.load(other / "config.yaml")
    cfg.seed = 1
    (other / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    newer = (run / "checkpoints" / "last").stat().st_mtime + 60
    os.utime(other / "checkpoints" / "last", (newer, newer))
    other_log = (other / "train_log.jsonl").read_text()

    train(tmp_path, *tiny(tiny_bert), "resume=true")
    assert_same_as_reference(run, ref)
    assert not (other / "eval").exists() and (other / "train_log.jsonl").read_text() == other_log
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["2026-01-01", "2026-01-02"]


def test_resume_true_without_a_matching_run_is_a_user_error(tmp_path, monkeypatch):
    from peftkit import config, launch
    from peftkit.errors import UserError

    monkeypatch.chdir(tmp_path)
    cfg = config.compose("quickstart", ["seed=3"])
    with pytest.raises(UserError, match="resume=true found no unfinished run"):
        launch.resolve_resume("quickstart", ["seed=3", "resume=true"], cfg)
    with pytest.raises(UserError, match="no checkpoint"):
        launch.resolve_resume("quickstart", ["seed=3", f"resume={tmp_path}"], cfg)


def test_adalora_resumes_with_its_importance_scores(tmp_path, tiny_bert):
    """A method with training state of its own (AdaLoRA's importance scores, rank masks that change
    every step) resumes bitwise; tests/methods/test_adalora.py checks the scores' round trip itself."""
    args = tiny(tiny_bert, "method=adalora", "method.tinit=2", "method.tfinal=1", "method.target_r=4")
    ref = tmp_path / "ref"
    train(tmp_path, *args, f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    interrupted(tmp_path, *args, f"hydra.run.dir={run}")
    assert any(k.startswith("method.") and ".importance." in k for k in checkpoint_tensors(run))
    train(tmp_path, *args, f"resume={run}")
    assert_same_as_reference(run, ref)


def no_leftovers(run) -> None:
    """After a resumed run: the checkpoint and adapter in place, no copy or temporary folder beside them."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]
    assert not [p for p in run.rglob(".*") if p.name != ".peftkit.lock"], "leftovers of the killed saves"
    assert not (run / ".peftkit.lock").exists()


@pytest.mark.parametrize("step", __import__("random").Random(11).sample(range(5, 9), 2))
def test_a_kill_at_a_random_step_resumes_bitwise(tmp_path, tiny_bert, reference, step):
    ref, _ = reference
    run = tmp_path / "run"
    interrupted(tmp_path, *tiny(tiny_bert, f"hydra.run.dir={run}"), fault=f"train_step@{step}")
    train(tmp_path, *tiny(tiny_bert), f"resume={run}")
    assert_same_as_reference(run, ref)
    no_leftovers(run)


@pytest.mark.parametrize("save", [1, 2])
def test_a_kill_between_the_renames_of_a_checkpoint_save_resumes_bitwise(tmp_path, tiny_bert, reference, save):
    """Killed after the new checkpoint is complete (`.last.new`) and the old one moved aside
    (`.last.old`), before the new one takes its place: resume finds the new one."""
    ref, _ = reference
    run = tmp_path / "run"
    interrupted(tmp_path, *tiny(tiny_bert, f"hydra.run.dir={run}"), fault=f"between_renames:last@{save}")
    ckpts = run / "checkpoints"
    assert not (ckpts / "last").exists() and (ckpts / ".last.new").is_dir()
    assert (ckpts / ".last.old").is_dir() == (save == 2)
    train(tmp_path, *tiny(tiny_bert), f"resume={run}")
    assert_same_as_reference(run, ref)
    no_leftovers(run)


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_bert, reference):
    ref, _ = reference
    run = tmp_path / "run"
    interrupted(tmp_path, *tiny(tiny_bert, f"hydra.run.dir={run}"), fault="checkpoint_write@2")
    assert [p.name.split("-")[0] for p in (run / "checkpoints").iterdir() if p.name != "last"] == [".last.tmp"]
    proc = train(tmp_path, *tiny(tiny_bert), f"resume={run}")
    assert "at step 4" in proc.stdout + proc.stderr
    assert_same_as_reference(run, ref)
    no_leftovers(run)


def test_a_kill_between_the_renames_of_an_adapter_save(tmp_path, tiny_bert):
    """adapter/ is missing for a moment; eval reads the complete copy beside it, resume puts it in place.
    (keep_best=false: the adapter is saved at every eval, so the second save is the step-8 one.)"""
    args = tiny(tiny_bert, "trainer.keep_best=false")
    ref = tmp_path / "ref"
    train(tmp_path, *args, f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    interrupted(tmp_path, *args, f"hydra.run.dir={run}", fault="between_renames:adapter@2")
    assert not (run / "adapter").exists() and (run / ".adapter.new").is_dir() and (run / ".adapter.old").is_dir()
    scored = shutil.copytree(run, tmp_path / "copy")
    proc = cli("eval", f"run={scored}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert report(scored)["metrics"] == report(ref)["metrics"]  # the step-8 adapter, not the step-4 one
    train(tmp_path, *args, f"resume={run}")
    assert_same_as_reference(run, ref)
    no_leftovers(run)
