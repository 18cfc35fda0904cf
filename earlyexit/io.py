"""Atomic file writes and safe checkpoint loading.

Every file of a run is written to a temporary file in the same folder and
renamed over the target, so a killed run leaves either the old file or the
new one, never half of one. Checkpoints are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickles.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, truncated zip, foreign pickle
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in msg.lower():
            msg = "it holds objects other than tensors, and only weights are loaded"
        raise CheckpointError(f"cannot read checkpoint {path}: {msg[:200]}") from None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save``d dict (optionally under a ``"model"`` key)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights not found: {path}")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError("reading .safetensors needs the safetensors package (pip install safetensors)") from None
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
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d
