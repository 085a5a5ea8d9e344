"""`peftkit merge`: fold an adapter into its base and save a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from peftkit import model
from peftkit.errors import UserError
from peftkit.files import atomic_dir
from peftkit.methods.base import merge_into_base

console = Console()


def _adapter_dir(path: Path) -> Path:
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


@torch.no_grad()
def into_base(adapter_path: Path, out: Path, backbone_path: str | None = None) -> float:
    """Merge, save, and check the merged model against the unmerged one on a probe batch.

    Returns the max abs difference of the logits.
    """
    a, cfg = model.from_adapter(_adapter_dir(adapter_path), backbone_path)
    if not a.method.mergeable:
        raise UserError(
            f"method '{a.method.name}' is not mergeable (its adapters are not linear in the weights); "
            f"load base + adapter with peftkit instead, or train a mergeable method such as lora or ia3"
        )
    net = a.model.eval()
    probe = a.tokenizer(["a merged model must give the same logits", "as the adapter it came from"],
                        padding=True, return_tensors="pt")
    before = net(**probe).logits
    merged = merge_into_base(net)
    after = merged(**probe).logits
    diff = (before - after).abs().max().item()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        a.tokenizer.save_pretrained(tmp)
    console.print(f"merged {cfg['method']['name']} into {cfg['backbone']['name']}: {out} (max |Δlogit| {diff:.2e})")
    return diff
