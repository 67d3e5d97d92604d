"""One GPU per concurrently running job on a multi-GPU workstation.

``snakemake --cores N --resources gpu=K`` only caps how many GPU jobs run at once; it never sets
``CUDA_VISIBLE_DEVICES``, so every job would otherwise land on ``cuda:0``. :func:`claim_gpu` picks a
free device id for the calling process: it takes an exclusive, non-blocking ``fcntl.flock`` on a
per-id lock file in a lock directory shared by all jobs of the working directory
(``.snakemake/gpu_slots/``), keeps it until the process exits (or the returned slot is released),
and sets ``CUDA_VISIBLE_DEVICES`` to that id, so the job then sees one GPU as ``cuda:0``. The kernel
drops a flock when its process dies, so a killed job never leaks its slot. It must run before CUDA
is initialised in the process (before the first ``torch.cuda.is_available()`` or tensor on CUDA).

Nothing is done for a device that is not CUDA (``cpu``; ``auto`` without a visible GPU), for an
explicit index (``cuda:1``: the user chose), inside a SLURM job (SLURM sets
``CUDA_VISIBLE_DEVICES`` itself), on ROCm builds, or with ``FLATNESS_GPU_SLOTS=off``.

Environment:

- ``FLATNESS_GPU_SLOTS``: ``auto`` (default), ``off`` (never), ``on`` (also inside SLURM, e.g.
  a local ``snakemake --resources gpu=K`` run inside an ``salloc`` of K GPUs).
- ``FLATNESS_GPU_IDS``: comma-separated ids to share out, overriding the visible devices
  (``CUDA_VISIBLE_DEVICES`` if set, else ``0..n-1`` for the n GPUs NVML reports).
- ``FLATNESS_GPU_LOCK_DIR``: the lock directory (default ``.snakemake/gpu_slots`` of the cwd,
  which is Snakemake's working directory in a job).
- ``FLATNESS_GPU_JOBS_PER_DEVICE``: jobs allowed to share one GPU (default 1).
- ``FLATNESS_GPU_WAIT_S``: how long to wait for a free slot before failing (default 3600).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

_HELD: list[GpuSlot] = []  # slots held until process exit (the open fd is the lock)


class GpuSlotTimeout(TimeoutError):
    """Every GPU slot stayed taken for the whole wait."""


class GpuSlot:
    """A held slot: ``gpu_id`` is what ``CUDA_VISIBLE_DEVICES`` was set to."""

    def __init__(self, gpu_id: str, path: Path, fd: int):
        self.gpu_id, self.path, self._fd = gpu_id, path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last fd drops the flock
            self._fd = None
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> GpuSlot:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"GpuSlot(gpu_id={self.gpu_id!r}, path={str(self.path)!r})"


def _split_ids(value: str) -> list[str]:
    ids = [v.strip() for v in value.split(",") if v.strip()]
    # CUDA stops at the first invalid entry; "-1" (or empty) conventionally hides every GPU.
    out = []
    for v in ids:
        if v.startswith("-"):
            break
        out.append(v)
    return out


def _nvml_device_count() -> int:
    """GPUs the NVIDIA driver reports, via NVML (does not initialise CUDA); 0 without a driver."""
    from ctypes import CDLL, byref, c_uint

    try:
        nvml = CDLL("libnvidia-ml.so.1")  # shipped with the driver, next to libcuda
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        count = c_uint(0)
        return count.value if nvml.nvmlDeviceGetCount_v2(byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def visible_gpu_ids() -> list[str]:
    """The device ids jobs share: FLATNESS_GPU_IDS, else CUDA_VISIBLE_DEVICES, else NVML's count."""
    if "FLATNESS_GPU_IDS" in os.environ:
        return _split_ids(os.environ["FLATNESS_GPU_IDS"])
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return _split_ids(os.environ["CUDA_VISIBLE_DEVICES"])
    import torch

    if torch.version.hip or not torch.backends.cuda.is_built():
        return []
    return [str(i) for i in range(_nvml_device_count())]


def lock_dir() -> Path:
    return Path(os.environ.get("FLATNESS_GPU_LOCK_DIR") or Path.cwd() / ".snakemake" / "gpu_slots")


def _applies(device: str) -> bool:
    mode = os.environ.get("FLATNESS_GPU_SLOTS", "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"FLATNESS_GPU_SLOTS={mode!r}: expected auto, on or off")
    if mode == "off" or device not in ("auto", "cuda"):  # cpu, mps, an explicit cuda:N
        return False
    return mode == "on" or "SLURM_JOB_ID" not in os.environ


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking: who holds it
    return fd


def claim_gpu(device: str, *, timeout: float | None = None, poll: float = 0.5) -> GpuSlot | None:
    """Hold one free GPU slot for ``device`` ("auto", "cuda", "cpu", ...) and narrow
    ``CUDA_VISIBLE_DEVICES`` to it; None (and nothing changed) where slots do not apply.

    Waits, polling every ``poll`` s, while all slots are taken; raises :class:`GpuSlotTimeout`
    after ``timeout`` s (default ``FLATNESS_GPU_WAIT_S`` or 3600). The slot is held until the
    process exits, or until ``release()`` / the end of a ``with`` block.
    """
    if not _applies(device):
        return None
    ids = visible_gpu_ids()
    if not ids:
        return None  # auto → CPU; cuda → resolve_device reports the missing GPU
    torch = sys.modules.get("torch")  # not imported yet: CUDA cannot have started
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("claim_gpu must run before CUDA is initialised in this process")
    per_device = int(os.environ.get("FLATNESS_GPU_JOBS_PER_DEVICE", "1"))
    if timeout is None:
        timeout = float(os.environ.get("FLATNESS_GPU_WAIT_S", "3600"))
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # Fill every GPU once before doubling up; a file per (id, k), its name made path-safe.
    slots = [(g, k) for k in range(per_device) for g in ids]
    names = [f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', g)}.{k}.lock" for g, k in slots]
    start, warned = time.monotonic(), False
    while True:
        for (gpu_id, _), name in zip(slots, names, strict=True):
            fd = _try_lock(folder / name)
            if fd is not None:
                slot = GpuSlot(gpu_id, folder / name, fd)
                _HELD.append(slot)
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
                log.info("GPU slot: CUDA_VISIBLE_DEVICES=%s (lock %s)", gpu_id, slot.path)
                return slot
        waited = time.monotonic() - start
        if waited >= timeout:
            raise GpuSlotTimeout(
                f"no free GPU slot among ids {ids} after {waited:.0f} s; lock dir {folder} "
                f"(each lock file names its holder's pid). Is --resources gpu=K larger than the "
                f"{len(slots)} slot(s), or another run using the same lock dir?"
            )
        if not warned:
            log.warning(
                "all %d GPU slot(s) %s taken; waiting up to %.0f s for one (lock dir %s)",
                len(slots),
                ids,
                timeout,
                folder,
            )
            warned = True
        time.sleep(min(poll, max(timeout - waited, 0.0)))
