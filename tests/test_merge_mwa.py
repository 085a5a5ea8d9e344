"""Checkpoint merging: `trainer.keep_checkpoints` keeps adapter snapshots, `peftkit merge mode=mwa` averages them.

The run: quickstart LoRA on the tiny BERT, 6 steps (4 per epoch), eval every 2, keep_checkpoints=2,
keep_best=false, one log record per step. References are independent of the code under test:
the snapshots' train loss against the per-step losses in train_log.jsonl, the weights against
their closed form, the merged tensors against a weighted sum computed here in float64.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from _train_helpers import assert_same_tensors, cli, read_log, train
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_resume import interrupted

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.merge import checkpoints

AVERAGE_ATOL = 1e-7  # float32 storage of a float64 weighted sum of values well below 1 in magnitude
LOSS_REL = 1e-12  # a mean of the same float64 losses, summed in another order at most


def args(tiny_bert, run_dir, *extra):
    """A key in `extra` replaces its default here (peftkit refuses a key given twice)."""
    given = {e.split("=", 1)[0] for e in extra}
    base = ["recipe=quickstart", f"backbone.path={tiny_bert}", "dataset.max_train_samples=128", "dataset.max_eval_samples=32",
            "seed=0", "trainer.max_steps=6", "trainer.eval_every=2", "trainer.log_every=1", "trainer.keep_checkpoints=2",
            "trainer.keep_best=false", f"hydra.run.dir={run_dir}"]
    return [b for b in base if b.split("=", 1)[0] not in given] + list(extra)


@pytest.fixture(scope="module")
def mwa_run(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("mwa")
    train(root, *args(tiny_bert, root / "run"))
    return root / "run"


def snapshot_tensors(run, step):
    return load_file(str(run / "snapshots" / f"step-{step:06d}" / adapter.WEIGHTS))


def snapshot_meta(run, step):
    return json.loads((run / "snapshots" / f"step-{step:06d}" / adapter.CONFIG).read_text())


def merge(run, out, **knobs):
    """`peftkit merge mode=mwa` with these knobs (through `merge.run`, which checks `out`)."""
    import peftkit.merge

    return peftkit.merge.run(OmegaConf.create({"mode": "mwa", "run": str(run), "weighting": "loss", "penalty": 1.0,
                                               "last": None, "out": str(out), **knobs}))


# ---- the trainer ------------------------------------------------------------------------------------------

def test_trainer_keeps_the_last_k_snapshots(mwa_run):
    assert sorted(p.name for p in (mwa_run / "snapshots").iterdir()) == ["step-000004", "step-000006"]
    assert not (mwa_run / "checkpoints").exists()  # the resumable checkpoint goes at the end; snapshots stay
    steps, evals = read_log(mwa_run)
    loss = {r["step"]: r["loss"] for r in steps}  # log_every=1, grad_accum=1: each step's own loss
    for step in (4, 6):
        _, meta = model.from_adapter(mwa_run / "snapshots" / f"step-{step:06d}")  # loads on the run's base
        assert meta["step"] == step
        assert meta["train_loss"] == pytest.approx((loss[step - 1] + loss[step]) / 2, rel=LOSS_REL)  # since the last snapshot
        at_eval = next(e for e in evals if e["step"] == step)
        assert meta["metrics"] == at_eval["eval"] and meta["score"] == at_eval["score"]
    assert_same_tensors(snapshot_tensors(mwa_run, 6), load_file(str(mwa_run / "adapter" / adapter.WEIGHTS)))  # keep_best=false


def test_resumed_run_keeps_its_snapshots_and_ends_as_the_straight_one(mwa_run, tiny_bert, tmp_path):
    """Killed while taking step 6 (checkpoint and snapshots at 2 and 4), then resumed: snapshots 4 and 6, as unbroken."""
    interrupted(tmp_path, *args(tiny_bert, tmp_path / "run"), fault="train_step@6")
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step-000002", "step-000004"]
    train(tmp_path, *args(tiny_bert, tmp_path / "run", f"resume={tmp_path / 'run'}"))
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step-000004", "step-000006"]
    for step in (4, 6):
        assert_same_tensors(snapshot_tensors(tmp_path / "run", step), snapshot_tensors(mwa_run, step))
        assert snapshot_meta(tmp_path / "run", step)["train_loss"] == snapshot_meta(mwa_run, step)["train_loss"]


def test_a_new_run_in_the_folder_drops_the_old_snapshots(mwa_run, tiny_bert, tmp_path):
    run = shutil.copytree(mwa_run, tmp_path / "run")
    train(tmp_path, *args(tiny_bert, run, "trainer.max_steps=2"), "overwrite=true")
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-000002"]


# ---- the weights ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting, penalty, expected", [
    ("loss", 1.0, [2 / 7, 4 / 7, 1 / 7]),  # 1/loss = 2, 4, 1
    ("loss", 2.0, [4 / 21, 16 / 21, 1 / 21]),
    ("step", 1.0, [2 / 12, 4 / 12, 6 / 12]),
    ("step", 3.0, [8 / 288, 64 / 288, 216 / 288]),
    ("loss", 0.0, [1 / 3] * 3),
    ("step", 0.0, [1 / 3] * 3),
    ("uniform", 5.0, [1 / 3] * 3),
    ("last", 5.0, [0.0, 0.0, 1.0]),
])
def test_weights_closed_form(weighting, penalty, expected):
    got = checkpoints.mwa_weights(weighting, penalty, [2, 4, 6], [0.5, 0.25, 1.0])
    assert got == pytest.approx(expected, abs=1e-15)
    assert sum(got) == pytest.approx(1.0, abs=1e-15)


def test_weights_large_penalty_pick_one_and_do_not_depend_on_the_count():
    assert checkpoints.mwa_weights("loss", 500.0, [2, 4, 6], [0.5, 0.25, 1.0])[1] == pytest.approx(1.0, abs=1e-12)
    assert checkpoints.mwa_weights("step", 500.0, [2, 4, 6], [0.5, 0.25, 1.0])[2] == pytest.approx(1.0, abs=1e-12)
    # a checkpoint's weight relative to another's depends on those two alone: drop one, renormalise, same weights
    three = checkpoints.mwa_weights("loss", 1.5, [2, 4, 6], [0.5, 0.25, 1.0])
    two = checkpoints.mwa_weights("loss", 1.5, [2, 4], [0.5, 0.25])
    assert [w / sum(three[:2]) for w in three[:2]] == pytest.approx(two, abs=1e-15)


# ---- the merge --------------------------------------------------------------------------------------------

def hand_average(run, steps, weights):
    tensors = [snapshot_tensors(run, s) for s in steps]
    return {n: sum(w * t[n].double() for w, t in zip(weights, tensors)) for n in tensors[-1]}


@pytest.mark.parametrize("weighting, penalty", [("loss", 1.0), ("loss", 3.0), ("step", 2.0), ("uniform", 1.0), ("last", 1.0)])
def test_merge_is_the_weighted_sum_of_the_snapshots(mwa_run, tmp_path, weighting, penalty):
    losses = [snapshot_meta(mwa_run, s)["train_loss"] for s in (4, 6)]
    expected_w = {"loss": [(1 / loss) ** penalty for loss in losses], "step": [4**penalty, 6**penalty],
                  "uniform": [1, 1], "last": [0, 1]}[weighting]
    expected_w = [w / sum(expected_w) for w in expected_w]
    info = merge(mwa_run, tmp_path / "out", weighting=weighting, penalty=penalty)
    assert [c["weight"] for c in info["checkpoints"]] == pytest.approx(expected_w, abs=1e-12)
    assert [c["step"] for c in info["checkpoints"]] == [4, 6] and info["tensors_copied"] == []

    got = load_file(str(tmp_path / "out" / "adapter" / adapter.WEIGHTS))
    want = hand_average(mwa_run, (4, 6), expected_w)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), want[n], atol=AVERAGE_ATOL, rtol=0, msg=n)
    assert all(t.abs().max() < 1 for t in want.values())  # so float32 rounding stays below AVERAGE_ATOL
    if weighting == "last":
        assert_same_tensors(got, snapshot_tensors(mwa_run, 6))
    _, meta = model.from_adapter(tmp_path / "out" / "adapter")  # loads on the run's base
    assert meta["merge"]["weighting"] == weighting and meta["metrics"] == {} and "train_loss" not in meta
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["checkpoints"] == info["checkpoints"]


def test_penalty_zero_is_the_uniform_average(mwa_run, tmp_path):
    merge(mwa_run, tmp_path / "zero", weighting="loss", penalty=0.0)
    merge(mwa_run, tmp_path / "uniform", weighting="uniform")
    assert_same_tensors(load_file(str(tmp_path / "zero" / "adapter" / adapter.WEIGHTS)),
                        load_file(str(tmp_path / "uniform" / "adapter" / adapter.WEIGHTS)))


def test_last_n_takes_the_newest_snapshots(mwa_run, tmp_path):
    info = merge(mwa_run, tmp_path / "out", last=1)
    assert [(c["step"], c["weight"]) for c in info["checkpoints"]] == [(6, 1.0)]


def test_masks_and_frozen_tensors_come_from_the_newest_snapshot(tmp_path):
    """Integer/bool tensors and tensors equal in every snapshot are copied; the rest averaged."""
    run = tmp_path / "run"
    frozen = torch.randn(3, 4)
    for i, (step, loss) in enumerate([(2, 0.8), (4, 0.4)]):
        tensors = {"trained": torch.full((3,), float(i + 1)), "mask": torch.tensor([True, i == 0, True]),
                   "rank": torch.tensor(5 + i), "frozen": frozen.clone()}
        adapter.save_tensors(run / "snapshots" / f"step-{step:06d}", tensors,
                             {"method": {"name": "adalora"}, "base_fingerprint": "x", "step": step, "train_loss": loss})
    info = merge(run, tmp_path / "out")  # weights 1/3, 2/3
    got = load_file(str(tmp_path / "out" / "adapter" / adapter.WEIGHTS))
    torch.testing.assert_close(got["trained"], torch.full((3,), 1 / 3 + 2 * 2 / 3), atol=AVERAGE_ATOL, rtol=0)
    assert torch.equal(got["mask"], torch.tensor([True, False, True])) and got["rank"].item() == 6
    assert torch.equal(got["frozen"], frozen)
    assert info["tensors_copied"] == ["frozen", "mask", "rank"]


def test_merge_refuses_to_overwrite_its_run(mwa_run):
    with pytest.raises(UserError, match="overlaps the input"):
        merge(mwa_run, mwa_run)
    with pytest.raises(UserError, match="overlaps the input"):
        merge(mwa_run, mwa_run.parent)
    with pytest.raises(UserError, match="overlaps the input"):
        merge(mwa_run, mwa_run / "snapshots" / "mwa")


# ---- end to end -------------------------------------------------------------------------------------------

def test_cli_merge_then_eval(mwa_run, tmp_path):
    r = cli("merge", "mode=mwa", f"run={mwa_run}", f"out={tmp_path / 'mwa'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dev score" in r.stdout and "weight" in r.stdout and "→" in r.stdout
    r = cli("eval", f"run={tmp_path / 'mwa'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "mwa" / "eval" / "report.json").read_text())
    assert all(math.isfinite(v) for ms in report["metrics"].values() for v in ms.values())


def test_eval_of_the_last_merge_reproduces_the_snapshot_score(mwa_run, tmp_path):
    from peftkit import evaluate

    merge(mwa_run, tmp_path / "last", weighting="last")
    result = evaluate.run(tmp_path / "last", "validation", {})
    assert result["metrics"] == snapshot_meta(mwa_run, 6)["metrics"]


def assert_refused(r, *needles):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:"), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_refusals(mwa_run, tmp_path):
    bare = shutil.copytree(mwa_run, tmp_path / "bare", ignore=shutil.ignore_patterns("snapshots"))
    assert_refused(cli("merge", "mode=mwa", f"run={bare}", f"out={tmp_path / 'o1'}", cwd=tmp_path),
                   "no checkpoint snapshots", "trainer.keep_checkpoints=K")
    assert_refused(cli("merge", "mode=mwa", f"run={mwa_run}", "weighting=best", f"out={tmp_path / 'o2'}", cwd=tmp_path),
                   "weighting=best", "'loss', 'step', 'uniform' or 'last'")
    assert_refused(cli("merge", "mode=mwa", f"run={mwa_run}", "penalty=-1", f"out={tmp_path / 'o3'}", cwd=tmp_path),
                   "penalty=-1", "≥ 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]  # nothing written


def test_cli_refuses_negative_keep_checkpoints(tiny_bert, tmp_path):
    r = cli("train", *args(tiny_bert, tmp_path / "run", "trainer.keep_checkpoints=-1"), cwd=tmp_path)
    assert_refused(r, "trainer.keep_checkpoints")
    assert not (tmp_path / "run").exists()
