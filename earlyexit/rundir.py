"""A run folder's safety rules: one run at a time, and a replaced run kept until its successor has started.

- ``RunLock``: ``run`` holds ``OUT/.lock`` (a file naming the owner's pid,
  ``flock``-ed for the owner's lifetime) for the whole run; a second run into
  the same folder, with or without ``--force``, gets a one-line error. The file
  is removed on exit; after a crash (``kill -9``, power loss) the lock is free
  and the pid it names is dead, so the next run recognises it as stale and
  takes it over. A lock file naming a live process is respected even when no
  ``flock`` is held (another machine's run over a network file system).
- ``stash_run`` / ``settle``: ``--force`` moves the previous run's files into
  ``OUT/.previous-run/`` (the checkpoint first) instead of deleting them; the
  new run's first checkpoint is what makes it "started for real". Until then a
  failure, Ctrl-C or crash puts the previous run back (``settle`` does it on the
  next run in the folder after a crash); from then on the stash is dropped.
- ``remove_stale_temps`` (``earlyexit.io``) clears the temporary files of
  writes that a kill interrupted; ``run`` calls it under the lock.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Sequence

from .errors import EarlyExitError

LOCK = ".lock"
STASH = ".previous-run"
_COMPLETE = ".complete"  # in the stash: every file of the previous run was moved


def describe_os_error(e: OSError, what: str = "") -> str:
    """``OSError`` as one line naming the path and the cause, e.g. ``cannot write runs/x: Read-only file system``."""
    path = e.filename if e.filename is not None else ""
    cause = e.strerror or " ".join(str(e).split()) or type(e).__name__
    if e.errno == errno.ENOSPC:
        cause = "no space left on the device"
    elif e.errno == errno.EEXIST and path and not os.path.isdir(path):
        cause = "it exists and is not a folder"
    head = f"{what} " if what else ""
    return f"{head}{path}: {cause}" if path else f"{head.strip() or 'file system error'}: {cause}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def lock_holder(out: str | os.PathLike) -> int | None:
    """The pid of the live run holding ``out``'s lock, or None (no lock file, or a stale one)."""
    path = Path(out) / LOCK
    if not path.exists():
        return None
    pid = _read_pid(path)
    if pid is not None and _pid_alive(pid):
        return pid
    try:
        import fcntl
    except ImportError:  # no flock: the pid decides
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return pid if pid is not None else -1  # held by a live process that has not written its pid yet
    finally:
        os.close(fd)
    return None


def _busy(out: Path, pid: int) -> EarlyExitError:
    who = f"pid {pid}" if pid > 0 else "another process"
    return EarlyExitError(f"{out} is in use by another run ({who}); wait for it to end, or remove {out / LOCK} "
                          "if no run is using the folder")


def check_unlocked(out: str | os.PathLike) -> None:
    """Fail fast (before loading any data) when a live run holds ``out``."""
    pid = lock_holder(out)
    if pid is not None:
        raise _busy(Path(out), pid)


class RunLock:
    """``OUT/.lock`` held for a run's lifetime (see the module docstring); a context manager."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None
        self.created_out = False

    def acquire(self) -> "RunLock":
        try:
            self.created_out = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EarlyExitError(describe_os_error(e, "cannot create the run folder")) from None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise EarlyExitError(describe_os_error(e, "cannot write the run folder's lock")) from None
            try:
                if not self._flock(fd):  # a live run holds it
                    raise _busy(self.out, _read_pid(self.path) or -1)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous owner removed the file between our open and our lock: retry
                    os.close(fd)
                    continue
                pid = _read_pid(self.path)
                if pid is not None and _pid_alive(pid):  # a live process named without a flock: respect it
                    raise _busy(self.out, pid)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise _busy(self.out, -1)

    @staticmethod
    def _flock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def release(self, *, remove_empty_out: bool = False) -> None:
        """Remove the lock file and unlock; ``remove_empty_out``: also remove the folder if acquire created
        it and nothing was written there (a run that failed before it wrote anything)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if remove_empty_out and self.created_out:
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def stash_run(out: Path, names: Sequence[str], first: str) -> list[str]:
    """Move the previous run's files (``first``, then the other ``names`` present) into ``out/.previous-run``.

    Returns:
        The names moved.
    """
    stash = out / STASH
    if stash.exists():  # settle() resolves a stash before any new run starts; never overwrite one
        raise EarlyExitError(f"{stash} holds a previous run that was being replaced; run again in {out} to settle it")
    stash.mkdir()
    moved = []
    for name in [first, *[n for n in names if n != first]]:
        if (out / name).exists():
            os.replace(out / name, stash / name)  # one rename each: the same file system
            moved.append(name)
    (stash / _COMPLETE).touch()  # every file moved: what is left in the folder from now on is the new run's
    return moved


def restore_run(out: Path, names: Sequence[str]) -> bool:
    """Put a stashed run back; False when there is none.

    When the stash was complete, the new run's files of ``names`` that the old run did not have are removed;
    after a stash cut short, the files still in the folder are the old run's and stay.
    """
    stash = out / STASH
    if not stash.is_dir():
        return False
    complete = (stash / _COMPLETE).exists()
    kept = {p.name for p in stash.iterdir()} - {_COMPLETE}
    if complete:
        for name in names:
            if name not in kept:
                (out / name).unlink(missing_ok=True)
    for name in kept:
        os.replace(stash / name, out / name)
    (stash / _COMPLETE).unlink(missing_ok=True)
    stash.rmdir()
    return True


def drop_stash(out: Path) -> None:
    """Delete a stashed run (its successor has started)."""
    if (out / STASH).exists():
        shutil.rmtree(out / STASH)


def settle(out: Path, names: Sequence[str], started: str) -> str | None:
    """After a crash: keep the new run if it wrote ``started`` (its checkpoint), else put the stashed run back.

    Returns:
        "restored", "dropped" or None (nothing was stashed).
    """
    if not (out / STASH).is_dir():
        return None
    if (out / started).exists():
        drop_stash(out)
        return "dropped"
    restore_run(out, names)
    return "restored"


__all__ = ["LOCK", "STASH", "RunLock", "check_unlocked", "lock_holder", "stash_run", "restore_run", "drop_stash",
           "settle", "describe_os_error"]
