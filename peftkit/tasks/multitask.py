"""Multi-task classification: one backbone and adapter, one head and metric per task, every batch
from one task, tasks drawn by temperature sampling (`dataset=[glue/rte,glue/mrpc]`, `dataset=glue/small`).

Heads: each task gets its own copy of the model's head (`classifier`, `score`, RoBERTa's two-layer
head, DistilBERT's fresh `pre_classifier`), sized for its labels, kept under `task_heads.<task>`.
The model's own head slots hold a placeholder between forward passes and the task's head during
one (`active`), so every parameter has one name and a task's head reads as a single-task run's
would with the `task_heads.<task>.` prefix removed. A module that needs to know the task too (a
hypernetwork) has a `set_task(index)` method; `active` calls it.

Sampling: an epoch has as many batches as the tasks' own epochs together; the task of each batch
is drawn with probability ∝ n_t^(1/T) (T=1: in proportion to size; large T: uniform). A task that
runs out of batches starts a new shuffled pass of its own.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftkit import backbone, config
from peftkit.data import TaskData, local
from peftkit.data.batching import Encoded, train_batches
from peftkit.errors import UserError
from peftkit.evaluation.scoring import score
from peftkit.tasks import classification

NAME = "multitask"
SPARSE_GRADIENTS = True  # other tasks' heads get no gradient in a step (DDP must expect unused parameters)
SHARED_KEYS = ("data_dir", "max_train_samples", "max_eval_samples")  # set once, passed to every task
UNSUPPORTED = {
    "adapter_fusion": "it fuses single-task adapters trained on one task; train it per task",
    "scalearn": "it combines single-task adapters trained on one task; train it per task",
}


@dataclass
class MultiTaskData:
    name: str
    tasks: dict[str, TaskData]  # task key (rte, mrpc) -> its data, in the order given
    temperature: float

    @property
    def task(self) -> str:
        return "+".join(self.tasks)

    @property
    def label_names(self) -> dict[str, list[str] | None]:
        return {k: t.label_names for k, t in self.tasks.items()}

    @property
    def splits(self) -> dict:
        return {}  # per task: `tasks[k].splits`


def task_configs(dataset_cfg: DictConfig) -> list[DictConfig]:
    """Each task's own dataset config: a name (`glue/rte`, a user's `dataset/NAME.yaml`) is read from
    its YAML, a mapping taken as it is; the keys set once for all (`SHARED_KEYS`) apply to each."""
    options = config.group_options("dataset")
    out = []
    for entry in dataset_cfg.tasks:
        if isinstance(entry, str) and entry not in options:
            raise UserError(f"dataset.tasks: unknown dataset '{entry}'; choose classification datasets, e.g. glue/rte, glue/mrpc")
        cfg = OmegaConf.load(options[entry]) if isinstance(entry, str) else OmegaConf.create(entry)
        name = entry if isinstance(entry, str) else cfg.get("name")
        if cfg.get("task", "classification") != "classification" or "tasks" in cfg:
            raise UserError(f"dataset.tasks: {name} is a {cfg.get('task')} dataset; a multi-task run takes classification datasets")
        for key in SHARED_KEYS:
            if dataset_cfg.get(key) is not None and key in cfg:
                cfg[key] = dataset_cfg[key]
        out.append(cfg)
    return out


def expand_config(dataset_cfg: DictConfig) -> None:
    """Names in `dataset.tasks` become the datasets' whole configs, so the run's config.yaml says
    everything about its data and `peftkit eval` needs no recipes dir."""
    cfgs = task_configs(dataset_cfg)
    for c in cfgs:  # a local file's task is named once, here: from another folder, eval would name it otherwise
        if c.get("name") == "local" and c.get("train_file") and not c.get("task_name"):
            c.task_name = local.task_name(c)
    dataset_cfg.tasks = [OmegaConf.to_container(c, resolve=True) for c in cfgs]


def load_data(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> MultiTaskData:
    tasks: dict[str, TaskData] = {}
    for cfg in task_configs(dataset_cfg):
        t = classification.load_data(cfg, splits)
        if "." in t.task:  # a task's head lives at task_heads.<task>: a module name holds no '.'
            raise UserError(f"dataset.tasks: task name '{t.task}' (of {cfg.name}) holds a '.', which a head's name cannot; "
                            f"give that dataset a task_name without one, e.g. task_name={t.task.replace('.', '_')}")
        if t.task in tasks:
            raise UserError(f"dataset.tasks names task '{t.task}' twice ({cfg.name}); give each task once")
        tasks[t.task] = t
    return MultiTaskData(dataset_cfg.name, tasks, float(dataset_cfg.temperature))


def load_processor(backbone_cfg: DictConfig):
    return backbone.load_tokenizer(backbone_cfg)


class NoHead(nn.Module):
    """Holds a head slot between forward passes: calling the model without a task is a bug."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a multi-task model runs inside multitask.active(model, task): its head depends on the task")


def _output_layer(head: nn.Module, num_labels: int) -> str | None:
    """The name (in `head`) of its last Linear with one output per label: the part a task resizes."""
    found = [n for n, m in head.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    return found[-1] if found else None


def load_model(backbone_cfg: DictConfig, label_names: dict[str, list[str] | None]):
    """The first task's classifier, its head copied per task (the output layer new, sized per task)."""
    first = next(iter(label_names.values()))
    model = classification.load_model(backbone_cfg, first)
    slots = backbone.head_module_names(model, list(backbone_cfg.head))
    std = getattr(model.config, "initializer_range", 0.02)
    model.task_heads = nn.ModuleDict()
    heads = []
    for task, labels in label_names.items():
        holder = nn.Module()
        for slot in slots:
            head = copy.deepcopy(model.get_submodule(slot))
            n = 1 if labels is None else len(labels)
            out = "" if isinstance(head, nn.Linear) else _output_layer(head, model.config.num_labels)
            if out is not None:
                old = head.get_submodule(out) if out else head
                new = nn.Linear(old.in_features, n, bias=old.bias is not None)
                nn.init.normal_(new.weight, std=std)
                if new.bias is not None:
                    nn.init.zeros_(new.bias)
                head = new if not out else head
                if out:
                    head.set_submodule(out, new)
            _set_path(holder, slot, head)
            heads.append(f"task_heads.{task}.{slot}")
        model.task_heads[task] = holder
    for slot in slots:
        model.set_submodule(slot, NoHead())
    model.head_slots = slots
    model.task_names = list(label_names)
    model.head_modules = heads  # by name: a task may be called `score`, like a head
    return model


# every task's head reads the first position, as the single-task classifier's: the same shortcut, so
# a task's scores here and in the single-task run `peftkit merge mode=materialize` makes agree
skip_unread_positions = classification.skip_unread_positions


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """`root.a.b.c = module`, creating empty containers for a and b."""
    *parents, leaf = path.split(".")
    for p in parents:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(leaf, module)


@contextlib.contextmanager
def active(model: nn.Module, task: int):
    """Run `model` as task `task` (an index into its tasks): its head in the slots, `set_task` told."""
    from accelerate.utils import extract_model_from_parallel

    raw = extract_model_from_parallel(model)
    holder = raw.task_heads[raw.task_names[task]]
    for m in raw.modules():
        if hasattr(m, "set_task") and m is not raw:
            m.set_task(task)
    try:
        for slot in raw.head_slots:
            raw.set_submodule(slot, holder.get_submodule(slot))
        yield raw
    finally:
        for slot in raw.head_slots:
            raw.set_submodule(slot, NoHead())


class MultiTaskSplit:
    """The tasks' training splits end to end: an index is global, a batch holds one task's rows."""

    def __init__(self, parts: list[Encoded], temperature: float):
        self.parts = parts
        self.temperature = temperature
        self.offsets = np.cumsum([0, *[len(p) for p in parts]])
        self.lengths = [n for p in parts for n in p.lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def probabilities(self) -> np.ndarray:
        w = np.array([len(p) for p in self.parts], dtype=np.float64) ** (1.0 / self.temperature)
        return w / w.sum()

    def train_batches(self, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
        """One epoch's batches: the task of each drawn by temperature, each task's own batches in
        order (shuffled, length-grouped) and a new pass of them when one runs out."""
        own = [train_batches(p.lengths, batch_size, seed, epoch, group_by_length, stream=(t,)) for t, p in enumerate(self.parts)]
        total = sum(len(b) for b in own)
        drawn = np.random.default_rng([seed, epoch, len(self.parts)]).choice(len(self.parts), size=total, p=self.probabilities())
        used, passes, out = [0] * len(own), [0] * len(own), []
        for t in drawn.tolist():
            if used[t] == len(own[t]):
                passes[t] += 1
                used[t] = 0
                own[t] = train_batches(self.parts[t].lengths, batch_size, seed, epoch, group_by_length, stream=(t, passes[t]))
            out.append([int(self.offsets[t]) + i for i in own[t][used[t]]])
            used[t] += 1
        return out

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        t = int(np.searchsorted(self.offsets, idx[0], side="right")) - 1
        local = [i - int(self.offsets[t]) for i in idx]
        if any(not 0 <= i < len(self.parts[t]) for i in local):
            raise ValueError("a multi-task batch mixes tasks")
        return {**self.parts[t].batch(local), "task": torch.tensor(t)}


def encode(data: MultiTaskData, tokenizer, cfg: DictConfig) -> dict:
    """{"tasks": {key: {split: Encoded}}, "train": the tasks' training rows end to end}."""
    per_task = {}
    for key, task in data.tasks.items():
        regression = task.label_names is None
        per_task[key] = {s: Encoded(split, tokenizer, cfg.backbone.max_length, float_labels=regression) for s, split in task.splits.items()}
    out: dict = {"tasks": per_task}
    if all("train" in e for e in per_task.values()):
        out["train"] = MultiTaskSplit([e["train"] for e in per_task.values()], data.temperature)
    return out


def loss(net, batch, encoded) -> torch.Tensor:
    """Cross-entropy on the task's labels, or MSE for a regression task (one output)."""
    task = int(batch.pop("task"))
    labels = batch.pop("labels")
    with active(net, task):
        logits = net(**batch).logits
    if labels.is_floating_point():
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels)
    return nn.functional.cross_entropy(logits.float(), labels)


def evaluate(accelerator, net, data: MultiTaskData, encoded: dict, batch_size: int) -> dict:
    """Each task on its own eval splits with its own head and metrics; the score is their average.
    Metrics are keyed by task (`rte`), or task and split where a task has several (`mnli/validation_matched`)."""
    per, scores, collapsed = {}, {}, {}
    for t, (key, task) in enumerate(data.tasks.items()):
        with active(net, t):
            result = score(accelerator, net, task, encoded["tasks"][key], batch_size)
        scores[key] = result["score"]
        for split, ms in result["metrics"].items():
            name = key if len(result["metrics"]) == 1 else f"{key}/{split}"
            per[name] = ms
            if split in result.get("collapsed", {}):
                collapsed[name] = result["collapsed"][split]
    return {"metrics": per, "score": float(np.mean(list(scores.values()))), "task_scores": scores,
            **({"collapsed": collapsed} if collapsed else {})}

