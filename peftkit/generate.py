"""`peftkit generate` and `peftkit chat`: try a causal-LM run's adapter by hand.

The run's base model and adapter are rebuilt from its folder (as `peftkit eval` does) and prompts
are formatted as in training (the run's `dataset.template`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from peftkit import model
from peftkit.data.instruct import Conversation
from peftkit.errors import UserError
from peftkit.evaluation import generation
from peftkit.files import newest_complete

console = Console()


def load(run_dir: Path, overrides: dict[str, str]):
    """(adapted model, tokenizer, prompt template) of a causal-LM run."""
    from peftkit.evaluate import load_run_config
    from peftkit.tasks import causal_lm

    cfg = load_run_config(run_dir, overrides)
    if cfg.dataset.get("task") != causal_lm.NAME:
        raise UserError(f"{run_dir} is a {cfg.dataset.get('task') or 'classification'} run; generate and chat need a causal-LM run "
                        f"(dataset=instruct, math or quickstart_lm)")
    found = newest_complete(run_dir / "adapter")
    if found is None:
        raise UserError(f"{run_dir} has no adapter/ yet; train it first")
    a, _ = model.from_adapter(found, cfg.backbone.get("path"))
    a.model.eval()
    return a, cfg.dataset.template


def prompt_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    from peftkit.tasks import causal_lm

    return causal_lm.prompt_ids(Conversation([*messages, {"role": "assistant", "content": ""}]), tokenizer, template)


def run(run_dir: Path, prompts: list[str], max_new_tokens: int, overrides: dict[str, str]) -> list[str]:
    a, template = load(run_dir, overrides)
    ids = [prompt_ids(a.tokenizer, template, [{"role": "user", "content": p}]) for p in prompts]
    replies = generation.generate(a.model, a.tokenizer, ids, max_new_tokens, batch_size=8)
    for p, r in zip(prompts, replies):
        console.print(f"[bold]> {p}[/]\n{r}\n", highlight=False)
    return replies


def chat(run_dir: Path, max_new_tokens: int, overrides: dict[str, str], system: str | None = None) -> None:
    """A conversation on the terminal, the reply streamed token by token; an empty line or EOF ends it."""
    import torch
    from transformers import TextStreamer

    a, template = load(run_dir, overrides)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(a.tokenizer, skip_prompt=True, skip_special_tokens=True)
    console.print(f"chatting with {run_dir} (an empty line ends)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        ids = torch.tensor([prompt_ids(a.tokenizer, template, history)])
        sys.stdout.write("model> ")
        sys.stdout.flush()
        with torch.no_grad():
            out = a.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, use_cache=True, streamer=streamer,
                                   pad_token_id=a.tokenizer.pad_token_id, eos_token_id=a.tokenizer.eos_token_id)
        history.append({"role": "assistant", "content": a.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()})
