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
