"""Multi-task classification: temperature-sampled single-task batches, one head per task (routing
checked against a single-task model holding that head), the loss by hand, and runs from the CLI on
three local datasets of different kinds (binary, three classes on pairs, regression)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from _train_helpers import THREADS, cli, report, toy_task_datasets
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)
from peftkit.tasks import multitask


class FakePart:
    """What MultiTaskSplit needs of a task's Encoded split: lengths and batch()."""

    def __init__(self, n: int, seed: int):
        self.lengths = np.random.default_rng(seed).integers(3, 40, n).tolist()

    def __len__(self):
        return len(self.lengths)

    def batch(self, idx):
        return {"input_ids": torch.tensor(idx)}


def task_of(split: multitask.MultiTaskSplit, b: list[int]) -> int:
    return int(np.searchsorted(split.offsets, b[0], side="right")) - 1


def test_every_batch_holds_one_task_and_an_epoch_as_many_batches_as_the_tasks_own():
    split = multitask.MultiTaskSplit([FakePart(300, 0), FakePart(95, 1), FakePart(41, 2)], temperature=1.0)
    batches = split.train_batches(10, seed=0, epoch=0, group_by_length=True)
    assert len(batches) == 30 + 10 + 5
    for b in batches:
        t = task_of(split, b)
        assert all(split.offsets[t] <= i < split.offsets[t + 1] for i in b)
        assert split.batch(b)["task"].item() == t
    with pytest.raises(ValueError, match="mixes tasks"):
        split.batch([0, 299, 300])


def test_a_task_is_seen_whole_before_it_repeats_and_the_order_is_a_function_of_seed_and_epoch():
    split = multitask.MultiTaskSplit([FakePart(300, 0), FakePart(20, 1)], temperature=100.0)  # the small task runs out
    batches = split.train_batches(10, seed=3, epoch=1, group_by_length=False)
    small = [i for b in batches if task_of(split, b) == 1 for i in b]
    assert len(small) > 40  # drawn about half the time: several passes over its 20 rows
    for k in range(0, len(small) - len(small) % 20, 20):  # each pass: every row once
        assert sorted(small[k:k + 20]) == list(range(300, 320))
    assert batches == split.train_batches(10, seed=3, epoch=1, group_by_length=False)
    assert batches != split.train_batches(10, seed=3, epoch=2, group_by_length=False)


@pytest.mark.parametrize("temperature, expected", [(1.0, [0.8, 0.2]), (2.0, [2 / 3, 1 / 3]), (1e6, [0.5, 0.5])])
def test_tasks_are_drawn_in_proportion_to_size_to_the_power_one_over_t(temperature, expected):
    split = multitask.MultiTaskSplit([FakePart(400, 0), FakePart(100, 1)], temperature=temperature)  # sqrt: 20 to 10
    assert split.probabilities() == pytest.approx(expected, abs=1e-6)
    drawn = [task_of(split, b) for e in range(40) for b in split.train_batches(10, 0, e, True)]
    assert np.mean(np.array(drawn) == 0) == pytest.approx(expected[0], abs=0.03)  # 2,000 draws


# --- heads ---------------------------------------------------------------------------------------

LABELS = {"sent": ["neg", "pos"], "score": None, "pair": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def heads_model(tiny_bert):
    torch.manual_seed(0)
    model = multitask.load_model(OmegaConf.create({"name": "tiny", "path": str(tiny_bert), "head": ["classifier", "score"],
                                                   "trust_remote_code": False, "max_length": 64}), LABELS)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 1000, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def test_each_task_runs_its_own_head_as_a_single_task_model_with_that_head_would(heads_model, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    names = [n for n, _ in heads_model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("classifier.") for n in names)
    for t, (task, labels) in enumerate(LABELS.items()):
        single = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1 if labels is None else len(labels)).eval()
        state = {k: v for k, v in heads_model.state_dict().items() if not k.startswith("task_heads.")}
        state.update({k.removeprefix(f"task_heads.{task}."): v for k, v in heads_model.state_dict().items()
                      if k.startswith(f"task_heads.{task}.")})
        single.load_state_dict(state)
        with torch.no_grad(), multitask.active(heads_model, t):
            got = heads_model(**inputs()).logits
        assert got.shape == (3, single.num_labels)
        torch.testing.assert_close(got, single(**inputs()).logits.detach(), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="multitask.active"):  # no task, no head: never a silent wrong one
        heads_model(**inputs())


def test_the_loss_is_cross_entropy_or_mse_on_the_tasks_own_logits(heads_model):
    for t, labels in enumerate(LABELS.values()):
        y = torch.tensor([0.5, 2.0, -1.0]) if labels is None else torch.tensor([1, 0, len(labels) - 1])
        loss = multitask.loss(heads_model, {**inputs(), "labels": y, "task": torch.tensor(t)}, None)
        with torch.no_grad(), multitask.active(heads_model, t):
            logits = heads_model(**inputs()).logits
        if labels is None:
            want = ((logits[:, 0] - y) ** 2).mean()
        else:
            want = -torch.log_softmax(logits, -1)[torch.arange(3), y].mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# --- from the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory):
    """Three local datasets as a user adds them: YAMLs in a --recipes-dir, each naming its CSV."""
    return toy_task_datasets(tmp_path_factory.mktemp("mt_recipes"), {"sent": 120, "pair": 90, "score": 60})


def mt_args(recipes_dir, tiny_bert, run_dir, *extra):
    """A 12-step multi-task Houlsby run on the three toy datasets; a key in `extra` replaces its default."""
    base = ["recipe=glue_houlsby", "dataset=[toy_sent,toy_pair,toy_score]", f"backbone.path={tiny_bert}", "backbone.max_length=32",
            "trainer.batch_size=8", "trainer.max_steps=12", "trainer.eval_every=6", "trainer.log_every=1", "seed=0",
            f"hydra.run.dir={run_dir}"]
    given = {e.split("=", 1)[0] for e in extra}
    return ["--recipes-dir", str(recipes_dir), "train", *[b for b in base if b.split("=", 1)[0] not in given], *extra]


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, recipes_dir, tiny_bert):
    cwd = tmp_path_factory.mktemp("mt_run")
    proc = cli(*mt_args(recipes_dir, tiny_bert, cwd / "run"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def test_a_multi_task_run_reports_each_task_and_their_average(mt_run):
    r = report(mt_run)
    assert r["status"] in FINISHED and r["dataset"] == "multitask" and r["task"] == "sent+pair+score"
    assert list(r["task_scores"]) == ["sent", "pair", "score"]
    assert set(r["metrics"]) == {"sent", "pair", "score"}
    assert set(r["metrics"]["score"]) == {"pearson", "spearman"} and set(r["metrics"]["pair"]) == {"accuracy"}
    assert r["score"] == pytest.approx(np.mean(list(r["task_scores"].values())))
    for task, s in r["task_scores"].items():
        assert s == pytest.approx(np.mean(list(r["metrics"][task].values())))
    meta = json.loads((mt_run / "adapter" / "adapter_config.json").read_text())
    assert meta["task_type"] == "multitask"
    assert meta["label_names"] == {"sent": ["neg", "pos"], "pair": ["a", "b", "c"], "score": None}
    assert {h for h in meta["head"] if h.startswith("task_heads.")} == {f"task_heads.{t}.classifier" for t in ("sent", "pair", "score")}
    cfg = OmegaConf.load(mt_run / "config.yaml")
    assert cfg.dataset.temperature == 1.0  # the datasets' whole configs in place of their names: eval needs no recipes dir
    assert [d.train_file for d in cfg.dataset.tasks] == [str(mt_run.parents[1] / f"mt_recipes0/{t}.csv") for t in ("sent", "pair", "score")]
    assert "| task | metric | score |" in (mt_run / "eval" / "report.md").read_text()  # tasks, not splits


def test_each_step_trains_one_task_and_every_task_trains(mt_run):
    from safetensors.torch import load_file

    tensors = load_file(str(mt_run / "adapter" / "adapter.safetensors"))
    for task, n in (("sent", 2), ("pair", 3), ("score", 1)):
        w = tensors[f"task_heads.{task}.classifier.weight"]
        assert w.shape[0] == n
    logged = [json.loads(x) for x in (mt_run / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == list(range(1, 13))


def test_eval_rescores_a_multi_task_run_exactly(mt_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mt_run, run)
    before = report(run)
    proc = cli("eval", f"run={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reproduces the training-time scores exactly" in proc.stdout
    after = report(run)
    assert after["metrics"] == before["metrics"] and after["task_scores"] == before["task_scores"]


def test_the_leaderboard_puts_each_task_in_its_column(mt_run, tmp_path):
    proc = cli("report", str(mt_run), f"out={tmp_path / 'board'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = json.loads((tmp_path / "board" / "leaderboard" / "leaderboard.json").read_text())
    assert board["tasks"] == ["pair", "score", "sent"]
    (row,) = board["rows"]
    r = report(mt_run)
    assert row["label"] == "houlsby multi-task"
    assert {t: c["mean"] for t, c in row["scores"].items()} == pytest.approx(r["task_scores"])
    assert row["trainable_params"] == round(r["trainable_params"] / 3)  # per task


def test_temperature_and_sampled_tasks_from_the_cli(recipes_dir, tiny_bert, tmp_path):
    proc = cli(*mt_args(recipes_dir, tiny_bert, tmp_path / "run", "dataset.temperature=1000", "trainer.max_steps=4",
                        "trainer.eval_every=4", "dataset.max_train_samples=16"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert cfg.dataset.temperature == 1000
    assert [d.max_train_samples for d in cfg.dataset.tasks] == [16, 16, 16]  # set once, for every task


@pytest.mark.parametrize("override, words", [
    ("dataset=[toy_sent,nope]", ["unknown dataset 'nope'", "toy_sent"]),
    ("dataset.temperature=0", ["dataset.temperature", "> 0"]),
    ("dataset=[toy_sent,quickstart_lm]", ["quickstart_lm", "classification datasets"]),
    ("dataset=[toy_sent,toy_sent]", ["twice"]),
])
def test_bad_multi_task_input_is_one_line(override, words, recipes_dir, tiny_bert, tmp_path):
    extra = [override] + (["dataset=[toy_sent,toy_pair]"] if override.startswith("dataset.") else [])
    proc = cli(*mt_args(recipes_dir, tiny_bert, tmp_path / "run", *extra), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_a_multi_task_run_in_two_processes(recipes_dir, tiny_bert, tmp_path):
    """DDP: a step of one task leaves the other heads without gradients; the group must not hang on them."""
    import shutil
    import sys
    from pathlib import Path

    from _train_helpers import free_port
    from test_distributed import launch

    bin_dir = Path(sys.executable).parent
    if shutil.which("torchrun", path=str(bin_dir)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    args = mt_args(recipes_dir, tiny_bert, tmp_path / "run", "trainer.max_steps=4", "trainer.eval_every=4")
    proc = launch([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "peftkit.cli", *args],
                  tmp_path, {"ACCELERATE_USE_CPU": "true", **THREADS})
    r = report(tmp_path / "run")
    assert r["processes"] == 2 and r["status"] in FINISHED and set(r["task_scores"]) == {"sent", "pair", "score"}, proc.stderr[-2000:]


def test_dry_run_shows_a_head_per_task_and_writes_nothing(recipes_dir, tiny_bert, tmp_path):
    proc = cli(*mt_args(recipes_dir, tiny_bert, tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[-1] for line in proc.stdout.splitlines() if line.strip().startswith("task_heads.")}
    # the heads the run makes, named and sized as the data says: 2 classes, 3 classes, a score (32 x n + n)
    assert rows == {"task_heads.sent.classifier": "66", "task_heads.pair.classifier": "99", "task_heads.score.classifier": "33"}
    assert "sized for 2 labels" not in proc.stdout and list(tmp_path.iterdir()) == []


def test_a_task_name_with_a_dot_is_one_line(tmp_path):
    from peftkit.errors import UserError

    f = tmp_path / "my.reviews.csv"
    f.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(10)))
    entry = {"name": "local", "train_file": str(f), "dev_file": None, "dev_fraction": 0.25, "split_seed": 0,
             "text_fields": ["text"], "label_field": "label", "label_names": None, "regression": False, "id_field": None,
             "metrics": ["accuracy"], "max_train_samples": None, "max_eval_samples": None}
    cfg = OmegaConf.create({"name": "multitask", "task": "multitask", "tasks": [entry], "temperature": 1.0})
    with pytest.raises(UserError, match=r"task name 'my.reviews'.*task_name=my_reviews"):
        multitask.load_data(cfg)
