"""Output safety: which directories embedforge may replace, one writer per output, and cleanup after a crash.

Every stage writes its result through :func:`atomic_dir` (defined at the end of this module and re-exported by
:mod:`embedforge.model`), which uses the pieces here:

- :func:`check_output` refuses an output location embedforge must not replace: a file, the current directory, a
  non-empty directory without an ``embedforge.json`` that embedforge wrote, or (for ``eval``) a directory that
  holds anything but an earlier evaluation. An empty directory is fine.
- :func:`output_lock` takes ``.NAME.lock`` beside the output for the whole run: an exclusive ``flock`` plus the
  holder's pid, host and process start time, so a second run into the same output is refused at once, and a lock
  left by a run that died is taken over with a warning. Re-entrant within one process.
- :func:`clean_leftovers` removes the hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings a killed save left behind
  (only those whose owning process is gone), and puts a previous output back if a save died between renames.
- :func:`fix_modes` gives a finished output the umask's permissions (``mkdtemp`` and safetensors use 700 / 600).
- :func:`is_disk_full` / :class:`DiskFullError` turn ``ENOSPC`` anywhere in a save into one line.

Import-light: no torch here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from embedforge.errors import OutputError, RunError

logger = logging.getLogger(__name__)

LINEAGE_FILE = "embedforge.json"
#: Lineage ``stage`` values that do not make a directory embedforge's own (``update_metrics`` on a foreign model).
FOREIGN_STAGES = frozenset({"external"})
#: Leftovers without an owner pid in their name (older embedforge versions) are removed after this many seconds.
UNOWNED_LEFTOVER_AGE_S = 3600.0


class DiskFullError(RunError):
    """The disk (or quota) filled up while an output was written; the previous output is untouched."""


# ------------------------------------------------------------------------------------------ ownership


def owner_stage(path: str | os.PathLike[str]) -> str | None:
    """The stage recorded in ``path/embedforge.json`` when embedforge wrote the directory, else None."""
    f = Path(path) / LINEAGE_FILE
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "embedforge_version" not in record:
        return None
    stage = record.get("stage")
    if not isinstance(stage, str) or not stage or stage in FOREIGN_STAGES:
        return None
    return stage


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: str | os.PathLike[str], *, stage: str | None = None,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Raise :class:`OutputError` unless embedforge may write (and so replace) ``out``.

    Allowed: a missing path, an empty directory, or a directory whose ``embedforge.json`` embedforge wrote; with
    ``stage="eval"`` only an earlier eval output (an evaluation never replaces a model). ``inputs`` are local
    paths the writer reads: ``out`` may not be one of them or contain one.
    """
    path = Path(out).expanduser().resolve()
    for item in inputs:
        src = Path(item).expanduser()
        if src.exists() and _contains(path, src.resolve()):
            raise OutputError(f"{path}: is (or contains) the input {item}, which writing here would delete; "
                              "choose another output directory")
    if _contains(path, Path.cwd().resolve()):
        raise OutputError(f"{path}: is the current directory or one above it; write the output to a new "
                          "subdirectory instead")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: is a file, not a directory; choose a new or empty directory for the output")
    if not any(path.iterdir()):
        return
    owner = owner_stage(path)
    if owner is None:
        raise OutputError(f"{path}: refusing to replace a non-empty directory embedforge did not write "
                          f"(no {LINEAGE_FILE} of its own); choose a new or empty output directory")
    if stage == "eval" and owner != "eval":
        raise OutputError(f"{path}: holds a {owner} model, not an eval output; write the evaluation to a new or "
                          "empty directory (or an earlier eval output)")


# ------------------------------------------------------------------------------------------ processes


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True when process ``pid`` runs on this host (and, if ``started`` is given, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2:].startswith("Z"):
            return False  # a zombie has finished
    except OSError:
        pass
    if started is not None:
        now = _start_time(pid)
        if now is not None and now != started:
            return False  # the pid was reused by another process
    return True


# ------------------------------------------------------------------------------------------------ locks


@dataclass
class LockHolder:
    """What a lock file says about the run that holds it."""

    pid: int
    host: str = ""
    started: int | None = None
    since: str = ""

    def alive(self) -> bool:
        """True when the holder is a running process on this host (another host's holder counts as running)."""
        if self.host and self.host != socket.gethostname():
            return True
        return pid_alive(self.pid, self.started)

    def describe(self) -> str:
        if self.pid < 0:
            return "an unreadable lock record"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        since = f", since {self.since}" if self.since else ""
        return f"pid {self.pid}{where}{since}"


def lock_path(out: str | os.PathLike[str]) -> Path:
    """``.NAME.lock`` beside output ``NAME``."""
    path = Path(out).expanduser().resolve()
    return path.parent / f".{path.name}.lock"


def _read_holder(text: str) -> LockHolder | None:
    text = text.strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, int):
        return LockHolder(pid=data)
    if isinstance(data, dict) and isinstance(data.get("pid"), int):
        started = data.get("started")
        return LockHolder(pid=data["pid"], host=str(data.get("host") or ""),
                          started=started if isinstance(started, int) else None, since=str(data.get("since") or ""))
    return LockHolder(pid=-1)  # unreadable: nobody we can check


def _try_flock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: the pid check alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # pragma: no cover - a file system without locks: fall back to the pid check
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


_held: dict[Path, list[int]] = {}  # lock file -> [fd, depth], for re-entry within this process
_held_guard = threading.Lock()


def _acquire(lock: Path, out: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create its parent directory ({exc.strerror}); choose a writable "
                          "output location") from None
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the lock file {lock} ({exc.strerror}); choose a writable "
                              "output location") from None
        try:
            holder = _read_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            if not _try_flock(fd):
                who = holder.describe() if holder else "another process"
                raise OutputError(f"{out}: another embedforge run ({who}) is writing this output; wait for it "
                                  "to finish or choose another output directory")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:  # its previous holder removed the file between our open and our lock: start again
                os.close(fd)
                continue
            holder = _read_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            if holder is not None and holder.pid != os.getpid() and holder.alive():
                raise OutputError(f"{out}: another embedforge run ({holder.describe()}) holds {lock}; wait for it "
                                  "to finish or choose another output directory (remove the lock file only if "
                                  "that run is gone)")
            if holder is not None:
                logger.warning("%s: taking over the stale lock %s left by %s, which is no longer running",
                               out, lock, holder.describe())
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                      "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(out, exc) from exc
                raise
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OutputError(f"{out}: could not take the lock {lock} (other runs keep replacing it); try again")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of output ``out`` for the block; refuse (:class:`OutputError`) while another run holds it.

    Re-entrant within one process, so a recipe can lock all its outputs up front and each save locks again.
    """
    path = Path(out).expanduser().resolve()
    if not path.name:
        raise OutputError(f"{path}: a file system root cannot be an output; choose a new or empty directory")
    lock = lock_path(path)
    with _held_guard:
        entry = _held.get(lock)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        fd = _acquire(lock, path)
        with _held_guard:
            _held[lock] = [fd, 1]
    try:
        yield lock
    finally:
        with _held_guard:
            entry = _held[lock]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[lock]
        if last:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # while still locked, so nobody can lock the old file after us
            os.close(entry[0])


# ------------------------------------------------------------------------------------- temporary siblings


def temp_prefix(out: Path, kind: str = "tmp", pid: int | None = None) -> str:
    """Name prefix of a hidden sibling of ``out`` (``kind`` tmp or old) that names its owner (this process)."""
    return f".{out.name}.{kind}-{_host_tag()}-{os.getpid() if pid is None else pid}-"


def make_temp_dir(out: Path) -> Path:
    """A fresh hidden temporary directory beside ``out``, owned by this process."""
    try:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out, exc) from exc
        raise OutputError(f"{out}: cannot write beside it in {out.parent} ({exc.strerror}); choose a writable "
                          "output location") from None


def _leftovers(out: Path) -> list[tuple[Path, str, bool | None]]:
    """Hidden siblings ``.NAME.tmp-*`` / ``.NAME.old-*``: (path, kind, owner alive: True/False, None if unknown)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(.*)$")
    owned = re.compile(r"^([0-9a-f]{6})-(\d+)-")
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        o = owned.match(m.group(2))
        if o is None:
            alive = None
        elif o.group(1) != _host_tag():
            alive = None if time.time() - p.stat().st_mtime > 24 * 3600 else True
        else:
            alive = int(o.group(2)) == os.getpid() or pid_alive(int(o.group(2)))
        found.append((p, m.group(1), alive))
    return found


def clean_leftovers(out: str | os.PathLike[str], *, locked: bool = True) -> list[Path]:
    """Remove what killed saves into ``out`` left beside it; return what was removed.

    A sibling is removed when the process named in it is gone (siblings without an owner, from older versions,
    once they are an hour old). If ``out`` itself is missing because a save died between moving the previous
    output aside and putting the new one in place, the previous output is put back first. ``locked`` says the
    caller holds ``out``'s lock (otherwise ownerless siblings are left alone).
    """
    path = Path(out).expanduser().resolve()
    removed: list[Path] = []
    stale = []
    for p, kind, alive in _leftovers(path):
        if alive:
            continue
        if alive is None and not (locked and time.time() - p.stat().st_mtime > UNOWNED_LEFTOVER_AGE_S):
            continue
        stale.append((p, kind))
    olds = sorted((p for p, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        logger.warning("%s: a save into it was interrupted; restoring the previous output from %s", path, olds[-1])
        olds[-1].rename(path)
        stale = [(p, k) for p, k in stale if p != olds[-1]]
    for p, _ in stale:
        logger.warning("removing %s, left behind by an interrupted save", p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ modes and disk full


def current_umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fix_modes(root: str | os.PathLike[str]) -> None:
    """Give every directory and file under ``root`` the permissions the umask grants (755 / 644 under 022)."""
    umask = current_umask()
    dir_mode = 0o777 & ~umask
    file_mode = 0o666 & ~umask
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            f = os.path.join(dirpath, name)
            st = os.lstat(f)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = dir_mode if st.st_mode & stat.S_IXUSR else file_mode
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(f, want)


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) reports a full disk or quota."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL_ERRNOS:
            return True
        if any(t in str(cur) for t in _FULL_TEXTS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def disk_full(out: Path, exc: BaseException) -> DiskFullError:
    """The one-line error for a save into ``out`` that ran out of space."""
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{out}: no space left on the device while writing it ({free} in {out.parent}); "
                         "nothing was replaced: free space there or choose another output directory, then run "
                         "again")


# ------------------------------------------------------------------------------------------ atomic writes


class Existing(str, enum.Enum):
    """What :func:`atomic_dir` does with an output that is already there."""

    REPLACE = "replace"  # replace it if embedforge wrote it (checked up front), under the output's lock
    KEEP = "keep"  # a shared cache entry: another process that finished it first wins; no lock, no check


def write_npy_atomic(path: str | os.PathLike[str], array: object) -> None:
    """Write ``array`` to ``path`` as ``.npy`` through a hidden temporary file in the same folder (flushed to disk)
    and a rename, so a reader (a rerun, another process) never sees half a file."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], *, stage: str | None = None,
               existing: Existing = Existing.REPLACE) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out_dir`` when the block succeeds.

    Before the block: the output is locked (:func:`output_lock`), leftovers of killed saves
    beside it are cleaned, and it is checked (:func:`check_output`: only an output embedforge
    wrote, an empty directory or a missing path may be replaced; with ``stage="eval"`` only an earlier eval
    output). On an exception the temporary directory is removed and ``out_dir`` is left as it was; a full
    disk becomes :class:`DiskFullError`. On success the files get the umask's permissions, an
    existing ``out_dir`` is moved aside, the new one renamed into place, and the old one deleted.
    """
    out = Path(out_dir).expanduser().resolve()
    if existing == Existing.KEEP:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out, locked=False)
        with _writing(out, keep=True) as tmp:
            yield tmp
        return
    with output_lock(out):
        clean_leftovers(out)
        check_output(out, stage=stage)
        with _writing(out, keep=False) as tmp:
            yield tmp


@contextlib.contextmanager
def _writing(out: Path, *, keep: bool) -> Iterator[Path]:
    """The temporary directory, its cleanup on failure, and the final swap into ``out``."""
    tmp = make_temp_dir(out)
    try:
        yield tmp
        fix_modes(tmp)
        if keep and out.exists():
            logger.info("%s was completed by another process meanwhile; keeping that one", out)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=out.parent))
            old.rmdir()
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(out, exc) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
