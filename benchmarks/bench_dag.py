"""DAG build time at scale (issue 10): ``snakemake -n`` on config/scale/grid1000.yaml beside bare
Snakemake on a generated workflow of the same DAG shape.

The bare workflow has the grid's jobs (train and measure per run, interpolate per pair, 12
study-wide jobs) as ``script:`` rules with log and benchmark files but constant params and
resources, no input functions, no config and no imports: what Snakemake itself costs for this DAG
on this machine, which no workflow goes below. A one-job Snakefile gives its fixed start-up. Both
are also run on a 100-run cut of the grid (``seed: [0]``), so the totals split into a fixed
start-up (the intercept) and a cost per job (the slope). Repeats are interleaved, so a change of
machine load hits every variant alike; times are wall seconds of the whole ``snakemake``
process, CPU seconds are in results.json.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import Row, Timing

REPO = Path(__file__).resolve().parents[1]
SCALE = REPO / "config" / "scale" / "grid1000.yaml"
TARGET_MS_PER_JOB = 2.0  # issue 10: the whole `snakemake -n`, start-up included

BARE_ONE_JOB = """\
rule one:
    output:
        "one.txt",
    shell:
        "touch {output}"
"""

# The grid's DAG in plain Snakemake: {runs} runs, {pairs} pairs and a chain of {steps} study-wide
# jobs (aggregate, {steps} - 2 steps, all), like the workflow's tables, figures and report.
BARE_SHAPE = """\
RUNS = [f"r{{i}}" for i in range({runs})]
PAIRS = [(f"r{{2 * i}}", f"r{{2 * i + 1}}") for i in range({pairs})]


rule all:
    input:
        "tables/step{last}.txt",


rule train:
    output:
        model="runs/{{run}}/model.pt",
        metrics="runs/{{run}}/metrics.json",
    log:
        "logs/train/{{run}}.log",
    benchmark:
        "benchmarks/train/{{run}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    params:
        run_id="{{run}}",
    script:
        "s.py"


rule measure:
    input:
        model="runs/{{run}}/model.pt",
        metrics="runs/{{run}}/metrics.json",
    output:
        "runs/{{run}}/measures.json",
    log:
        "logs/measure/{{run}}.log",
    benchmark:
        "benchmarks/measure/{{run}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    params:
        run_id="{{run}}",
    script:
        "s.py"


rule interpolate:
    input:
        small="runs/{{small}}/model.pt",
        large="runs/{{large}}/model.pt",
    output:
        "interpolation/{{small}}_vs_{{large}}.csv",
    log:
        "logs/interpolate/{{small}}_vs_{{large}}.log",
    benchmark:
        "benchmarks/interpolate/{{small}}_vs_{{large}}.tsv"
    script:
        "s.py"


rule aggregate:
    input:
        expand("runs/{{run}}/measures.json", run=RUNS),
        [f"interpolation/{{a}}_vs_{{b}}.csv" for a, b in PAIRS],
    output:
        "tables/step0.txt",
    script:
        "s.py"


rule step:
    input:
        lambda wc: f"tables/step{{int(wc.k) - 1}}.txt",
    output:
        "tables/step{{k,[1-9][0-9]*}}.txt",
    script:
        "s.py"
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dry_run(snakefile: Path, workdir: Path, *args: str) -> tuple[float, float, int]:
    """``snakemake -n --cores 2``: (wall s, CPU s, jobs) of the whole process."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "-s", str(snakefile)]
    cmd += ["--directory", str(workdir), *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    found = re.search(r"^total\s+(\d+)$", r.stdout + r.stderr, re.M)
    jobs = int(found.group(1)) if found else 1  # a one-job run prints no job-stats table
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, jobs


def _timing(runs: list[float]) -> Timing:
    return Timing(statistics.median(runs), min(runs), max(runs), runs)


def _fit(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(intercept s, slope s/job) through two (jobs, seconds) points."""
    (n0, t0), (n1, t1) = small, large
    slope = (t1 - t0) / (n1 - n0)
    return t1 - slope * n1, slope


def run(ctx) -> list[Row]:
    topic = "dag"
    repeats = 1 if ctx.quick else 3
    base = Path(ctx.out_dir).resolve() / "dag"
    full = yaml.safe_load(SCALE.read_text())
    cut = dict(full, grid=dict(full["grid"], seed=full["grid"]["seed"][:1]))
    configs = {"1000": SCALE, "100": _write(base, "grid100.yaml", yaml.safe_dump(cut))}
    variants = {"bare one job": (_write(base / "one", "Snakefile", BARE_ONE_JOB), base / "one", ())}
    jobs: dict[str, int] = {}
    for size, config in configs.items():
        work = base / f"work{size}"
        work.mkdir(parents=True, exist_ok=True)
        variants[f"ours {size}"] = (REPO / "Snakefile", work, ("--configfile", str(config)))
        # Warm-up (bytecode, source caches) and the job count the bare workflow must match.
        jobs[f"ours {size}"] = dry_run(REPO / "Snakefile", work, "--configfile", str(config))[2]
        runs, pairs = _grid_size(yaml.safe_load(Path(config).read_text()))
        steps = jobs[f"ours {size}"] - 2 * runs - pairs
        text = BARE_SHAPE.format(runs=runs, pairs=pairs, steps=steps, last=steps - 2)
        shape = base / f"bare{size}"
        _write(shape, "s.py", "")
        variants[f"bare {size}"] = (_write(shape, "Snakefile", text), shape, ())

    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for name in order:  # warm-up
        if not name.startswith("ours"):
            dry_run(*variants[name][:2], *variants[name][2])
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            w, c, n = dry_run(*variants[name][:2], *variants[name][2])
            wall[name].append(w)
            cpu[name].append(c)
            jobs[name] = n
    t = {k: _timing(v) for k, v in wall.items()}
    med = {k: v.median for k, v in t.items()}
    if jobs["ours 1000"] != jobs["bare 1000"] or jobs["ours 100"] != jobs["bare 100"]:
        raise RuntimeError(f"the bare workflow's DAG is not the grid's shape: {jobs}")
    n = jobs["ours 1000"]
    ours_start, ours_slope = _fit(*((jobs[f"ours {s}"], med[f"ours {s}"]) for s in ("100", "1000")))
    bare_start, bare_slope = _fit(*((jobs[f"bare {s}"], med[f"bare {s}"]) for s in ("100", "1000")))
    extra = dict(
        jobs=jobs,
        wall_s={k: v.runs for k, v in t.items()},
        cpu_s=cpu,
        loadavg=os.getloadavg(),
        ours_start_s=ours_start,
        ours_ms_per_job=1000 * ours_slope,
        bare_start_s=bare_start,
        bare_ms_per_job=1000 * bare_slope,
    )
    ms = {k: 1000 * med[f"{k} 1000"] / n for k in ("ours", "bare")}
    cpu_ms = {k: 1000 * statistics.median(cpu[f"{k} 1000"]) / n for k in ("ours", "bare")}
    total = Row(
        topic,
        f"`snakemake -n` on the 1,000-run grid ({n} jobs) vs bare Snakemake on the same DAG shape",
        ours_s=med["ours 1000"],
        reference_s=med["bare 1000"],
        ratio=med["ours 1000"] / med["bare 1000"],
        ratio_def="ours/ref",
        ours_spread=t["ours 1000"].spread,
        reference_spread=t["bare 1000"].spread,
        agreement=f"{ms['ours']:.2f} vs {ms['bare']:.2f} ms/job in total "
        f"(CPU {cpu_ms['ours']:.2f} vs {cpu_ms['bare']:.2f})",
        target=f"≤ {TARGET_MS_PER_JOB:g} ms/job in total (issue 10)",
        passed=ms["ours"] <= TARGET_MS_PER_JOB,
        notes=f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        extra=extra,
    )
    per_job = Row(
        topic,
        f"cost per job: slope between the 100- and 1,000-run grids "
        f"({jobs['ours 100']} → {n} jobs), ours vs bare",
        ours_s=ours_slope,
        reference_s=bare_slope,
        ratio=ours_slope / bare_slope if bare_slope > 0 else None,
        ratio_def="ours/ref",
        agreement=f"{1000 * ours_slope:.2f} vs {1000 * bare_slope:.2f} ms/job",
    )
    start_up = Row(
        topic,
        "fixed start-up: intercept of the two grid sizes vs `snakemake -n` on a one-job "
        "Snakefile (Snakemake's floor)",
        ours_s=ours_start,
        reference_s=med["bare one job"],
        ratio=ours_start / med["bare one job"],
        ratio_def="ours/ref",
        reference_spread=t["bare one job"].spread,
        agreement=f"bare same-shape intercept {bare_start:.2f} s",
    )
    return [total, per_job, start_up]


def _grid_size(config: dict) -> tuple[int, int]:
    """(runs, interpolation pairs) of a study config, as the workflow expands it."""
    from snakemake.utils import validate

    from flatness.suite import batch_pairs, expand_grid

    config = yaml.safe_load(yaml.safe_dump(config))  # validate fills defaults in place
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    runs = expand_grid(config)
    pairs = batch_pairs(runs, config["interpolation"]["pair_across"])
    return len(runs), (len(pairs) if config["interpolation"]["enabled"] else 0)
