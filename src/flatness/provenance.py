"""What made a result: resolved config, code version, package versions and device."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
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


def torchvision_version() -> str | None:
    """torchvision's ``__version__`` (local build tag included, e.g. ``0.29.1+cu130``) without
    importing it: the import costs ≈ 1.2 s, in every training job, for one string."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"].__version__
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    try:  # the generated torchvision/version.py starts with __version__ = '...'
        text = Path(spec.origin).with_name("version.py").read_text()
        return re.search(r"""^__version__ = ['"]([^'"]+)['"]""", text, re.M).group(1)
    except (OSError, AttributeError):
        return importlib.metadata.version("torchvision")


def provenance(config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The provenance block of ``metrics.json`` (STYLE.md point 8)."""
    return {
        "config": config,
        "seed": config.get("seed"),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": device_name(device),
    }
