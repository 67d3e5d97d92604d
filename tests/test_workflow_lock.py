"""A stale Snakemake lock is removed; a live Snakemake's lock is kept (real processes, /proc)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flatness.workflow_lock import LockHeld, live_snakemake_pids, lock_files, recover

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def make_lock(workdir):
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("results/x\n")


def fake_snakemake(cwd, *extra):
    """A process started as the `snakemake` console script is (`python .../bin/snakemake ...`)."""
    script = cwd / "bin" / "snakemake"
    script.parent.mkdir(exist_ok=True)
    script.write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), *extra], cwd=cwd)
    time.sleep(0.3)
    return proc


def test_no_lock_nothing_to_do(tmp_path):
    assert recover(tmp_path) == "no lock"


def test_stale_lock_is_removed(tmp_path):
    make_lock(tmp_path)
    assert live_snakemake_pids(tmp_path) == []
    assert "removed a stale lock" in recover(tmp_path)
    assert lock_files(tmp_path) == []


def test_live_snakemake_keeps_its_lock(tmp_path):
    make_lock(tmp_path)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    procs = [fake_snakemake(tmp_path), fake_snakemake(elsewhere, "--directory", str(tmp_path))]
    try:
        assert sorted(live_snakemake_pids(tmp_path)) == sorted(p.pid for p in procs)
        with pytest.raises(LockHeld, match=str(procs[0].pid)):
            recover(tmp_path)
        assert lock_files(tmp_path), "a live run's lock was removed"
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "removed a stale lock" in recover(tmp_path)


def test_a_snakemake_in_another_directory_does_not_count(tmp_path):
    make_lock(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    proc = fake_snakemake(other)
    try:
        assert live_snakemake_pids(tmp_path) == []
    finally:
        proc.kill()
        proc.wait()


def test_cli_exit_codes(tmp_path):
    make_lock(tmp_path)
    proc = fake_snakemake(tmp_path)
    try:
        held = subprocess.run(
            [sys.executable, "-m", "flatness", "unlock-stale", "--directory", str(tmp_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert held.returncode == 1 and "Snakemake is running on" in held.stderr
    finally:
        proc.kill()
        proc.wait()
