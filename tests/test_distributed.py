"""Two processes on CPU (gloo): `accelerate launch` and `torchrun` give one run dir, one adapter, one report.

No hydra.run.dir is passed, so both processes must agree on the timestamped outputs/<date>/<time>
that rank 0 picks (peftkit.launch shares it over the process group). The 64 dev examples make one
eval batch of 128, so one process scores nothing: evaluation must not need both in lockstep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _train_helpers import THREADS, free_port, read_log, report, tiny

BIN = Path(sys.executable).parent


def launch(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher; on a hang, kill it with its worker processes (its own process group)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **THREADS, **(env or {})}
    p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{cmd[0]} hung for 300 s (processes out of step on a collective?)\n{out[-3000:]}\n{err[-5000:]}")
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-4000:]}\n{err[-8000:]}"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def assert_one_run_of_two_processes(cwd: Path, proc) -> None:
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    r = report(run)
    assert r["processes"] == 2
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "eval" / "report.md").is_file() and (run / "config.yaml").is_file()
    steps, evals = read_log(run)
    assert [s["step"] for s in steps] == list(range(1, 9)) and [e["step"] for e in evals] == [4, 8]  # rank 0 logs, once
    out = proc.stdout + proc.stderr
    assert out.count("trainable params:") == 1, "only rank 0 prints"


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_bert):
    if shutil.which("accelerate", path=str(BIN)) is None:
        pytest.skip("accelerate's launcher is not installed beside this Python")
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "peftkit.cli", "train", *tiny(tiny_bert)]  # 3 steps per epoch per process
    proc = launch(cmd, tmp_path, {"ACCELERATE_USE_CPU": "true"})
    assert_one_run_of_two_processes(tmp_path, proc)


def test_torchrun_two_cpu_processes(tmp_path, tiny_bert):
    if shutil.which("torchrun", path=str(BIN)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "peftkit.cli", "train", *tiny(tiny_bert)]  # 3 steps per epoch per process
    proc = launch(cmd, tmp_path)
    assert_one_run_of_two_processes(tmp_path, proc)
