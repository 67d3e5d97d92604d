"""Relative flatness κ^φ_Tr: our CE closed form against Petzka et al.'s exact last-layer Hessian
(one double-backward pass per entry of W, d·m passes), and against one forward pass over the data."""

from __future__ import annotations

import torch

from benchmarks.harness import Row, failed_row, rel_diff, speed_row, time_fn, time_pair
from benchmarks.references import petzka_exact_kappa

TOPIC = "relative flatness"


def _forward_pass(model, X):
    from flatness.batches import DEFAULT_CHUNK

    with torch.no_grad():
        for i in range(0, X.shape[0], DEFAULT_CHUNK):  # the chunking the measures use
            model(X[i : i + DEFAULT_CHUNK])


def run(ctx) -> list[Row]:
    return [row for name in ("mlp", "lenet5") for row in _model_rows(ctx, name)]


def _model_rows(ctx, name: str) -> list[Row]:
    from flatness.lastlayer import last_linear
    from flatness.measures import relative_flatness

    rows = []
    # float64: the agreement target (1e-6) is a float64 statement
    model = ctx.model(name, torch.float64)
    X, y = ctx.eval_data(dtype=torch.float64)
    d, m = last_linear(model).weight.shape
    try:
        ours, fwd, kappa, _ = time_pair(
            lambda: relative_flatness(model, (X, y)),
            lambda: _forward_pass(model, X),
            ctx.device,
            ctx.repeats(),
        )
    except Exception as exc:  # noqa: BLE001
        rows.append(failed_row(TOPIC, f"{name}: κ_Tr closed form", exc))
        return rows
    ref, kappa_ref = time_fn(
        lambda: petzka_exact_kappa(model, X, y, last_linear(model)),
        ctx.device,
        repeats=1,
        warmup=0,
    )
    diff = rel_diff(kappa, kappa_ref)
    agreement = f"κ {kappa:.6g} vs {kappa_ref:.6g}, rel {diff:.1e} (≤ 1e-6)"
    rows.append(
        speed_row(
            TOPIC,
            f"{name}: κ_Tr closed form vs exact last-layer Hessian ({d * m} double backwards)",
            ours,
            ref,
            min_speedup=300 if name == "mlp" else None,
            agreement=agreement,
            agree_ok=diff <= 1e-6,
            notes=f"float64, N = {X.shape[0]}",
            extra={"kappa": kappa, "kappa_reference": kappa_ref, "passes": d * m},
        )
    )
    rows.append(
        speed_row(
            TOPIC,
            f"{name}: κ_Tr closed form vs one forward pass",
            ours,
            fwd,
            max_cost=1.5,
            notes=f"float64, N = {X.shape[0]}",
        )
    )
    return rows
