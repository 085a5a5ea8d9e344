"""`peftkit ls`: what recipes, methods, backbones, datasets and trainers exist."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftkit import config
from peftkit.errors import UserError

KINDS = {"recipes": None, "methods": "method", "backbones": "backbone", "datasets": "dataset", "trainers": "trainer"}


def show(what: str) -> None:
    if what != "all" and what not in KINDS:
        raise UserError(f"peftkit ls takes one of: {', '.join(KINDS)}")
    console = Console()
    for kind, group in KINDS.items():
        if what not in ("all", kind):
            continue
        entries = config.recipes() if group is None else config.group_options(group)
        table = Table(title=kind, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for name, path in entries.items():
            table.add_row(f"[bold]{name}[/]", escape(config.describe(path)))
        console.print(table)
        console.print()
