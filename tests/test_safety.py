"""Nothing lost, nothing silent: every bad value, hostile file or broken machine gets one line and
exit code 2, and leaves the file tree as it was (nothing of the user's removed, nothing half-written).

The table cases are caught before any run starts, so they run `peftkit.cli.main` in this process
(what the `peftkit` command calls); the cases that need a run start `peftkit` in a subprocess, as a
user would, on the tiny random BERT and a small CSV.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)



def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash ('dir' for folders): the file tree to compare."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert "Traceback" not in out + err, out + err
    assert code == 2, f"exit {code}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("peftkit: error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture()
def main_in(tmp_path, monkeypatch, capsys):
    """`peftkit ARGS` in this process with `tmp_path` as the working directory: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def call(*args: str):
        from peftkit import cli

        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


CSV = "text,label\n" + "".join(f"{w} film number {i},{lab}\n" for i in range(40) for w, lab in (("a great", "pos"), ("an awful", "neg")))


@pytest.fixture()
def workdir(tmp_path, tiny_bert) -> Path:
    """A user's folder: a data file, a finished-looking run (config only) and a folder of their own."""
    from peftkit import config

    (tmp_path / "reviews.csv").write_text(CSV)
    run = tmp_path / "run"
    run.mkdir()
    cfg = config.compose("quickstart", [f"backbone.path={tiny_bert}", "dataset=local",
                                        f"dataset.train_file={tmp_path / 'reviews.csv'}"])
    from omegaconf import OmegaConf

    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file\n")
    return tmp_path


# ---- every value a user can set: one line naming the key, the value and what is allowed -----------------

TRAIN = [
    (["trainer.lr=abc"], ["trainer.lr=abc", "a number ≥ 0"]),
    (["trainer.lr=-1"], ["trainer.lr=-1", "a number ≥ 0"]),
    (["trainer.lr=null"], ["trainer.lr=null", "a number ≥ 0"]),
    (["trainer.lr=nan"], ["trainer.lr=nan", "a number ≥ 0"]),
    (["trainer.lr=inf"], ["trainer.lr=inf", "a number ≥ 0"]),
    (["trainer.lr="], ["trainer.lr=''", "a number ≥ 0"]),
    (["~trainer.lr"], ["trainer.lr is missing"]),
    (["trainer.lr=1e-3,abc"], ["trainer.lr=1e-3,abc", "-m"]),
    (["-m", "trainer.lr=1e-3,abc"], ["trainer.lr=abc", "a number ≥ 0"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0", "a whole number ≥ 1"]),
    (["trainer.batch_size=abc"], ["trainer.batch_size=abc", "a whole number ≥ 1"]),
    (["trainer.batch_size=2.5"], ["trainer.batch_size=2.5", "a whole number ≥ 1"]),
    (["trainer.eval_batch_size=0"], ["trainer.eval_batch_size=0"]),
    (["trainer.grad_accum=0"], ["trainer.grad_accum=0"]),
    (["trainer.log_every=0"], ["trainer.log_every=0"]),
    (["trainer.epochs=-1"], ["trainer.epochs=-1"]),
    (["trainer.epochs=0"], ["trainer.epochs=0"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0", "null"]),
    (["trainer.warmup=-0.5"], ["trainer.warmup=-0.5"]),
    (["trainer.device=tpu"], ["trainer.device=tpu", "auto", "cpu", "cuda"]),
    (["trainer.precision=fp8"], ["trainer.precision=fp8", "fp32", "bf16"]),
    (["trainer.scheduler=step"], ["trainer.scheduler=step", "linear", "cosine"]),
    (["trainer.eval_every=-1"], ["trainer.eval_every=-1"]),
    (["trainer.max_grad_norm=-1"], ["trainer.max_grad_norm=-1"]),
    (["trainer.betas=[2,3]"], ["trainer.betas=[2,3]", "[0, 1)"]),
    (["trainer.betas=[0.9]"], ["trainer.betas=[0.9]", "two numbers"]),
    (["trainer.weight_decay=abc"], ["trainer.weight_decay=abc", "a number ≥ 0"]),
    (["trainer.eps=0"], ["trainer.eps=0"]),
    (["trainer.keep_checkpoints=-1"], ["trainer.keep_checkpoints=-1"]),
    (["trainer.threads=0"], ["trainer.threads=0"]),
    (["trainer.keep_best=maybe"], ["trainer.keep_best=maybe", "true or false"]),
    (["seed=abc"], ["seed=abc", "whole number"]),
    (["seed=1.5"], ["seed=1.5", "whole number"]),
    (["method.r=1.5"], ["method.r=1.5", "whole number"]),
    (["method.r=true"], ["method.r=true", "whole number"]),
    (["method.r=0"], ["method.r", "0"]),
    (["method.alpha=abc"], ["method.alpha=abc", "number"]),
    (["method.target_modules=query"], ["method.target_modules=query", "list"]),
    (["method=ia3", "method.r=8"], ["method.r: unknown key", "has no key 'r'", "target_modules"]),
    (["backbone.max_length=-5"], ["backbone.max_length=-5", "≥ 2"]),
    (["backbone.max_length=100000"], ["backbone.max_length=100000", "at most 128"]),
    (["backbone.trust_remote_code=yes"], ["backbone.trust_remote_code=yes", "true or false"]),
    (["dataset.max_train_samples=0"], ["dataset.max_train_samples=0"]),
    (["dataset.max_eval_samples=-1"], ["dataset.max_eval_samples=-1"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.dev_fraction=1.5"], ["dataset.dev_fraction=1.5", "(0, 1)"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.dev_fraction=0"], ["dataset.dev_fraction=0", "(0, 1)"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.text_fields=text"], ["dataset.text_fields=text", "[text]"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.text_fields=[a,b,c]"], ["dataset.text_fields=[a,b,c]"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.metrics=[auc]"], ["dataset.metrics=[auc]", "accuracy"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.regression=sometimes"], ["dataset.regression=sometimes"]),
    (["resume=nowhere"], ["resume=nowhere", "no checkpoint"]),
    (["overwrite=maybe"], ["overwrite=maybe", "true or false"]),
    (["trainer.lrr=1"], ["trainer.lrr", "lr"]),
    # numbers in range: seeds fit numpy's and torch's generators, counts what the data and machine hold
    (["seed=-1"], ["seed=-1", "0 to 4294967295"]),
    (["seed=4294967296"], ["seed=4294967296", "0 to 4294967295"]),
    (["dataset=local", "dataset.train_file=reviews.csv", "dataset.split_seed=-5"], ["dataset.split_seed=-5", "0 to"]),
    (["dataset.split_seed=99999999999999999999999"], ["dataset.split_seed=99999999999999999999999"]),
    (["dataset.dev_size=100000"], ["dataset.dev_size=100000", "12807"]),
    (["trainer.threads=100000"], ["trainer.threads=100000", "1 to 1024"]),
    # a number in quotes is text: say so
    (["trainer.lr='1e-3'"], ["trainer.lr='1e-3'", "a number", "without quotes"]),
    (["method.r='8'"], ["method.r='8'", "whole number", "without quotes"]),
    # empty and unresolvable paths
    (["hydra.run.dir="], ["hydra.run.dir=''"]),
    (["hydra.run.dir=${oc.env:PEFTKIT_UNSET_VARIABLE}"], ["hydra.run.dir=", "cannot resolve", "PEFTKIT_UNSET_VARIABLE"]),
    (["-m", "seed=1,2", "hydra.sweep.dir=${oc.env:PEFTKIT_UNSET_VARIABLE}"], ["hydra.sweep.dir=", "cannot resolve"]),
    (["hydra.run.dir=reviews.csv/run"], ["reviews.csv is a file"]),
    (["-m", "trainer.max_steps=range(5,1)"], ["range(5,1)", "no value"]),
    # the command line: each key once, only the options peftkit passes on to Hydra
    (["method.r=4", "method.r=8"], ["method.r= is given twice", "method.r=4", "method.r=8"]),
    (["recipe=glue", "recipe=quickstart"], ["recipe= is given twice"]),
    (["hydra.run.dir=a", "hydra.run.dir=b"], ["hydra.run.dir= is given twice"]),
    (["--info"], ["unknown option --info"]),
    (["--foo"], ["unknown option --foo"]),
    (["--cfg", "nope"], ["--cfg nope", "job"]),
]


@pytest.mark.parametrize("args, needles", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train_refuses_bad_values_before_anything_is_written(main_in, workdir, tiny_bert, args, needles):
    before = tree(workdir)
    code, out, err = main_in("train", f"backbone.path={tiny_bert}", *args)
    assert_one_line_error(code, out, err, *needles)
    assert tree(workdir) == before


@pytest.fixture()
def custom_code_model(tmp_path, tiny_bert) -> Path:
    """A model folder whose config asks for its own Python code (which must never run unasked)."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_custom_model", auto_map={"AutoConfig": "configuration_mine.MyConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_mine.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def test_custom_code_is_refused_unless_asked(main_in, custom_code_model):
    before = tree(custom_code_model.parent)
    code, out, err = main_in("train", f"backbone.path={custom_code_model}")
    assert_one_line_error(code, out, err, "custom code", "backbone.trust_remote_code=true")
    assert tree(custom_code_model.parent) == before


def _pickled(folder: Path) -> None:
    """Its weights as pytorch_model.bin (a pickle, which can run code when loaded) and no model.safetensors."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


BROKEN_BACKBONES = [
    (_pickled, ["cannot load its weights", "model.safetensors", "no pickled weights"]),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]), ["cannot load its weights"]),
    (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": '), ["cannot load its tokenizer"]),
]


@pytest.mark.parametrize("breaks, needles", BROKEN_BACKBONES, ids=["pickled weights", "truncated weights", "broken tokenizer"])
def test_a_backbone_folder_that_cannot_load_safely_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, tiny_bert, breaks, needles):
    from peftkit import cli

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    breaks(folder)
    (tmp_path / "reviews.csv").write_text(CSV)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exited:  # found once the run starts: the launcher exits with the run's code
        cli.main(["train", f"backbone.path={folder}", "dataset=local", "dataset.train_file=reviews.csv", "hydra.run.dir=run"])
    captured = capsys.readouterr()
    assert_one_line_error(exited.value.code, captured.out, captured.err, "backbone.path=", *needles)
    assert tree(tmp_path) == before


MERGE = [
    (["mode=ties", "adapters=[run]", "density=abc", "out=o"], ["density=abc", "(0, 1]"]),
    (["mode=ties", "adapters=[run]", "density=0", "out=o"], ["density=0"]),
    (["mode=task_arithmetic", "adapters=[run,run]", "weights=[abc,1]", "out=o"], ["weights=[abc,1]", "one number per adapter"]),
    (["mode=task_arithmetic", "adapters=[run]", "weights=heavy", "out=o"], ["weights=heavy"]),
    (["mode=task_arithmetic", "adapters=[run]", "head=first", "out=o"], ["head=first", "mean"]),
    (["mode=dare", "adapters=[run]", "seed=abc", "out=o"], ["seed=abc", "whole number"]),
    (["mode=svd", "adapters=[run]", "rank=0", "out=o"], ["rank=0"]),
    (["mode=mwa", "run=run", "weighting=median", "out=o"], ["weighting=median", "loss"]),
    (["mode=mwa", "run=run", "penalty=-1", "out=o"], ["penalty=-1"]),
    (["mode=compress", "adapter=run", "alpha=0", "out=o"], ["alpha=0"]),
    (["mode=compress", "adapter=run", "out=run"], ["out=run", "overlaps the input run"]),
    (["adapter=run", "out=run/merged"], ["out=run/merged", "overlaps"]),
    (["mode=task_arithmetic", "adapters=[mine,run]", "out=."], ["out=.", "overlaps"]),
    (["adapter=run", "out=mine"], ["out=mine", "already holds files", "overwrite=true"]),
    (["adapter=run", "out=reviews.csv"], ["out=reviews.csv", "is a file"]),
    (["adapter=run", "out=o", "overwrite=maybe"], ["overwrite=maybe", "true or false"]),
    (["mode=nope", "adapter=run", "out=o"], ["nope", "into_base", "ties"]),
    (["adapter=run", "out=o", "bogus=1"], ["bogus"]),
    (["adapter=run"], ["out=..."]),
    (["adapter"], ["KEY=VALUE"]),
    (["mode=dare", "adapters=[run]", "seed=-1", "out=o"], ["seed=-1", "0 to 4294967295"]),
    (["mode=dare", "adapters=[run]", "seed=99999999999999999999999", "out=o"], ["seed=99999999999999999999999"]),
    (["adapter=run", "out="], ["out=''"]),
    (["adapter=run", "out=${oc.env:PEFTKIT_UNSET_VARIABLE}"], ["out", "cannot resolve", "PEFTKIT_UNSET_VARIABLE"]),
    (["adapter=run", "adapter=mine", "out=o"], ["adapter= is given twice"]),
    (["mode=ties", "mode=dare", "adapters=[run]", "out=o"], ["mode= is given twice"]),
    (["adapter=run", "backbone_path=a", "backbone.path=b", "out=o"], ["backbone_path= is given twice"]),
]


@pytest.mark.parametrize("args, needles", MERGE, ids=[" ".join(a) for a, _ in MERGE])
def test_merge_refuses_bad_values_and_never_touches_its_inputs(main_in, workdir, args, needles):
    before = tree(workdir)
    code, out, err = main_in("merge", *args)
    assert_one_line_error(code, out, err, *needles)
    assert tree(workdir) == before


OTHER = [
    (["eval", "run=run", "run=mine"], ["run= is given twice"]),
    (["eval", "run=run", "bogus.key=1"], ["bogus.key", "no key"]),
    (["eval", "run=run", "trainer.eval_batch_size=0"], ["trainer.eval_batch_size=0"]),
    (["eval", "run=run", "split=dev"], ["split", "validation", "test"]),
    (["eval", "split=test"], ["needs run=DIR"]),
    (["eval", "run=mine"], ["not a peftkit run directory"]),
    (["eval", "run=run"], ["has no adapter/"]),
    (["report"], ["needs at least one DIR"]),
    (["report", "nowhere"], ["no such directory"]),
    (["report", "mine"], ["no runs"]),
    (["report", "run", "bogus=1"], ["unknown option bogus"]),
    (["report", "run", "submission=maybe"], ["submission", "true or false"]),
    (["ls", "methods", "extra"], ["one word", "methods extra"]),
    (["ls", "nope"], ["recipes", "methods"]),
    (["--nope"], ["unknown option --nope"]),
    (["frobnicate"], ["unknown command 'frobnicate'"]),
    (["--recipes-dir"], ["--recipes-dir needs a folder"]),
    (["--recipes-dir=", "ls"], ["--recipes-dir needs a folder"]),
    (["--recipes-dir", "reviews.csv", "ls"], ["reviews.csv is a file"]),
    (["report", "--out", "x", "run"], ["unknown option --out", "out=DIR"]),
    (["report", "run", "out=reviews.csv"], ["out=", "reviews.csv is a file"]),
    (["eval", "run="], ["run=''"]),
    (["train", "backbone.path="], ["backbone.path=''", "model folder"]),
]


@pytest.mark.parametrize("args, needles", OTHER, ids=[" ".join(a) for a, _ in OTHER])
def test_eval_report_ls_refuse_bad_input(main_in, workdir, args, needles):
    before = tree(workdir)
    code, out, err = main_in(*args)
    assert_one_line_error(code, out, err, *needles)
    assert tree(workdir) == before


@pytest.mark.parametrize("damage, needles", [
    ("config.yaml", ["corrupt run config", "config.yaml"]),
    ("eval/report.json", ["corrupt report", "report.json"]),
    ("adapter/adapter_config.json", ["corrupt adapter config", "adapter_config.json"]),
])
def test_eval_refuses_a_corrupt_run_file(main_in, workdir, damage, needles):
    f = workdir / "run" / damage
    f.parent.mkdir(exist_ok=True)
    f.write_text("{ this: is: not [ valid\n")
    before = tree(workdir)
    code, out, err = main_in("eval", "run=run")
    assert_one_line_error(code, out, err, *needles)
    assert tree(workdir) == before


def test_eval_waits_for_no_one_but_refuses_a_folder_in_use(main_in, workdir):
    from peftkit import rundir

    owner = rundir.RunDir(workdir / "run").claim()  # as a training run would
    try:
        before = tree(workdir)
        code, out, err = main_in("eval", "run=run")
        assert_one_line_error(code, out, err, "in use by peftkit", f"pid {os.getpid()}")
        assert tree(workdir) == before
    finally:
        owner.release()


def test_report_lists_an_unreadable_run_as_failed_with_a_warning(tmp_path, reference):
    good = copy_run(reference, tmp_path / "runs" / "good")
    bad = copy_run(reference, tmp_path / "runs" / "bad")
    (bad / "config.yaml").write_text("{ not: [ yaml\n")
    proc = cli("report", str(tmp_path / "runs"), f"out={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("peftkit: warning:")]
    assert len(warnings) == 1 and "unreadable config.yaml" in warnings[0] and str(bad) in warnings[0]
    board = json.loads((tmp_path / "leaderboard" / "leaderboard.json").read_text())
    assert [f["dir"] for f in board["failed"]] == [str(bad)] and str(good) in json.dumps(board)


GOOD = [
    (["--version"], "peftkit 0."),
    (["--help"], "usage: peftkit"),
    (["ls", "recipes"], "quickstart"),
    (["train", "--help"], "overwrite=true"),
    (["merge", "--help"], "overwrite=true"),
]


@pytest.mark.parametrize("args, expect", GOOD, ids=[" ".join(a) for a, _ in GOOD])
def test_good_input_stays_good(main_in, workdir, args, expect):
    before = tree(workdir)
    code, out, err = main_in(*args)
    assert code == 0 and expect in out and err == "", (out, err)
    assert tree(workdir) == before


# ---- the mechanisms, one by one -------------------------------------------------------------------------

def test_a_failed_run_removes_what_it_created_and_nothing_else(tmp_path, monkeypatch):
    from peftkit import rundir

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "v"
    mine.mkdir()
    (mine / "f").write_text("x")
    rundir.prepare(mine, "hydra.run.dir")  # existed: the run may not remove it
    owner = rundir.RunDir(mine).claim()
    (mine / "config.yaml").write_text("written by the run")
    (mine / "adapter").mkdir()
    owner.remove_created()
    assert tree(tmp_path) == {"v": "dir", "v/f": tree(tmp_path)["v/f"]}

    new = tmp_path / "outputs" / "2026-01-01" / "12-00-00"
    (tmp_path / "outputs" / "2026-01-01" / "11-00-00").mkdir(parents=True)  # another run's folder stays
    rundir.prepare(new, "hydra.run.dir")
    owner = rundir.RunDir(new).claim()
    (new / "train_log.jsonl").write_text("")
    owner.remove_created()
    assert not new.exists() and (tmp_path / "outputs" / "2026-01-01" / "11-00-00").is_dir()

    fresh = tmp_path / "a" / "b" / "c"
    rundir.prepare(fresh, "hydra.run.dir")
    owner = rundir.RunDir(fresh).claim()
    owner.remove_created()
    assert not (tmp_path / "a").exists()


def test_a_live_lock_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    from peftkit import rundir
    from peftkit.errors import UserError

    run = tmp_path / "run"
    first = rundir.RunDir(run).claim()
    with pytest.raises(UserError, match=f"in use by peftkit \\(pid {os.getpid()}"):
        rundir.RunDir(run).claim()
    first.release()
    assert not (run / rundir.LOCK).exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / rundir.LOCK).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "start": "1", "since": "earlier"}))
    owner = rundir.RunDir(run).claim()
    assert "taking over" in capsys.readouterr().err
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    owner.release()


def test_atomic_dir_leaves_a_complete_copy_after_a_kill_at_any_step(tmp_path):
    """Simulate where a kill can leave `atomic_dir`'s steps; the newest complete copy is always found,
    and `recover` puts it in place and removes the rest."""
    from peftkit.files import newest_complete, recover

    def folder(p: Path, text: str) -> Path:
        p.mkdir()
        (p / "state.txt").write_text(text)
        return p

    cases = {  # what is on disk after the kill -> the copy a reader must get
        "killed while writing": ({"x": "old", ".x.tmp-999999-ab": "half"}, "old"),
        "new is complete": ({"x": "old", ".x.new": "new"}, "new"),
        "between the renames": ({".x.old": "old", ".x.new": "new"}, "new"),
        "before the old copy is removed": ({"x": "new", ".x.old": "old"}, "new"),
    }
    for name, (on_disk, want) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        root.mkdir()
        for n, text in on_disk.items():
            folder(root / n, text)
        assert (newest_complete(root / "x") / "state.txt").read_text() == want, name
        recover(root / "x")
        assert sorted(p.name for p in root.iterdir()) == ["x"], name
        assert (root / "x" / "state.txt").read_text() == want, name


def test_json_written_by_peftkit_is_valid_json(tmp_path):
    from peftkit.evaluation import report

    r = {"status": "ok", "dataset": "d", "method": "m", "backbone": "b", "task": "t", "score": float("nan"),
         "metrics": {"validation": {"pearson": float("nan"), "spearman": float("inf")}},
         "trainable_params": 1, "trainable_pct": 1.0}
    report.write(tmp_path, r)
    back = json.loads((tmp_path / "eval" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert back["score"] is None and back["metrics"]["validation"] == {"pearson": None, "spearman": None}


# ---- runs: in a subprocess, as a user types them ------------------------------------------------------------

from _train_helpers import THREADS, cli, copy_run, reference_run, report, tiny  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    return reference_run(tmp_path_factory, tiny_bert)[0]


def one_line(proc, *needles: str) -> str:
    """A run that started prints its progress on stderr too: the error is one line, and the last."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("peftkit: error: ")]
    assert len(errors) == 1 and errors[0] == len(lines) - 1, proc.stderr
    return assert_one_line_error(proc.returncode, proc.stdout, lines[-1], *needles)


def test_a_failed_run_in_the_users_folder_removes_only_its_own_files(tmp_path, tiny_bert):
    mine = tmp_path / "v"
    mine.mkdir()
    (mine / "f").write_text("x\n")
    before = tree(tmp_path)
    proc = cli("train", *tiny(tiny_bert, "hydra.run.dir=v", "method.target_modules=[nonexistent]"), cwd=tmp_path)
    one_line(proc, "nonexistent", "matches no Linear layer")
    assert tree(tmp_path) == before
    proc = cli("train", *tiny(tiny_bert, "method.target_modules=[nonexistent]"), cwd=tmp_path)  # outputs/<date>/<time>
    one_line(proc, "nonexistent")
    assert tree(tmp_path) == before


def test_a_run_never_replaces_another_unless_asked(tmp_path, tiny_bert, reference):
    run = copy_run(reference, tmp_path / "run")
    (run / "notes.txt").write_text("mine\n")
    before = tree(tmp_path)
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={run}", "seed=1"), cwd=tmp_path)
    one_line(proc, "already holds a run", "overwrite=true", "resume=")
    assert tree(tmp_path) == before
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={run}", "seed=1"), "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert report(run)["seed"] == 1 and (run / "notes.txt").read_text() == "mine\n"
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no lock, no temporary folders


def test_two_runs_in_one_folder_one_owner(tmp_path, tiny_bert):
    """The second run is refused while the first holds the folder; the first then finishes whole."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **THREADS}
    first = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "train", *tiny(tiny_bert, f"hydra.run.dir={run}")],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".peftkit.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, whatever the machine's speed
        second = cli("train", *tiny(tiny_bert, f"hydra.run.dir={run}", "trainer.lr=3e-3"), cwd=tmp_path)
        one_line(second, "in use by peftkit", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / "config.yaml").trainer.lr == 1e-3 and report(run)["status"] in FINISHED
    assert not (run / ".peftkit.lock").exists()


def test_divergence_stops_with_one_line_and_a_diverged_report(tmp_path, tiny_bert):
    run = tmp_path / "run"
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={run}", "trainer.lr=1e30", "trainer.max_grad_norm=0",
                              "trainer.eval_every=1"), cwd=tmp_path)
    line = one_line(proc, "training diverged at step", "last finite loss", "trainer.lr", "trainer.max_grad_norm=1.0")
    r = report(run)
    assert r["status"] == "diverged" and r["error"] in line
    records = [json.loads(x, parse_constant=lambda c: pytest.fail(f"bare {c} in train_log.jsonl"))
               for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["diverged"] is True
    if (run / "adapter").exists():  # an eval before the divergence: its adapter is kept, and finite
        from safetensors.torch import load_file

        assert all(bool(t.isfinite().all()) for t in load_file(str(run / "adapter" / "adapter.safetensors")).values())
    board = cli("report", str(run), f"out={tmp_path / 'board'}", cwd=tmp_path)
    assert board.returncode == 0 and "diverged" in board.stdout


@pytest.mark.parametrize("poison, needles", [
    ("nan", ["NaN or infinity", "diverged run"]),
    ("float8", ["unexpected dtype", "float8"]),
    ("int64", ["torch.int64", "torch.float32"]),
])
def test_eval_and_merge_refuse_poisoned_adapter_tensors(tmp_path, reference, poison, needles):
    import torch
    from safetensors.torch import load_file, save_file

    run = copy_run(reference, tmp_path / "run")
    f = run / "adapter" / "adapter.safetensors"
    tensors = load_file(str(f))
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    if poison == "nan":
        tensors[name][0, 0] = float("nan")
    else:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn if poison == "float8" else torch.int64)
    save_file(tensors, str(f))
    before = tree(tmp_path)
    one_line(cli("eval", f"run={run}", cwd=tmp_path), *needles)
    one_line(cli("merge", f"adapter={run}", "out=merged", cwd=tmp_path), *needles)
    assert tree(tmp_path) == before


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB file system of its own (tmpfs): filling it does not fill the machine's disk. Needs root."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (a disk-full test must not fill the real disk)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> None:
    with open(disk / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        with open(disk / "ballast", "ab") as f:  # the last partial block too
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass


def test_a_full_disk_gets_one_line_and_keeps_the_good_files(tmp_path, tiny_bert, reference, small_disk):
    run = copy_run(reference, small_disk / "run")
    fill(small_disk)
    before = tree(small_disk)
    one_line(cli("eval", f"run={run}", cwd=tmp_path), "cannot write", "disk is full")
    assert tree(small_disk) == before  # the old report is intact, no temporary file is left
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={small_disk / 'new'}"), cwd=tmp_path)
    one_line(proc, "disk is full")
    assert not (small_disk / "new" / "adapter").exists() and not list(small_disk.glob("new/.*tmp*"))


def test_a_file_size_limit_gets_one_line(tmp_path, tiny_bert):
    import resource

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **THREADS, "PEFTKIT_CACHE": str(tmp_path / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", *tiny(tiny_bert, "hydra.run.dir=run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=600)
    one_line(proc, "cannot write", "file size")
    run = tmp_path / "run"
    assert not (run / "adapter").exists() or (run / "adapter" / "adapter_config.json").is_file()
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


@pytest.fixture()
def read_only(tmp_path, reference):
    """A read-only folder holding a finished run: a read-only mount as root (root ignores file modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs to make read-only")
        copy_run(reference, ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=False)
    else:
        copy_run(reference, ro / "run")
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield ro
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_a_read_only_place_gets_one_line(tmp_path, tiny_bert, reference, read_only):
    before = tree(read_only)
    one_line(cli("train", *tiny(tiny_bert, f"hydra.run.dir={read_only / 'new'}"), cwd=tmp_path), "not writable")
    one_line(cli("train", "-m", *tiny(tiny_bert, f"hydra.sweep.dir={read_only / 'sweep'}"), cwd=tmp_path), "not writable")
    one_line(cli("merge", f"adapter={reference}", f"out={read_only / 'merged'}", cwd=tmp_path), "not writable")
    one_line(cli("eval", f"run={read_only / 'run'}", cwd=tmp_path), "cannot write")
    one_line(cli("report", str(read_only / "run"), cwd=tmp_path), "not writable")  # refused before any work
    assert tree(read_only) == before


# ---- paths: one line for what cannot be read, created or followed ---------------------------------------

RAGGED = "text,label\na fine film,pos,an extra field\nan awful film,neg\n" + CSV.split("\n", 1)[1]


def test_a_ragged_csv_row_is_one_line_and_leaves_nothing(tmp_path, tiny_bert):
    (tmp_path / "ragged.csv").write_text(RAGGED)
    before = tree(tmp_path)
    proc = cli("train", *tiny(tiny_bert, "dataset=local", f"dataset.train_file={tmp_path / 'ragged.csv'}"), cwd=tmp_path)
    one_line(proc, "ragged.csv", "line 2 has 3 fields, the header 2", "quote")
    assert tree(tmp_path) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be created")
@pytest.mark.parametrize("command", [["train", "hydra.run.dir=/proc/peftkit_x"], ["merge", "adapter=run", "out=/proc/peftkit_x"],
                                     ["report", "run", "out=/proc/peftkit_x"]], ids=["train", "merge", "report"])
def test_an_output_folder_that_cannot_be_created_is_one_line(main_in, workdir, tiny_bert, command):
    extra = [f"backbone.path={tiny_bert}"] if command[0] == "train" else []
    before = tree(workdir)
    code, out, err = main_in(*command, *extra)
    assert_one_line_error(code, out, err, "/proc", "nothing can be created")
    assert tree(workdir) == before


@pytest.mark.parametrize("command", [["train", "hydra.run.dir=loop"], ["merge", "adapter=run", "out=loop"],
                                     ["report", "run", "out=loop"], ["eval", "run=loop"]], ids=["train", "merge", "report", "eval"])
def test_a_symlink_loop_is_one_line(main_in, workdir, tiny_bert, command):
    (workdir / "loop").symlink_to("loop")
    extra = [f"backbone.path={tiny_bert}"] if command[0] == "train" else []
    before = sorted(p.name for p in workdir.iterdir())  # tree() would follow the loop
    code, out, err = main_in(*command, *extra)
    assert_one_line_error(code, out, err, "loop")
    assert sorted(p.name for p in workdir.iterdir()) == before


# ---- files peftkit reads back: valid JSON of the wrong shape is one line naming the file ------------------

@pytest.mark.parametrize("content, needles", [
    ("[1, 2]", ["corrupt report", "report.json", "got a list"]),
    ('"hello"', ["corrupt report", "got a string"]),
    ('{"status": "ok", "score": 50}', ["corrupt report", "no dataset"]),
    ('{"status": "ok", "dataset": "d", "method": "m", "backbone": "b", "metrics": [1]}', ["corrupt report", "metrics=[1]"]),
])
def test_eval_refuses_a_report_of_the_wrong_shape(tmp_path, reference, content, needles):
    run = copy_run(reference, tmp_path / "run")
    (run / "eval" / "report.json").write_text(content)
    before = tree(tmp_path)
    one_line(cli("eval", f"run={run}", cwd=tmp_path), *needles)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content, needles", [
    ("{}", ["corrupt adapter config", "adapter_config.json", "no method"]),
    ("[1]", ["corrupt adapter config", "got a list"]),
    ('{"method": "lora"}', ["corrupt adapter config", "method=lora", "mapping"]),
])
def test_eval_and_merge_refuse_an_adapter_config_of_the_wrong_shape(tmp_path, reference, content, needles):
    run = copy_run(reference, tmp_path / "run")
    (run / "adapter" / "adapter_config.json").write_text(content)
    before = tree(tmp_path)
    one_line(cli("eval", f"run={run}", cwd=tmp_path), *needles)
    one_line(cli("merge", f"adapter={run}", "out=merged", cwd=tmp_path), *needles)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("config_yaml, needles", [("- a\n- b\n", ["got a list"]), ("", ["no backbone"]),
                                                  ("seed: 1\nmethod: [lora]\n", ["no backbone"])])
def test_eval_refuses_a_run_config_of_the_wrong_shape(main_in, workdir, config_yaml, needles):
    (workdir / "run" / "config.yaml").write_text(config_yaml)
    before = tree(workdir)
    code, out, err = main_in("eval", "run=run")
    assert_one_line_error(code, out, err, "corrupt run config", "config.yaml", *needles)
    assert tree(workdir) == before


def test_report_lists_runs_with_files_of_the_wrong_shape_as_failed(tmp_path, reference):
    good = copy_run(reference, tmp_path / "runs" / "good")
    listed = copy_run(reference, tmp_path / "runs" / "list_report")
    (listed / "eval" / "report.json").write_text("[1, 2]")
    method = copy_run(reference, tmp_path / "runs" / "method_list")
    (method / "config.yaml").write_text((method / "config.yaml").read_text().replace("method:\n", "method_was:\n") + "method: [a]\n")
    binary_log = copy_run(reference, tmp_path / "runs" / "binary_log")
    (binary_log / "train_log.jsonl").write_bytes(bytes(range(128, 256)))
    proc = cli("report", str(tmp_path / "runs"), f"out={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("peftkit: warning:")]
    assert len(warnings) == 3, proc.stderr
    board = json.loads((tmp_path / "leaderboard" / "leaderboard.json").read_text())
    assert sorted(f["dir"] for f in board["failed"]) == sorted([str(listed), str(method)])
    assert str(good) in json.dumps(board["rows"]) and str(binary_log) in json.dumps(board["rows"])


# ---- resume continues the run's own model, from a readable checkpoint ---------------------------------------

@pytest.mark.parametrize("change, needles", [
    (["method.r=4"], ["method.r=8 (this command: 4)"]),
    (["method=ia3"], ["method=lora (this command: ia3)"]),
])
def test_resume_refuses_another_method_config(tmp_path, tiny_bert, reference, change, needles):
    run = copy_run(reference, tmp_path / "run")
    before = tree(tmp_path)
    proc = cli("train", *tiny(tiny_bert, f"resume={run}", *change), cwd=tmp_path)
    one_line(proc, f"resume={run}", "the run was trained with", *needles, "another hydra.run.dir", "overwrite=true")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content, needles", [("{ not json", ["corrupt checkpoint file", "trainer_state.json"]),
                                              ("{}", ["corrupt checkpoint file", "no key 'state'"]),
                                              ('{"state": [1]}', ["corrupt checkpoint file"])])
def test_resume_refuses_a_corrupt_trainer_state(tmp_path, tiny_bert, reference, content, needles):
    run = copy_run(reference, tmp_path / "run")
    (run / "checkpoints" / "last" / "trainer_state.json").write_text(content)
    before = tree(tmp_path)
    one_line(cli("train", *tiny(tiny_bert, f"resume={run}"), cwd=tmp_path), *needles)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "a pickle"])
def test_resume_refuses_a_damaged_state_file_before_touching_the_run(tmp_path, tiny_bert, reference, damage):
    run = copy_run(reference, tmp_path / "run")
    state = run / "checkpoints" / "last" / "state.safetensors"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        import torch

        torch.save({"x": torch.zeros(2)}, state)
    before = tree(tmp_path)
    one_line(cli("train", *tiny(tiny_bert, f"resume={run}"), cwd=tmp_path), "corrupt checkpoint file", "state.safetensors")
    assert tree(tmp_path) == before  # config.yaml too: not rewritten for a resume that cannot start


# ---- the command line --------------------------------------------------------------------------------------

def test_a_binary_recipe_is_one_line_naming_it_and_ls_lists_the_rest(main_in, workdir):
    recipes = workdir / "recipes"
    recipes.mkdir()
    (recipes / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    code, out, err = main_in("--recipes-dir", str(recipes), "train", "recipe=binary")
    assert_one_line_error(code, out, err, "binary.yaml", "not a text YAML file")
    code, out, err = main_in("--recipes-dir", str(recipes), "ls", "recipes")
    assert code == 0 and "binary" in out and "unreadable" in out and "quickstart" in out and err == "", (out, err)


@pytest.mark.parametrize("value, shows", [("false", False), ("0", False), ("", False), ("no", False), ("1", True), ("true", True)])
def test_peftkit_traceback_is_on_only_when_asked(main_in, workdir, monkeypatch, value, shows):
    from peftkit.errors import UserError

    monkeypatch.setenv("PEFTKIT_TRACEBACK", value)
    if shows:
        with pytest.raises(UserError):
            main_in("ls", "nope")
    else:
        assert_one_line_error(*main_in("ls", "nope"), "peftkit ls takes one of")


def test_prompt_tuning_too_long_names_num_virtual_tokens(tmp_path, tiny_bert):
    proc = cli("train", *tiny(tiny_bert, "method=prompt_tuning", "method.num_virtual_tokens=1000"), cwd=tmp_path)
    one_line(proc, "method.num_virtual_tokens=1000", "at most 126")
    assert not (tmp_path / "outputs").exists()


# ---- Ctrl-C ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum,code,said", [(2, 130, "interrupted (Ctrl-C)"), (15, 143, "stopped (SIGTERM)")],
                         ids=["ctrl_c", "sigterm"])
def test_ctrl_c_during_training_says_what_was_kept(tmp_path, tiny_bert, signum, code, said):
    """Ctrl-C, or SIGTERM (a cluster's time limit, `timeout`, `docker stop`), keeps the checkpoint and says
    how to go on."""
    import time

    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **THREADS}
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "train",
                             *tiny(tiny_bert, f"hydra.run.dir={run}", "trainer.max_steps=100000")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"peftkit: error: {said}") and "kept the checkpoint of step" in last
    assert f"resume={run}" in last and len([x for x in err.splitlines() if x.startswith("peftkit: error:")]) == 1
    assert not (run / ".peftkit.lock").exists() and (run / "checkpoints" / "last" / "state.safetensors").is_file()


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_ctrl_c_during_eval_or_merge_is_one_line_and_frees_the_folder(main_in, workdir, monkeypatch, command):
    from peftkit import evaluate, merge

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "score_run", interrupted)
    monkeypatch.setattr(merge, "check_output", interrupted)
    before = tree(workdir)
    code, out, err = main_in(*(["eval", "run=run"] if command == "eval" else ["merge", "adapter=run", "out=o"]))
    assert code == 130 and "Traceback" not in err, err
    assert err.startswith("peftkit: error: interrupted (Ctrl-C)") and len(err.strip().splitlines()) == 1, err
    assert tree(workdir) == before  # no lock left behind


# ---- overwrite and the user's files --------------------------------------------------------------------------

def test_overwrite_with_bad_data_keeps_the_previous_run(tmp_path, tiny_bert, reference):
    run = copy_run(reference, tmp_path / "run")
    (tmp_path / "ragged.csv").write_text(RAGGED)
    before = tree(tmp_path)
    for bad in (["dataset=local", f"dataset.train_file={tmp_path / 'ragged.csv'}"], ["method.target_modules=[nonexistent]"]):
        proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={run}", *bad), "overwrite=true", cwd=tmp_path)
        one_line(proc)
        assert tree(tmp_path) == before


def test_a_folder_of_the_users_is_no_run_to_replace(tmp_path, tiny_bert):
    proj = tmp_path / "proj"
    (proj / "eval").mkdir(parents=True)
    (proj / "config.yaml").write_text("my_project: true\n")
    (proj / "eval" / "notes.md").write_text("mine\n")
    before = tree(tmp_path)
    for extra in ([], ["overwrite=true"]):
        proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={proj}"), *extra, cwd=tmp_path)
        one_line(proc, "config.yaml", "peftkit did not write")
        assert tree(tmp_path) == before
    (proj / "config.yaml").unlink()  # eval/ with the user's notes only: nothing a run writes is in the way
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={proj}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (proj / "eval" / "notes.md").read_text() == "mine\n" and (proj / "eval" / "report.json").is_file()
    proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={proj}", "seed=1"), "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (proj / "eval" / "notes.md").read_text() == "mine\n" and report(proj)["seed"] == 1


def test_merge_overwrite_replaces_only_an_earlier_merge(tmp_path, reference):
    out = tmp_path / "merged"
    assert cli("merge", f"adapter={reference}", f"out={out}", cwd=tmp_path).returncode == 0
    assert cli("merge", f"adapter={reference}", f"out={out}", "overwrite=true", cwd=tmp_path).returncode == 0
    (out / "notes.txt").write_text("mine\n")
    before = tree(tmp_path)
    one_line(cli("merge", f"adapter={reference}", f"out={out}", "overwrite=true", cwd=tmp_path), "notes.txt", "peftkit did not write")
    assert tree(tmp_path) == before
    mine = tmp_path / "model"  # a model folder of the user's (no merge.json): never replaced
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    one_line(cli("merge", f"adapter={reference}", f"out={mine}", "overwrite=true", cwd=tmp_path), "config.json", "peftkit did not write")
    assert (mine / "config.json").read_text() == "{}"


def test_report_never_replaces_the_users_files_in_leaderboard(tmp_path, reference):
    run = copy_run(reference, tmp_path / "run")
    assert cli("report", str(run), cwd=tmp_path).returncode == 0
    assert cli("report", str(run), cwd=tmp_path).returncode == 0  # its own leaderboard: replaced
    (run / "leaderboard" / "mynotes.md").write_text("mine\n")
    before = tree(tmp_path)
    one_line(cli("report", str(run), cwd=tmp_path), "mynotes.md", "peftkit did not write", "out=DIR")
    assert tree(tmp_path) == before
    shutil.rmtree(run / "leaderboard")
    (run / "leaderboard").mkdir()  # files of yours with our names: told apart by content, not by name
    (run / "leaderboard" / "leaderboard.csv").write_text("my,own,csv\n")
    (run / "leaderboard" / "scores.png").write_bytes(b"mine")
    before = tree(tmp_path)
    one_line(cli("report", str(run), cwd=tmp_path), "leaderboard.csv", "peftkit did not write")
    assert tree(tmp_path) == before


def test_tilde_means_home_in_every_path(tmp_path, tiny_bert, reference, monkeypatch):
    from peftkit import config

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    copy_run(reference, home / "run")
    _, _, out = config.check("quickstart", [f"backbone.path={tiny_bert}", "hydra.run.dir='~/new'"])
    assert out == str(home / "new")
    assert cli("eval", "run=~/run", cwd=tmp_path).returncode == 0
    assert cli("merge", "adapter=~/run", "out='~/merged'", cwd=tmp_path).returncode == 0
    assert cli("report", "~/run", "out=~/board", cwd=tmp_path).returncode == 0
    assert (home / "merged" / "merge.json").is_file() and (home / "board" / "leaderboard" / "leaderboard.md").is_file()
    assert not (tmp_path / "~").exists()


def test_eval_marks_an_unfinished_run_and_resume_still_finds_it(tmp_path, tiny_bert, reference, monkeypatch):
    from peftkit import config, launch

    run = copy_run(reference, tmp_path / "outputs" / "2026-01-01" / "00-00-00")
    shutil.rmtree(run / "eval")  # a run stopped mid-way: a checkpoint, no final report
    proc = cli("eval", f"run={run}", cwd=tmp_path)
    assert proc.returncode == 0 and "is unfinished" in proc.stderr, proc.stderr
    r = report(run)
    assert r["status"] == "unfinished" and "at step 8" in r["error"] and f"resume={run}" in r["error"]
    monkeypatch.chdir(tmp_path)
    cfg, _, _ = config.check("quickstart", tiny(tiny_bert))
    _, found = launch.resolve_resume("quickstart", [*tiny(tiny_bert), "resume=true"], cfg)
    assert found is not None and found.resolve() == run.resolve()
    board = cli("report", str(run), f"out={tmp_path}", cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    assert json.loads((tmp_path / "leaderboard" / "leaderboard.json").read_text())["failed"][0]["status"] == "unfinished"


def test_from_peft_refuses_a_base_with_custom_code_unless_trusted(tmp_path, reference, custom_code_model):
    peft = tmp_path / "peft"
    assert cli("merge", "mode=to_peft", f"adapter={reference}", f"out={peft}", cwd=tmp_path).returncode == 0
    cfg = json.loads((peft / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(custom_code_model)
    (peft / "adapter_config.json").write_text(json.dumps(cfg))
    before = tree(tmp_path)
    one_line(cli("merge", "mode=from_peft", f"adapter={peft}", "out=o", cwd=tmp_path), "custom code", "trust_remote_code=true")
    one_line(cli("merge", "mode=from_peft", f"adapter={peft}", f"backbone_path={custom_code_model}", "out=o", cwd=tmp_path),
             "custom code", "trust_remote_code=true")
    assert tree(tmp_path) == before


def test_a_non_finite_method_loss_term_is_divergence_too(tmp_path, tiny_bert, monkeypatch):
    """A method's own loss term (MoE LoRA's load balancing) trains the adapter as the task loss does:
    infinity there stops the run as a diverged one, not a report that says ok."""
    import torch

    from peftkit.methods.moe_lora import MoeLoRA

    monkeypatch.setattr(MoeLoRA, "aux_loss", lambda self, model: torch.tensor(float("inf")))
    run = tmp_path / "run"
    proc = cli("train", *tiny(tiny_bert, "method=moe_lora", f"hydra.run.dir={run}"), cwd=tmp_path)
    one_line(proc, "training diverged at step 1", "moe_lora", "inf")
    assert report(run)["status"] == "diverged"


def test_a_method_loss_term_missing_on_some_steps_is_read_in_order_once_a_window(tmp_path, tiny_bert, monkeypatch):
    """Read once a log window (as on a GPU), steps with and without a method term mix in one read, and
    the first non-finite one still names its step."""
    import torch

    from peftkit import train as trainer
    from peftkit.methods.moe_lora import MoeLoRA

    terms = iter([None, torch.tensor(0.1), torch.tensor(float("inf"))] + [None] * 100)
    monkeypatch.setattr(MoeLoRA, "aux_loss", lambda self, model: next(terms))
    monkeypatch.setattr(trainer, "read_interval", lambda device, log_every: log_every)
    run = tmp_path / "run"
    proc = cli("train", *tiny(tiny_bert, "method=moe_lora", "trainer.log_every=8", f"hydra.run.dir={run}"), cwd=tmp_path)
    one_line(proc, "training diverged at step 3", "moe_lora", "inf")
    assert report(run)["status"] == "diverged"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception, as intended
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_loop():
    """Python drops an exception raised in a __del__: a Ctrl-C landing there must not be lost (CtrlC's flag)."""
    import gc
    import signal

    from peftkit.errors import CtrlC

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs here, inside the finalizer

    before = signal.getsignal(signal.SIGINT)  # a library used earlier in this worker may have changed it
    with CtrlC() as ctrl_c:
        x = Finalized()
        del x  # the KeyboardInterrupt is raised in __del__ and dropped ("Exception ignored")
        gc.collect()
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_a_bad_value_in_a_run_config_names_the_file_and_one_given_here_does_not(main_in, workdir):
    from omegaconf import OmegaConf

    path = workdir / "run" / "config.yaml"
    good = OmegaConf.load(path)
    bad = good.copy()
    bad.trainer.lr = -1.0
    path.write_text(OmegaConf.to_yaml(bad))
    before = tree(workdir)
    code, out, err = main_in("eval", "run=run")
    assert_one_line_error(code, out, err, "run/config.yaml: trainer.lr=-1.0", "edit it there, or override it")
    code, out, err = main_in("eval", "run=run", "trainer.lr=1e-3")  # overridden: past the check (to the missing adapter)
    assert_one_line_error(code, out, err, "has no adapter/")
    assert tree(workdir) == before
    path.write_text(OmegaConf.to_yaml(good))
    code, out, err = main_in("eval", "run=run", "trainer.lr=-2")
    assert "config.yaml" not in assert_one_line_error(code, out, err, "trainer.lr=-2")  # the value given here, not the file's
