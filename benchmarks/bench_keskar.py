"""Keskar ε-sharpness against its own floor: the call against its loss + gradient evaluations
(those L-BFGS-B made, plus the one loss at θ, replayed at the same points through the same
evaluator), and against the same optimisation driven through ``scipy.optimize.minimize`` (the
implementation before: a Python loop over the n bounds). float32 for both fixtures, and float64
for the MLP (the default study's dtype).

The time inside scipy's L-BFGS-B routine (``setulb``: its O(m·n) work per iteration, m = 10, the
same in ``minimize``) is measured in the same calls, so a second row gives the call less that time
against the evaluations (what our code adds), and the notes give the floor (evaluations + setulb)
and the cost in gradients (the call ÷ one loss + gradient over the same data).

Topic ``measure_cost`` (separate, slower): every measure of the default study as a multiple of one
loss + gradient over the same data, each measure run once."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from benchmarks.harness import (
    Row,
    Timing,
    failed_row,
    rel_diff,
    speed_row,
    time_fn,
    time_pair,
)

TOPIC = "keskar"
TOPIC_COST = "measure cost"


@contextlib.contextmanager
def record_evaluations():
    """Record every loss evaluation ``keskar_sharpness`` makes inside the block, as
    ``(displacement, with_gradient)``: L-BFGS-B's (with gradient, scipy's ``nfev``) and L(θ)."""
    from flatness.measures import keskar

    calls: list[tuple[torch.Tensor, bool]] = []
    original = keskar._FlatLoss.__call__

    def recording(self, delta, grad=True):
        calls.append((delta.detach().clone(), grad))
        return original(self, delta, grad)

    keskar._FlatLoss.__call__ = recording
    try:
        yield calls
    finally:
        keskar._FlatLoss.__call__ = original


@contextlib.contextmanager
def timing_setulb():
    """Accumulate the wall time spent inside ``keskar._setulb`` into the yielded one-item list
    (reset it between calls); the wrapper keeps setulb's docstring, which the measure checks."""
    import time

    from flatness.measures import keskar

    spent = [0.0]
    original = keskar._setulb

    def timed(*args):
        start = time.perf_counter()
        try:
            return original(*args)
        finally:
            spent[0] += time.perf_counter() - start

    timed.__doc__ = original.__doc__
    keskar._setulb = timed
    try:
        yield spent
    finally:
        keskar._setulb = original


@contextlib.contextmanager
def through_scipy_minimize():
    """``keskar_sharpness`` as it was: L-BFGS-B through ``scipy.optimize.minimize``."""
    from flatness.measures import keskar

    original = keskar._setulb_usable
    keskar._setulb_usable = lambda: False
    try:
        yield
    finally:
        keskar._setulb_usable = original


def _evaluations(model, data, calls) -> None:
    """The evaluations of one ``keskar_sharpness`` call replayed at the same displacements through
    the measure's own evaluator (θ + δ via ``functional_call``, per-chunk backward): its floor."""
    from flatness.batches import Batches, default_loss, eval_mode
    from flatness.measures.keskar import _FlatLoss

    flat = _FlatLoss(model, Batches.for_model(data, model), default_loss)
    with eval_mode(model):
        for delta, grad in calls:
            flat(delta, grad=grad)


def run(ctx) -> list[Row]:
    rows = []
    # float32 as every other row; float64 as the default study measures (config/config.yaml)
    for name, dtype in (("mlp", torch.float32), ("lenet5", torch.float32), ("mlp", torch.float64)):
        try:
            rows += _keskar_rows(ctx, name, dtype)
        except Exception as exc:  # noqa: BLE001
            rows.append(failed_row(TOPIC, f"{name}: keskar_sharpness", exc))
    return rows


def _keskar_rows(ctx, name: str, dtype: torch.dtype) -> list[Row]:
    import statistics

    from flatness.measures import keskar_sharpness

    model = ctx.model(name, dtype)
    data = ctx.eval_data(dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    with record_evaluations() as calls:
        keskar_sharpness(model, data)
    n_grad = sum(grad for _, grad in calls)
    n_loss = len(calls) - n_grad
    in_setulb: list[float] = []

    def ours_call():
        spent[0] = 0.0
        value = keskar_sharpness(model, data)
        in_setulb.append(spent[0])
        return value

    with timing_setulb() as spent:
        ours, floor, value, _ = time_pair(
            ours_call,
            lambda: _evaluations(model, data, calls),
            ctx.device,
            ctx.repeats(),
        )
    setulb_s = statistics.median(in_setulb[-len(ours.runs) :])
    grad, _ = time_fn(lambda: _gradient(model, data), ctx.device, repeats=ctx.repeats())
    # ours less setulb, per repeat (the same calls), against the evaluations' median
    less = [t - s for t, s in zip(ours.runs, in_setulb[-len(ours.runs) :], strict=True)]
    ours_less = Timing(statistics.median(less), min(less), max(less), less)
    note = f"{str(dtype).removeprefix('torch.')}, N = {data[0].shape[0]}, n = {n_params:,}"
    floor_ratio = (floor.median + setulb_s) / floor.median
    in_gradients = ours.median / grad.median
    costs = (
        f"setulb {setulb_s:.3g} s, floor (evaluations + setulb) {floor_ratio:.2f}× the "
        f"evaluations; the call = {in_gradients:.1f} gradients ({grad.median:.3g} s each)"
    )
    extra = {
        "value": value,
        "evaluations": n_grad,
        "losses": n_loss,
        "setulb_s": setulb_s,
        "ratio_without_setulb": ours_less.median / floor.median,
        "floor_ratio": floor_ratio,
        "gradient_s": grad.median,
        "cost_in_gradients": in_gradients,
    }
    rows = [
        speed_row(
            TOPIC,
            f"{name}: keskar_sharpness vs its {n_grad} loss+gradient evaluations + {n_loss} loss "
            "(replayed at the same points)",
            ours,
            floor,
            max_cost=1.5,
            notes=f"{note}; {costs}",
            extra=extra,
        ),
        speed_row(
            TOPIC,
            f"{name}: keskar_sharpness less its time in scipy's setulb vs the same evaluations",
            ours_less,
            floor,
            max_cost=1.5,
            notes=f"{note}; setulb (L-BFGS-B's own O(m·n) work) {setulb_s:.3g} s",
            extra=extra,
        ),
    ]
    with through_scipy_minimize():
        before, value_before = time_fn(
            lambda: keskar_sharpness(model, data), ctx.device, repeats=1, warmup=0
        )
    diff = rel_diff(value, value_before)
    rows.append(
        speed_row(
            TOPIC,
            f"{name}: keskar_sharpness, setulb driven directly vs scipy.optimize.minimize",
            ours,
            before,
            agreement=f"value {value:.6g} vs {value_before:.6g}, rel {diff:.1e} (≤ 1e-10)",
            agree_ok=diff <= 1e-10,
            notes=note + ", reference once",
            extra={"value": value, "value_minimize": value_before},
        )
    )
    return rows


#: The default study's measures (config/config.yaml) and their options there.
STUDY_MEASURES = (
    ("hessian_max_eigenvalue", {}),
    ("hessian_trace", {}),
    ("quotient_sharpness", {}),
    ("relative_flatness", {}),
    ("fisher_rao_norm", {}),
    ("adaptive_sharpness", {}),
    ("keskar_sharpness", {}),
    ("pacbayes_sigma", {"num_samples": 3}),
)


def _gradient(model, data) -> None:
    """One loss + gradient over ``data``, chunked as the measures chunk it."""
    from flatness.batches import Batches, loss_term

    batches = Batches.for_model(data, model)
    for p in model.parameters():
        p.grad = None
    for X, y in batches:
        loss_term(None, model(X), y, batches.num_samples).backward()


def run_cost(ctx) -> list[Row]:
    rows = []
    for name in ("mlp", "lenet5"):
        rows += _cost_rows(ctx, name)
    return rows


def _cost_rows(ctx, name: str) -> list[Row]:
    from flatness.measures import MEASURES

    model = ctx.model(name)
    data = ctx.eval_data()
    grad, _ = time_fn(lambda: _gradient(model, data), ctx.device, repeats=ctx.repeats())
    rows = []
    for measure, options in STUDY_MEASURES:
        label = measure + "".join(f", {k}={v}" for k, v in options.items())
        try:
            timing, value = time_fn(
                lambda m=measure, o=options: MEASURES[m](model, data, **o),
                ctx.device,
                repeats=1,
                warmup=0,
            )
        except Exception as exc:  # noqa: BLE001
            rows.append(failed_row(TOPIC_COST, f"{name}: {label}", exc))
            continue
        row = speed_row(
            TOPIC_COST,
            f"{name}: {label} in gradients",
            timing,
            grad,
            notes=f"float32, N = {data[0].shape[0]}, one run",
            extra={"value": float(value) if np.isscalar(value) else str(value)},
        )
        # A cost, not a speed-up: no target, so no verdict.
        row.ratio, row.ratio_def, row.passed = timing.median / grad.median, "ours/ref", None
        rows.append(row)
    return rows
