"""Shared by test_train, test_resume, test_eval, test_distributed: tiny runs of `peftkit train` and reading them.

The reference run (`reference_run`) is trained once per session and reused read-only: tests that
write into a run (eval, resume) copy it first.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

from safetensors.torch import load_file

from conftest import run_cli

_cache: dict[str, Path] = {}


def tiny(tiny_bert: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run: tiny BERT, 256/64 quickstart examples, 8 steps, eval and checkpoint every 4.
    A key in `extra` replaces its default here (peftkit refuses a key given twice)."""
    given = {e.split("=", 1)[0].lstrip("+~") for e in extra if "=" in e}
    return [o for o in _TINY(tiny_bert) if o.split("=", 1)[0] not in given] + list(extra)


def _TINY(tiny_bert: Path) -> list[str]:
    return [
        f"backbone.path={tiny_bert}",
        "dataset.max_train_samples=256",
        "dataset.max_eval_samples=64",
        "seed=0",
        "trainer.batch_size=48",  # 5 full batches + 1 of 16: 6 steps per epoch, so 8 steps cross an epoch
        "trainer.max_steps=8",
        "trainer.eval_every=4",
        "trainer.log_every=1",
        "trainer.keep_last_checkpoint=true",
    ]


def check(proc, what: str = "peftkit") -> None:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


# One intra-op thread per process: on a few cores shared with other jobs, torch's default thread
# pool spends most of a tiny model's step waiting for a busy core (100x slower steps).
THREADS = {"OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    return run_cli(*args, cwd=cwd, env={**THREADS, **(env or {})}, timeout=timeout)


def train(cwd: Path, *args: str, env: dict | None = None, timeout: int = 600):
    proc = cli("train", *args, cwd=cwd, env=env, timeout=timeout)
    check(proc, "peftkit train " + " ".join(args))
    return proc


def reference_run(tmp_path_factory, tiny_bert: Path) -> tuple[Path, str]:
    """The reference run of `tiny()` (trained once per session): its directory and its console output."""
    if "reference" not in _cache:
        root = tmp_path_factory.mktemp("reference")
        proc = train(root, *tiny(tiny_bert, f"hydra.run.dir={root / 'run'}"))
        (root / "console.txt").write_text(proc.stdout + proc.stderr)
        _cache["reference"] = root / "run"
    run = _cache["reference"]
    return run, (run.parent / "console.txt").read_text()


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter.safetensors"))


def read_log(run: Path) -> tuple[list[dict], list[dict]]:
    """train_log.jsonl as (step records, eval records)."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval" in r]


def report(run: Path) -> dict:
    return json.loads((run / "eval" / "report.json").read_text())


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not bool((a[k] == b[k]).all())]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOY_WORDS = "the a good bad fine dull great poor film plot actor scene".split()


def toy_task_datasets(root: Path, sizes: dict[str, int]) -> Path:
    """Three local datasets as a user adds them, for multi-task runs: a CSV each and a YAML in
    `root/dataset/toy_<name>.yaml` (pass root as --recipes-dir). `sent`: one text, neg/pos; `pair`:
    two texts, three classes a/b/c; `score`: two texts, a number (regression). `sizes`: rows per dataset."""
    import random

    (root / "dataset").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def text():
        return " ".join(rng.choice(TOY_WORDS) for _ in range(rng.randint(3, 12)))

    label = {"sent": lambda: rng.choice(["neg", "pos"]), "pair": lambda: rng.choice("abc"), "score": lambda: f"{rng.uniform(0, 5):.2f}"}
    for name, n in sizes.items():
        header, row = ("text,label", lambda: text()) if name == "sent" else ("text,text_b,label", lambda: f"{text()},{text()}")
        (root / f"{name}.csv").write_text("\n".join([header] + [f"{row()},{label[name]()}" for _ in range(n)]) + "\n")
        fields = "[text]" if name == "sent" else "[text,text_b]"
        (root / "dataset" / f"toy_{name}.yaml").write_text(
            f"# @package dataset\n# toy {name}\nname: local\ntrain_file: {root / name}.csv\ndev_file: null\ndev_fraction: 0.25\n"
            f"split_seed: 0\ntext_fields: {fields}\nlabel_field: label\nlabel_names: null\nregression: {str(name == 'score').lower()}\n"
            f"id_field: null\nmetrics: [accuracy]\nmax_train_samples: null\nmax_eval_samples: null\n")
    return root
