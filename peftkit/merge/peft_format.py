"""Exchange adapters with Hugging Face peft: `to_peft` writes peft's format, `from_peft` reads it.

peft's format (0.21): `adapter_config.json`, a LoraConfig or IA3Config as JSON, and
`adapter_model.safetensors`, keyed `base_model.model.<module>.<tensor>` with the adapter name
removed: `lora_A.weight` (r×in), `lora_B.weight` (out×r), DoRA's `lora_magnitude_vector` (out),
IA³'s `ia3_l`, shaped (out, 1) where it scales a layer's output and (1, in) where it scales a
feed-forward layer's input. The task head is a `modules_to_save` module, saved under its own
name (`base_model.model.classifier.weight`). On GPT-2's Conv1D layers peft sets `fan_in_fan_out`
and keeps the same A and B shapes (it transposes only when merging), so they carry over too.
peftkit's LoRA, rsLoRA, DoRA and IA³ compute what
peft's do, so their tensors carry over unchanged. A PiSSA-initialised LoRA trains on the residual
W − s·B₀A₀; relative to the original W its update is s(BA − B₀A₀), which it exports as peft converts
PiSSA: a plain LoRA of rank 2r, A' = [A; A₀], B' = [B, −B₀], on the original base. peft itself is
never imported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from peftkit import adapter, backbone, config, model, tasks
from peftkit.errors import UserError
from peftkit.files import atomic_dir
from peftkit.merge import sources
from peftkit.methods.base import AdapterLinear, adapter_tensors
from peftkit.methods.dora import DoraLinear
from peftkit.methods.ia3 import IA3Linear
from peftkit.methods.lora import LoraEmbedding, LoraLinear, PissaLinear
from peftkit.methods.targets import LinearFromConv1D

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's module names
EXPORTABLE = ("lora", "rslora", "dora", "ia3")
PEFT_TASK = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}  # peftkit's task type → peft's task_type
ADAPTER_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                         r"|lora_magnitude_vector|ia3_l)(?:\.weight)?")
PEFTKIT_NAME = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "dora_magnitude", "ia3_l": "ia3_l",
                "lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}
# LoraConfig options that change what the adapter computes or the base it sits on; peftkit's lora
# has none of them, so an adapter that sets one is refused rather than imported wrongly.
LORA_UNSUPPORTED = ("lora_bias", "rank_pattern", "alpha_pattern", "layer_replication",
                    "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "target_parameters",
                    "velora_config", "monteclora_config", "arrow_config", "kasa_config", "use_bdlora")
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # their frozen base is not the original W


def run(cfg: DictConfig) -> dict:
    return to_peft(cfg) if cfg.mode == "to_peft" else from_peft(cfg)


# ----------------------------------------------------------------- peftkit → peft

@torch.no_grad()
def to_peft(cfg: DictConfig) -> dict:
    path = sources.adapter_dir(cfg.adapter)
    meta = adapter.read_config(path)
    if "peft_type" in meta:
        raise UserError(f"{path} is already a peft adapter; to_peft reads peftkit adapters (from_peft imports peft ones)")
    name = meta["method"]["name"]
    if name not in EXPORTABLE:
        raise UserError(f"to_peft writes {', '.join(EXPORTABLE)} adapters (PiSSA-initialised lora too); {path} is {name}")
    a, meta = sources.load(path, cfg.get("backbone_path"))
    tensors, targets, feedforward, conv1d = {}, [], [], False
    for module, m in a.model.named_modules():
        if not isinstance(m, AdapterLinear):
            continue
        key = PREFIX + module
        targets.append(module)
        conv1d |= isinstance(m.base_layer, LinearFromConv1D)
        if type(m) is IA3Linear:
            tensors[f"{key}.ia3_l"] = m.ia3_l[None, :] if m.on_input else m.ia3_l[:, None]
            if m.on_input:
                feedforward.append(module)
        elif type(m) in (LoraLinear, DoraLinear):
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = m.lora_A, m.lora_B
            if type(m) is DoraLinear:
                tensors[f"{key}.lora_magnitude_vector"] = m.dora_magnitude
        elif type(m) is LoraEmbedding:  # peft's names for an embedding's factors, the same shapes
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = m.lora_embedding_A, m.lora_embedding_B
        elif type(m) is PissaLinear:
            tensors[f"{key}.lora_A.weight"] = torch.cat([m.lora_A, m.lora_A_initial], 0)
            tensors[f"{key}.lora_B.weight"] = torch.cat([m.lora_B, -m.lora_B_initial], 1)
        else:
            raise UserError(f"{path} has {type(m).__name__} layers ({name}), which peft cannot hold exactly")
    params = adapter_tensors(a.model)
    for n in a.trainable:
        if any(n.startswith(h + ".") for h in a.head):
            tensors[PREFIX + n] = params[n]
        elif n.rpartition(".")[0] not in targets:  # a tensor outside the layers and the head: nowhere to put it
            raise UserError(f"{path} trains {n}, which a peft {name} adapter has no place for")
    tensors = {n: t.detach().to("cpu").clone().contiguous() for n, t in tensors.items()}

    bb = meta["backbone"]
    base = cfg.get("backbone_path") or bb.get("path")
    peft_config = {
        "peft_type": "IA3" if name == "ia3" else "LORA",
        "task_type": PEFT_TASK[meta.get("task_type") or tasks.DEFAULT],
        "base_model_name_or_path": str(Path(base).resolve()) if base else bb.get("hub_id"),
        "revision": None,
        "inference_mode": True,
        **(ia3_config(feedforward) if name == "ia3" else lora_config(a.method.cfg, name)),
        "fan_in_fan_out": conv1d,  # GPT-2's Conv1D (peft flips it per layer type with a warning if mixed)
        "target_modules": targets,  # exact names: peft matches a full name, or a dotted suffix
        "modules_to_save": list(a.head),
    }
    info = {"mode": "to_peft", "adapter": str(path.resolve()), "method": name, "peft_type": peft_config["peft_type"],
            "modules": len(targets)}
    if name != "ia3" and a.method.cfg.init == "pissa":
        info["note"] = f"PiSSA exported as a plain rank-{peft_config['r']} LoRA on the original base"
    out = Path(cfg.out)
    adapter.refuse_nonfinite(tensors, out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / adapter.CARD).write_text(peft_card({**meta, "merge": info}, (tmp / WEIGHTS).stat().st_size,
                                                  peft_config["base_model_name_or_path"]))
    sources.console.print(f"to_peft: {name} adapter on {len(targets)} modules → {out} (peft {peft_config['peft_type']})")
    return info


def lora_config(c, name: str) -> dict:
    r, alpha = c.r, float(c.alpha)
    if c.init == "pissa":  # [A; A₀], [B, −B₀]: rank 2r, alpha scaled so alpha/r (or alpha/√r) is unchanged
        r, alpha = 2 * r, alpha * (2**0.5 if c.rslora else 2)
    return {"r": r, "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": float(c.dropout),
            "use_rslora": bool(c.rslora), "use_dora": name == "dora", "bias": "none",
            "init_lora_weights": "gaussian" if c.init == "gaussian" else True, "rank_pattern": {}, "alpha_pattern": {}}


def ia3_config(feedforward: list[str]) -> dict:
    return {"feedforward_modules": feedforward, "init_ia3_weights": True}


def peft_card(meta: dict, size_bytes: int, base: str) -> str:
    """peftkit's model card with peft as its library (the Hub then lists it as an adapter of base_model)."""
    if meta.get("task_type") == "causal_lm":
        load = f"AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")` (base \"{base}\")"
    else:
        n = len(meta["label_names"]) if meta.get("label_names") else 1
        load = (f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
                f"\"{base}\", num_labels={n}), \"<this folder>\")`")
    usage = f"Load it with peft: `{load}; or back into peftkit: `peftkit merge mode=from_peft adapter=<this folder> out=DIR`."
    return adapter.model_card(meta, size_bytes, library="peft", usage=usage)


# ----------------------------------------------------------------- peft → peftkit

@torch.no_grad()
def from_peft(cfg: DictConfig) -> dict:
    src = Path(cfg.adapter)
    peft_cfg = read_peft_config(src)
    found = read_peft_tensors(src)
    task = "causal_lm" if peft_cfg.get("task_type") == "CAUSAL_LM" else tasks.DEFAULT
    layers, head = split_keys(src, found, peft_cfg.get("modules_to_save") or [], task)
    method = (ia3_method if peft_cfg["peft_type"] == "IA3" else lora_method)(src, peft_cfg, layers)
    bb = backbone_config(cfg, peft_cfg.get("base_model_name_or_path"))
    bb["trust_remote_code"] = bool(cfg.get("trust_remote_code") or bb.get("trust_remote_code"))
    backbone.check(OmegaConf.create(bb), trust_key="trust_remote_code")  # a base with its own code: only when asked
    labels = label_names(cfg, bb, head) if task == tasks.DEFAULT else None
    a = model.build(OmegaConf.create(bb), method, labels, task)

    mapped = dict(head)
    for (module, tensor), t in layers.items():
        mapped[f"{module}.{PEFTKIT_NAME[tensor]}"] = t.flatten() if tensor == "ia3_l" else t
    missing, unexpected = sorted(set(a.trainable) - set(mapped)), sorted(set(mapped) - set(a.trainable))
    if missing or unexpected:
        raise UserError(f"{src} does not fit backbone '{bb['name']}' with {method['name']}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; pass the base it was trained on (backbone= or backbone_path=)")
    params = adapter_tensors(a.model)
    for n in a.trainable:
        if params[n].shape != mapped[n].shape:
            raise UserError(f"{src}: {n} has shape {tuple(mapped[n].shape)}, backbone '{bb['name']}' "
                            f"{tuple(params[n].shape)}; pass the base it was trained on (backbone= or backbone_path=)")
        params[n].copy_(mapped[n])

    info = {"mode": "from_peft", "adapter": str(src.resolve()), "peft_type": peft_cfg["peft_type"],
            "peft_version": peft_cfg.get("peft_version"), "base_model_name_or_path": peft_cfg.get("base_model_name_or_path")}
    meta = {**model.meta(a, OmegaConf.create(bb), labels, None, task), "seed": None, "merge": info}
    sources.write_adapter_run(Path(cfg.out), {n: params[n] for n in a.trainable}, meta, None)
    sources.console.print(f"from_peft: peft {peft_cfg['peft_type']} → peftkit {method['name']} on "
                          f"{len(method['target_modules'])} modules, backbone {bb['name']} → {cfg.out}")
    return info


def read_peft_config(src: Path) -> dict:
    f = src / CONFIG
    if not f.is_file():
        raise UserError(f"{src} is not a peft adapter folder (no {CONFIG})")
    try:
        peft_cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt peft config {f}: {e}") from None
    kind = peft_cfg.get("peft_type")
    if kind is None:
        what = "a peftkit adapter already" if "peftkit_version" in peft_cfg else "not a peft adapter"
        raise UserError(f"{f} has no peft_type: {src} is {what}; from_peft reads peft's LORA and IA3 adapters")
    if kind not in ("LORA", "IA3"):
        raise UserError(f"{src} is a peft {kind} adapter; from_peft reads peft's LORA and IA3 adapters")
    return peft_cfg


def read_peft_tensors(src: Path) -> dict[str, torch.Tensor]:
    f = src / WEIGHTS
    if not f.is_file():
        hint = " (adapter_model.bin is a pickle, which peftkit does not load: re-save it with safetensors)" \
            if (src / "adapter_model.bin").is_file() else ""
        raise UserError(f"{src} has no {WEIGHTS}{hint}")
    tensors = adapter.read_tensors(f, "peft weights file", "re-save the peft adapter")
    return {k.removeprefix(PREFIX): t for k, t in tensors.items()}


def split_keys(src: Path, found: dict[str, torch.Tensor], modules_to_save: list[str], task: str):
    """{(module, tensor kind): t} for the adapter's layers, and {name: t} for the head (`modules_to_save`):
    a classifier needs one; a causal LM (peft's task_type=CAUSAL_LM) keeps its pretrained head."""
    layers, head, other = {}, {}, []
    for k, t in found.items():
        m = ADAPTER_KEY.fullmatch(k)
        if m:
            layers[m["module"], m["tensor"]] = t
        elif any(f".{s}." in f".{k}" for s in modules_to_save):
            head[k] = t
        else:
            other.append(k)
    if other:
        raise UserError(f"{src} holds tensors peftkit cannot map ({', '.join(sorted(other)[:3])}); "
                        f"from_peft reads LoRA/DoRA/IA³ layers and a modules_to_save head")
    if not layers:
        raise UserError(f"{src} holds no LoRA or IA³ layers (lora_A, lora_B, ia3_l); is it a peft adapter of another kind?")
    if task == "causal_lm" and head:
        raise UserError(f"{src} trains {', '.join(sorted(head)[:3])} (modules_to_save) beside its layers; peftkit's "
                        f"causal-LM adapters keep the pretrained head: export it without modules_to_save")
    if task != "causal_lm" and not any(t.ndim == 2 for t in head.values()):
        raise UserError(f"{src} has no classification head (modules_to_save) and its task_type is not "
                        f"CAUSAL_LM; save the peft model with task_type=SEQ_CLS (a classifier) or CAUSAL_LM")
    return layers, head


def lora_method(src: Path, peft_cfg: dict, layers: dict) -> dict:
    unsupported = [k for k in LORA_UNSUPPORTED if peft_cfg.get(k)]
    if peft_cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={peft_cfg['bias']}")
    if unsupported:
        raise UserError(f"{src} uses peft options a peftkit lora cannot hold: {', '.join(unsupported)}")
    init = str(peft_cfg.get("init_lora_weights", True))
    if init.startswith(BASE_CHANGING_INITS):
        raise UserError(f"{src} was initialised with {init}, which changes the base weights; save it in peft with "
                        f"path_initial_model_for_weight_conversion (a plain LoRA on the original base) and import that")
    ranks = {t.shape[0] for (_, kind), t in layers.items() if kind in ("lora_A.weight", "lora_embedding_A")}
    if ranks != {peft_cfg.get("r")}:
        raise UserError(f"{src}: lora_A has rank {sorted(ranks)} but r={peft_cfg.get('r')}; the adapter is corrupt")
    modules = sorted({m for m, _ in layers})
    return {"name": "dora" if peft_cfg.get("use_dora") else "lora", "r": int(peft_cfg["r"]),
            "alpha": float(peft_cfg.get("lora_alpha", 8)), "dropout": float(peft_cfg.get("lora_dropout", 0.0)),
            "rslora": bool(peft_cfg.get("use_rslora")), "init": "kaiming", "target_modules": modules}


def ia3_method(src: Path, peft_cfg: dict, layers: dict) -> dict:
    """Which layers scale their input is in the vector's shape, (1, in); peft's feedforward_modules
    suffixes may match more layers than they name (`output.dense` is attention.output.dense too)."""
    modules = sorted({m for m, _ in layers})
    return {"name": "ia3", "target_modules": modules,
            "feedforward_modules": sorted(m for (m, _), t in layers.items() if t.ndim == 2 and t.shape[0] == 1)}


def backbone_config(cfg: DictConfig, base: str | None) -> dict:
    """`backbone=NAME` (a peftkit backbone), `backbone_path=DIR`, else peft's base_model_name_or_path:
    a local model folder, or the hub_id of a peftkit backbone."""
    path = cfg.get("backbone_path")
    options = config.group_options("backbone")
    if cfg.get("backbone"):
        if cfg.backbone not in options:
            raise UserError(f"unknown backbone '{cfg.backbone}'; choose one of: {', '.join(options)}")
        bb = OmegaConf.to_container(OmegaConf.load(options[cfg.backbone]), resolve=True)
        if path:
            bb["path"] = str(Path(path).resolve())
        return bb
    if not path and base and (Path(base) / "config.json").is_file():
        path = base
    if path:
        hub_id = base if base and not Path(base).exists() else None
        return {"name": Path(path).resolve().name, "package": None, "path": str(Path(path).resolve()), "hub_id": hub_id,
                "max_length": 128, "head": ["classifier", "score"], "trust_remote_code": False}
    for f in options.values():
        bb = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
        if base and bb.get("hub_id") == base:
            return bb
    raise UserError(f"peft's base_model_name_or_path '{base}' is neither a local model folder nor a peftkit backbone's "
                    f"hub_id; pass backbone=NAME (peftkit ls backbones) or backbone_path=DIR")


def label_names(cfg: DictConfig, bb: dict, head: dict[str, torch.Tensor]) -> list[str] | None:
    """`labels=`, else the base config's id2label if it has the head's size, else LABEL_i; None for regression.

    The head's size is its output layer's: the smallest first dimension among its matrices
    (a dense-then-project head, as RoBERTa's, has a hidden×hidden matrix before it).
    """
    n = min(t.shape[0] for t in head.values() if t.ndim == 2)
    if cfg.get("labels") is not None:
        labels = [str(x) for x in cfg.labels]
        if n == 1:
            raise UserError(f"{cfg.adapter} has a regression head (one output); drop labels=")
        if len(labels) != n:
            raise UserError(f"labels names {len(labels)} labels, the head has {n} outputs; give {n} names")
        return labels
    if n == 1:
        return None
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(backbone.resolve_path(OmegaConf.create(bb)),
                                          trust_remote_code=bool(bb.get("trust_remote_code"))).id2label
    if len(id2label) == n:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [f"LABEL_{i}" for i in range(n)]
