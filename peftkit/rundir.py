"""A run directory: one live owner at a time, and a failed run removes only what it created.

`prepare` runs before Hydra and notes which folders on the way to the run directory do not exist
yet; `RunDir.claim` takes the lock (`.peftkit.lock`, with the owner's pid, host and process start
time; a lock whose process is gone is taken over with a notice) and notes what the folder already
holds. `remove_created` then removes exactly what appeared since, and the folders `prepare` saw
missing once they are empty: never a file that was there before.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from peftkit.errors import UserError
from peftkit.files import make_dir, pid_alive, recover, resolved

LOCK = ".peftkit.lock"
# what a run writes in its folder (paths relative to it); `eval/` may hold the user's own files too
RUN_FILES = ("config.yaml", "adapter", "eval/report.json", "eval/report.md", "eval/submission", "train_log.jsonl",
             "checkpoints", "snapshots", "tracking")
OTHER_PEFTKIT_FILES = ("merge.json",)  # a merge's run-shaped output: replaced with the run it belongs to

_missing: dict[Path, Path] = {}  # run or sweep dir -> the outermost folder on its path that `prepare` created


def prepare(path: Path, key: str) -> None:
    """Create an output folder (and its parents) before Hydra does, noting which did not exist."""
    path = resolved(path, key)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    make_dir(path, "output folder", key)
    _missing.pop(path, None)
    if missing:
        _missing[path] = missing[-1]


def created_root(path: Path) -> Path | None:
    """The outermost folder on the way to `path` that `prepare` created, if it created any."""
    return _missing.get(Path(path).resolve())


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux): tells a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remove_if_empty(path: Path) -> None:
    """Remove a folder `prepare` created, and the new folders above it, if nothing was put in them."""
    path, root = Path(path).resolve(), created_root(path)
    if root is None:
        return
    for p in [path, *path.parents]:
        if not p.is_dir() or any(p.iterdir()):
            break
        p.rmdir()
        if p == root:
            break


class RunDir:
    """Ownership of one run directory for the life of a run (rank 0 only under several processes)."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.lock = self.path / LOCK
        self.before: set[str] = set()
        self.owned = False

    def claim(self) -> RunDir:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:  # a full disk: no half-written lock either
                self.lock.unlink(missing_ok=True)
                raise OSError(e.errno, e.strerror, str(self.lock)) from None
            self.owned = True
            break
        if not self.owned:
            raise UserError(f"run directory {self.path} is in use by another peftkit run; wait for it, or choose another hydra.run.dir")
        for name in ("adapter", "checkpoints/last"):
            recover(self.path / name)
        for snap in (self.path / "snapshots").glob("step-*"):
            recover(snap)
        self.before = _entries(self.path)
        return self

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.lock.read_text())
        except (OSError, ValueError):  # being written this instant, or unreadable: treat as live
            time.sleep(0.2)
            try:
                owner = json.loads(self.lock.read_text())
            except (OSError, ValueError):
                raise UserError(f"run directory {self.path} has an unreadable lock {self.lock}; if no run is using it, remove that file") from None
        pid, host = owner.get("pid"), owner.get("host")
        alive = host != socket.gethostname() or (pid_alive(pid) and _process_start(pid) in (None, owner.get("start")))
        if alive:
            where = f"pid {pid}" + ("" if host == socket.gethostname() else f" on {host}")
            raise UserError(
                f"run directory {self.path} is in use by peftkit ({where}, since {owner.get('since')}); wait for it, "
                f"choose another hydra.run.dir, or remove {self.lock} if that run is gone")
        print(f"peftkit: notice: taking over {self.path} from a run that is gone (pid {pid}, since {owner.get('since')})", file=sys.stderr)
        self.lock.unlink(missing_ok=True)

    def previous_run(self) -> list[str]:
        """What is here that this run would write over (whoever wrote it)."""
        return [n for n in RUN_FILES if n in self.before]

    def holds_run(self) -> bool:
        """Is what is here an earlier peftkit run (not a user's files that happen to share a name)?"""
        return is_peftkit_run(self.path)

    def clear_previous_run(self) -> None:
        """`overwrite=true`: remove an earlier run's files (only peftkit's own), keep anything else."""
        if not self.holds_run():
            raise UserError(f"{self.path} holds files peftkit did not write ({', '.join(self.previous_run())}); "
                            f"overwrite=true replaces only a peftkit run: move them away or choose another folder")
        for name in [*self.previous_run(), *(n for n in OTHER_PEFTKIT_FILES if n in self.before)]:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            self.before.discard(name)
        eval_dir = self.path / "eval"
        if eval_dir.is_dir() and not eval_dir.is_symlink() and not any(eval_dir.iterdir()):
            eval_dir.rmdir()
            self.before.discard("eval")

    def remove_created(self) -> None:
        """A failed or refused run removes what it wrote here and the folders it created, nothing else."""
        if not self.path.is_dir():
            return
        for name in sorted(_entries(self.path) - self.before - {LOCK}):
            p = self.path / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        self.release()
        remove_if_empty(self.path)

    def __enter__(self) -> RunDir:
        """Own the folder for a `with` block (the main process only, under several processes)."""
        return self.claim() if int(os.environ.get("RANK", "0")) == 0 else self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.owned:
            self.lock.unlink(missing_ok=True)
            self.owned = False




def _entries(path: Path) -> set[str]:
    """The names in a run folder, and in its eval/ (where a user may keep notes beside the report)."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    ev = path / "eval"
    if ev.is_dir() and not ev.is_symlink():
        names |= {f"eval/{p.name}" for p in ev.iterdir()}
    return names


def is_peftkit_run(path: Path) -> bool:
    """An earlier peftkit run lives here: its config.yaml is a run config (backbone, method, dataset,
    trainer) or its eval/report.json a peftkit report. File names alone prove nothing."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(path) / "config.yaml").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in ("backbone", "method", "dataset", "trainer")):
            return True
    except (OSError, ValueError, yaml.YAMLError):
        pass
    try:
        rep = json.loads((Path(path) / "eval" / "report.json").read_text(encoding="utf-8"))
        return isinstance(rep, dict) and {"status", "method", "dataset"} <= set(rep)
    except (OSError, ValueError):
        return False
