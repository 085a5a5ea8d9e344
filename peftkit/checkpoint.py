"""Resumable training state as safetensors + JSON (no pickles): weights, optimizer, scheduler, RNG,
and what the method tracks while training (`Method.training_state`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from peftkit.errors import UserError
from peftkit.files import atomic_dir, fault_point

FIX = "resume another run, or start over without resume"


def save(path: Path, model: torch.nn.Module, names: list[str], method, optimizer, scheduler, state: dict) -> None:
    from peftkit.methods.base import adapter_tensors

    params = adapter_tensors(model)
    tensors = {f"model.{n}": params[n].detach().cpu().contiguous() for n in names}
    opt = optimizer.state_dict()
    for idx, s in opt["state"].items():
        for k, v in s.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).cpu().contiguous()
    for k, v in method.training_state(model).items():
        tensors[f"method.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "state": state,
        "optimizer_param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "rng_python": random.getstate(),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        fault_point("checkpoint_write")
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))


def load(path: Path, model: torch.nn.Module, method, optimizer, scheduler) -> dict:
    from peftkit.adapter import read_tensors
    from peftkit.methods.base import adapter_tensors

    tensors = read_tensors(Path(path) / "state.safetensors", "checkpoint file", FIX)
    meta = read_meta(path)
    params = adapter_tensors(model)
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("model."):
                name = k[len("model.") :]
                if name not in params or params[name].shape != v.shape:
                    got = "no such tensor" if name not in params else f"shape {tuple(params[name].shape)}"
                    raise UserError(f"checkpoint {path} does not fit this model: {name} is {tuple(v.shape)} there, "
                                    f"{got} here; resume with the run's own method and backbone settings")
                params[name].copy_(v)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    method.load_training_state(model, {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise UserError(f"corrupt checkpoint {path} ({what}); {FIX}") from None
    return meta["state"]


def check(path: Path) -> dict:
    """Before a resumed run touches its folder: the checkpoint's state file is whole safetensors (its
    header read, not its tensors) and its trainer_state.json readable; returns the latter."""
    from safetensors import SafetensorError, safe_open

    f = Path(path) / "state.safetensors"
    if not f.is_file():
        raise UserError(f"checkpoint file {f} is missing; {FIX}")
    try:
        with safe_open(str(f), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt checkpoint file {f}: {e}; {FIX}") from None
    return read_meta(path)


def read_meta(path: Path) -> dict:
    """A checkpoint's trainer_state.json, checked for what resuming reads; one line if it is damaged."""
    f = Path(path) / "trainer_state.json"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        state = meta["state"]
        ok = (isinstance(state, dict) and isinstance(state.get("step"), int)
              and all(isinstance(state.get(k, 0), int) for k in ("epoch", "batch"))
              and isinstance(meta["optimizer_param_groups"], list) and isinstance(meta["scheduler"], dict)
              and isinstance(meta["rng_python"], list) and len(meta["rng_python"]) == 3)
        if not ok:
            raise ValueError("a key holds a value of the wrong kind")
    except FileNotFoundError:
        raise UserError(f"checkpoint file {f} is missing; {FIX}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        what = f"no key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise UserError(f"corrupt checkpoint file {f} ({what}); {FIX}") from None
    return meta
