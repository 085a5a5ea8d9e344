"""`peftkit train`: what a run writes, that it learns, seeding, keep_best, precision and sweeps.

Every run is the tiny random BERT on a few hundred examples, so each takes seconds (most of it
importing torch and transformers in the subprocess).
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _train_helpers import adapter_tensors, assert_same_tensors, cli, read_log, reference_run, report, tiny, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    return reference_run(tmp_path_factory, tiny_bert)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_bert):
    """`-m method=lora,ia3 seed=0,1` with the reference run's other overrides: four runs in one process."""
    root = tmp_path_factory.mktemp("sweep")
    args = [a for a in tiny(tiny_bert) if not a.startswith("seed=")]
    proc = train(root, "-m", *args, "method=lora,ia3", "seed=0,1", f"hydra.sweep.dir={root / 'sweep'}")
    runs = {}
    for d in sorted((root / "sweep").iterdir()):
        if (d / "config.yaml").is_file():
            cfg = OmegaConf.load(d / "config.yaml")
            runs[(cfg.method.name, cfg.seed)] = d
    return root / "sweep", runs, proc


# --- what a run writes ---------------------------------------------------------------------------


def test_config_yaml_is_resolved(reference, tiny_bert):
    run, _ = reference
    text = (run / "config.yaml").read_text()
    assert "${" not in text
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.backbone.path == str(tiny_bert)
    assert cfg.trainer.max_steps == 8 and cfg.trainer.eval_every == 4 and cfg.seed == 0
    assert cfg.method.name == "lora" and cfg.dataset.name == "quickstart"


def test_adapter_holds_exactly_the_trainable_tensors(reference):
    from peftkit import model
    from peftkit.data.quickstart import LABELS

    run, _ = reference
    cfg = OmegaConf.load(run / "config.yaml")
    a = model.build(cfg.backbone, cfg.method, LABELS)
    trainable = {n: p for n, p in a.model.named_parameters() if p.requires_grad}
    tensors = adapter_tensors(run)
    assert set(tensors) == set(trainable)
    assert all(tensors[n].shape == trainable[n].shape for n in tensors)
    assert any(n.startswith("classifier.") for n in tensors)  # the head is always saved
    assert any("lora" in n for n in tensors)
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["method"]["name"] == "lora"
    assert adapter_cfg["label_names"] == LABELS
    assert adapter_cfg["base_fingerprint"] == a.fingerprint
    assert adapter_cfg["trainable_params"] == sum(t.numel() for t in tensors.values())


def test_train_log_has_step_and_eval_records(reference):
    run, _ = reference
    steps, evals = read_log(run)
    assert [r["step"] for r in steps] == list(range(1, 9))  # log_every=1
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] >= 0 and r["samples_per_s"] > 0
    assert steps[0]["lr"] > 0 and steps[-1]["lr"] == 0  # linear decay to 0 at the last step
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        acc = r["eval"]["validation"]["accuracy"]
        assert 0 <= acc <= 100 and r["score"] == acc


def test_report_json_and_md(reference):
    run, _ = reference
    r = report(run)
    n = sum(t.numel() for t in adapter_tensors(run).values())
    assert r["trainable_params"] == n
    assert 0 < r["trainable_params"] < r["total_params"]
    assert r["trainable_pct"] == pytest.approx(100 * n / r["total_params"])
    assert set(r["metrics"]) == {"validation"} and "accuracy" in r["metrics"]["validation"]
    assert r["score"] == r["metrics"]["validation"]["accuracy"]
    assert r["method"] == "lora" and r["dataset"] == "quickstart" and r["seed"] == 0
    assert r["total_steps"] == 8 and r["processes"] == 1 and r["precision"] == "fp32"
    on_disk = sum(f.stat().st_size for f in (run / "adapter").rglob("*") if f.is_file())
    assert r["adapter_bytes"] == on_disk > 0  # so `peftkit report` can show it once the adapter is moved
    md = (run / "eval" / "report.md").read_text()
    assert f"{r['metrics']['validation']['accuracy']:.2f}" in md
    assert f"{n:,}" in md and f"{r['trainable_pct']:.3f}%" in md


def test_one_throughput_figure_in_the_bar_the_log_and_the_report(reference):
    """Throughput is defined once (train.Throughput): report.json's figures are the last log record's,
    and the progress bar ends on the same number."""
    run, console = reference
    steps, _ = read_log(run)
    r = report(run)
    assert (r["samples_per_s"], r["tokens_per_s"]) == (steps[-1]["samples_per_s"], steps[-1]["tokens_per_s"])
    bar = re.findall(r"(\d+) samples/s", console)
    assert bar and bar[-1] == f"{r['samples_per_s']:.0f}", console[-2000:]


def test_throughput_leaves_out_each_process_first_window_unless_it_is_the_only_one():
    from peftkit.train import Throughput

    t = Throughput()
    assert t.figures() == {}
    t.add(10, 100, 1.0)  # warm-up: the figure until another window comes
    assert t.figures() == {"samples_per_s": 10.0, "tokens_per_s": 100.0}
    t.add(40, 400, 2.0)
    t.add(20, 200, 1.0)
    assert t.figures() == {"samples_per_s": 20.0, "tokens_per_s": 200.0}
    assert t.figures(tokens=False) == {"samples_per_s": 20.0}
    resumed = Throughput(t.state())  # a checkpoint's counts go on; the resumed process's warm-up is left out too
    resumed.add(1, 1, 100.0)
    assert resumed.figures() == t.figures()


def test_console_reports_trainable_params(reference):
    run, console = reference
    m = re.search(r"trainable params: ([\d,]+) \((\d+\.\d\d)% of ([\d,]+)\)", console)
    assert m, console[-2000:]
    r = report(run)
    assert int(m.group(1).replace(",", "")) == r["trainable_params"]
    assert int(m.group(3).replace(",", "")) == r["total_params"]
    assert m.group(2) == f"{r['trainable_pct']:.2f}"


# --- keep_best -----------------------------------------------------------------------------------


def test_keep_best_adapter_is_the_best_eval_step(reference):
    """best_step is the first eval with the top score; adapter/ equals the last weights only if that is the last step."""
    run, _ = reference
    _, evals = read_log(run)
    top = max(r["score"] for r in evals)
    best = next(r for r in evals if r["score"] == top)
    r = report(run)
    assert r["best_step"] == best["step"]
    assert r["metrics"] == best["eval"] and r["score"] == top
    # the kept checkpoint holds the weights after the last step (8)
    last = {k[len("model."):]: v for k, v in load_file(str(run / "checkpoints" / "last" / "state.safetensors")).items()
            if k.startswith("model.")}
    saved = adapter_tensors(run)
    assert set(last) == set(saved)
    same_as_last = all(bool((saved[k] == last[k]).all()) for k in saved)
    assert same_as_last == (best["step"] == 8)


# --- learning --------------------------------------------------------------------------------------

POS, NEG = "wonderful", "dreadful"
FILLER = ("the movie was plot actor scene story film music camera light night city road house water "
          "friend family window table paper green blue small large quiet loud early late").split()


def _keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 3)
        words.insert(rng.randrange(len(words) + 1), POS if label == "pos" else NEG)
        rows.append((" ".join(words), label))
    return rows


def test_training_reduces_loss_and_beats_chance(tmp_path, tiny_bert):
    import csv

    for name, n, seed in (("train.csv", 256, 1), ("dev.csv", 64, 2)):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(_keyword_rows(n, seed))
    run = tmp_path / "run"
    train(tmp_path, f"backbone.path={tiny_bert}", "method=full", "dataset=local",
          f"dataset.train_file={tmp_path / 'train.csv'}", f"dataset.dev_file={tmp_path / 'dev.csv'}",
          "trainer.lr=5e-3", "trainer.batch_size=16", "trainer.max_steps=30", "trainer.log_every=5", "seed=0",
          f"hydra.run.dir={run}")
    steps, evals = read_log(run)
    assert [s["step"] for s in steps] == [5, 10, 15, 20, 25, 30]
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert first > 0.6  # about ln 2 for an untrained 2-class head
    assert last < 0.5 * first, [round(s["loss"], 3) for s in steps]
    assert report(run)["metrics"]["validation"]["accuracy"] >= 90  # chance is 50
    assert evals[-1]["score"] >= 90


# --- seeds and sweeps ------------------------------------------------------------------------------


def test_multirun_writes_one_run_dir_per_combination(sweep):
    root, runs, _ = sweep
    assert set(runs) == {("lora", 0), ("lora", 1), ("ia3", 0), ("ia3", 1)}
    assert len([d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]) == 4
    for (method, seed), d in runs.items():
        r = report(d)
        assert (r["method"], r["seed"]) == (method, seed)
        assert (d / "eval" / "report.md").is_file() and (d / "adapter" / "adapter.safetensors").is_file()
        assert not list(d.glob("*.log")), "no (empty) Hydra job log in a run folder"
    # ia3 and lora adapters hold different tensors
    assert set(adapter_tensors(runs[("ia3", 0)])) != set(adapter_tensors(runs[("lora", 0)]))


def test_same_seed_gives_identical_adapter(reference, sweep):
    """The sweep's lora/seed=0 run is a second run of the reference config (in another process)."""
    run, _ = reference
    _, runs, _ = sweep
    assert_same_tensors(adapter_tensors(runs[("lora", 0)]), adapter_tensors(run))
    assert [s["loss"] for s in read_log(runs[("lora", 0)])[0]] == [s["loss"] for s in read_log(run)[0]]


def test_different_seed_gives_different_adapter(reference, sweep):
    run, _ = reference
    _, runs, _ = sweep
    a, b = adapter_tensors(runs[("lora", 1)]), adapter_tensors(run)
    assert a.keys() == b.keys()
    assert any(not bool((a[k] == b[k]).all()) for k in a)


# --- precision -------------------------------------------------------------------------------------


def test_bf16_runs_on_cpu(tmp_path, tiny_bert, reference, monkeypatch):
    from peftkit import cpu

    monkeypatch.setattr(cpu, "bf16_slowdown", lambda: 57.0)  # as measured on an AVX2-only AMD EPYC
    run = tmp_path / "run"
    proc = train(tmp_path, *tiny(tiny_bert, "trainer.precision=bf16", "trainer.max_steps=4", f"hydra.run.dir={run}"))
    assert "bf16 matrices 57x slower than fp32" in proc.stderr and "trainer.precision=fp32" in proc.stderr
    r = report(run)
    assert r["precision"] == "bf16" and r["total_steps"] == 4 and "accuracy" in r["metrics"]["validation"]
    steps, _ = read_log(run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in steps)
    # step 1 sees the same weights and batch as the fp32 reference: the loss is close, not equal (autocast is on)
    fp32 = read_log(reference[0])[0][0]["loss"]
    assert steps[0]["loss"] != fp32 and steps[0]["loss"] == pytest.approx(fp32, abs=0.05)
    assert {t.dtype for t in adapter_tensors(run).values()} == {torch.float32}  # weights stay fp32


def test_fp16_on_cpu_fails_naming_bf16(tmp_path, tiny_bert):
    run = tmp_path / "out" / "run"
    proc = cli("train", *tiny(tiny_bert, "trainer.precision=fp16", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"^peftkit: error: .*fp16.*bf16", proc.stderr, re.M), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not run.exists()  # a run that failed on bad input leaves nothing behind


def test_trainer_threads_sets_torch_threads(tiny_bert, tmp_path):
    import torch

    from peftkit import config, train

    before = torch.get_num_threads()
    cfg = config.compose("quickstart", [f"backbone.path={tiny_bert}", "trainer.max_steps=1", "trainer.eval_every=1",
                                        "dataset.max_train_samples=32", "dataset.max_eval_samples=16", "trainer.threads=1"])
    try:
        torch.set_num_threads(2)
        train.run(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 1
        assert (tmp_path / "run" / "eval" / "report.json").is_file()
    finally:
        torch.set_num_threads(before)


def _log_without_timings(run) -> list[dict]:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "tokens_per_s", "elapsed_s")} for r in records]


def _same(a, b) -> bool:
    """Equal, floats up to float32 rounding (two runs in one process can differ by an ulp on some CPUs)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def test_losses_read_once_a_log_window_as_on_a_gpu_log_and_stop_as_read_every_step(tmp_path, tiny_bert, monkeypatch):
    """On a GPU the trainer reads the step losses once a log window (train.read_interval), so the host
    never waits for the GPU mid-window. Read that way here, a run logs what per-step reading logs, and
    a divergence names the same first step even when an evaluation comes before the window's log step
    (the losses are read before it), and keeps nothing."""
    from peftkit import train as trainer

    runs = {}
    for mode in ("every step", "once a window"):
        if mode == "once a window":
            asked = []
            monkeypatch.setattr(trainer, "read_interval", lambda device, log_every: asked.append(log_every) or log_every)
        runs[mode] = tmp_path / mode.replace(" ", "_")
        train(tmp_path, *tiny(tiny_bert, f"hydra.run.dir={runs[mode]}", "trainer.log_every=3"))
        diverging = tmp_path / f"{mode.replace(' ', '_')}_diverged"
        proc = cli("train", *tiny(tiny_bert, f"hydra.run.dir={diverging}", "trainer.lr=1e30", "trainer.max_grad_norm=0",
                                  "trainer.log_every=8", "trainer.eval_every=4"), cwd=tmp_path)
        assert proc.returncode != 0 and not (diverging / "adapter").exists()
        runs[mode + " diverged"] = (report(diverging)["error"], _log_without_timings(diverging))
    assert asked == [3, 8]  # the patched interval was the one used
    assert _same(_log_without_timings(runs["every step"]), _log_without_timings(runs["once a window"]))
    assert runs["every step diverged"] == runs["once a window diverged"]
    error, log = runs["once a window diverged"]
    assert "training diverged at step 2 of 8: the loss is nan" in error and log[-1]["diverged"] is True
