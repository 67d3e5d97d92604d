"""Peak memory of one HVP in the recompute-per-chunk mode for LeNet5 as N grows (inputs tiled from
the MNIST subset): it should stay flat in N, unlike one double backward over the whole batch.

Each size runs in a fresh process started with glibc's mmap threshold fixed at 64 KiB, so every
tensor is mmapped and unmapped on free and the resident-set peak follows the live tensors: in a
long-lived process freed heap chunks are recycled without the resident set growing, and a peak
would read as zero.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks.harness import Row, peak_memory, pin_malloc_to_mmap, time_fn
from benchmarks.references import CachedHVP

TOPIC = "memory"
SIZES = (2048, 8192, 32768)
SIZES_QUICK = (512, 2048, 8192)
#: One whole-batch double backward at 32k LeNet5 inputs needs several GiB: shown up to this N.
WHOLE_BATCH_MAX_N = 8192
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(ctx) -> list[Row]:
    sizes = SIZES_QUICK if ctx.quick else SIZES
    rows, peaks = [], {}
    for n in sizes:
        res = _in_fresh_process(ctx, n, whole_batch=n <= WHOLE_BATCH_MAX_N)
        peaks[n] = res["peak_mib"]
        row = Row(TOPIC, f"lenet5: one HVP, recompute per chunk, N = {n}", ours_s=res["time_s"])
        row.agreement = f"peak +{res['peak_mib']:.0f} MiB"
        row.extra = res
        if "whole_batch_peak_mib" in res:
            row.reference_s = res["whole_batch_time_s"]
            row.agreement += f" vs +{res['whole_batch_peak_mib']:.0f} MiB (whole-batch HVP)"
            row.ratio = res["whole_batch_peak_mib"] / max(res["peak_mib"], 1e-9)
            row.ratio_def = "ref/ours memory"
        rows.append(row)
    lo, hi = sizes[0], sizes[-1]
    growth = peaks[hi] / max(peaks[lo], 1e-9)
    rows.append(
        Row(
            TOPIC,
            f"lenet5: HVP peak memory at N = {hi} ÷ at N = {lo} (flat in N)",
            ratio=growth,
            ratio_def="peak ratio",
            agreement=", ".join(f"N={n}: {peaks[n]:.0f} MiB" for n in sizes),
            target=f"≤ 1.5 while N grows ×{hi // lo}",
            passed=bool(0 < growth <= 1.5),
            extra={"peaks_mib": peaks},
        )
    )
    return rows


def _in_fresh_process(ctx, n: int, whole_batch: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--out", ctx.out_dir, "--n", str(n)]
    cmd += ["--threads", str(torch.get_num_threads())]
    cmd += ["--quick"] if ctx.quick else []
    cmd += ["--whole-batch"] if whole_batch else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for N = {n} failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiled(ctx, n: int):
    reps = -(-n // ctx.X.shape[0])
    X = ctx.X.repeat(reps, 1, 1, 1)[:n].to(ctx.device)
    return X, ctx.y.repeat(reps)[:n].to(ctx.device)


def _whole_batch_hvp(model, X, y):
    hvp = CachedHVP(model, X, y)
    return hvp([torch.ones_like(p) for p in hvp.params])


def measure(ctx, n: int, whole_batch: bool) -> dict:
    """Peak (MiB above what is allocated before) and time of one HVP, in this process."""
    from flatness.hvp import HessianOperator

    model = ctx.model("lenet5")
    X, y = _tiled(ctx, n)
    op = HessianOperator(model, (X, y), graph_budget_bytes=0)
    v = torch.randn(op.num_params, device=ctx.device)
    op.matvec(v)  # warm-up: lazy initialisation outside the peak
    peak, _ = peak_memory(lambda: op.matvec(v), ctx.device)
    t, _ = time_fn(lambda: op.matvec(v), ctx.device, 1, warmup=0)
    res = {"n": n, "peak_mib": peak, "time_s": t.median, "chunks": len(op.batches)}
    if whole_batch:
        peak, _ = peak_memory(lambda: _whole_batch_hvp(model, X, y), ctx.device)
        t, _ = time_fn(lambda: _whole_batch_hvp(model, X, y), ctx.device, 1, warmup=0)
        res.update(whole_batch_peak_mib=peak, whole_batch_time_s=t.median)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description="one memory probe (started by run())")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--whole-batch", action="store_true")
    args = parser.parse_args()
    pin_malloc_to_mmap()  # in case the environment variables were not honoured
    torch.set_num_threads(args.threads)
    from benchmarks.fixtures import make_context

    ctx = make_context(args.out, quick=args.quick)
    print(json.dumps(measure(ctx, args.n, args.whole_batch)))


if __name__ == "__main__":
    main()
