"""Device and precision in one place.

``local_device`` picks this process's device (an explicit choice, else this
rank's GPU, else the CPU); ``autocast_context`` is bf16 autocast on CUDA and a
null context on the CPU, which runs in float32; ``cuda_sync`` makes wall-clock
timings complete on CUDA and costs nothing elsewhere.
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
from torch import nn

from .errors import ConfigError


def local_device(device: str | torch.device | None) -> torch.device:
    """The device of this process: ``device`` if given, else this rank's GPU, else CPU.

    Raises:
        ConfigError: an unknown device, or a CUDA device this machine does not have.
    """
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs)")
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"device {device!r} is not supported; valid: cpu, cuda, cuda:N")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_context(device: torch.device | str) -> ContextManager:
    """bf16 autocast on CUDA, a null context elsewhere (CPU runs in float32).

    Args:
        device: the device the model runs on.
    Returns:
        A context manager.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cuda_sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so that wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["local_device", "autocast_context", "model_device", "cuda_sync"]
