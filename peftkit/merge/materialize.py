"""`mode=materialize`: a multi-task run as one ordinary single-task run per task.

A multi-task adapter holds one shared adapter and a head per task (`task_heads.<task>.<slot>`).
Task t's run gets the shared adapter's tensors as its method states them for t
(`Method.materialize`: most methods' as they are; HyperFormer's, the Houlsby adapters its
hypernetwork generates for t) and t's head renamed to the slot a single-task model has it in
(`task_heads.rte.classifier.weight` → `classifier.weight`), with t's labels and dataset.

OUT/<task>/ is run-shaped (`adapter/`, `config.yaml` with that task's dataset, `merge.json`), so
`peftkit eval run=OUT/<task>` scores it. Each is built as a single-task model and loaded before
anything is written, and its logits and last hidden states are checked against the multi-task
model's for that task on a probe batch; the largest differences go into merge.json. OUT is
written at once (atomically): all tasks or nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from peftkit import adapter, model
from peftkit.errors import UserError
from peftkit.files import atomic_dir
from peftkit.merge import sources
from peftkit.merge.into_base import probe_batch
from peftkit.methods.base import adapter_tensors
from peftkit.tasks import classification, multitask

HEADS = "task_heads."


def check_multitask(path, meta: dict) -> Path:
    """The run directory of a multi-task adapter (its config.yaml names each task's dataset)."""
    if meta.get("task_type") != multitask.NAME:
        raise UserError(f"adapter={path} is a single-task run ({meta.get('task_type') or 'classification'}); materialize "
                        f"splits a multi-task run (trained with dataset=[glue/rte,glue/mrpc,...]) into one run per task: "
                        f"give adapter=<a multi-task run>")
    run_dir = sources.run_dir(path)
    if run_dir is None:
        raise UserError(f"adapter={path} has no run directory around it (no config.yaml beside adapter/), which names each "
                        f"task's dataset: give adapter=<the run directory>")
    return run_dir


def single_task(bb: DictConfig, method_cfg: dict, labels, tensors: dict[str, torch.Tensor]) -> model.Adapted:
    """A single-task classifier of `method_cfg` holding `tensors`: what the written adapter rebuilds."""
    a = model.build(bb, method_cfg, labels, classification.NAME)
    missing, unexpected = sorted(set(a.trainable) - set(tensors)), sorted(set(tensors) - set(a.trainable))
    if missing or unexpected:
        raise UserError(f"materialize: the single-task {method_cfg['name']} adapter does not fit its model (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); nothing written (please report this)")
    params = adapter_tensors(a.model)
    with torch.no_grad():
        for n in a.trainable:
            params[n].copy_(tensors[n])
    return a


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    src = sources.adapter_dir(cfg.adapter)
    meta = adapter.read_config(src)
    run_dir = check_multitask(cfg.adapter, meta)
    task_cfgs = multitask.task_configs(OmegaConf.load(run_dir / "config.yaml").dataset)
    if not isinstance(meta.get("label_names"), dict) or len(task_cfgs) != len(meta["label_names"]):
        raise UserError(f"{run_dir / 'config.yaml'} names {len(task_cfgs)} datasets, its adapter the tasks "
                        f"{meta.get('label_names')}; restore the run's config.yaml or adapter")
    mt, meta = sources.load(src, cfg.get("backbone_path"))
    net = mt.model.eval()
    bb = OmegaConf.create(meta["backbone"])
    if cfg.get("backbone_path"):
        bb.path = cfg.backbone_path
    probe = probe_batch(mt.tokenizer, classification.NAME)
    shared = [n for n in mt.trainable if not n.startswith(HEADS)]
    tensors = adapter_tensors(net)
    info = {"mode": "materialize", "adapter": str(src.resolve()), "method": mt.method.name, "tasks": {}}
    written = []
    for t, (task, task_cfg) in enumerate(zip(net.task_names, task_cfgs)):
        method_cfg, own = mt.method.materialize(net, t, shared)
        prefix = f"{HEADS}{task}."
        own.update({n.removeprefix(prefix): tensors[n].detach().clone() for n in mt.trainable if n.startswith(prefix)})
        labels = meta["label_names"][task]
        a = single_task(bb, method_cfg, labels, own)
        if a.fingerprint != meta["base_fingerprint"]:
            raise UserError(f"materialize: the single-task model of {task} has another base fingerprint ({a.fingerprint}) than "
                            f"the run's ({meta['base_fingerprint']}); nothing written (please report this)")
        with multitask.active(net, t):
            want = net(**probe, output_hidden_states=True)
        got = a.model.eval()(**probe, output_hidden_states=True)
        diff = (want.logits - got.logits).abs().max().item()
        hidden = (want.hidden_states[-1] - got.hidden_states[-1]).abs().max().item()
        if max(diff, hidden) > 1e-5 * max(1.0, want.logits.abs().max().item(), want.hidden_states[-1].abs().max().item()):
            raise UserError(f"materialize: {task}'s single-task model differs from the multi-task model's by {diff:.2e} "
                            f"(logits), {hidden:.2e} (last hidden states); nothing written (please report this)")
        task_meta = {**model.meta(a, bb, labels, task_cfg.name, classification.NAME), "backbone": meta["backbone"],
                     "seed": meta.get("seed"), "metrics": {}}
        info["tasks"][task] = {"dataset": task_cfg.name, "method": method_cfg["name"], "max_abs_logit_diff": diff,
                               "max_abs_hidden_diff": hidden,
                               "source_metrics": meta.get("metrics", {}).get(task, {}),
                               "trainable_params": task_meta["trainable_params"]}
        written.append((task, {n: own[n] for n in a.trainable}, task_meta, task_cfg))
    info["folders"] = [task for task, *_ in written]  # `merge.not_ours` reads it: these folders are this merge's
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        for task, own, task_meta, task_cfg in written:
            task_info = {**info["tasks"][task], "mode": "materialize", "task": task, "adapter": info["adapter"]}
            sources.write_adapter_run(tmp / task, own, {**task_meta, "merge": task_info}, run_dir, dataset=task_cfg)
        (tmp / "merge.json").write_text(json.dumps(info, indent=2) + "\n")
    for task, *_ in written:
        d = info["tasks"][task]
        sources.console.print(f"materialize: {task} ({d['dataset']}) as a single-task {d['method']} run → {out / task} "
                              f"(max |Δlogit| {d['max_abs_logit_diff']:.2e})")
    return info
