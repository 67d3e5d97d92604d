"""The workflow under faults, with real Snakemake runs on tiny studies (digits, a 16-unit MLP).

(a) SIGKILL of the whole Snakemake process group while a training job is past its first
    checkpoint; `--unlock` + `--rerun-incomplete` completes, runs finished before the kill are not
    retrained, the interrupted run resumes from its checkpoint, and every result equals that of an
    uninterrupted run of the same config.
(b) A malformed config (wrong type, unknown key, out-of-range value) fails before any job and the
    message names the key.
(c) A diverging grid point (lr 1e6) is a row with status "diverged"; the DAG and the report finish.
(d) A torchvision dataset missing offline fails the training job with a one-line error naming the
    data root.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.workflow_helpers import SNAKEFILE, run_snakemake, workflow_env

pytestmark = pytest.mark.slow

# Two runs (seeds 0 and 1) of a 64-16-10 MLP on sklearn's digits, one cheap measure, no
# interpolation: the smallest study that still goes train → measure → aggregate.
TINY = {
    "grid": {
        "dataset": ["digits"],
        "model": ["mlp"],
        "optimizer": ["sgd"],
        "regularizer": ["none"],
        "batch_size": [16],
        "lr": [0.05],
        "seed": [0, 1],
    },
    "datasets": {"digits": {"name": "digits"}},
    "models": {"mlp": {"name": "mlp", "widths": [16]}},
    "optimizers": {"sgd": {"name": "sgd", "momentum": 0.9}},
    "regularizers": {"none": {"name": "none"}},
    # 60 epochs of 90 steps: several seconds per run, so a kill lands between checkpoints.
    "training": {"epochs": 60, "device": "cpu"},
    "measure": {
        "n_samples": 128,
        "device": "cpu",
        "measures": [{"function": "hessian_max_eigenvalue"}],
        "layerwise": {"copies": 0},
        "dinh_alpha": [],
    },
    "interpolation": {"enabled": False},
}
RUNS_CSV = "results/tables/runs.csv"


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, **override) -> Path:
    path.write_text(yaml.safe_dump(merged(TINY, override), sort_keys=False))
    return path


def snakemake_cmd(workdir: Path, configfile: Path, *args: str) -> list[str]:
    """The command run_snakemake runs (needed here to start it in its own process group)."""
    return [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE),
        "--directory", str(workdir), "--configfile", str(configfile), "--cores", "1", *args,
    ]  # fmt: skip


def run(workdir: Path, configfile: Path, *args: str, timeout: float = 600):
    workdir.mkdir(parents=True, exist_ok=True)
    r = run_snakemake(workdir, *args, configfile=configfile, timeout=timeout, check=False)
    r.log = r.stdout
    return r


def run_dirs(workdir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((workdir / "results" / "runs").glob("*")) if p.is_dir()}


def comparable_metrics(path: Path) -> dict:
    """metrics.json without what legitimately differs between two identical runs: wall-clock
    times and the git commit (other work lands in the repository between runs)."""
    m = json.loads(path.read_text())
    m.pop("wall_time_s")
    for row in m["history"]:
        row.pop("time_s")
    m["provenance"].pop("git_commit", None)
    return m


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert tensors, f"no tensors found in {path}: keys {list(obj)}"
    return tensors


def comparable_runs(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path).sort_values("run_id").reset_index(drop=True)
    timing = [c for c in df.columns if "time" in c or c.endswith("_s") or "seconds" in c]
    return df.drop(columns=timing)


def group_gone(pgid: int) -> bool:
    """True when no live process is left in the group (zombies awaiting a reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            return False
    return True


# --------------------------------------------------------------------------------------------
# (a) kill -9 mid-training, then --rerun-incomplete


def test_sigkill_mid_training_then_rerun_incomplete_matches_uninterrupted(tmp_path):
    config = write_config(tmp_path / "tiny.yaml")

    # The uninterrupted reference, in its own working directory.
    ref = tmp_path / "reference"
    r = run(ref, config, RUNS_CSV)
    assert r.returncode == 0, r.log[-5000:]

    # The same study, killed (SIGKILL to Snakemake and every job process in its group) as soon as
    # one run has finished and the next has written its first checkpoint.
    work = tmp_path / "work"
    ckpt_root = work / "results" / "ckpt"
    console = (tmp_path / "killed.log").open("w")
    work.mkdir()
    proc = subprocess.Popen(
        snakemake_cmd(work, config, RUNS_CSV), cwd=work, env=workflow_env(),
        stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    finished = interrupted = None
    try:
        while proc.poll() is None:
            # Checkpoints first, then metrics (written after the last checkpoint): a run that
            # finishes between the two looks done, never ongoing.
            ckpts = {p.parent.name for p in ckpt_root.glob("*/checkpoint.pt")}
            runs = run_dirs(work) if (work / "results" / "runs").exists() else {}
            done = [n for n, p in runs.items() if (p / "metrics.json").exists()]
            ongoing = sorted(ckpts - set(done))
            if done and ongoing:
                os.killpg(proc.pid, signal.SIGKILL)
                finished, interrupted = done, ongoing[0]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and finished is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        console.close()
    assert finished, (
        "the study ended before a training job could be killed past its first checkpoint "
        f"(exit {proc.returncode}):\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    )
    for _ in range(200):  # the job processes die with the group; wait until they are gone
        if group_gone(proc.pid):
            break
        time.sleep(0.05)
    assert group_gone(proc.pid), "a job process outlived the SIGKILL of its process group"

    runs = run_dirs(work)
    assert not (runs[interrupted] / "metrics.json").exists(), "the kill came too late"
    saved_ckpt = torch.load(ckpt_root / interrupted / "checkpoint.pt", weights_only=True)
    ckpt_epoch = saved_ckpt["progress"]["epoch"]
    assert 1 <= ckpt_epoch < TINY["training"]["epochs"]
    before = {
        name: {f: ((runs[name] / f).stat().st_mtime_ns, (runs[name] / f).read_bytes())
               for f in ("model.pt", "metrics.json")}
        for name in finished
    }  # fmt: skip

    # A SIGKILLed Snakemake leaves its lock behind: a plain rerun fails on it ...
    r = run(work, config, "--rerun-incomplete", RUNS_CSV)
    assert r.returncode != 0 and "LockException" in r.log, r.log[-3000:]
    # ... `make run`'s first step removes it (no Snakemake is alive here), then the rerun works.
    unlock = subprocess.run(
        [sys.executable, "-m", "flatness", "unlock-stale", "--directory", str(work)],
        capture_output=True, text=True, env=workflow_env(),
    )  # fmt: skip
    assert unlock.returncode == 0 and "removed a stale lock" in unlock.stderr, unlock.stderr
    r = run(work, config, "--rerun-incomplete", RUNS_CSV)
    (tmp_path / "rerun.log").write_text(r.log)
    assert r.returncode == 0, r.log[-5000:]

    # Finished runs were not retrained: same bytes, same mtimes.
    for name, files in before.items():
        for f, (mtime, content) in files.items():
            path = work / "results" / "runs" / name / f
            assert path.stat().st_mtime_ns == mtime, f"{name}/{f} was rewritten"
            assert path.read_bytes() == content, f"{name}/{f} changed"

    # The interrupted run resumed from its checkpoint instead of starting over.
    train_log = (work / "results" / "logs" / "train" / f"{interrupted}.log").read_text()
    assert f"resumed from results/ckpt/{interrupted} at epoch {ckpt_epoch}," in train_log, train_log
    assert "epoch 1/" not in train_log, "the resumed job retrained epoch 1"
    for name in finished:
        # Their training jobs were not even scheduled (Snakemake prints each job's log path).
        assert f"results/logs/train/{name}.log" not in r.log, f"{name} was scheduled again"
    assert f"results/logs/train/{interrupted}.log" in r.log

    # Final results equal those of the uninterrupted run: metrics, weights, runs.csv.
    ref_runs = run_dirs(ref)
    assert sorted(ref_runs) == sorted(run_dirs(work))
    for name, path in run_dirs(work).items():
        assert comparable_metrics(path / "metrics.json") == comparable_metrics(
            ref_runs[name] / "metrics.json"
        ), name
        got, want = load_weights(path / "model.pt"), load_weights(ref_runs[name] / "model.pt")
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k]), f"{name}: {k} differs from the uninterrupted run"
    pd.testing.assert_frame_equal(comparable_runs(work / RUNS_CSV), comparable_runs(ref / RUNS_CSV))
    assert (pd.read_csv(work / RUNS_CSV)["status"] == "ok").all()


# --------------------------------------------------------------------------------------------
# (b) malformed configs fail before any job


@pytest.mark.parametrize(
    ("override", "names"),
    [
        pytest.param({"training": {"epochs": "ten"}}, ["training", "epochs"], id="wrong-type"),
        pytest.param({"training": {"epochz": 3}}, ["training", "epochz"], id="unknown-key"),
        pytest.param({"measure": {"n_samples": 0}}, ["measure", "n_samples"], id="out-of-range"),
    ],
)
def test_malformed_config_fails_before_any_job(tmp_path, override, names):
    config = write_config(tmp_path / "bad.yaml", **override)
    work = tmp_path / "work"
    r = run(work, config, timeout=300)
    assert r.returncode != 0, r.log[-3000:]
    for name in names:
        assert name in r.log, f"{name!r} not named in:\n{r.log[-3000:]}"
    assert "validat" in r.log.lower(), r.log[-3000:]
    # Nothing was scheduled, let alone run.
    assert "Select jobs to execute" not in r.log and "rule train" not in r.log, r.log[-3000:]
    assert not (work / "results").exists()


# --------------------------------------------------------------------------------------------
# (c) a diverging run is data, not a failure


def test_diverged_run_is_reported_and_the_dag_finishes(tmp_path):
    config = write_config(
        tmp_path / "diverge.yaml",
        grid={"lr": [0.05, 1e6], "seed": [0]},
        training={"epochs": 5},
    )
    work = tmp_path / "work"
    report = work / "report" / "report.html"
    r = run(work, config, "--report", str(report), "--report-after-run")
    assert r.returncode == 0, r.log[-5000:]
    runs = pd.read_csv(work / RUNS_CSV)
    assert len(runs) == 2
    status = dict(zip(runs["lr"], runs["status"], strict=True))
    assert status == {0.05: "ok", 1e6: "diverged"}, runs
    diverged = runs[runs["status"] == "diverged"].iloc[0]
    assert pd.isna(diverged["train_loss"]) and pd.isna(diverged["hessian_max_eigenvalue"])
    ok = runs[runs["status"] == "ok"].iloc[0]
    assert ok["train_loss"] < 1.0 and ok["hessian_max_eigenvalue"] > 0
    # The figures were drawn from a table with a diverged row, and the report embeds them.
    for fig in ("measures_by_batch", "measure_vs_gap", "training_curves"):
        assert (work / "results" / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    assert report.stat().st_size > 100_000


# --------------------------------------------------------------------------------------------
# (d) a torchvision dataset that is not there, offline


def test_missing_offline_dataset_gives_one_line_error_naming_the_root(tmp_path):
    config = write_config(
        tmp_path / "cifar.yaml",
        grid={"dataset": ["c10"], "seed": [0]},
        datasets={"c10": {"name": "cifar10", "root": "no_such_data", "download": False}},
    )
    work = tmp_path / "work"
    r = run(work, config, "train_all", timeout=300)
    assert r.returncode != 0, r.log[-3000:]
    logs = list((work / "results" / "logs" / "train").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    lines = [ln for ln in text.splitlines() if "no_such_data" in ln]
    assert lines, text
    # One line says what is missing, where, and how to get it.
    line = lines[-1]
    assert "cifar10" in line and "not found" in line and "download" in line, line
    assert not list((work / "results" / "runs").glob("*/model.pt"))
