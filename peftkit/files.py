"""Safe writes: a reader never sees a half-written file or folder, and a kill at any moment leaves
a complete copy that the next reader finds.

A folder is replaced in steps that each leave a complete copy on disk (`atomic_dir`):
write `.NAME.tmp-PID-*` → rename it to `.NAME.new` (complete) → move `NAME` to `.NAME.old` →
rename `.NAME.new` to `NAME` → remove `.NAME.old`. `newest_complete` finds the copy to read after a
kill at any step, and `recover` (for the folder's owner) puts it back in place and removes the
temporary folders of killed writers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import UserError


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path`, 0 when it is not there: an adapter's size on disk."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """JSON that other tools can read: NaN and infinity (never valid JSON) are written as null."""
    atomic_write_text(path, json_text(obj) + "\n")


def json_text(obj, indent: int | None = 2) -> str:
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def finite(obj):
    """`obj` with every non-finite float replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        try:
            yield tmp
        except Exception as e:  # safetensors (and save_pretrained through it) report a full disk as its own error
            code = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        _sync_tree(tmp)
        new, old = _new(path), _old(path)
        shutil.rmtree(new, ignore_errors=True)
        os.replace(tmp, new)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        fault_point(f"between_renames:{path.name}")
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sync_tree(folder: Path) -> None:
    """Flush a folder's files to disk before it is renamed into place (a crash of the machine, not
    only of the process, then finds complete files)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def newest_complete(path: Path) -> Path | None:
    """The newest complete copy of a folder written by `atomic_dir`, wherever a kill left it; read-only."""
    path = Path(path)
    for candidate in (_new(path), path, _old(path)):
        if candidate.is_dir():
            return candidate
    return None


def recover(path: Path) -> None:
    """For the folder's owner: put its newest complete copy in place, remove older copies and the
    temporary folders of killed writers."""
    path = Path(path)
    new, old = _new(path), _old(path)
    if new.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(new, path)
    elif old.is_dir() and not path.exists():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    remove_dead_temps(path)


def remove_dead_temps(path: Path) -> None:
    """Remove `.NAME.tmp-PID-*` beside `path` whose writer (PID, on this machine) is gone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL, as `kill -9`) here when `PEFTKIT_FAULT=name[@N]` names this point
    (at its N-th passage, default 1): how the tests interrupt a run at an exact moment."""
    spec = os.environ.get("PEFTKIT_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want != name:
        return
    _passages[name] = _passages.get(name, 0) + 1
    if _passages[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_passages: dict[str, int] = {}


def user_path(value, key: str) -> Path:
    """A path as the user gave it on the command line or in a config: `~` expanded (quoted or not),
    an empty value refused. Every command reads its path arguments through here."""
    text = "" if value is None else str(value)
    if not text.strip():
        raise UserError(f"{key}='': expected a path; give {key}=PATH")
    return Path(os.path.expanduser(text))


def resolved(path, key: str) -> Path:
    """`path` made absolute with symlinks followed; a symlink loop is one line, not a traceback."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise UserError(f"{key}={path}: cannot follow its path ({' '.join(str(e).split())}); is it a symlink loop? "
                        f"choose another path") from None


def check_writable(path: Path, what: str, key: str) -> None:
    """Refuse early, in one line, an output folder that cannot be created or written: a file in
    the way, no write permission, or a place where nothing can be created (/proc, a read-only mount)."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise UserError(f"{key}={path}: {existing} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path}: {existing} is not writable; choose a writable {what}")
    try:  # root passes os.access everywhere: try it (and leave nothing behind)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".peftkit-probe-"))
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"{key}={path}: {existing} is not writable ({e.strerror}); choose a writable {what}") from None
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(write_error(e)) from None
        raise UserError(f"{key}={path}: nothing can be created in {existing} ({e.strerror}); choose another {what}") from None


def make_dir(path: Path, what: str, key: str) -> None:
    """Create an output folder and its parents, or say in one line why it cannot be."""
    check_writable(path, what, key)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{key}={path}: a file is in the way; choose another {what}") from None
    except OSError as e:
        raise UserError(f"{key}={path}: cannot create it ({e.strerror}); choose another {what}") from None


WRITE_ERRNOS = {"ENOSPC": "the disk is full: free space or write elsewhere",
                "EDQUOT": "the disk quota is used up: free space or write elsewhere",
                "EFBIG": "a file grew past the allowed file size (ulimit -f): raise the limit or write elsewhere",
                "EROFS": "the file system is read-only: choose a writable output folder",
                "EACCES": "permission denied: choose a writable output folder",
                "EPERM": "permission denied: choose a writable output folder"}


def write_error(e: OSError) -> str | None:
    """One line for an OSError that the machine, not peftkit, caused (disk full, read-only, ...)."""
    name = errno.errorcode.get(e.errno or 0, "")
    if name not in WRITE_ERRNOS:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {e.strerror or name}; {WRITE_ERRNOS[name]}"
