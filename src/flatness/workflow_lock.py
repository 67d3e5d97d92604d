"""After a crash, a Snakemake working directory keeps its lock: tell a stale lock from a live run.

A SIGKILLed Snakemake (power loss, the OOM killer, a closed terminal) leaves
``.snakemake/locks/`` behind, and the next run fails with ``LockException`` until someone runs
``snakemake --unlock``. :func:`recover` does that only when no Snakemake process is alive on the
directory, found by scanning ``/proc`` for a process whose arguments name snakemake and whose
working directory (or ``--directory``/``-d`` argument) is this one. Where ``/proc`` does not exist
it cannot tell, and leaves the lock alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class LockHeld(RuntimeError):
    """A Snakemake process is alive on the directory: its lock is not stale."""


def lock_files(workdir: str | os.PathLike) -> list[Path]:
    folder = Path(workdir) / ".snakemake" / "locks"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _is_snakemake(argv: list[str]) -> bool:
    # `snakemake ...`, `python -m snakemake ...`, a job's `python -m snakemake --executor ...`
    return any(Path(a).name == "snakemake" or a == "snakemake" for a in argv[:3])


def _directory_of(argv: list[str], cwd: Path) -> Path:
    for i, a in enumerate(argv):
        if a in ("--directory", "-d") and i + 1 < len(argv):
            return (cwd / argv[i + 1]).resolve()
        if a.startswith("--directory="):
            return (cwd / a.split("=", 1)[1]).resolve()
    return cwd


def live_snakemake_pids(workdir: str | os.PathLike) -> list[int] | None:
    """Pids of Snakemake processes working on ``workdir``; None when /proc cannot be read."""
    proc = Path("/proc")
    if not (proc / "self" / "cmdline").exists():
        return None
    target, me, pids = Path(workdir).resolve(), os.getpid(), []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if _is_snakemake(argv) and _directory_of(argv, cwd) == target:
            pids.append(int(entry.name))
    return sorted(pids)


def recover(workdir: str | os.PathLike = ".") -> str:
    """Unlock ``workdir`` when it holds a stale lock; say what was done.

    Raises :class:`LockHeld` when a Snakemake process is alive there (its lock is real).
    """
    workdir = Path(workdir)
    if not lock_files(workdir):
        return "no lock"
    pids = live_snakemake_pids(workdir)
    if pids is None:
        return "locked; cannot tell whether a Snakemake is running here (no /proc): lock kept"
    if pids:
        raise LockHeld(
            f"Snakemake is running on {workdir.resolve()} (pid {', '.join(map(str, pids))}); "
            "wait for it or stop it, then run again"
        )
    # What `snakemake --unlock` does (snakemake.persistence.file: rmtree of .snakemake/locks),
    # without parsing the workflow, which needs the study's config to be found from here.
    shutil.rmtree(workdir / ".snakemake" / "locks")
    return "removed a stale lock (no Snakemake process was running here)"
