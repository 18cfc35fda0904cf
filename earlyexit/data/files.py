"""Finding dataset files on disk (images and text alike), and downloading them when allowed.

Files are searched, in order, in ``data_dir``, ``$EARLYEXIT_DATA``, the system
dataset folders (``SYSTEM_ROOTS``; Debian's ``dataset-fashion-mnist`` installs
into ``/usr/share/datasets/fashion-mnist``) and a user cache folder; inside
each root both our layout (``ROOT/fashion-mnist``, ``ROOT/cifar-10-batches-py``)
and torchvision's (``ROOT/FashionMNIST/raw``) are recognised. torchvision only
downloads when nothing is found locally and ``download=True``. Text corpora
are also looked for inside installed packages (``_package_dir``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError

# System folders holding datasets installed by a package manager.
SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")
# Seconds a download may wait on a silent socket before it counts as failed.
DOWNLOAD_TIMEOUT_S = 20.0


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "earlyexit" / "data"


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for datasets, in order.

    Args:
        data_dir: a folder searched first (the CLI's ``--data-dir``).
    Returns:
        ``data_dir``, ``$EARLYEXIT_DATA``, ``SYSTEM_ROOTS`` and the user cache folder, without repeats.
    """
    roots = [data_dir, os.environ.get("EARLYEXIT_DATA") or None, *SYSTEM_ROOTS, _cache_root()]
    out: list[Path] = []
    for r in roots:
        if r is not None and Path(r).expanduser() not in out:
            out.append(Path(r).expanduser())
    return out


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir or os.environ.get("EARLYEXIT_DATA") or _cache_root()).expanduser()


def _candidates(roots: Sequence[Path], folders: Sequence[str]) -> list[Path]:
    """Folders a dataset may live in: ``root/<folder>`` for each root, and a root that is itself such a folder."""
    out: list[Path] = []
    for r in roots:
        for f in folders:
            for d in (r / f, r) if r.name == f else (r / f,):
                if d not in out:
                    out.append(d)
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _download(fn: Callable[[], Any]) -> str | None:
    """Run a torchvision download; return None on success or a one-line reason on failure.

    torchvision prints progress and retries mirrors: its output is captured, and a
    socket timeout keeps an unreachable network from hanging the call.
    """
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fn()
    except Exception as e:  # any failure (network, checksum, disk) becomes the reason in a DataError
        return _one_line(e)
    finally:
        socket.setdefaulttimeout(old)
    return None


def _not_found(name: str, looked: Sequence[Path], download: bool, reason: str | None, how: str) -> DataError:
    if reason:
        tried = f"download failed ({reason})"
    else:
        tried = "download gave no files" if download else "download disabled"
    return DataError(f"{name}: data not found; looked in {', '.join(str(p) for p in looked)}; {tried}; {how}")


def _locate(name: str, folders: Sequence[str], files: Sequence[str], *, data_dir: Any, download: bool,
            fetch: Callable[[Path], None], how: str, any_suffix: Sequence[str] = ("",)) -> Path:
    """Find the folder holding all ``files`` (each with any of ``any_suffix``), downloading if allowed."""

    def complete(d: Path) -> bool:
        return all(any((d / (f + s)).is_file() for s in any_suffix) for f in files)

    looked = _candidates(data_roots(data_dir), folders)
    for d in looked:
        if complete(d):
            return d
    reason = None
    if download:
        target = _download_root(data_dir)
        reason = _download(lambda: fetch(target))
        if reason is None:
            for d in _candidates([target], folders):
                if complete(d):
                    return d
    raise _not_found(name, looked, download, reason, how)


def _package_dir(package: str, *parts: str) -> Path | None:
    """A folder inside an installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def _find(name: str, folders: Sequence[str], ok: Any, *, data_dir: Any, extra: Sequence[Path | None] = (),
          how: str, roots_too: bool = True) -> Path:
    """First folder ``root/<folder>`` (or a root itself) for which ``ok(path)`` holds; DataError otherwise."""
    looked: list[Path] = []
    for r in data_roots(data_dir):
        for d in [r / f for f in folders] + ([r] if roots_too else []):
            if d not in looked:
                looked.append(d)
    looked += [p for p in extra if p is not None and p not in looked]
    for d in looked:
        if d.is_dir() and ok(d):
            return d
    raise DataError(f"{name}: data not found; looked in {', '.join(str(p) for p in looked)}; {how}")
