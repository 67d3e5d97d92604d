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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.test_workflow_faults import (
    TINY,
    comparable_metrics,
    load_weights,
    merged,
    run_dirs,
    snakemake_cmd,
)
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
                if isinstance(value, str) and "attempt" in value:  # an expression: attempt 1
                    value = eval(value, {}, {"attempt": 1})  # noqa: S307 (our own profile)
                if key == "slurm_extra":  # the dry run prints the string without its quotes
                    value = value.strip("'")
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
    # the four figures of every study, the interpolation's and the curvature figures it turns on
    optional = ("fig_interpolation", "trajectory", "layer_profile", "spectrum")
    assert len(figures) == 4 + sum(per_rule.get(r, 0) for r in optional), figures
    assert (work / "results" / "tables" / "findings.md").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# (c) interrupted training on SLURM resumes from its checkpoint
#
# A training job that SLURM signals (scancel --signal, or SIGTERM at its time limit) checkpoints
# and exits non-zero (flatness.train.TrainingInterrupted); the executor plugin sees the job FAILED
# or TIMEOUT, counts it as failed, and Snakemake's `retries` resubmits it with attempt 2; the new
# job resumes from results/ckpt/{run}/ (undeclared, so Snakemake does not delete it). The result
# must equal an uninterrupted local run of the same config, bit for bit on CPU.


def squeue_jobs(*fields: str) -> list[dict[str, str]]:
    """Every job squeue still remembers, as dicts of the given -O fields (plus JobID)."""
    fields = ("JobID", *fields)
    r = subprocess.run(
        ["squeue", "--states=all", "-h", "-O", ",".join(f"{f}:|" for f in fields)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        dict(zip(fields, (v.strip() for v in line.split("|")), strict=False))
        for line in r.stdout.splitlines()
    ]


def train_jobs(run: str, before: set[str]) -> list[dict[str, str]]:
    """The SLURM jobs (oldest first) of `run`'s train rule submitted after `before` was taken."""
    jobs = [
        j
        for j in squeue_jobs("State", "Comment", "TimeLimit", "Reason")
        if j["JobID"] not in before
        and j["Comment"].startswith("rule_train_")
        and j["Comment"].endswith(run)
    ]
    return sorted(jobs, key=lambda j: int(j["JobID"]))


def resume_profile(dest: Path, **train: object) -> Path:
    """one_node_profile with the train rule's resources overridden by `train`."""
    profile = one_node_profile(dest)
    cfg = yaml.safe_load((profile / "config.yaml").read_text())
    cfg["set-resources"]["train"].update(train)
    (profile / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return profile


@pytest.fixture
def start_snakemake():
    """start(workdir, configfile, log, *args): Snakemake in the background (own session, output
    to `log`), for the local reference run beside the SLURM run or a SLURM run the test
    interrupts. Whatever still runs at teardown is stopped (SIGTERM to its process group)."""
    procs: list[subprocess.Popen] = []

    def start(workdir: Path, configfile: Path, log: Path, *args: str) -> subprocess.Popen:
        workdir.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                snakemake_cmd(workdir, configfile, *args),
                cwd=workdir,
                env=workflow_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def assert_same_as_reference(work: Path, ref: Path) -> None:
    """Weights (bitwise) and metrics (but times and git commit) of every run equal the reference."""
    got_runs, ref_runs = run_dirs(work), run_dirs(ref)
    assert sorted(got_runs) == sorted(ref_runs)
    for name, path in got_runs.items():
        assert comparable_metrics(path / "metrics.json") == comparable_metrics(
            ref_runs[name] / "metrics.json"
        ), f"{name}: metrics differ from the uninterrupted run"
        got, want = load_weights(path / "model.pt"), load_weights(ref_runs[name] / "model.pt")
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k]), f"{name}: {k} differs from the uninterrupted run"


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {
        f: ((run_dir / f).stat().st_mtime_ns, (run_dir / f).read_bytes())
        for f in ("model.pt", "metrics.json")
    }


SUBMITTED = re.compile(
    r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: [^)]*/rule_train/([^/]+)/\d+\.log\)"
)


def train_submissions(log: str) -> tuple[dict[str, list[str]], set[str]]:
    """From the console: run → its train jobs' SLURM ids (in order), and the runs whose train job
    Snakemake has finished (postprocessed: outputs touched, so their mtimes are final)."""
    sids: dict[str, list[str]] = {}
    run_of: dict[str, str] = {}
    for job, sid, run in SUBMITTED.findall(log):
        sids.setdefault(run, []).append(sid)
        run_of[job] = run
    done = {run_of[j] for j in re.findall(r"Finished jobid: (\d+) \(Rule: train\)", log)}
    return sids, done


# Two runs at once on the 2 CPUs: one on 256 digits (quick) beside one on the full digits set
# (~1437 images, 90 steps per epoch: several times slower), so the quick one is finished while the
# slow one is still training.
CANCEL_STUDY = {
    "grid": {"dataset": ["quick", "digits"], "seed": [0]},
    "datasets": {"quick": {"name": "digits", "n_train": 256}, "digits": {"name": "digits"}},
    "training": {"epochs": 300},
}


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("how", ["TERM", "requeue"])
def test_slurm_signalled_training_resumes_and_matches_uninterrupted(
    slurm_cluster, start_snakemake, tmp_path, how
):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(merged(TINY, CANCEL_STUDY), sort_keys=False))
    ref, work = tmp_path / "reference", tmp_path / "work"
    # The uninterrupted reference runs locally while the cluster works.
    ref_proc = start_snakemake(ref, config, tmp_path / "reference.log", "train_all")
    profile = one_node_profile(tmp_path / "profile")
    before = {j["JobID"] for j in squeue_jobs()}
    console = tmp_path / "slurm.log"
    t0 = time.monotonic()
    proc = start_snakemake(work, config, console, "--profile", str(profile), "train_all")
    runs_dir, ckpt_root = work / "results" / "runs", work / "results" / "ckpt"
    finished = interrupted = None
    # Signal the slow run's job as soon as the quick run has written its outputs and the slow
    # one has a checkpoint (checkpoints before metrics: a run finishing in between looks done).
    while proc.poll() is None and time.monotonic() < t0 + 240:
        ckpts = {p.parent.name for p in ckpt_root.glob("*/checkpoint.pt")}
        done = {p.parent.name for p in runs_dir.glob("*/metrics.json")}
        if done and ckpts - done:
            finished, interrupted = sorted(done), sorted(ckpts - done)[0]
            break
        time.sleep(0.02)
    assert finished, f"no run was caught past a checkpoint:\n{console.read_text()[-3000:]}"
    content = {n: {f: b for f, (_, b) in snapshot(runs_dir / n).items()} for n in finished}
    sid = train_submissions(console.read_text())[0][interrupted][-1]
    signalled = time.monotonic() - t0
    if how == "requeue":  # what preemption with PreemptMode=REQUEUE does to a batch job
        subprocess.run(["scontrol", "requeue", sid], check=True, capture_output=True)
        # Once the job is back in the queue SLURM holds it (BeginTime = now + 2 min): let it
        # start at once (the requeue itself waits until the job's processes are gone).
        for _ in range(600):
            state = [j["State"] for j in squeue_jobs("State") if j["JobID"] == sid]
            if state == ["PENDING"]:
                break
            time.sleep(0.1)
        subprocess.run(
            ["scontrol", "update", f"JobId={sid}", "StartTime=now"],
            check=True,
            capture_output=True,
        )
    else:  # what SLURM sends before a time limit with --signal
        subprocess.run(["scancel", f"--signal={how}", sid], check=True, capture_output=True)
    # Snakemake touches a job's outputs when it registers the job as finished (its status
    # poll may come after the signal): from then on nothing may touch them.
    kept = {}
    while proc.poll() is None and time.monotonic() < t0 + 400:
        done = train_submissions(console.read_text())[1]
        for name in set(finished) & done - set(kept):
            kept[name] = snapshot(runs_dir / name)
        time.sleep(0.05)
    rc = proc.wait(timeout=10)
    log = console.read_text()
    for name in set(finished) & train_submissions(log)[1] - set(kept):
        kept[name] = snapshot(runs_dir / name)
    (ARTIFACTS / "slurm-resume").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "slurm-resume" / f"signal-{how}.log").write_text(log)
    assert rc == 0, log[-5000:]
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    jobs = train_jobs(interrupted, before)
    print(f"{how}: signalled at {signalled:.0f}s, done at {time.monotonic() - t0:.0f}s; {jobs}")

    # The interrupted run resumed from its checkpoint instead of starting over ...
    train_log = (runs_dir.parent / "logs" / "train" / f"{interrupted}.log").read_text()
    assert f"resumed from results/ckpt/{interrupted} at epoch" in train_log, train_log
    assert "epoch 1/" not in train_log, "the resumed job retrained epoch 1"
    assert jobs and jobs[-1]["State"] == "COMPLETED", jobs
    # ... the finished one was not retrained (same bytes, same mtimes, one SLURM job) ...
    assert sorted(kept) == finished, "Snakemake never registered the finished run"
    for name in finished:
        now = snapshot(runs_dir / name)
        assert now == kept[name], f"{name} was touched after Snakemake registered it"
        assert {f: b for f, (_, b) in now.items()} == content[name], f"{name} was rewritten"
        assert [j["State"] for j in train_jobs(name, before)] == ["COMPLETED"], name
    # ... and both equal the uninterrupted run.
    assert_same_as_reference(work, ref)


# One run long enough (~2 min of CPU at ~35 ms per epoch) to outlast a 1-minute time limit.
# SLURM enforces limits on its 30 s timer, so the first attempt is killed 60-90 s after it
# starts (SIGTERM to every step, SIGKILL KillWait = 30 s later); the retry (attempt 2) gets 10
# minutes. checkpoint_every 10 keeps the growing checkpoint (it holds the history) cheap.
TIMELIMIT_STUDY = {
    "grid": {"seed": [0]},
    "training": {"epochs": 3000, "checkpoint_every": 10},
}


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_time_limit_then_retry_resumes_and_matches_uninterrupted(
    slurm_cluster, start_snakemake, tmp_path
):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(merged(TINY, TIMELIMIT_STUDY), sort_keys=False))
    ref, work = tmp_path / "reference", tmp_path / "work"
    ref_proc = start_snakemake(ref, config, tmp_path / "reference.log", "train_all")
    # The attempt-dependent runtime, as a set-resources expression (Snakemake evaluates it with
    # `attempt` in scope): 1 minute, then 10.
    profile = resume_profile(tmp_path / "profile", runtime="1 if attempt == 1 else 10")
    before = {j["JobID"] for j in squeue_jobs()}
    t0 = time.monotonic()
    work.mkdir()
    r = run_snakemake(
        work, "--profile", str(profile), "train_all", configfile=config, check=False, timeout=600
    )
    elapsed = time.monotonic() - t0
    (ARTIFACTS / "slurm-resume").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "slurm-resume" / "time-limit.log").write_text(r.stdout)
    assert r.returncode == 0, r.stdout[-5000:]
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    (run,) = run_dirs(work)
    jobs = train_jobs(run, before)
    print(f"time limit: done in {elapsed:.0f}s; {jobs}")

    # Attempt 1 hit its 1-minute limit, attempt 2 ran with 10 minutes and completed.
    assert [j["State"] for j in jobs] == ["TIMEOUT", "COMPLETED"], jobs
    assert [j["TimeLimit"] for j in jobs] == ["1:00", "10:00"], jobs
    assert "SLURM status is: 'TIMEOUT'" in r.stdout, r.stdout[-5000:]
    # The retry resumed from the checkpoint the first attempt left.
    train_log = (work / "results" / "logs" / "train" / f"{run}.log").read_text()
    assert f"resumed from results/ckpt/{run} at epoch" in train_log, train_log
    assert "epoch 1/" not in train_log, "the retry retrained epoch 1"
    assert_same_as_reference(work, ref)
