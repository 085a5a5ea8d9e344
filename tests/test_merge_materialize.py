"""`peftkit merge mode=materialize`: a multi-task run (houlsby, lora, hyperformer) trained from the
CLI on three local datasets becomes one single-task run per task, whose model gives the multi-task
model's logits and hidden states for that task, and which `peftkit eval` scores as the multi-task
run scored that task; hyperformer's become houlsby runs holding each task's generated adapters.
Refusals are one line; out= is never replaced without overwrite=true."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _train_helpers import cli, report, toy_task_datasets
from peftkit import adapter, model
from peftkit.tasks import multitask

TASKS = {"sent": ["neg", "pos"], "pair": ["a", "b", "c"], "score": None}
METHODS = {"houlsby": ["method.train_layernorm=false"], "lora": [], "hyperformer": []}  # hyperformer's LayerNorms train (copied too)


@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory):
    return toy_task_datasets(tmp_path_factory.mktemp("recipes"), {"sent": 64, "pair": 48, "score": 40})


_runs: dict[str, object] = {}


@pytest.fixture(scope="module")
def runs(recipes_dir, tiny_bert, tmp_path_factory):
    """A multi-task run per method, trained once (lr 1e-2, so that 8 steps move the adapters)."""
    def get(method: str):
        if method not in _runs:
            cwd = tmp_path_factory.mktemp(f"mt_{method}")
            proc = cli("--recipes-dir", str(recipes_dir), "train", "recipe=glue", f"method={method}",
                       "dataset=[toy_sent,toy_pair,toy_score]", f"backbone.path={tiny_bert}", "backbone.max_length=32",
                       "trainer.batch_size=8", "trainer.max_steps=8", "trainer.eval_every=8", "trainer.lr=1e-2", "seed=0",
                       f"hydra.run.dir={cwd / 'run'}", *METHODS[method], cwd=cwd)
            assert proc.returncode == 0, proc.stderr[-3000:]
            _runs[method] = cwd / "run"
        return _runs[method]
    return get


def materialize(recipes_dir, run, out, *extra):
    return cli("--recipes-dir", str(recipes_dir), "merge", "mode=materialize", f"adapter={run}", f"out={out}", *extra, cwd=out.parent)


def inputs(tokenizer) -> dict:
    single = ["a gripping, funny and warm film", "dull"]
    return dict(tokenizer(single + ["the plot", "a scene"], ["", "", "never comes together", "great actor"], padding=True,
                          return_tensors="pt"))


@torch.no_grad()
def outputs(m, batch):
    out = m.eval()(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_task_becomes_a_single_task_run_with_the_same_outputs(method, runs, recipes_dir, tmp_path):
    run = runs(method)
    out = tmp_path / "tasks"
    proc = materialize(recipes_dir, run, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["merge.json", "pair", "score", "sent"]
    mt, _ = model.from_adapter(run / "adapter")
    batch = inputs(mt.tokenizer)
    base_hidden = None
    generated = {}
    for t, (task, labels) in enumerate(TASKS.items()):
        meta = json.loads((out / task / "adapter" / adapter.CONFIG).read_text())
        assert meta["method"]["name"] == ("houlsby" if method == "hyperformer" else method)
        assert meta["task_type"] == "classification" and meta["label_names"] == labels and meta["dataset"] == "local"
        cfg = OmegaConf.load(out / task / "config.yaml")
        assert cfg.dataset.train_file.endswith(f"/{task}.csv") and "tasks" not in cfg.dataset and cfg.method.name == meta["method"]["name"]
        tensors = load_file(str(out / task / "adapter" / adapter.WEIGHTS))
        assert not any(n.startswith("task_heads.") or ".hypernet." in n for n in tensors)
        assert tensors["classifier.weight"].shape == (1 if labels is None else len(labels), 32)
        if method == "hyperformer":
            assert sum(".LayerNorm." in n for n in tensors) == 2 * 2 * 2  # two per layer, weight and bias
            generated[task] = tensors["bert.encoder.layer.1.output.dense.adapter_up.weight"]

        single, _ = model.from_adapter(out / task / "adapter")
        with multitask.active(mt.model, t):
            want = outputs(mt.model, batch)
        got = outputs(single.model, batch)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
        if base_hidden is None:  # the adapter matters: without it the hidden states differ
            from transformers import AutoModel

            base_hidden = AutoModel.from_pretrained(meta["backbone"]["path"]).eval()(**batch).last_hidden_state.detach()
        assert not torch.allclose(got[1], base_hidden, atol=1e-3)

        proc = cli("eval", f"run={out / task}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scored = report(out / task)["metrics"]["validation"]
        assert scored == pytest.approx(report(run)["metrics"][task], abs=1e-6)  # as the multi-task run scored it
    if method == "hyperformer":  # one hypernetwork, a different adapter per task
        assert not torch.allclose(generated["sent"], generated["pair"]) and not torch.allclose(generated["pair"], generated["score"])
    info = json.loads((out / "merge.json").read_text())
    assert info["folders"] == list(TASKS) and all(d["max_abs_logit_diff"] <= 1e-5 for d in info["tasks"].values())


def test_out_is_replaced_only_when_asked_and_only_if_ours(runs, recipes_dir, tmp_path):
    run, out = runs("houlsby"), tmp_path / "tasks"
    assert materialize(recipes_dir, run, out).returncode == 0
    proc = materialize(recipes_dir, run, out)
    assert proc.returncode == 2 and "already holds files" in proc.stderr and "overwrite=true" in proc.stderr
    assert cli("eval", f"run={out / 'sent'}", cwd=tmp_path).returncode == 0  # its eval/ is ours too
    proc = materialize(recipes_dir, run, out, "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out / "sent" / "notes.txt").write_text("mine")
    proc = materialize(recipes_dir, run, out, "overwrite=true")
    assert proc.returncode == 2 and "sent/notes.txt" in proc.stderr
    assert (out / "sent" / "notes.txt").read_text() == "mine"


def test_a_single_task_run_is_refused_in_one_line(tiny_bert, tmp_path):
    from methods._helpers import LABELS, backbone_cfg, build

    a = build(tiny_bert, {"name": "houlsby", "bottleneck": 4})
    adapter.save(tmp_path / "single", a.model, a.trainable, model.meta(a, backbone_cfg(tiny_bert), LABELS, "t"))
    proc = cli("merge", "mode=materialize", f"adapter={tmp_path / 'single'}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    line = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in line, proc.stderr[-2000:]
    assert f"adapter={tmp_path / 'single'}" in line and "single-task" in line and "multi-task run" in line
    assert not (tmp_path / "out").exists()
