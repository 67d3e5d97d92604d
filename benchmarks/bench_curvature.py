"""Curvature: quotient sharpness against Rangamani et al.'s power iteration, the lower bound set by
Lanczos steps × one cached HVP, HVP vs gradient cost, ARPACK vs our lean Lanczos, and PyHessian 0.1
(top eigenvalue at its tolerance; trace at its number of HVPs, against the exact trace)."""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import torch
from torch import nn

from benchmarks.harness import Row, Timing, failed_row, rel_diff, speed_row, time_fn, time_pair
from benchmarks.references import rangamani_power_iteration

TOPIC_Q = "quotient sharpness"
TOPIC_P = "PyHessian"
TOPIC_H = "HVP / Lanczos"


def call_measure(fn, model, data, **wanted):
    """Call a measure with the keyword arguments it accepts (signatures are still settling)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(model, data, **wanted)
    return fn(model, data, **{k: v for k, v in wanted.items() if k in params})


@contextlib.contextmanager
def count_matvecs():
    """Count every ``HessianOperator.matvec`` made inside the block, whoever creates the operator."""
    from flatness.hvp import HessianOperator

    counter = {"n": 0}
    original = HessianOperator.matvec

    def counting(self, v):
        counter["n"] += 1
        return original(self, v)

    HessianOperator.matvec = counting
    try:
        yield counter
    finally:
        HessianOperator.matvec = original


def _zero_grads(model):
    for p in model.parameters():
        p.grad = None


def run(ctx) -> list[Row]:
    rows = []
    for name in ("mlp", "lenet5"):
        for part in (_quotient_and_hvp_rows, _pyhessian_rows):
            try:
                rows += part(ctx, name)
            except Exception as exc:  # noqa: BLE001 — a missing API must not stop the others
                rows.append(failed_row(part.__name__.strip("_").replace("_rows", ""), name, exc))
    return rows


def _quotient_and_hvp_rows(ctx, name: str) -> list[Row]:
    rows, timed = _quotient_rows(ctx, name)
    return rows + _hvp_rows(ctx, name, timed)


# -- Rangamani --------------------------------------------------------------------------------


def _quotient_rows(ctx, name: str) -> tuple[list[Row], dict]:
    """The Rangamani row, and our timing with its HVP count (reused by the lower-bound row)."""
    from flatness.measures import quotient_sharpness

    model = ctx.model(name)
    X, y = ctx.eval_data()
    target = {"mlp": 3, "lenet5": 6}[name]
    label = f"{name}: λ_max(DHD), Lanczos vs Rangamani power iteration on G⁻¹H"
    try:
        with count_matvecs() as count:
            ours, lam = time_fn(
                lambda: call_measure(quotient_sharpness, model, (X, y)), ctx.device, ctx.repeats()
            )
        ours_hvps = count["n"] // (ctx.repeats() + 1)
    except Exception as exc:  # noqa: BLE001
        return [failed_row(TOPIC_Q, label, exc)], {}
    ref, (lam_ref, ref_hvps) = time_fn(
        lambda: rangamani_power_iteration(model, X, y, tol=1e-6, max_iter=1000),
        ctx.device,
        repeats=1,
        warmup=0,
    )
    diff = rel_diff(lam, lam_ref)
    row = speed_row(
        TOPIC_Q,
        label,
        ours,
        ref,
        min_speedup=target,
        agreement=f"λ {lam:.6g} vs {lam_ref:.6g}, rel {diff:.1e} (≤ 1e-4)",
        agree_ok=diff <= 1e-4,
        notes=f"{ours_hvps} vs {ref_hvps} HVPs, N = {X.shape[0]}",
        extra={"ours": lam, "reference": lam_ref, "hvps": ours_hvps, "ref_hvps": ref_hvps},
    )
    return [row], {"quotient_sharpness": (ours, ours_hvps)}


# -- HVP cost, lower bound, ARPACK ------------------------------------------------------------


def _hvp_rows(ctx, name: str, timed: dict) -> list[Row]:
    from flatness.hvp import HessianOperator
    from flatness.lanczos import top_eigenvalues
    from flatness.measures import hessian_max_eigenvalue

    model = ctx.model(name)
    X, y = ctx.eval_data()
    data = (X, y)
    n_rep = ctx.repeats()
    rows = []

    kept = HessianOperator(model, data)
    v = torch.randn(kept.num_params, device=ctx.device)
    kept.matvec(v)  # builds the kept graph outside the timing: "one cached HVP"
    cached_t, _ = time_fn(lambda: kept.matvec(v), ctx.device, 3)
    recompute = HessianOperator(model, data, graph_budget_bytes=0)
    # The unit: one gradient over the same chunks (the recompute operator never keeps a graph).
    recompute_t, grad_t, _, _ = time_pair(
        lambda: recompute.matvec(v), recompute.gradient, ctx.device, n_rep
    )
    for label, t in (("kept graph", cached_t), ("recompute per chunk", recompute_t)):
        rows.append(
            speed_row(
                TOPIC_H,
                f"{name}: one HVP ({label}) vs one gradient",
                t,
                grad_t,
                max_cost=3,
                notes=f"N = {X.shape[0]}",
            )
        )

    # Lower bound: a measure cannot beat (its Lanczos steps) × (one cached HVP).
    if "hessian_max_eigenvalue" not in timed:
        try:
            with count_matvecs() as count:
                total, _ = time_fn(
                    lambda: call_measure(hessian_max_eigenvalue, model, data), ctx.device, n_rep
                )
            timed["hessian_max_eigenvalue"] = (total, count["n"] // (n_rep + 1))
        except Exception as exc:  # noqa: BLE001
            rows.append(failed_row(TOPIC_H, f"{name}: hessian_max_eigenvalue lower bound", exc))
    for label, (total, steps) in timed.items():
        bound = Timing(*([steps * cached_t.median] * 3), runs=[steps * cached_t.median])
        rows.append(
            speed_row(
                TOPIC_H,
                f"{name}: {label} total vs {steps} Lanczos steps × one cached HVP",
                total,
                bound,
                max_cost=1.2,
                notes=f"N = {X.shape[0]}",
            )
        )

    # ARPACK vs the lean Lanczos on the same kept-graph operator and tolerance.
    results, timings = {}, {}
    slow_rep = ctx.repeats(cheap=False)
    for method in ("lanczos", "eigsh"):
        before = kept.num_matvecs
        timings[method], res = time_fn(
            lambda method=method: top_eigenvalues(
                kept.matvec,
                kept.num_params,
                1,
                method=method,
                tol=1e-4,
                device=ctx.device,
                dtype=X.dtype,
            ),  # fmt: skip
            ctx.device,
            slow_rep,
            warmup=0,  # the graph is already built: nothing to warm up
        )
        results[method] = (float(res.eigenvalues[0]), (kept.num_matvecs - before) // slow_rep)
    diff = rel_diff(results["lanczos"][0], results["eigsh"][0])
    rows.append(
        speed_row(
            TOPIC_H,
            f"{name}: λ_max, lean Lanczos vs scipy eigsh (ARPACK), tol 1e-4",
            timings["lanczos"],
            timings["eigsh"],
            agreement=f"rel {diff:.1e} (≤ 1e-4)",
            agree_ok=diff <= 1e-4,
            notes=f"{results['lanczos'][1]} vs {results['eigsh'][1]} matvecs",
            extra={"lanczos": results["lanczos"][0], "eigsh": results["eigsh"][0]},
        )
    )
    kept.close()
    return rows


# -- PyHessian --------------------------------------------------------------------------------


def _pyhessian(model, X, y, device):
    from pyhessian import hessian

    _zero_grads(model)  # its constructor accumulates into .grad with a graph
    torch.manual_seed(0)  # its probes come from the global RNG: the same start on every repeat
    return hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=device.type == "cuda")


def _exact_trace(ctx, model, X, y) -> tuple[float, str]:
    """The library's exact trace (``hessian_trace``, auto: the GGN identity on piecewise-linear
    nets), else a many-probe Hutchinson mean."""
    from flatness.ggn import piecewise_linear_offender
    from flatness.measures import hessian_trace

    if piecewise_linear_offender(model) is None:
        return hessian_trace(model, (X, y), method="ggn_exact"), "exact GGN"
    return _hutchinson_reference(ctx, model, X, y)[0], f"{_reference_probes(ctx)}-probe Hutchinson"


def _reference_probes(ctx) -> int:
    return 100 if ctx.quick else 1000


def _hutchinson_reference(ctx, model, X, y) -> tuple[float, float]:
    """An independent trace: plain Hutchinson on HVPs, 1,000 Rademacher probes (100 with --quick)."""
    from flatness.hutchinson import hutchinson_trace
    from flatness.hvp import HessianOperator

    with HessianOperator(model, (X, y)) as op:
        gen = torch.Generator().manual_seed(123)
        est, se = hutchinson_trace(
            op.matvec, op.num_params, _reference_probes(ctx), gen, device=ctx.device, dtype=X.dtype
        )
    return float(est), float(se)


def _exact_trace_row(ctx, name: str, model, X, y, pyh_t) -> Row:
    """hessian_trace's default (exact GGN here) vs PyHessian's trace, judged against the
    independent Hutchinson reference (within 4 of its standard errors)."""
    from flatness.measures import hessian_trace

    label = f"{name}: hessian_trace (auto: exact GGN) vs PyHessian trace"
    try:
        ours_t, (tr, se) = time_fn(
            lambda: hessian_trace(model, (X, y), return_stderr=True), ctx.device, ctx.repeats()
        )
    except Exception as exc:  # noqa: BLE001
        return failed_row(TOPIC_P, label, exc)
    ref_tr, ref_se = _hutchinson_reference(ctx, model, X, y)
    k = _reference_probes(ctx)
    ok = se == 0.0 and abs(tr - ref_tr) <= 4 * ref_se
    row = speed_row(
        TOPIC_P,
        label,
        ours_t,
        pyh_t,
        min_speedup=1.0,
        agreement=(
            f"trace {tr:.6g} (stderr {se:g}) vs {k}-probe Hutchinson {ref_tr:.6g} ± {ref_se:.3g}"
            " (≤ 4 stderr)"
        ),
        agree_ok=ok,
        notes=f"N = {X.shape[0]}",
        extra={"ours": tr, "reference": ref_tr, "reference_se": ref_se, "probes": k},
    )
    return row


def _pyhessian_rows(ctx, name: str) -> list[Row]:
    from flatness.hvp import HessianOperator
    from flatness.lanczos import top_eigenvalues
    from flatness.measures import hessian_max_eigenvalue, hessian_trace

    model = ctx.model(name)
    X, y = ctx.eval_data()
    n_rep = ctx.repeats()
    rows = []

    # Top eigenvalue at PyHessian's defaults (power iteration, maxIter 100, tol 1e-3), both
    # judged against a tightly converged Lanczos value.
    op = HessianOperator(model, (X, y))
    tight = top_eigenvalues(op.matvec, op.num_params, 1, tol=1e-8, device=ctx.device, dtype=X.dtype)
    lam_true = float(tight.eigenvalues[0])
    op.close()

    def pyhessian_top():
        eigs, _ = _pyhessian(model, X, y, ctx.device).eigenvalues(maxIter=100, tol=1e-3)
        _zero_grads(model)  # drop the graph it leaves in .grad
        return float(eigs[0])

    try:
        ours, ref, lam, pyh_lam = time_pair(
            lambda: call_measure(hessian_max_eigenvalue, model, (X, y), tol=1e-3),
            pyhessian_top,
            ctx.device,
            n_rep,
        )
        err, pyh_err = rel_diff(lam, lam_true), rel_diff(pyh_lam, lam_true)
        rows.append(
            speed_row(
                TOPIC_P,
                f"{name}: hessian_max_eigenvalue vs PyHessian eigenvalues (tol 1e-3)",
                ours,
                ref,
                min_speedup=1.0,
                agreement=f"rel err {err:.1e} vs {pyh_err:.1e} (tight λ {lam_true:.5g})",
                agree_ok=err <= max(pyh_err, 1e-4),
                extra={"ours": lam, "pyhessian": pyh_lam, "tight": lam_true},
            )
        )
    except Exception as exc:  # noqa: BLE001
        rows.append(failed_row(TOPIC_P, f"{name}: hessian_max_eigenvalue vs PyHessian", exc))

    # Trace: PyHessian's Hutchinson with its running-mean stop; ours at the same HVP count.
    ref_t, samples = time_fn(
        lambda: _pyhessian(model, X, y, ctx.device).trace(maxIter=100, tol=1e-3),
        ctx.device,
        1,
        warmup=0,
    )
    _zero_grads(model)
    samples = np.asarray(samples, dtype=np.float64)
    n_hvp = len(samples)
    pyh_tr = float(samples.mean())
    pyh_se = float(samples.std(ddof=1) / math.sqrt(n_hvp)) if n_hvp > 1 else float("inf")
    exact_t, (exact, how) = time_fn(lambda: _exact_trace(ctx, model, X, y), ctx.device, 1, 0)
    rows.append(_exact_trace_row(ctx, name, model, X, y, ref_t))
    try:
        ours_t, (tr, se) = time_fn(
            lambda: _our_trace(hessian_trace, model, (X, y), n_hvp), ctx.device, 1, warmup=0
        )
    except Exception as exc:  # noqa: BLE001
        rows.append(failed_row(TOPIC_P, f"{name}: hessian_trace vs PyHessian trace", exc))
        return rows
    rows.append(
        speed_row(
            TOPIC_P,
            f"{name}: hessian_trace vs PyHessian trace, {n_hvp} HVPs each",
            ours_t,
            ref_t,
            agreement=(
                f"stderr {se:.3g} vs {pyh_se:.3g} (≥ 2× smaller); abs err {abs(tr - exact):.3g} vs "
                f"{abs(pyh_tr - exact):.3g} ({how} trace {exact:.5g})"
            ),
            agree_ok=se * 2 <= pyh_se,
            min_speedup=0.0,
            notes=f"the {how} trace took {exact_t.median:.3g} s",
            extra={
                "ours": tr,
                "ours_se": se,
                "pyhessian": pyh_tr,
                "pyhessian_se": pyh_se,
                "exact": exact,
                "exact_s": exact_t.median,
                "exact_how": how,
                "hvps": n_hvp,
            },
        )
    )
    rows[-1].target = "stderr ≥ 2× smaller at equal HVPs"
    return rows


def _our_trace(hessian_trace, model, data, n_hvp: int):
    """Our trace with a budget of ``n_hvp`` HVPs, whatever the keyword is called."""
    params = inspect.signature(hessian_trace).parameters
    for key in ("num_matvecs", "num_hvps", "num_probes", "num_samples", "probes", "n_samples"):
        if key in params:
            out = hessian_trace(model, data, **{key: n_hvp}, return_stderr=True)  # Hutch++
            return float(out[0]), float(out[1])
    out = hessian_trace(model, data, return_stderr=True)
    return float(out[0]), float(out[1])
