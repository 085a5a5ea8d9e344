"""`peftkit train`: one readable job, setup → train → save adapter → report.

The loop is plain PyTorch under accelerate (one process, DDP on CPUs or GPUs, multi-node), in
fp32, bf16 or fp16. Features are small functions it calls: evaluation every N steps, keeping the
best adapter, resumable checkpoints, adapter snapshots for checkpoint merging, a JSONL log, a
rich progress bar and experiment trackers (`peftkit.tracking`).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from peftkit import adapter, backbone, checkpoint, cpu, device_reads, model, tasks, tracking
from peftkit.data.batching import to_device, train_batches
from peftkit.errors import CtrlC, Diverged, UserError
from peftkit.evaluation import report
from peftkit.methods.base import adapter_tensors, pack_frozen_linears
from peftkit.files import atomic_write_text, fault_point, folder_bytes, json_text, newest_complete

console = Console(stderr=True)


def make_accelerator(trainer: DictConfig, sparse_gradients: bool = False, trackers: tracking.Trackers | None = None):
    """One per run, with the run's experiment trackers (`trainer.log_with`). A sweep runs its jobs one
    after another in one process, each with its own precision: accelerate's process-wide state is
    reset between them (one process only: under torchrun or accelerate launch the state holds the
    process group)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available() and trainer.device != "cpu"
    if trainer.device == "cuda" and not cuda:
        raise UserError("trainer.device=cuda: no GPU is visible here; use trainer.device=auto or cpu")
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "auto": "no"}[trainer.precision]
    if trainer.precision == "auto" and cuda and torch.cuda.is_bf16_supported():
        precision = "bf16"  # on CPU bf16 autocast is many times slower than fp32 for a decoder's matmuls
    if precision == "fp16" and not cuda:
        raise UserError("trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=fp32 (or bf16 on a CPU with bf16 units)")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if sparse_gradients else []
    return Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=trainer.grad_accum,
                       kwargs_handlers=handlers, log_with=(trackers.instances() if trackers else None) or None,
                       project_dir=trackers.dir if trackers and trackers.names else None)


def prepare_model(accelerator, a: model.Adapted, kind) -> None:
    """How the run computes, the same in training and in `peftkit eval` so their scores agree: under
    bf16 mixed precision the frozen base is stored in bf16 and the adapter in fp32
    (`backbone.store_frozen_base`), its Linears on CPU on weights packed once
    (`methods.base.PackedLinear`), off CPU its attention masks are built without reading the device
    (`device_reads.attend_without_reads`), and a task may skip what its loss never reads
    (classification: the last layer on the first position only)."""
    if accelerator.mixed_precision == "bf16":
        backbone.store_frozen_base(a.model, torch.bfloat16, a.trainable)
        if accelerator.device.type == "cpu":
            pack_frozen_linears(a.model)
    device_reads.attend_without_reads(a.model, accelerator.device)
    if hasattr(kind, "skip_unread_positions"):
        kind.skip_unread_positions(a.model, a.method)


def read_interval(device: torch.device, log_every: int) -> int:
    """Steps between reads of the step losses on the host. On a GPU, once a log window: a read waits
    for the GPU to finish every queued step, so reading each step would keep the host from running
    ahead. On CPU every step, where a read costs nothing and a divergence stops the run at once."""
    return 1 if device_reads.reads_are_free(device) else log_every


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(m: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in m.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


def make_scheduler(opt, t: DictConfig, total_steps: int):
    warmup = int(t.warmup * total_steps) if t.warmup < 1 else int(t.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if t.scheduler == "linear":
            return max(0.0, 1 - progress)
        if t.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


class Throughput:
    """Training speed, defined once: samples (and real tokens, no padding) over the seconds spent in
    training steps, summed over log windows (one log step to the next, evaluation and saving cut
    out). The first window of each process is warm-up (first batches, allocator, kernel choice) and
    counts only while it is the only one. The progress bar, each train_log.jsonl record, report.json
    and the trackers all show `figures()`."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}  # a checkpoint's counts: a resumed run goes on with them
        self.samples, self.tokens, self.seconds = saved.get("samples", 0), saved.get("tokens", 0), saved.get("seconds", 0.0)
        self.warmup: tuple[int, int, float] | None = None

    def add(self, samples: int, tokens: int, seconds: float) -> None:
        if self.warmup is None:
            self.warmup = (samples, tokens, seconds)
        else:
            self.samples, self.tokens, self.seconds = self.samples + samples, self.tokens + tokens, self.seconds + seconds

    def state(self) -> dict:
        return {"samples": self.samples, "tokens": self.tokens, "seconds": self.seconds}

    def figures(self, tokens: bool = True) -> dict:
        """{samples_per_s, tokens_per_s}; empty before the first log step."""
        samples, n_tokens, seconds = (self.samples, self.tokens, self.seconds) if self.seconds else (self.warmup or (0, 0, 0.0))
        if not seconds:
            return {}
        return {"samples_per_s": samples / seconds, **({"tokens_per_s": n_tokens / seconds} if tokens else {})}


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's adapter snapshots (`trainer.keep_checkpoints`), oldest first."""
    found = [(int(p.name.removeprefix("step-")), p) for p in (run_dir / "snapshots").glob("step-*")
             if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(found)


def save_snapshot(run_dir: Path, raw: torch.nn.Module, names: list[str], meta: dict, keep: int) -> None:
    """The adapter at this eval step, for `peftkit merge mode=mwa`; only the newest `keep` stay."""
    adapter.save(run_dir / "snapshots" / f"step-{meta['step']:06d}", raw, names, meta)
    for _, old in snapshots(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


PATH_KEYS = ("backbone.path", "dataset.data_dir", "dataset.train_file", "dataset.dev_file", "dataset.path")


def absolute_paths(cfg: DictConfig) -> None:
    """Make user paths absolute, so the saved config works from any directory (`peftkit eval`);
    a multi-task run's datasets too (`dataset.tasks`)."""
    nodes = [cfg] + [OmegaConf.create({"dataset": d}) for d in (cfg.dataset.get("tasks") or []) if isinstance(d, DictConfig)]
    for node in nodes:
        for key in PATH_KEYS:
            value = OmegaConf.select(node, key)
            if key == "dataset.train_file" and OmegaConf.select(node, "dataset.data_dir"):
                continue  # dataset=math: a file inside data_dir (an absolute path still wins there)
            if value:
                OmegaConf.update(node, key, str(Path(value).expanduser().resolve()))
    if len(nodes) > 1:
        cfg.dataset.tasks = [OmegaConf.to_container(n.dataset) for n in nodes[1:]]


def collapse_message(collapsed: dict[str, str], step: int, lr: float) -> str:
    """One line for a report whose kept adapter collapsed (`scoring.collapse`), with what to try."""
    where = "; ".join(f"{split}: {why}" for split, why in collapsed.items())
    return f"the kept adapter (step {step}) collapsed to one prediction or nearly ({where}); try a lower trainer.lr (now {lr:g})"


def run(cfg: DictConfig, run_dir: Path, before_writing=None, group: str | None = None) -> dict:
    """`before_writing`: called once the data, the model and the batches are ready, just before the
    run writes its first file (`overwrite=true` clears the earlier run there, and only then).
    `group`: the sweep this run belongs to, for the trackers (its directory's name)."""
    tracking.check(cfg.trainer)
    with tracking.Trackers(tracking.wanted(cfg.trainer), Path(run_dir), group) as trackers, CtrlC() as ctrl_c:
        return _train(cfg, Path(run_dir), before_writing, trackers, ctrl_c)


def _train(cfg: DictConfig, run_dir: Path, before_writing, trackers: tracking.Trackers, ctrl_c: CtrlC) -> dict:
    kind = tasks.of(cfg.dataset)
    if hasattr(kind, "expand_config"):  # multi-task: the datasets' own configs in place of their names
        kind.expand_config(cfg.dataset)
    absolute_paths(cfg)
    t = cfg.trainer
    keep_snapshots = t.get("keep_checkpoints") or 0
    n_threads, why = cpu.choose_threads(t.get("threads"), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    accelerator = make_accelerator(t, getattr(kind, "SPARSE_GRADIENTS", False), trackers)
    main = accelerator.is_main_process
    seed_everything(cfg.seed)

    tokens = getattr(kind, "TOKENS", True)  # an image task has none: no tokens/s in its log and report
    task = kind.load_data(cfg.dataset)
    seed_everything(cfg.seed)  # the initial adapter and head depend on the seed alone (merge mode=compress rebuilds them)
    a = model.build(cfg.backbone, cfg.method, task.label_names, kind.NAME)
    if main:
        console.print(f"{cfg.method.name} on {cfg.backbone.name}, {cfg.dataset.name}: {a.summary()}")
    encoded = kind.encode(task, a.tokenizer, cfg)
    train = encoded["train"]
    world, rank = accelerator.num_processes, accelerator.process_index

    def epoch_batches(epoch: int) -> list[list[int]]:
        if hasattr(train, "train_batches"):  # the task's own order (multi-task: one task per batch)
            all_b = train.train_batches(t.batch_size, cfg.seed, epoch, t.group_by_length)
        else:
            all_b = train_batches(train.lengths, t.batch_size, cfg.seed, epoch, t.group_by_length)
        mine = all_b[rank::world][: len(all_b) // world]  # every process takes the same number of steps
        return mine[: len(mine) - len(mine) % t.grad_accum]

    steps_per_epoch = len(epoch_batches(0)) // t.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"train split has {len(train)} examples: too few for batch size {t.batch_size} × {world} processes × {t.grad_accum} accumulation")
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    eval_every = t.eval_every or steps_per_epoch
    if main and before_writing is not None:
        before_writing()
    if main and accelerator.device.type == "cpu":  # only once every input checked out: a bad one stays one line
        console.print(f"CPU threads: {n_threads} ({why}; trainer.threads=N sets them)")
        if accelerator.mixed_precision == "bf16" and (slower := cpu.bf16_slowdown()) > 3:
            console.print(f"[yellow]trainer.precision=bf16: this CPU multiplies bf16 matrices {slower:.0f}x slower than fp32 "
                          "(no AVX512-BF16 or AMX units): trainer.precision=fp32 will be much faster here[/]")
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if where := trackers.start(accelerator, OmegaConf.to_container(cfg, resolve=True)):
        console.print(where)

    prepare_model(accelerator, a, kind)
    net = a.model
    if accelerator.device.type == "cpu":
        cpu.use_fast_dropout(net)
    optimizer = make_optimizer(net, t)
    scheduler = make_scheduler(optimizer, t, total_steps)
    net, optimizer = accelerator.prepare(net, optimizer)
    raw = accelerator.unwrap_model(net)
    trainable_params = [p for p in net.parameters() if p.requires_grad]

    ckpt_dir = run_dir / "checkpoints" / "last"
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "throughput": {}, "train_time_s": 0.0, "eval_time_s": 0.0,
             "threads": n_threads}
    if cfg.resume and (found := newest_complete(ckpt_dir)):
        state = checkpoint.load(found, raw, a.method, optimizer, scheduler)
        if state.get("threads") and why.startswith("auto"):  # the interrupted run's count: sums in the same order
            n_threads = state["threads"]
            torch.set_num_threads(n_threads)
        if main:
            console.print(f"resumed from {found} at step {state['step']}")
    elif cfg.resume and main:
        console.print(f"no checkpoint in {run_dir}; starting from step 0")
    log_path = run_dir / "train_log.jsonl"
    if main and state["step"] == 0:
        log_path.write_text("")
    elif main and log_path.is_file():  # drop what the interrupted run logged past its last checkpoint
        kept = []
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= state["step"]:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
                pass
        atomic_write_text(log_path, "".join(kept))
    if main:  # snapshots past the starting step belong to an earlier run in this folder, not to this one
        for at, old in snapshots(run_dir):
            if at > state["step"]:
                shutil.rmtree(old, ignore_errors=True)

    def log(record: dict) -> None:
        if main:
            with open(log_path, "a") as f:
                f.write(json_text(record, indent=None) + "\n")
        trackers.log(tracking.record_values(record), record["step"])

    meta = {**model.meta(a, cfg.backbone, task.label_names, cfg.dataset.name, kind.NAME), "seed": cfg.seed}

    def evaluate_and_keep(step: int, train_loss: float) -> None:
        if bad := adapter.nonfinite(adapter_tensors(raw), a.trainable):
            diverged(step, f"{len(bad)} trained tensors hold NaN or infinity (first: {bad[0]})")
        result = kind.evaluate(accelerator, net, task, encoded, t.eval_batch_size)
        log({"step": step, "eval": result["metrics"], "score": result["score"],
             **({"collapsed": result["collapsed"]} if "collapsed" in result else {})})
        best = state["best"]
        if main:
            console.print(f"step {step}: {task.task} score {result['score']:.2f} " + " ".join(
                f"{s}/{k} {v:.2f}" for s, ms in result["metrics"].items() for k, v in ms.items()))
            for split, why in result.get("collapsed", {}).items():
                console.print(f"[yellow]step {step}: collapsed on {split}: {why}[/]")
        if best is None or result["score"] > best["score"] or not t.keep_best:
            state["best"] = {"step": step, **result}
            if main:
                adapter.save(run_dir / "adapter", raw, a.trainable, {**meta, "step": step, "metrics": result["metrics"]})
        if keep_snapshots:
            train_loss = accelerator.reduce(torch.tensor(train_loss, dtype=torch.float64, device=accelerator.device), "mean").item()
            if main:
                save_snapshot(run_dir, raw, a.trainable, {**meta, "step": step, "train_loss": train_loss,
                                                          "score": result["score"], "metrics": result["metrics"]}, keep_snapshots)

    last_finite = {"step": state["step"], "loss": None}
    method_stats: dict[str, float] = {}  # the method's numbers at the last log step (Method.stats)

    def make_report(status: str, error: str | None = None) -> dict:
        train_time = time.perf_counter() - t_start
        best = state["best"] or {}
        n, total = meta["trainable_params"], meta["total_params"]
        parts = getattr(task, "tasks", {"": task}).values()  # a multi-task run's datasets
        scored = all(d.name.startswith("glue/") for d in parts) and "score" in best
        return {
            "status": status,
            **({"error": error} if error else {}),
            "dataset": cfg.dataset.name,
            "task": task.task,
            "method": cfg.method.name,
            "backbone": cfg.backbone.name,
            "recipe": cfg.get("recipe"),
            "seed": cfg.seed,
            "metrics": best.get("metrics", {}),
            "score": best.get("score"),
            **({"task_scores": best["task_scores"]} if "task_scores" in best else {}),
            **({"collapsed": best["collapsed"]} if "collapsed" in best else {}),  # {split: how}: the kept step's
            **({"samples": best["samples"]} if best.get("samples") else {}),
            **({"truncated": task.truncated} if getattr(task, "truncated", None) else {}),
            "glue_average": best["score"] if scored else None,
            "best_step": best.get("step"),
            "total_steps": total_steps,
            "trainable_params": n,
            "total_params": total,
            "trainable_pct": 100 * n / total,
            "adapter_bytes": folder_bytes(run_dir / "adapter"),  # `peftkit report` shows it after the adapter moves
            "train_time_s": train_time,
            "eval_time_s": state["eval_time_s"],
            **throughput.figures(tokens),  # training steps alone (Throughput)
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}),
            "precision": t.precision,
            "threads": n_threads,
            "processes": world,
            **({"method_stats": dict(method_stats)} if method_stats else {}),
        }

    def diverged(at: int, what: str) -> None:
        """Stop: the last finite adapter and checkpoint stay, the report says `diverged`."""
        log({"step": at, "diverged": True, "error": what})
        best, kept = state["best"], []
        if best:
            kept.append(f"the adapter of step {best['step']}")
        if t.checkpoint and state["step"]:
            kept.append(f"the checkpoint of step {state['step']}")
        last = (f"last finite loss {last_finite['loss']:.4g} at step {last_finite['step']}"
                if last_finite["loss"] is not None else "no finite loss before")
        message = (f"training diverged at step {at} of {total_steps}: {what} ({last}); "
                   f"{'kept ' + ' and '.join(kept) if kept else 'nothing was kept'}; try a lower trainer.lr (now {t.lr:g})"
                   + ("" if t.max_grad_norm else " or clip gradients with trainer.max_grad_norm=1.0"))
        raise Diverged(message, make_report("diverged", message))

    # Each step's loss (and a method's own loss term) stays on the device until read here, in order,
    # every `read_interval` steps, at each log step and before each evaluation.
    unread: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss, aux)
    read_every = read_interval(accelerator.device, t.log_every)

    def read_losses() -> None:
        nonlocal window_loss, window_n, eval_loss_sum, eval_loss_n
        if not unread:
            return
        # one read for all of them; a step's aux term may be missing (MoE LoRA has none without routing)
        values = iter(torch.stack([x.reshape(()).float() for _, loss, aux in unread for x in (loss, aux) if x is not None]).tolist())
        for at, _, aux in unread:
            value, aux_value = next(values), None if aux is None else next(values)
            if not math.isfinite(value):
                diverged(at, f"the loss is {value}")
            if aux_value is not None and not math.isfinite(aux_value):  # it trained on it too
                diverged(at, f"the method's own loss term ({a.method.name}) is {aux_value}")
            last_finite.update(step=at, loss=value)
            window_loss, window_n = window_loss + value, window_n + 1
            eval_loss_sum, eval_loss_n = eval_loss_sum + value, eval_loss_n + 1
        unread.clear()

    step, epoch, start = state["step"], state["epoch"], state["batch"]
    throughput = Throughput(state.get("throughput"))  # (older checkpoints lack it)
    window_loss, window_n, window_samples, window_tokens, window_t = 0.0, 0, 0, 0, time.perf_counter()
    window_s = 0.0  # training seconds of this log window before an evaluation cut it
    eval_loss_sum, eval_loss_n = 0.0, 0  # training loss since the last evaluation (snapshots record it)
    t_start = time.perf_counter() - state["train_time_s"]
    if t.get("eval_before") and step == 0:  # the base model as the run starts: the "before" of a before/after
        t0 = time.perf_counter()
        before = kind.evaluate(accelerator, net, task, encoded, t.eval_batch_size)
        log({"step": 0, "eval": before["metrics"], "score": before["score"]})
        if main:
            console.print(f"before training: {task.task} score {before['score']:.2f}")
        state["eval_time_s"] += time.perf_counter() - t0  # evaluation, not training speed
        window_t = time.perf_counter()
    net.train()
    with progress_bar(main) as bar:
        job = bar.add_task("train", total=total_steps, completed=step, loss="-", lr="-", speed="-")
        while step < total_steps:
            batches = epoch_batches(epoch)
            for bi in range(start, len(batches)):
                ctrl_c.check()
                batch = to_device(train.batch(batches[bi]), accelerator.device)
                with accelerator.accumulate(net):
                    loss = kind.loss(net, batch, train)
                    aux = a.method.aux_loss(raw)  # the method's own term (MoE load balancing); the logged loss is the task's
                    accelerator.backward(loss if aux is None else loss + aux)
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable_params, t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        a.method.after_optimizer_step(raw, step + 1, total_steps)
                    optimizer.zero_grad(set_to_none=True)
                unread.append((step + 1, loss.detach(), None if aux is None else aux.detach()))
                if len(unread) >= read_every:
                    read_losses()
                fault_point("train_step")
                window_samples += len(batches[bi]) * world
                window_tokens += sum(train.lengths[i] for i in batches[bi]) * world  # real tokens, no padding
                if (bi + 1) % t.grad_accum:
                    continue
                scheduler.step()
                step += 1
                if step % t.log_every == 0 or step == total_steps:
                    read_losses()  # on a GPU, waits for the window's queued work: the timing below includes it
                    now = time.perf_counter()
                    throughput.add(window_samples, window_tokens, window_s + now - window_t)
                    speed = throughput.figures()
                    lr = scheduler.get_last_lr()[0]
                    record = {"step": step, "epoch": round(epoch + (bi + 1) / len(batches), 3),
                              "loss": window_loss / window_n, "lr": lr, "samples_per_s": speed["samples_per_s"],
                              **({"tokens_per_s": speed["tokens_per_s"]} if tokens else {}), "elapsed_s": now - t_start}
                    stats = a.method.stats(raw)  # the method's numbers since the last log step (MoE LoRA's expert load)
                    record.update(stats)
                    method_stats.update(stats)
                    log(record)
                    shown = f"{speed['tokens_per_s']:.0f} tok/s" if kind.NAME == "causal_lm" else f"{speed['samples_per_s']:.0f} samples/s"
                    bar.update(job, loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", speed=shown)
                    window_loss, window_n, window_samples, window_tokens, window_t, window_s = 0.0, 0, 0, 0, now, 0.0
                bar.update(job, completed=step)
                if step % eval_every == 0 or step == total_steps:
                    read_losses()  # nothing is evaluated or saved past an unread divergence
                    t0 = time.perf_counter()
                    window_s += t0 - window_t
                    evaluate_and_keep(step, eval_loss_sum / eval_loss_n)
                    eval_loss_sum, eval_loss_n = 0.0, 0
                    state.update(step=step, epoch=epoch, batch=bi + 1, throughput=throughput.state())
                    state["eval_time_s"] += time.perf_counter() - t0
                    state["train_time_s"] = time.perf_counter() - t_start
                    if main and t.checkpoint:
                        checkpoint.save(ckpt_dir, raw, a.trainable, a.method, optimizer, scheduler, state)
                    window_t = time.perf_counter()  # eval and saving are not training speed
                if step >= total_steps:
                    break
            epoch, start = epoch + 1, 0

    collapsed = (state["best"] or {}).get("collapsed")
    result = make_report("collapsed", collapse_message(collapsed, state["best"]["step"], t.lr)) if collapsed else make_report("ok")
    trackers.log(tracking.report_values(result), step)
    if main:
        report.write(run_dir, result)
        if not t.keep_last_checkpoint:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return result
