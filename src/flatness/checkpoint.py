"""Resume checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds only tensors and plain Python containers (the model and optimizer state
dicts, every RNG state as a ``uint8`` tensor, the loader position, the history), so it loads
under ``torch.load(..., weights_only=True)``; a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or does not belong to this run."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file atomically: ``write(f)`` into a temporary file in the same folder, flush and
    fsync it, then ``os.replace`` it onto ``path``. A reader (or a job killed mid-write, or a power
    loss after the rename) never sees a half-written file. The one atomic-write helper of the
    package (weights, checkpoints, metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def checkpoint_path(resume_dir: str | os.PathLike) -> Path:
    return Path(resume_dir) / CHECKPOINT_NAME


def save_checkpoint(state: dict[str, Any], resume_dir: str | os.PathLike) -> Path:
    """Write ``state`` to ``<resume_dir>/checkpoint.pt`` via a temporary file and ``os.replace``,
    so a job killed mid-write leaves the previous checkpoint intact."""
    path = checkpoint_path(resume_dir)
    atomic_torch_save({"format_version": FORMAT_VERSION, **state}, path)
    return path


def load_checkpoint(resume_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint in ``resume_dir`` (tensors on the CPU), or None when there is none yet."""
    path = checkpoint_path(resume_dir)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing checkpoint {path}: it does not load with weights_only=True ({first}); "
            "delete it to restart the run from scratch"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a flatness checkpoint (format {FORMAT_VERSION})")
    return state


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every global RNG the training step may draw from (dropout masks), as tensors."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
