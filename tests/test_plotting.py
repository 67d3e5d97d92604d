"""Figure helpers: log-axis tick labels never overprint, whatever range the data span."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from flatness.plotting import log_axis, positive  # noqa: E402


def visible_labels(ax, axis):
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    target = getattr(ax, f"{axis}axis")
    ticks = target.get_major_ticks() + target.get_minor_ticks()
    labels = [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text()]
    lo, hi = getattr(ax, f"get_{axis}lim")()
    inside = [
        lab for lab, t in zip(labels, [t for t in ticks if t.label1 in labels], strict=True)
        if lo <= t.get_loc() <= hi
    ]  # fmt: skip
    return [(lab.get_text(), lab.get_window_extent(renderer)) for lab in inside]


@pytest.mark.parametrize(
    "lo, hi", [(2.5, 6.0), (3.0, 4.2), (0.8, 30.0), (0.2, 9.0), (1e-3, 1e4), (95, 910)]
)
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("size", [(3.4, 2.9), (1.5, 1.3)])
def test_log_axis_labels_do_not_overlap_and_are_present(lo, hi, axis, size):
    fig, ax = plt.subplots(figsize=size)
    ax.plot([lo, hi], [lo, hi], "o")
    log_axis(ax, axis)
    labels = visible_labels(ax, axis)
    assert len(labels) >= 2, (lo, hi, [t for t, _ in labels])
    boxes = sorted((b for _, b in labels), key=lambda b: b.x0 if axis == "x" else b.y0)
    for a, b in zip(boxes, boxes[1:], strict=False):
        gap = (b.x0 - a.x1) if axis == "x" else (b.y0 - a.y1)
        assert gap > 0, f"labels overlap on [{lo}, {hi}]: {[t for t, _ in labels]}"
    plt.close(fig)


def test_the_old_minor_labels_did_overlap():
    # The failure the helper fixes: matplotlib's default minor labels on a sub-decade span, in a
    # panel as narrow as one of a 3-column grid of small multiples.
    fig, ax = plt.subplots(figsize=(1.5, 1.3))
    ax.plot([2.5, 6.0], [1, 2], "o")
    ax.set_xscale("log")
    labels = visible_labels(ax, "x")
    boxes = sorted((b for _, b in labels), key=lambda b: b.x0)
    assert min(b.x0 - a.x1 for a, b in zip(boxes, boxes[1:], strict=False)) <= 0, [t for t, _ in labels]
    plt.close(fig)


def test_positive():
    assert positive([1.0, 2.0, float("nan")]) and not positive([1.0, 0.0]) and not positive([])


def test_measures_by_batch_draws_each_runs_own_interval(tmp_path):
    import numpy as np
    import pandas as pd

    from flatness.plotting import measures_by_batch

    runs = pd.DataFrame(
        [dict(run_id=f"r-{reg}-bs{bs}-s{s}", regularizer=reg, batch_size=bs, seed=s,
              status="ok", m=float(bs + s + 100 * (reg == "sam"))) for reg in ("none", "sam")
         for bs in (32, 1024)
         for s in (0, 1)]  # fmt: skip
    )
    runs.loc[0, "status"] = "diverged"
    long = pd.DataFrame(
        [dict(run_id=r.run_id, measure="m", variant=v, value=r.m,
              ci_low=r.m - 1 - r.seed, ci_high=r.m + 2) for r in runs.itertuples()
         for v in ("original", "dinh_alpha10")]  # fmt: skip
    ).sample(frac=1, random_state=0)  # shuffled: the bars must follow run ids, not positions
    fig = measures_by_batch(runs.sample(frac=1, random_state=1), long, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 5000
    ax = fig.axes[0]
    points = {}
    for container in ax.containers:  # one errorbar container per run
        (x,), (y,) = container.lines[0].get_data()
        segs = container.lines[2][0].get_segments()
        points[float(y)] = (segs[0][0][1], segs[0][1][1])
    ok = runs[runs.status == "ok"]
    assert len(points) == len(ok) == 7
    for r in ok.itertuples():
        lo, hi = points[r.m]
        assert np.isclose(lo, r.m - 1 - r.seed) and np.isclose(hi, r.m + 2)
