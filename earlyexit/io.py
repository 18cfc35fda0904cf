"""Atomic file writes and loads that never run code from a file.

Every file of a run is written to a temporary file in the same folder and
renamed over the target, so a killed run leaves either the old file or the
new one, never half of one (``remove_stale_temps`` clears what a killed write
left behind). Checkpoints are read with ``torch.load(weights_only=True)``:
tensors and plain containers only, never arbitrary pickles. Other pickles
(CIFAR's python batches) go through ``load_plain_pickle``, which admits only
plain containers, numbers, strings, bytes and numpy arrays.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

TEMP_SUFFIX = ".tmp"
# atomic writes go to ".NAME.<pid>.<random>.tmp" beside NAME (mkstemp's 8 random characters); only files of
# exactly this form are ever removed as temporary files (remove_stale_temps)
TEMP_PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]{1,10})\.[a-z0-9_]{8}\.tmp")


def temp_name_of(name: str) -> str | None:
    """NAME of a temporary file name ``.NAME.<pid>.<random>.tmp`` that ``atomic_write_bytes`` makes, else None."""
    m = TEMP_PATTERN.fullmatch(name)
    return m.group("name") if m else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a new temporary file beside it and one rename.

    The temporary file is created exclusively (``mkstemp``: ``O_EXCL``, never through an existing entry);
    the rename replaces whatever entry ``path`` is (a symbolic link is replaced, never followed).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    except OSError as e:  # named by the file meant, not by the temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def figure_bytes(fig: Any, fmt: str = "png", *, dpi: int = 130, **savefig_kw: Any) -> bytes:
    """A matplotlib figure encoded as ``fmt``. A PNG is stored with a 256-colour palette, undithered (plots
    hold few colours; the file is about a third the size of the RGBA one, so committed figures stay small)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, **savefig_kw)
    if fmt.lower() != "png":
        return buf.getvalue()
    return png_palette(buf.getvalue())


def png_palette(data: bytes) -> bytes:
    """Re-encode PNG bytes with a 256-colour palette (no dithering) on an opaque background."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    out = io.BytesIO()
    flat.quantize(256, dither=Image.Dither.NONE).save(out, format="png", optimize=True)
    return out.getvalue()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors (``mmap``: tensors stay on disk until read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # corrupt file, truncated zip, foreign pickle
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in msg.lower():
            msg = "it holds objects other than tensors, and only weights are loaded"
        raise CheckpointError(f"cannot read checkpoint {path}: {msg[:200]}") from None


WEIGHTS_FILES = ("model.safetensors", "model.pt")  # a run folder's final weights (model.pt: runs of earlier versions)


def find_weights(run_dir: Path) -> Path:
    """The weights file of a run folder (``WEIGHTS_FILES``, the first that exists)."""
    for name in WEIGHTS_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir} holds no model weights ({' or '.join(WEIGHTS_FILES)})")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save``d dict (optionally under a ``"model"`` key)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights not found: {path}")
        from safetensors.torch import load_file  # a main dependency

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read weights {path}: {str(e).splitlines()[0][:200]}") from None
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return obj


def load_state_strict(model: torch.nn.Module, sd: dict, *, source: str = "checkpoint", strict: bool = True) -> None:
    """``model.load_state_dict`` with shape checks and a one-line error on mismatch."""
    ours = model.state_dict()
    for k, v in sd.items():
        if k in ours and ours[k].shape != v.shape:
            raise CheckpointError(f"{source} does not fit the model: {k} has shape {tuple(v.shape)}, model expects {tuple(ours[k].shape)}")
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{source} does not fit the model: {what}")
    model.load_state_dict(sd, strict=False)


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line (at most ``limit`` characters)."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (a model's or tokenizer's config); one-line ``CheckpointError`` otherwise."""
    from .schema import FileSchemaError, read_json

    path = Path(path)
    try:
        d = read_json(path)  # the one JSON reader: never a RecursionError
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    except FileSchemaError as e:
        raise CheckpointError(one_line(e, 300)) from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d


def remove_stale_temps(folder: str | os.PathLike, names: "tuple[str, ...] | None" = None) -> list[Path]:
    """Remove the temporary files that killed atomic writes left in ``folder`` (of ``names`` only, if given).

    Only regular files named exactly as ``atomic_write_bytes`` names them (``.NAME.<pid>.<random>.tmp``,
    ``TEMP_PATTERN``) are touched; any other entry, a user's own ``.notes.tmp`` or a symbolic link of any
    name, stays. Call it while no other process writes there (a run holds the folder's lock).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        target = temp_name_of(p.name)
        if target is None or (names is not None and target not in names):
            continue
        try:
            if not stat.S_ISREG(os.lstat(p).st_mode):  # a link, a folder, a fifo: not a file we wrote
                continue
        except FileNotFoundError:
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables an array's pickle names (numpy 1 and 2 spell the module differently)."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return out


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: any other global (a function, a class) is refused.

    Containers, numbers, strings and bytes need no global at all; numpy arrays, dtypes and scalars need
    the few reconstruction functions of ``_numpy_globals``; ``_codecs.encode`` turns the latin-1 strings
    of protocol-2 pickles back into bytes (latin-1 only: ``_latin1_encode``).
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        import builtins
        import collections

        if _PlainUnpickler._ALLOWED is None:
            _PlainUnpickler._ALLOWED = {("_codecs", "encode"): _latin1_encode,
                                        ("collections", "OrderedDict"): collections.OrderedDict,
                                        **{("builtins", n): getattr(builtins, n)
                                           for n in ("set", "frozenset", "bytearray", "complex")},
                                        **_numpy_globals()}
        import _compat_pickle  # Python 2 names (``__builtin__.set``), mapped as the default find_class maps them

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = _PlainUnpickler._ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain data and numpy arrays are read")
        return obj


def load_plain_pickle(f: Any, *, encoding: str = "latin1") -> Any:
    """Unpickle plain data (containers, numbers, strings, bytes, numpy arrays) from the binary file ``f``.

    Nothing in the file is executed: a pickle that names any other function or class raises
    ``pickle.UnpicklingError`` before it is called. ``encoding`` decodes Python 2 strings (CIFAR's batches).
    """
    try:
        return _PlainUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError:
        raise
    except (LookupError, RecursionError, UnicodeError, ArithmeticError) as e:  # a crafted stream: one error type
        raise pickle.UnpicklingError(f"it is not plain data ({type(e).__name__}: {one_line(e, 120)})") from None


_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso8859_1", "l1"}


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes call it (a string, ``"latin1"``); nothing else: a codec
    or an error handler a file names is never looked up."""
    import _codecs

    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1 \
            or errors != "strict":
        raise pickle.UnpicklingError(f"it calls _codecs.encode with {_short(encoding)}, and only the latin-1 "
                                     "encoding of bytes is read")
    return _codecs.encode(obj, "latin-1")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
