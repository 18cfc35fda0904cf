"""A run folder's safety rules: one run at a time, and a replaced run kept until its successor has finished.

- ``RunLock``: ``run`` holds ``OUT/.lock`` (a file naming the owner's pid,
  ``flock``-ed for the owner's lifetime) for the whole run; a second run into
  the same folder, with or without ``--force``, gets a one-line error. The file
  is removed on exit; after a crash (``kill -9``, power loss) the lock is free
  and the pid it names is dead, so the next run recognises it as stale and
  takes it over. A lock file naming a live process is respected even when no
  ``flock`` is held (another machine's run over a network file system).
- ``stash_run`` / ``settle``: ``--force`` moves the previous run's files into
  ``OUT/.previous-run/`` (the checkpoint first) instead of deleting them; the
  new run's ``results.json`` is what makes it replace the old one. Until then a
  failure, Ctrl-C or crash, even after the new run's first checkpoints, puts the
  previous run back (``settle`` does it on the next run in the folder after a
  crash); from then on the stash is dropped. The price: disk for two runs.
- ``remove_stale_temps`` (``earlyexit.io``) clears the temporary files of
  writes that a kill interrupted; ``run`` calls it under the lock.

Nothing here follows a symbolic link it did not create: the lock is opened with
``O_NOFOLLOW`` (and must be a regular file), and ``.previous-run`` or an entry
in it that is a link is refused (``UnsafeEntry``, one line naming it) before
anything is written, renamed or deleted. Only the run's own files (by exact
name) are moved in and out of ``.previous-run`` or deleted from it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Sequence

from .errors import EarlyExitError

LOCK = ".lock"
STASH = ".previous-run"
_COMPLETE = ".complete"  # in the stash: every file of the previous run was moved


class UnsafeEntry(EarlyExitError):
    """An entry of a run folder that the package would write, rename or delete through is a symbolic link (or not
    the kind of entry it writes there): refused, nothing is changed."""


def refuse_link(path: Path, what: str = "") -> None:
    """``UnsafeEntry`` when ``path`` is a symbolic link (the package never follows one it did not create)."""
    if path.is_symlink():
        raise UnsafeEntry(f"{path} is a symbolic link{what}; a run folder's own entries are never followed through "
                          "links: remove it (nothing was changed)")


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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _read_pid(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _pid_of(fd)
    finally:
        os.close(fd)


def _pid_of(fd: int) -> int | None:
    """The pid a lock file names (its first word), read through an open descriptor."""
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def lock_holder(out: str | os.PathLike) -> int | None:
    """The pid of the live run holding ``out``'s lock, or None (no lock file, or a stale one)."""
    path = Path(out) / LOCK
    if not os.path.lexists(path):
        return None
    refuse_link(path, " (the run folder's lock)")
    pid = _read_pid(path)
    if pid is not None and _pid_alive(pid):
        return pid
    try:
        import fcntl
    except ImportError:  # no flock: the pid decides
        return None
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
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
            refuse_link(self.path, " (the run folder's lock)")
            try:  # never through a link (O_NOFOLLOW), never blocking on a fifo planted there
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP or os.path.islink(self.path):  # a link planted after the check above
                    refuse_link(self.path, " (the run folder's lock)")
                raise EarlyExitError(describe_os_error(e, "cannot write the run folder's lock")) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UnsafeEntry(f"{self.path} is not a regular file; the run folder's lock is never written "
                                      "through another kind of entry: remove it (nothing was changed)")
                if not self._flock(fd):  # a live run holds it
                    raise _busy(self.out, _pid_of(fd) or -1)
                try:
                    same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous owner removed the file between our open and our lock: retry
                    os.close(fd)
                    continue
                pid = _pid_of(fd)
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
            if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:  # still our file, not an entry put there since
                self.path.unlink()
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


def check_entries(out: Path, names: Sequence[str]) -> None:
    """Before a run touches ``out``: none of its files (``names``), its lock or ``.previous-run`` is a symbolic
    link (``UnsafeEntry`` naming the first, nothing changed)."""
    for name in (LOCK, STASH, *names):
        refuse_link(out / name)


def _stash_of(out: Path) -> Path | None:
    """``out/.previous-run`` when it is a folder (None when there is none); ``UnsafeEntry`` when it is a link or a
    file, which the package never made."""
    stash = out / STASH
    if not os.path.lexists(stash):
        return None
    refuse_link(stash, " (where --force keeps the previous run)")
    if not stash.is_dir():
        raise UnsafeEntry(f"{stash} is not a folder; it is where --force keeps the previous run: move it away "
                          "(nothing was changed)")
    return stash


def _check_entries(stash: Path, names: Sequence[str]) -> list[str]:
    """The run files in the stash (``names`` and its marker); ``UnsafeEntry`` for a link or a foreign entry."""
    known = set(names) | {_COMPLETE}
    found = []
    for p in stash.iterdir():
        if p.name not in known:
            raise UnsafeEntry(f"{p} was not put there by the package; {stash} holds a previous run's files only: "
                              "move it out (nothing was changed)")
        if not _plain_entry(p):
            raise UnsafeEntry(f"{p} is a symbolic link or not a regular file; the package moves only the files it "
                              "wrote: remove it (nothing was changed)")
        found.append(p.name)
    return found


def _plain_entry(p: Path) -> bool:
    """A regular file, or a folder (a run's log folder, e.g. ``tensorboard``) of regular files; no link anywhere."""
    mode = os.lstat(p).st_mode
    if stat.S_ISREG(mode):
        return True
    return stat.S_ISDIR(mode) and all(stat.S_ISREG(os.lstat(c).st_mode) for c in p.iterdir())


def remove_entry(p: Path) -> None:
    """Remove a run's file, or its log folder and the files in it (never following a link; a missing one is fine)."""
    if os.path.lexists(p) and stat.S_ISDIR(os.lstat(p).st_mode):
        for c in p.iterdir():
            c.unlink()  # a link inside is removed, not followed
        p.rmdir()
    else:
        p.unlink(missing_ok=True)


def stash_run(out: Path, names: Sequence[str], first: str) -> list[str]:
    """Move the previous run's files (``first``, then the other ``names`` present) into ``out/.previous-run``.

    Returns:
        The names moved.
    """
    stash = out / STASH
    if _stash_of(out) is not None:  # settle() resolves a stash before any new run starts; never overwrite one
        raise EarlyExitError(f"{stash} holds a previous run that was being replaced; run again in {out} to settle it")
    stash.mkdir()
    moved = []
    for name in [first, *[n for n in names if n != first]]:
        if os.path.lexists(out / name):
            os.replace(out / name, stash / name)  # one rename each: the same file system; a link moves as a link
            moved.append(name)
    (stash / _COMPLETE).touch()  # every file moved: what is left in the folder from now on is the new run's
    return moved


def restore_run(out: Path, names: Sequence[str]) -> bool:
    """Put a stashed run back; False when there is none.

    When the stash was complete, the new run's files of ``names`` that the old run did not have are removed;
    after a stash cut short, the files still in the folder are the old run's and stay. ``UnsafeEntry`` (nothing
    changed) when the stash or an entry of it is a link, or it holds anything but the run's files.
    """
    stash = _stash_of(out)
    if stash is None:
        return False
    found = _check_entries(stash, names)
    complete = _COMPLETE in found
    kept = [n for n in found if n != _COMPLETE]
    if complete:
        for name in names:
            if name not in kept:
                remove_entry(out / name)  # the new run's own file (an unlink never follows a link)
    for name in kept:
        os.replace(stash / name, out / name)
    (stash / _COMPLETE).unlink(missing_ok=True)
    stash.rmdir()
    return True


def drop_stash(out: Path, names: Sequence[str] = ()) -> None:
    """Delete a stashed run (its successor has written its results): the run's files by name, then the folder.

    ``names``: the run's file names (default: whatever the stash holds, checked to be regular files).
    """
    stash = _stash_of(out)
    if stash is None:
        return
    found = _check_entries(stash, names) if names else _check_regular(stash)
    for name in found:
        remove_entry(stash / name)
    stash.rmdir()


def _check_regular(stash: Path) -> list[str]:
    found = []
    for p in stash.iterdir():
        if p.is_symlink() or not stat.S_ISREG(os.lstat(p).st_mode):
            raise UnsafeEntry(f"{p} is a symbolic link or not a regular file; the package deletes only the files it "
                              "wrote: remove it")
        found.append(p.name)
    return found


def settle(out: Path, names: Sequence[str], done: str) -> str | None:
    """After a crash: keep the new run if it wrote ``done`` (its results), else put the stashed run back.

    Returns:
        "restored", "dropped" or None (nothing was stashed).
    """
    if _stash_of(out) is None:
        return None
    if os.path.lexists(out / done):
        drop_stash(out, names)
        return "dropped"
    restore_run(out, names)
    return "restored"


__all__ = ["LOCK", "STASH", "UnsafeEntry", "refuse_link", "check_entries", "RunLock", "check_unlocked", "lock_holder", "stash_run", "restore_run", "drop_stash", "remove_entry",
           "settle", "describe_os_error"]
