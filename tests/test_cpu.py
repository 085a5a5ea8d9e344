"""CPU threads: what the user sets wins; otherwise a probe picks 1 or every free core. And the bf16 probe (peftkit.cpu)."""

from __future__ import annotations

import pytest
import torch

from peftkit import cpu


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "available_cores", lambda: 4)
    yield
    torch.set_num_threads(saved)


def test_the_users_number_wins():
    assert cpu.choose_threads(3, probe=lambda n: pytest.fail("no probe when the user says")) == (3, "trainer.threads")
    assert torch.get_num_threads() == 3


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert cpu.choose_threads(None, probe=lambda n: pytest.fail("no probe"))[0] == 1


@pytest.mark.parametrize("one, many, chosen", [(0.010, 0.004, 4), (0.010, 0.009, 1), (0.010, 0.050, 1)])
def test_the_probe_keeps_more_threads_only_when_clearly_faster(one, many, chosen):
    n, why = cpu.choose_threads(None, probe=lambda k: one if k == 1 else many)
    assert n == chosen and torch.get_num_threads() == chosen and "probe" in why


def test_processes_share_the_cores():
    seen = []
    cpu.choose_threads(None, processes=2, probe=lambda k: seen.append(k) or (0.01 if k == 1 else 0.001))
    assert seen == [1, 2] and torch.get_num_threads() == 2


def test_the_real_probe_times_a_matmul():
    assert 0 < cpu.probe_seconds(1, repeats=1) < 5


def test_the_bf16_probe_compares_two_matmuls(monkeypatch):
    assert cpu.bf16_slowdown(64) > 0
    clock = iter([0.0, 0.002, 0.0, 0.001, 0.0, 0.06, 0.0, 0.05])  # fp32 2 then 1 ms, bf16 60 then 50 ms: the best of each
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: next(clock))
    assert cpu.bf16_slowdown(8) == pytest.approx(50)
