"""`peftkit ls`: what recipes, methods, backbones, datasets and trainers exist."""

from __future__ import annotations

from omegaconf import OmegaConf
from rich import box
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
    shapes_only = copy.deepcopy(base).to("meta")  # counts need shapes, not values: no copies, no SVD inits
    counts = {}
    for name, path in entries.items():
        spec = OmegaConf.to_container(OmegaConf.load(path))
        try:
            try:
                model = copy.deepcopy(shapes_only)
                methods.prepare(model, methods.build(spec), head)
            except (NotImplementedError, RuntimeError):  # a method whose set-up needs values (a decomposition)
                model = copy.deepcopy(base)
                methods.prepare(model, methods.build(spec), head)
        except UserError:
            continue
        n, total = count_params(model)
        counts[name] = f"{n:,} ({100 * n / total:.2f}%)"
    return counts


def show_targets(recipe: str, overrides: list[str], read_data: bool = False) -> None:
    """`peftkit ls targets` / `peftkit train --dry-run`: what a recipe would adapt and train (module
    names folded over layers, layer type, shape, roles, trainable parameters), without training or
    writing anything. `read_data` (the dry run) reads the dataset as the run would, so a wrong file or
    column fails here, and sizes the head to its labels; without it a classifier's head has 2."""
    import re

    from peftkit import model, tasks
    from peftkit.methods.base import AdapterLinear, count_params
    from peftkit.methods.targets import LinearFromConv1D, layer_roles

    cfg, _, _ = config.check(recipe, overrides)
    kind = tasks.of(cfg.dataset)
    labels = None if kind.NAME == "causal_lm" else ["0", "1"]
    if read_data:
        labels = kind.load_data(cfg.dataset).label_names
    elif kind.NAME == "multitask":  # a head per task, each sized for 2 labels here
        labels = {str(t if isinstance(t, str) else t.name).rpartition("/")[2].replace(".", "_"): labels for t in cfg.dataset.tasks}
    a = model.build(cfg.backbone, cfg.method, labels, kind.NAME)
    modules = dict(a.model.named_modules())
    groups: dict[str, dict] = {}
    for name, p in a.model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")[:-1]
        prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        owner = next((q for q in prefixes if isinstance(modules[q], AdapterLinear)), ".".join(parts))
        m = modules.get(owner)
        if isinstance(m, AdapterLinear):
            base = m.base_layer
            kind_ = "Conv1D" if isinstance(base, LinearFromConv1D) else type(base).__name__
            shape = f"{base.in_features}→{base.out_features}" if hasattr(base, "in_features") else \
                f"{base.num_embeddings}×{base.embedding_dim}"
            what = (f"{kind_} {shape}", ", ".join(layer_roles(owner, base)) or "-")
        elif any(owner == h or owner.startswith(h + ".") for h in a.head):
            what = ("head, in full", "-")
        else:
            what = (f"{type(m).__name__}, in full" if m is not None else "tensor", "-")
        key = re.sub(r"\.\d+(?=\.|$)", ".N", owner or name)
        g = groups.setdefault(key, {"what": what, "layers": set(), "params": 0})
        g["layers"].add(owner)
        g["params"] += p.numel()
    table = Table(title=f"{a.method.name} on {cfg.backbone.path or cfg.backbone.name} ({kind.NAME})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col, just in (("module", "left"), ("×", "right"), ("layer", "left"), ("roles", "left"), ("trainable", "right")):
        table.add_column(col, justify=just, overflow="fold", no_wrap=col != "module")  # long names fold, not the rest
    for key, g in groups.items():
        layer, roles = g["what"]
        table.add_row(escape(key), str(len(g["layers"])), layer, roles, f"{g['params']:,}")
    console = Console()
    console.print(table)
    n, total = count_params(a.model)
    console.print(f"trainable params: {n:,} of {total:,} ({100 * n / total:.3f}%)"
                  + (f"; the head{' of each task' if kind.NAME == 'multitask' else ''} is sized for 2 labels here"
                     if a.head and not read_data else ""))
