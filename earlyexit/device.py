"""Device and precision in one place.

``local_device`` picks this process's device (an explicit choice, else this
rank's GPU, else the CPU); ``autocast_context`` is bf16 autocast on CUDA and a
null context on the CPU, which runs in float32; ``cuda_sync`` makes wall-clock
timings complete on CUDA and costs nothing elsewhere. ``memory_format`` resolves
a run's memory layout (``"auto"``: channels-last for the models that train faster
in it, see ``MultiExitModel.prefers_channels_last``) and ``in_format`` puts an
input batch into it. ``platform`` names what a run's float results depend on
besides its code, config and seed (torch, the kernels, the processor).
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch
from torch import nn

from .config import MEMORY_FORMATS
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


def memory_format(model: nn.Module, name: str) -> torch.memory_format:
    """The memory layout a model trains in: ``name``, or for ``"auto"`` the model's preference.

    Channels-last (NHWC) changes the order of the convolutions' floating-point sums, not what they compute:
    runs in the two layouts agree to rounding, not bit for bit.
    """
    if name == "auto":
        name = "channels_last" if getattr(model, "prefers_channels_last", False) else "contiguous"
    if name not in MEMORY_FORMATS:
        raise ConfigError(f"unknown memory format {name!r}; valid: {', '.join(MEMORY_FORMATS)}")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def in_format(x: object, fmt: torch.memory_format) -> object:
    """``x`` in layout ``fmt`` when it is a 4-d image batch, else unchanged (token batches, vectors)."""
    if fmt is torch.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=fmt)
    return x


def cuda_sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so that wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def platform(device: torch.device | str = "cpu") -> str:
    """What a run's float results depend on besides its code, config and seed, e.g. "torch 2.14.1, AVX2,
    AuthenticAMD": torch's version, then on the CPU the instruction set its kernels dispatch to and the
    processor's vendor (BLAS and oneDNN pick their paths by both), on CUDA the CUDA version and the GPU's name.

    Two machines that print the same string rerun a config to the same digits; on two that differ,
    convolutions round differently and training drifts apart (a tenth of a point to a point of accuracy on
    the committed ResNet-20 runs).
    """
    version = torch.__version__.split("+")[0]
    device = torch.device(device)
    if device.type == "cuda":
        return f"torch {version}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}"
    vendor = "unknown vendor"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform as _platform

        vendor = _platform.processor() or vendor
    return f"torch {version}, {torch.backends.cpu.get_cpu_capability()}, {vendor}"


__all__ = ["local_device", "autocast_context", "model_device", "cuda_sync", "MEMORY_FORMATS", "memory_format", "in_format",
           "platform"]
