"""`peftkit ls`: what recipes, methods, backbones, datasets and trainers exist."""

from __future__ import annotations

from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftkit import config
from peftkit.errors import UserError

KINDS = {"recipes": None, "methods": "method", "backbones": "backbone", "datasets": "dataset", "trainers": "trainer", "merges": "merge"}


def show(what: str) -> None:
    if what != "all" and what not in KINDS:
        raise UserError(f"peftkit ls takes one of: {', '.join(KINDS)}")
    console = Console()
    for kind, group in KINDS.items():
        if what not in ("all", kind):
            continue
        entries = config.recipes() if group is None else config.group_options(group)
        counts = method_param_counts(entries) if kind == "methods" else {}
        table = Table(title=kind, title_justify="left", show_header=bool(counts), box=None, padding=(0, 2))
        if counts:
            table.add_column("name")
            table.add_column("trainable on MiniLM", justify="right")
            table.add_column("lr", justify="right")
            table.add_column("what it is")
        for name, path in entries.items():
            row = [f"[bold]{name}[/]", escape(config.describe(path))]
            if counts:
                row[1:1] = [counts.get(name, "-"), str(OmegaConf.load(path).get("lr", "-"))]
            table.add_row(*row)
        console.print(table)
        console.print()


def method_param_counts(entries: dict) -> dict[str, str]:
    """Trainable parameters of each method YAML's defaults on MiniLM with a 2-class head.

    Empty when MiniLM is not installed: the listing must not need it.
    """
    import copy

    from peftkit import backbone, methods
    from peftkit.methods.base import count_params

    bb = OmegaConf.load(config.group_options("backbone")["minilm"])
    try:
        base = backbone.load_model(bb, 2, "single_label_classification")  # the classification head of a 2-label task
    except (UserError, OSError):
        return {}
    head = backbone.head_module_names(base, list(bb.head))
    counts = {}
    for name, path in entries.items():
        model = copy.deepcopy(base)
        try:
            methods.prepare(model, methods.build(OmegaConf.to_container(OmegaConf.load(path))), head)
        except UserError:
            continue
        n, total = count_params(model)
        counts[name] = f"{n:,} ({100 * n / total:.2f}%)"
    return counts
