"""Peak memory of one HVP in the recompute-per-chunk mode for LeNet5 as N grows (inputs tiled from
the MNIST subset): it should stay flat in N, unlike one double backward over the whole batch."""

from __future__ import annotations

import torch

from benchmarks.harness import Row, peak_memory, pin_malloc_to_mmap, time_fn
from benchmarks.references import CachedHVP

TOPIC = "memory"
SIZES = (2048, 8192, 32768)
SIZES_QUICK = (512, 2048, 8192)
#: One whole-batch double backward at 32k LeNet5 inputs needs several GiB: shown up to this N.
WHOLE_BATCH_MAX_N = 8192


def _tiled(ctx, n: int):
    reps = -(-n // ctx.X.shape[0])
    X = ctx.X.repeat(reps, 1, 1, 1)[:n].to(ctx.device)
    return X, ctx.y.repeat(reps)[:n].to(ctx.device)


def run(ctx) -> list[Row]:
    from flatness.hvp import HessianOperator

    pin_malloc_to_mmap()
    model = ctx.model("lenet5")
    sizes = SIZES_QUICK if ctx.quick else SIZES
    rows, peaks = [], {}
    for n in sizes:
        X, y = _tiled(ctx, n)
        op = HessianOperator(model, (X, y), graph_budget_bytes=0)
        v = torch.randn(op.num_params, device=ctx.device)
        op.matvec(v)  # warm-up: allocator pools and lazy initialisation outside the peak
        ours_mib, _ = peak_memory(lambda op=op, v=v: op.matvec(v), ctx.device)
        ours_t, _ = time_fn(lambda op=op, v=v: op.matvec(v), ctx.device, 1, warmup=0)
        peaks[n] = ours_mib
        row = Row(TOPIC, f"lenet5: one HVP, recompute per chunk, N = {n}", ours_s=ours_t.median)
        row.agreement = f"peak +{ours_mib:.0f} MiB"
        row.extra = {"n": n, "peak_mib": ours_mib}
        if n <= WHOLE_BATCH_MAX_N:
            ref_mib, _ = peak_memory(lambda X=X, y=y: _whole_batch_hvp(model, X, y), ctx.device)
            ref_t, _ = time_fn(lambda X=X, y=y: _whole_batch_hvp(model, X, y), ctx.device, 1, 0)
            row.reference_s = ref_t.median
            row.agreement += f" vs +{ref_mib:.0f} MiB (one whole-batch double backward)"
            row.extra["whole_batch_peak_mib"] = ref_mib
            row.ratio, row.ratio_def = ref_mib / max(ours_mib, 1e-9), "ref/ours memory"
        rows.append(row)
        del op, X, y
    lo, hi = sizes[0], sizes[-1]
    growth = peaks[hi] / max(peaks[lo], 1e-9)
    summary = Row(
        TOPIC,
        f"lenet5: HVP peak memory at N = {hi} ÷ at N = {lo} (flat in N)",
        ratio=growth,
        ratio_def="peak ratio",
        agreement=", ".join(f"N={n}: {peaks[n]:.0f} MiB" for n in sizes),
        target="≤ 1.5 while N grows ×16",
        passed=bool(growth <= 1.5),
        extra={"peaks_mib": peaks},
    )
    rows.append(summary)
    return rows


def _whole_batch_hvp(model, X, y):
    hvp = CachedHVP(model, X, y)
    return hvp([torch.ones_like(p) for p in hvp.params])
