"""The cluster profile: resolved resources (dry run, no SLURM needed) and a real one-node SLURM run.

(a) `snakemake --profile profiles/slurm -n` resolves every job's resources without any SLURM
    binary on PATH; the test asserts what each rule would ask sbatch for.
(b) @slurm: .ci/slurm_up.sh starts a one-node cluster (partitions debug and gpu, Gres=gpu:fake:2);
    the tiny study runs through `--executor slurm`, and the test checks that every job went through
    sbatch (one SLURM job id and log per job, all COMPLETED in squeue, train jobs on the gpu
    partition with a fake GPU), and that the study's outputs exist with status ok.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.workflow_helpers import REPO, run_snakemake, workflow_env

ARTIFACTS = REPO / "tests" / "artifacts"
PROFILE = REPO / "profiles" / "slurm"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun")


def require(ok: bool, reason: str) -> None:
    """In CI a missing prerequisite is a failure (a skip would pass silently), elsewhere a skip."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: run `make system-deps` as root)")
    pytest.skip(reason)


def parse_dry_run(text: str) -> dict[str, list[dict[str, str]]]:
    """rule name → one dict of resolved resources per job, from `snakemake -n` output."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s+resources: (.*)$", line)
        if m and rule is not None:
            res = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
            jobs.setdefault(rule, []).append(res)
            rule = None
    return jobs


SLURM_CLIENT = {
    "sacct", "sacctmgr", "salloc", "sattach", "sbatch", "sbcast", "scancel", "scontrol",
    "scrontab", "sdiag", "sinfo", "sprio", "squeue", "sreport", "srun", "sshare", "sstat",
    "strigger", "sview", "munge", "unmunge", "remunge",
}  # fmt: skip


def no_slurm_bin(tmp_path: Path) -> Path:
    """A folder of links to every tool in /usr/bin and /bin except SLURM's and munge's."""
    dest = tmp_path / "bin"
    dest.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            name = tool.name
            if name in SLURM_CLIENT or name.startswith("slurm") or (dest / name).exists():
                continue
            (dest / name).symlink_to(tool)
    return dest


def test_parse_dry_run_reads_resources():
    text = (
        "rule train:\n    jobid: 1\n    resources: tmpdir=/tmp, mem_mb=200, slurm_partition=gpu, gpu=1\n"
        "localrule all:\n    jobid: 0\n    resources: tmpdir=/tmp\n"
    )
    assert parse_dry_run(text) == {
        "train": [{"tmpdir": "/tmp", "mem_mb": "200", "slurm_partition": "gpu", "gpu": "1"}],
        "all": [{"tmpdir": "/tmp"}],
    }


@pytest.mark.slow
def test_slurm_profile_dry_run_resolves_resources(tmp_path):
    # No SLURM binary may be needed: PATH holds the venv and the system's tools minus SLURM's.
    env = dict(
        workflow_env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{no_slurm_bin(tmp_path)}"
    )
    assert shutil.which("sbatch", path=env["PATH"]) is None
    work = tmp_path / "work"
    work.mkdir()
    r = run_snakemake(work, "--profile", str(PROFILE), "-n", env=env, check=False, timeout=300)
    assert r.returncode == 0, r.stdout[-5000:]
    jobs = parse_dry_run(r.stdout)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())

    # The contract: every training job asks the gpu partition for one GPU of the profile's model,
    # CPUs per GPU (the plugin then sends --gpus=<model>:1 --cpus-per-gpu=k), memory and time.
    assert len(jobs.get("train", [])) == 4, f"expected 4 train jobs: {sorted(jobs)}"
    for res in jobs["train"]:
        assert res["slurm_partition"] == "gpu", res
        assert res["gpu"] == "1", res
        assert res["gpu_model"] == profile["set-resources"]["train"]["gpu_model"], res
        assert int(res["cpus_per_gpu"]) >= 1, res
    # Stages that only read tables run on the default partition without a GPU.
    cpu_rules = {"aggregate", "analyze", "collect_interpolation", "fig_measure_vs_gap"}
    assert cpu_rules <= set(jobs), sorted(jobs)
    for rule in cpu_rules:
        for res in jobs[rule]:
            assert res["slurm_partition"] == profile["default-resources"]["slurm_partition"], res
            assert res["slurm_partition"] != "gpu" and res.get("gpu", "0") == "0", (rule, res)
    # Every job carries exactly what the profile sets for its rule (over the defaults).
    for rule, rs in jobs.items():
        want = {**profile["default-resources"], **profile.get("set-resources", {}).get(rule, {})}
        for res in rs:
            assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0, (rule, res)
            for key, value in want.items():
                assert res.get(key) == str(value), (rule, key, res)
    assert not (work / "results").exists(), "a dry run must not write results"


# --------------------------------------------------------------------------------------------
# (b) a real one-node cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start .ci/slurm_up.sh once per session; stop it by PID (slurm_down.sh) afterwards."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]
    require(not missing, f"SLURM not installed ({', '.join(missing)} missing)")
    require(os.geteuid() == 0, "the one-node SLURM cluster needs root")
    require(
        not os.path.lexists("/etc/slurm/slurm.conf"),
        "/etc/slurm/slurm.conf exists: another cluster is up (stop it with .ci/slurm_down.sh)",
    )
    up = subprocess.run(
        ["bash", str(REPO / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stderr[-3000:]}"
    state = Path(up.stdout.strip().splitlines()[-1])
    try:
        yield state
    finally:
        # Keep the daemons' logs as artifacts before the state dir goes.
        dest = ARTIFACTS / "slurm"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(state / "log", dest / "daemons", dirs_exist_ok=True)
        subprocess.run(["bash", str(REPO / ".ci" / "slurm_down.sh"), str(state)], timeout=60)


def one_node_profile(dest: Path) -> Path:
    """profiles/slurm with its sizes scaled to the test node (2 CPUs, 8 GB, 2 fake GPUs).

    Everything else — executor, partitions, GPU requests, status and log settings — is the
    shipped profile's, so the run exercises it; only cpus_per_gpu, threads and memory would not
    fit (the node would refuse them with "Requested node configuration is not available")."""
    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    cfg["set-threads"] = {rule: 1 for rule in cfg.get("set-threads", {})}
    cfg["default-resources"]["mem_mb"] = 1000
    for res in cfg.get("set-resources", {}).values():
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
        if "mem_mb" in res:
            res["mem_mb"] = 1000
    dest.mkdir()
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def squeue_all() -> dict[str, dict[str, str]]:
    """SLURM job id → state, partition, comment and GPU request (TresPerJob) of every job squeue
    still remembers (MinJobAge=300 keeps finished ones)."""
    fields = ("JobID", "State", "Partition", "Comment", "tres-per-job")
    r = subprocess.run(
        ["squeue", "--states=all", "-h", "-O", ",".join(f"{f}:|" for f in fields)],
        capture_output=True,
        text=True,
        check=True,
    )
    jobs = {}
    for line in r.stdout.splitlines():
        jid, state, part, comment, tres = (v.strip() for v in line.split("|")[:5])
        jobs[jid] = dict(state=state, partition=part, comment=comment, tres=tres)
    return jobs


@pytest.mark.slow
@pytest.mark.slurm
def test_tiny_study_runs_through_slurm(slurm_cluster, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    before = set(squeue_all())
    profile = one_node_profile(tmp_path / "profile")
    # The job steps start `python -m snakemake` on the node: workflow_env puts the venv on PATH,
    # and sbatch --export=ALL carries it into the job.
    r = run_snakemake(
        work, "--profile", str(profile), env=workflow_env(), check=False, timeout=1500
    )
    log = r.stdout
    (ARTIFACTS / "slurm").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "slurm" / "snakemake.log").write_text(log)
    assert r.returncode == 0, log[-5000:]

    # Every non-local job was handed to sbatch: "Job <n> has been submitted with SLURM jobid <id>".
    submitted = {
        job: (sid, logpath)
        for job, sid, logpath in re.findall(
            r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: ([^)]+)\)", log
        )
    }
    finished = re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", log)
    local = {j for j, rule in finished if rule == "all"}
    assert finished, log[-3000:]
    for j, rule in finished:
        if j in local:
            continue
        assert j in submitted, f"job {j} ({rule}) finished without going through sbatch"
    assert len(submitted) == len(finished) - len(local)

    queue = squeue_all()
    assert {sid for sid, _ in submitted.values()}.isdisjoint(before)
    sized = yaml.safe_load((profile / "config.yaml").read_text())
    default_partition = sized["default-resources"]["slurm_partition"]
    per_rule: dict[str, int] = {}
    for sid, logpath in submitted.values():
        # One log per SLURM job, under the profile's logdir (kept: slurm-keep-successful-logs).
        logpath = Path(logpath)
        assert logpath.is_file(), logpath
        assert logpath.is_relative_to(work / "results" / "logs" / "slurm"), logpath
        assert sid in queue, f"SLURM job {sid} unknown to squeue (MinJobAge too short?)"
        q = queue[sid]
        assert q["state"] == "COMPLETED", (sid, q)
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", q["comment"]).group(1)
        per_rule[rule] = per_rule.get(rule, 0) + 1
        # Each job ran where the profile sends its rule, with the fake GPU when it asks for one.
        res = sized.get("set-resources", {}).get(rule, {})
        assert q["partition"] == res.get("slurm_partition", default_partition), (rule, q)
        want_tres = f"gres:gpu:{res['gpu_model']}:{res['gpu']}" if res.get("gpu") else "N/A"
        assert q["tres"] == want_tres, (rule, q)
    assert per_rule["train"] == 4 and per_rule["measure"] == 4, per_rule
    assert sized["set-resources"]["train"]["slurm_partition"] == "gpu"

    # The study itself: its table, with every run ok.
    runs_csv = work / "results" / "tables" / "runs.csv"
    assert runs_csv.is_file()
    runs = pd.read_csv(runs_csv)
    assert len(runs) == per_rule["train"]
    assert (runs["status"] == "ok").all(), runs[["run_id", "status"]]
    figures = sorted(p.name for p in (work / "results" / "figures").glob("*.png"))
    assert len(figures) == per_rule.get("fig_interpolation", 0) + 4, figures
    assert (work / "results" / "tables" / "findings.md").stat().st_size > 0
