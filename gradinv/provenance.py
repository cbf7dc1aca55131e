"""Where a number came from: package versions, commit, device, threads, host."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from . import __version__


@functools.cache
def commit() -> str:
    """The project's git commit: $GRADINV_COMMIT (set by the runner for remote workers), else git."""
    if os.environ.get("GRADINV_COMMIT"):
        return os.environ["GRADINV_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@functools.cache
def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


@functools.cache
def _software() -> dict:
    import torchvision

    return {
        "gradinv": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "commit": commit(),
        "host": socket.gethostname(),
    }


def provenance(device: str | torch.device = "cpu") -> dict:
    """Versions, commit and host (looked up once per process), device and the current thread count."""
    return {**_software(), "device": device_name(str(device)), "threads": torch.get_num_threads()}
