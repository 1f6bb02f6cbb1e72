"""Which torch device a model may go to, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

from ase_bptt.errors import AseBpttError

__all__ = ["DTYPES", "DeviceError", "check_device"]

#: The floating dtypes a model may run in, by the names the CLI, checkpoints and JSON specs use.
DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}


class DeviceError(AseBpttError, ValueError):
    """A device name torch does not know, or a device this machine does not have (CUDA without a GPU, ...)."""


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or one :class:`DeviceError` line instead of torch's failure on first use.

    torch accepts ``"cuda"`` on a machine without CUDA and fails only when a
    tensor moves there (a bare ``AssertionError: Torch not compiled with CUDA enabled``).
    """
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if checked.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(device)!r} was requested but torch sees no CUDA GPU; use cpu (--device cpu)"
            )
        if checked.index is not None and checked.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {str(device)!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
            )
    if checked.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} was requested but torch sees no Apple MPS device; use cpu")
    return checked
