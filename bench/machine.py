"""One line naming the machine a benchmark ran on (ratios depend on the CPU model)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str = "cpu") -> str:
    """e.g. ``"Intel(R) Xeon(R) Processor, 2 cores, x86_64"``, plus the GPU's name on CUDA."""
    text = f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text
