"""Studies at scale: the 1,000-run grid (config/scale/grid1000.yaml).

(a) The {run}/{pair} wildcard constraints (flatness.suite.id_regex) match exactly the study's ids,
    however the grid is cut by grid.exclude, and stay short (an alternation of every id made
    DAG building cost ≈ 7 ms a job).
(b) `snakemake -n` on the 1,000-run grid: the DAG build time per job is measured and printed
    (recorded, not asserted: timings are not test criteria in this project; `python -m
    benchmarks.run --only dag` sets it beside bare Snakemake on the same DAG shape). Parsing the
    workflow imports no torch (≈ 2 s of every `snakemake` call).
(c) `snakemake --profile profiles/slurm -n` on it: runs are grouped into at most 100 sbatch
    submissions, and each group asks SLURM for one GPU (its GPU jobs run one after another).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from flatness.suite import expand_grid, id_regex
from tests.workflow_helpers import REPO, SNAKEFILE, workflow_env

SCALE = REPO / "config" / "scale" / "grid1000.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PROFILE = REPO / "profiles" / "slurm"
MAX_SUBMISSIONS = 100


def scale_config(**grid) -> dict:
    cfg = yaml.safe_load(SCALE.read_text())
    cfg["grid"].update(grid)
    validate(cfg, str(SCHEMA))  # fills the schema's defaults, as the workflow does
    return cfg


# --------------------------------------------------------------------------------------------
# (a) wildcard constraints


def test_scale_config_has_1000_runs_and_a_short_exact_run_constraint():
    ids = [r.run_id for r in expand_grid(scale_config())]
    assert len(ids) == 1000
    rx = id_regex(ids)
    assert len(rx) < 300, rx  # factored like the grid, not 1,000 alternatives
    pattern = re.compile(rx)
    assert all(pattern.fullmatch(i) for i in ids)
    first = ids[0]
    for other in (first + "0", "x" + first, first.replace("-s0", "-s10"), "", "results/runs"):
        assert not pattern.fullmatch(other), other


def test_run_constraint_is_exact_under_grid_exclude():
    cfg = scale_config(exclude=[{"regularizer": "sam", "batch_size": 256}, {"seed": 3, "lr": 0.1}])
    ids = [r.run_id for r in expand_grid(cfg)]
    full = [r.run_id for r in expand_grid(scale_config())]
    excluded = sorted(set(full) - set(ids))
    assert len(excluded) == 40 + 25 - 1  # sam × bs256: 4 lr × 10 seeds; seed 3 × lr 0.1: 5 × 5
    pattern = re.compile(id_regex(ids))
    assert all(pattern.fullmatch(i) for i in ids)
    assert not any(pattern.fullmatch(i) for i in excluded)


def test_id_regex_on_ragged_ids():
    ids = ["a", "a-b", "a-b-c", "x-y-z", "x-q-z", "v1.0-w_2", "p+q-r"]
    pattern = re.compile(id_regex(ids))
    assert all(pattern.fullmatch(i) for i in ids)
    others = ["a-c", "x-y", "a-b-c-d", "b", "x-q", "v1x0-w_2", "pq-r", "a-", "-a", "x-y-z-"]
    assert not any(pattern.fullmatch(o) for o in others)
    assert re.compile(id_regex([])).fullmatch("") is None  # no pairs: matches nothing
    # Random subsets of a product grid stay exact.
    rows = ["-".join(p) for p in itertools.product("ab", ["c", "cd"], ["e", "f", "ef"])]
    for k in range(1, len(rows), 3):
        keep = rows[::k]
        pattern = re.compile(id_regex(keep))
        assert [r for r in rows if pattern.fullmatch(r)] == keep


# --------------------------------------------------------------------------------------------
# (b) DAG build time

# What common.smk computes while Snakemake parses the Snakefile, in a fresh interpreter.
PARSE_PATH = """
import sys, yaml
from snakemake.utils import validate
from flatness.paper_specs import missing_measures
from flatness.suite import batch_pairs, expand_grid, id_regex, measure_specs, variants_from_config

cfg = yaml.safe_load(open(sys.argv[1]))
validate(cfg, sys.argv[2])
runs = expand_grid(cfg)
specs = measure_specs(cfg["measure"]["measures"])
pairs = batch_pairs(runs, cfg["interpolation"]["pair_across"])
id_regex([r.run_id for r in runs]), id_regex([p.pair_id for p in pairs])
variants_from_config(cfg["measure"]), missing_measures(cfg["paper"]["study"], [s.label for s in specs])
assert "torch" not in sys.modules, "the workflow's parse path imports torch"
"""


def test_the_grid_and_config_checks_import_no_torch():
    import subprocess

    cmd = [sys.executable, "-c", PARSE_PATH, str(SCALE), str(SCHEMA)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=workflow_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def dry_run(workdir: Path, *args: str, env=None, runner: list[str] | None = None):
    """`snakemake -n` on the scale study; (stdout, wall seconds, CPU seconds) of the subprocess."""
    import subprocess

    cmd = [*(runner or [sys.executable, "-m", "snakemake"]), "-s", str(SNAKEFILE)]
    cmd += ["--directory", str(workdir), "--configfile", str(SCALE), "-n", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd, cwd=workdir, env=env or workflow_env(), capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr, wall, cpu


@pytest.mark.slow
def test_dag_build_time_per_job_is_recorded(tmp_path):
    # -X importtime: the whole parse (every .smk file) must not import torch.
    runner = [sys.executable, "-X", "importtime", "-m", "snakemake"]
    out, wall, cpu = dry_run(tmp_path, "--cores", "1", runner=runner)
    jobs = int(re.search(r"^total\s+(\d+)$", out, re.M).group(1))
    # train, measure, interpolate; the 12 study-wide jobs (tables, figures, costs, report)
    assert jobs == 1000 + 1000 + 200 + 12, jobs
    assert not re.search(r"^import time:.*\| +torch$", out, re.M), "parsing imports torch"
    # Recorded, not asserted (no timed assertions): the whole `snakemake -n`, start-up included.
    print(
        f"\nDAG build (snakemake -n, {jobs} jobs): {wall:.1f} s wall, {cpu:.1f} s CPU = "
        f"{1000 * wall / jobs:.2f} ms wall, {1000 * cpu / jobs:.2f} ms CPU per job"
    )


# --------------------------------------------------------------------------------------------
# (c) SLURM grouping

# The dry run through the real CLI, printing for each group job what the SLURM executor would
# submit: its resources as computed for a cluster submission (GroupJob.resources with
# run_local=False; the dry-run executor counts as local and would sum the layers instead) and
# the plugin's sbatch line for them.
HOOK = r"""
import json, sys
from snakemake.executors import dryrun
from snakemake.resources import GroupResources
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

_printjob = dryrun.Executor.printjob

def printjob(self, job):
    if job.is_group():
        job._resources = GroupResources.basic_layered(
            toposorted_jobs=job.toposorted, constraints=job.global_resources, run_local=False,
            additive_resources=["runtime"], sortby=["runtime"])
        res = {k: v for k, v in job.resources.items() if isinstance(v, (int, str))}
        params = dict(run_uuid="uuid", slurm_logfile="log", comment_str=f"group_{job.name}",
                      account="", partition=f"-p {res.get('slurm_partition')}", workdir=".")
        rules = [j.rule.name for j in job.jobs]
        print("SCALEGROUP " + json.dumps(dict(
            group=job.groupid, rules={r: rules.count(r) for r in sorted(set(rules))},
            resources=res, sbatch=get_submit_command(job, params) + set_gres_string(job))),
            flush=True)
    return _printjob(self, job)

dryrun.Executor.printjob = printjob
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_slurm_profile_groups_1000_runs_into_at_most_100_one_gpu_submissions(tmp_path):
    from tests.test_slurm import no_slurm_bin

    env = dict(
        workflow_env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{no_slurm_bin(tmp_path)}"
    )
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    work = tmp_path / "work"
    work.mkdir()
    out, wall, _ = dry_run(
        work, "--profile", str(PROFILE), env=env, runner=[sys.executable, str(hook)]
    )
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    size = profile["group-components"]

    groups = [
        json.loads(line.split(" ", 1)[1])
        for line in out.splitlines()
        if line.startswith("SCALEGROUP ")
    ]
    assert len(groups) == len(re.findall(r"\] Group job ", out))
    # Top-level (ungrouped) jobs: `rule x:` unindented; jobs inside a group are indented.
    single = re.findall(r"^(?:\[[^\]]*\] )?rule (\w+):$", out, re.M)
    local = {"all"}  # a target-only rule: Snakemake never submits it
    submissions = len(groups) + sum(r not in local for r in single)
    print(
        f"\ngrouped dry run ({wall:.1f} s): {len(groups)} group jobs + "
        f"{len(single)} single jobs ({sorted(single)}) = {submissions} sbatch submissions"
    )
    assert submissions <= MAX_SUBMISSIONS, submissions

    # Every train, measure and interpolate job sits in a group of at most the profile's size.
    per_rule: dict[str, int] = {}
    for g in groups:
        for rule, n in g["rules"].items():
            per_rule[rule] = per_rule.get(rule, 0) + n
        if g["group"] == "runs":
            assert g["rules"]["train"] == g["rules"]["measure"] <= size["runs"], g
        else:
            assert g["group"] == "pairs" and g["rules"]["interpolate"] <= size["pairs"], g
    assert per_rule == {"train": 1000, "measure": 1000, "interpolate": 200}, per_rule
    assert not {"train", "measure", "interpolate"} & set(single)

    # Each group asks for one GPU and one job's CPUs per GPU: its GPU jobs run one at a time.
    train_res = profile["set-resources"]["train"]
    for g in groups:
        res, sbatch = g["resources"], g["sbatch"]
        assert res["gpu"] == 1, g
        assert "--gpus=" in sbatch and sbatch.count("--gpus") == 1, sbatch
        if g["group"] == "runs":
            assert res["slurm_partition"] == train_res["slurm_partition"], g
            assert sbatch.endswith(f"--gpus={train_res['gpu_model']}:1"), sbatch
            assert f"--cpus-per-gpu={train_res['cpus_per_gpu']}" in sbatch, sbatch
            assert res["mem_mb"] == train_res["mem_mb"], g  # the largest job's, not a sum


#: The workflow scripts of the study-wide jobs (tables, figures, report page): their imports must
#: not pull torch (≈ 3 s of start-up each; they read tables only).
TABLE_SCRIPTS = ("aggregate", "analyze", "front_page", "costs", "paper", "curvature_table",
                 "collect_interpolation")  # fmt: skip


def test_the_table_and_figure_jobs_import_no_torch():
    """Each script's import lines (what the job runs before its first line of work), replayed in
    a fresh interpreter; plus the figure helpers the notebooks import."""
    import ast
    import subprocess

    lines = ["import sys"]
    for name in TABLE_SCRIPTS:
        tree = ast.parse((REPO / "workflow" / "scripts" / f"{name}.py").read_text())
        lines += [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    lines += ["import flatness.plotting", "assert 'torch' not in sys.modules, 'imports torch'"]
    r = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                       env=workflow_env(), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
