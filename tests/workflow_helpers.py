"""Run the real Snakemake workflow in a temporary working directory (for end-to-end tests).

Other test modules (kill/resume faults, the report browser check, SLURM) import these:

    from tests.workflow_helpers import REPO, TINY_CONFIG, run_snakemake, tiny_study

``tiny_study`` is a session-scoped fixture: the tiny study (tests/data/tiny.yaml) run once, report
built; it yields a :class:`Study` with the working directory and the last result. Import the
fixture into a test module (``from tests.workflow_helpers import tiny_study  # noqa: F401``) or
into conftest.py to use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TINY_CONFIG = REPO / "tests" / "data" / "tiny.yaml"
#: Columns DESIGN.md contract 2 promises in results/tables/runs.csv.
CONTRACT_COLUMNS = (
    "dataset",
    "model",
    "optimizer",
    "regularizer",
    "batch_size",
    "lr",
    "seed",
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "gap_loss",
    "gap_acc",
    "epochs",
    "status",
)


def workflow_env(threads: int = 1) -> dict[str, str]:
    """The environment for a Snakemake subprocess: low thread counts, the venv first on PATH."""
    env = dict(os.environ)
    env.update(
        FLATNESS_TEST_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONWARNINGS="ignore::DeprecationWarning",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def run_snakemake(
    workdir: str | os.PathLike,
    *args: str,
    configfile: str | os.PathLike | None = TINY_CONFIG,
    cores: int = 1,
    timeout: float = 900,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m snakemake -s <repo>/Snakefile --directory <workdir> --configfile <cfg> --cores N
    <args>``; returns the completed process (stdout and stderr merged into ``stdout``).

    ``check=True`` raises AssertionError with the tail of the output when Snakemake fails.
    """
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += ["--cores", str(cores), *args]
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=env or workflow_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
        )
    return proc


@dataclass
class Study:
    """A finished tiny study: its working directory and the run and report processes."""

    workdir: Path
    run: subprocess.CompletedProcess
    report: subprocess.CompletedProcess

    @property
    def runs_csv(self) -> Path:
        return self.workdir / "results" / "tables" / "runs.csv"

    @property
    def report_html(self) -> Path:
        return self.workdir / "report" / "report.html"


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Study:
    """The tiny study, run once per session through the real Snakemake, report built."""
    workdir = tmp_path_factory.mktemp("tiny_study")
    run = run_snakemake(workdir)
    report = run_snakemake(workdir, "--report", "report/report.html")
    return Study(workdir, run, report)
