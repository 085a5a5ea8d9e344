"""`trainer.log_with=[tensorboard,wandb,mlflow]`: what each tracker holds, read back from its files.

One tiny run logs to every installed tracker; each test reads one tracker's files and compares them
with train_log.jsonl and report.json. A tracker whose package is absent is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from _train_helpers import cli, read_log, report, tiny, train

INSTALLED = [n for n in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(n)]


def needs(name: str):
    return pytest.mark.skipif(name not in INSTALLED, reason=f"the {name} package is not installed (pip install {name})")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_bert) -> Path:
    if not INSTALLED:
        pytest.skip("no tracker package is installed (pip install tensorboard)")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        offline(mp)
        train(root, *tiny(tiny_bert, f"trainer.log_with=[{','.join(INSTALLED)}]", f"hydra.run.dir={root / 'run'}"))
    return root / "run"


def offline(mp: pytest.MonkeyPatch) -> None:
    """peftkit's defaults: wandb offline, MLflow in the run's own store (not where a user's variables point)."""
    for var in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)


def logged(run: Path) -> dict[str, dict[int, float]]:
    """train_log.jsonl as tracker keys: {key: {step: value}}."""
    steps, evals = read_log(run)
    out: dict[str, dict[int, float]] = {}
    for r in steps:
        for k in ("loss", "lr", "samples_per_s"):
            out.setdefault(f"train/{k}", {})[r["step"]] = r[k]
    for r in evals:
        out.setdefault("eval/score", {})[r["step"]] = r["score"]
        out.setdefault("eval/validation/accuracy", {})[r["step"]] = r["eval"]["validation"]["accuracy"]
    return out


# --- TensorBoard ---------------------------------------------------------------------------------


@needs("tensorboard")
def test_tensorboard_events_hold_the_log_the_report_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = tracked / "tracking" / "tensorboard"
    acc = EventAccumulator(str(events)).Reload()
    for key, by_step in logged(tracked).items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(by_step, rel=1e-6), key  # event files hold float32
    r = report(tracked)
    assert acc.Scalars("report/score")[-1].value == pytest.approx(r["score"], rel=1e-6)
    assert acc.Scalars("report/samples_per_s")[-1].value == pytest.approx(r["samples_per_s"], rel=1e-6)
    assert acc.Scalars("report/validation/accuracy")[-1].value == pytest.approx(r["metrics"]["validation"]["accuracy"], rel=1e-6)
    # the resolved config as hyperparameters (torch writes them in a folder of their own, named by the time)
    [hp_dir] = [d for d in events.iterdir() if any(d.glob("events.out.tfevents.*"))]
    hp = EventAccumulator(str(hp_dir)).Reload().PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["method.name"].string_value == "lora"
    assert session.hparams["trainer.max_steps"].number_value == 8
    assert session.hparams["trainer.log_with"].string_value == json.dumps(INSTALLED)


# --- MLflow ----------------------------------------------------------------------------------------


@needs("mlflow")
def test_mlflow_store_holds_the_log_the_report_and_the_config(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'tracking' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("peftkit").experiment_id])
    assert run.info.run_name == tracked.name and run.info.status == "FINISHED"
    for key, by_step in logged(tracked).items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} == pytest.approx(by_step), key
    r = report(tracked)
    assert run.data.metrics["report/score"] == pytest.approx(r["score"])
    assert run.data.metrics["report/samples_per_s"] == pytest.approx(r["samples_per_s"])
    assert run.data.params["method.name"] == "lora" and run.data.params["trainer.max_steps"] == "8"


# --- wandb (offline) -------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file: a LevelDB-style log (32 KiB blocks of
    crc32/length/type-framed chunks after a 7-byte header) of wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    [offline] = (run_dir / "tracking" / "wandb").glob("offline-run-*")
    out = {"history": {}, "config": {}}
    for rec in wandb_records(next(offline.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, project=rec.run.project)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in row.items():
                out["history"].setdefault(k, {})[row["_step"]] = v
    return out


@needs("wandb")
def test_wandb_offline_run_holds_the_log_the_report_and_the_config(tracked):
    w = wandb_run(tracked)
    assert (w["name"], w["group"], w["project"]) == (tracked.name, "", "peftkit")
    for key, by_step in logged(tracked).items():
        assert {s: w["history"][key][s] for s in by_step} == pytest.approx(by_step), key
    r = report(tracked)
    assert w["history"]["report/score"][r["total_steps"]] == pytest.approx(r["score"])
    assert w["config"]["method.name"] == "lora" and w["config"]["trainer.max_steps"] == 8


# --- errors and sweeps -------------------------------------------------------------------------------


def test_a_missing_tracker_package_is_one_line_and_writes_nothing(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    proc = cli("train", *tiny(tiny_bert, "trainer.log_with=[tensorboard,wandb]", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("peftkit: error: trainer.log_with=[wandb]: the wandb package is not installed; "
                                   "pip install wandb")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_an_unknown_tracker_is_refused_naming_the_choices(tmp_path, tiny_bert):
    proc = cli("train", *tiny(tiny_bert, "trainer.log_with=[comet]", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == ("peftkit: error: trainer.log_with=[comet]: expected a list of experiment trackers: "
                                   "tensorboard, wandb, mlflow, e.g. [tensorboard] (or [] for none)")


def test_a_sweeps_runs_are_named_after_their_folders_and_share_the_sweeps_group(tmp_path, tiny_bert, monkeypatch):
    offline(monkeypatch)
    named = [n for n in ("mlflow", "wandb") if n in INSTALLED]
    if not named:
        pytest.skip("neither mlflow nor wandb is installed: TensorBoard has no run names or groups")
    sweep = tmp_path / "my-sweep"
    train(tmp_path, "-m", *tiny(tiny_bert, "seed=0,1", "trainer.max_steps=2", "trainer.eval_every=2",
                                f"trainer.log_with=[{','.join(named)}]", f"hydra.sweep.dir={sweep}"))
    runs = sorted(d for d in sweep.iterdir() if (d / "eval" / "report.json").is_file())
    assert [d.name for d in runs] == ["0", "1"]
    for d in runs:
        if "wandb" in named:
            w = wandb_run(d)
            assert (w["name"], w["group"]) == (d.name, "my-sweep")
        if "mlflow" in named:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{d / 'tracking' / 'mlflow.db'}")
            [run] = client.search_runs([client.get_experiment_by_name("my-sweep").experiment_id])
            assert run.info.run_name == d.name
