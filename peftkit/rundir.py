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
from peftkit.files import check_writable, pid_alive, recover

LOCK = ".peftkit.lock"
RUN_FILES = ("config.yaml", "adapter", "eval", "train_log.jsonl", "checkpoints", "snapshots", "merge.json")

_missing: dict[Path, Path] = {}  # run or sweep dir -> the outermost folder on its path that `prepare` created


def prepare(path: Path, key: str) -> None:
    """Create an output folder (and its parents) before Hydra does, noting which did not exist."""
    path = Path(path).resolve()
    check_writable(path, "output folder", key)
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
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
        self.before = {p.name for p in self.path.iterdir()} - {LOCK}
        for name in ("adapter", "checkpoints/last"):
            recover(self.path / name)
        for snap in (self.path / "snapshots").glob("step-*"):
            recover(snap)
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
        """What an earlier run left here that this one would replace."""
        return [n for n in RUN_FILES if n in self.before]

    def clear_previous_run(self) -> None:
        """`overwrite=true`: remove an earlier run's files (only peftkit's own), keep anything else."""
        for name in self.previous_run():
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.before -= set(RUN_FILES)

    def remove_created(self) -> None:
        """A failed or refused run removes what it wrote here and the folders it created, nothing else."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name not in self.before and p.name != LOCK:
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


