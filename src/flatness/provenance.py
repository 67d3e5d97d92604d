"""What made a result: resolved config, code version, package versions and device."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD of the git work tree holding ``path`` (default: this package), with ``-dirty`` when
    tracked files differ; None outside git or without a git binary (never an error)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        run = dict(cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The provenance block of ``metrics.json`` (STYLE.md point 8)."""
    import torchvision

    return {
        "config": config,
        "seed": config.get("seed"),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": device_name(device),
    }
