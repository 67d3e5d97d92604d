"""The curvature report figures (flatness.analysis.curvature_figures) on synthetic tables.

Two batch sizes × two seeds (plus a diverged run), run ids like the study's. Each figure must
join its table to the runs table by run id: the runs table is shuffled, and every line (its
``gid`` is the run id) must still carry its own run's values, batch-size label and colour.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import same_color
from matplotlib.image import imread

from flatness.analysis.curvature_figures import (
    DENSITY_FLOOR,
    LARGE_COLOR,
    SMALL_COLOR,
    layer_profile_figure,
    spectrum_figure,
    trajectory_figure,
)

SIZES = (32, 1024)
SEEDS = (0, 1)
DIVERGED = "mnist5k-mlp-sgd-none-bs32-lr0.05-s2"


def run_id(bs, seed, reg="none") -> str:
    return f"mnist5k-mlp-sgd-{reg}-bs{bs}-lr0.05-s{seed}"


def make_runs(regs=("none",), shuffle_seed=0) -> pd.DataFrame:
    rows = [
        dict(
            run_id=run_id(bs, s, r),
            batch_size=bs,
            regularizer=r,
            seed=s,
            status="ok",
            test_acc=0.9 - 0.05 * (bs > 100),
        )  # fmt: skip
        for r in regs
        for bs in SIZES
        for s in SEEDS
    ]
    rows.append(dict(run_id=DIVERGED, batch_size=32, regularizer="none", seed=2,
                     status="diverged", test_acc=np.nan))  # fmt: skip
    # shuffled: a join by position would give lines the wrong batch size
    return pd.DataFrame(rows).sample(frac=1, random_state=shuffle_seed).reset_index(drop=True)


def ok_ids(runs) -> set[str]:
    return set(runs.loc[runs["status"] == "ok", "run_id"])


def run_lines(ax, runs) -> dict:
    ids = ok_ids(runs) | {DIVERGED}
    return {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid() in ids}


def assert_png(path) -> None:
    assert path.exists() and path.stat().st_size > 5000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas


def assert_styled_by_batch(lines: dict, runs) -> None:
    info = runs.set_index("run_id")
    for rid, ln in lines.items():
        bs = int(info.at[rid, "batch_size"])
        assert ln.get_label().startswith(f"batch {bs} ")
        assert ("(small)" in ln.get_label()) == (bs == min(SIZES))
        assert same_color(ln.get_color(), SMALL_COLOR if bs == min(SIZES) else LARGE_COLOR)


def figure_text(fig) -> str:
    texts = list(fig.texts) + [t for ax in fig.axes for t in ax.texts]
    return " ".join(t.get_text() for t in texts)


# -- tables ------------------------------------------------------------------------------------

MEASURES = ("hessian_max_eigenvalue", "hessian_trace", "relative_flatness")
LAYER_NAMES = ("0", "2", "4")


def layer_table(runs, measures=MEASURES) -> pd.DataFrame:
    rows = []
    for rid, bs, s, r in runs[["run_id", "batch_size", "seed", "regularizer"]].itertuples(
        index=False
    ):
        for k, m in enumerate(measures):
            for layer, name in enumerate(LAYER_NAMES):
                value = (k + 1) * (layer + 1) * (10.0 if bs > 100 else 1.0) * (1 + 0.1 * s)
                value *= 2.0 if r != "none" else 1.0
                if rid == DIVERGED:
                    value = np.inf
                rows.append(dict(run_id=rid, measure=m, layer=layer, layer_name=name,
                                 n_params=10 * (layer + 1), value=value, note=""))  # fmt: skip
    # rows in an order unrelated to the runs table's
    return pd.DataFrame(rows).sample(frac=1, random_state=3).reset_index(drop=True)


def spectrum_rows(runs, scale_large=10.0) -> pd.DataFrame:
    rows = []
    for rid, bs, s in runs[["run_id", "batch_size", "seed"]].itertuples(index=False):
        top = (scale_large if bs > 100 else 1.0) * (1 + 0.2 * s)
        x = np.linspace(-0.1 * top, 1.1 * top, 120)
        d = np.exp(-0.5 * (x / (0.02 * top)) ** 2) + 0.1 * np.exp(
            -0.5 * ((x - top) / (0.02 * top)) ** 2
        )
        rows.append(pd.DataFrame(dict(run_id=rid, eigenvalue=x, density=d / d.sum())))
    return pd.concat(rows, ignore_index=True).sample(frac=1, random_state=5)


EPOCHS = (1, 2, 5, 10, 20)


def trajectory_rows(runs, epochs=EPOCHS) -> pd.DataFrame:
    rows = []
    for rid, bs, s in runs[["run_id", "batch_size", "seed"]].itertuples(index=False):
        for e in epochs:
            # the groups overlap up to epoch 2 and stay apart from epoch 5 on
            grow = 1.0 if e <= 2 else (e if bs > 100 else 0.5)
            for m, f in (("hessian_trace", 1.0), ("relative_flatness", 3.0)):
                rows.append(dict(run_id=rid, epoch=e, measure=m,
                                 value=f * grow * (1 + 0.05 * s), note=""))  # fmt: skip
    return pd.DataFrame(rows).sample(frac=1, random_state=7).reset_index(drop=True)


# -- 1. per-layer profile ----------------------------------------------------------------------


def test_layer_profile_figure(tmp_path):
    runs = make_runs()
    table = layer_table(runs)
    path = tmp_path / "profile.png"
    fig = layer_profile_figure(table, runs, path)
    assert_png(path)
    assert len(fig.axes) == len(MEASURES)
    chosen = run_id(1024, 1)
    # panels follow the order of the (ok runs') rows
    in_table_order = list(dict.fromkeys(table.loc[table.run_id != DIVERGED, "measure"]))
    assert sorted(in_table_order) == sorted(MEASURES)
    for ax, m in zip(fig.axes, in_table_order, strict=True):
        assert ax.get_title() == m
        lines = run_lines(ax, runs)
        assert set(lines) == ok_ids(runs)  # the diverged run is not drawn
        assert_styled_by_batch(lines, runs)
        want = table[(table.run_id == chosen) & (table.measure == m)].sort_values("layer")
        np.testing.assert_array_equal(lines[chosen].get_xdata(), want["layer"])
        np.testing.assert_allclose(lines[chosen].get_ydata(), want["value"])
        # the mean over seeds per batch size
        mean = {ln.get_gid(): ln for ln in ax.get_lines() if str(ln.get_gid()).startswith("mean")}
        assert len(mean) == len(SIZES)
        small = table[(table.measure == m) & table.run_id.isin([run_id(32, s) for s in SEEDS])]
        np.testing.assert_allclose(
            mean["mean:32:none"].get_ydata(), small.groupby("layer")["value"].mean()
        )
        assert mean["mean:32:none"].get_linewidth() > lines[run_id(32, 0)].get_linewidth()
        assert [t.get_text() for t in ax.get_xticklabels()] == [
            f"{i}: {name}" for i, name in enumerate(LAYER_NAMES)
        ]
        assert ax.get_yscale() == "log"
    assert DIVERGED in figure_text(fig) and "diverged" in figure_text(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "batch 32 (small)" in legend and "batch 1024 (large)" in legend


def test_layer_profile_join_survives_reordering(tmp_path):
    """Different shuffles of the runs table draw the same lines."""
    table = layer_table(make_runs())
    a = layer_profile_figure(table, make_runs(shuffle_seed=1), tmp_path / "a.png")
    b = layer_profile_figure(table, make_runs(shuffle_seed=2), tmp_path / "b.png")
    for ax_a, ax_b in zip(a.axes, b.axes, strict=True):
        la, lb = run_lines(ax_a, make_runs()), run_lines(ax_b, make_runs())
        for rid in la:
            np.testing.assert_array_equal(la[rid].get_ydata(), lb[rid].get_ydata())
            assert la[rid].get_label() == lb[rid].get_label()


def test_layer_profile_linear_axis_nan_and_regularizers(tmp_path):
    runs = make_runs(regs=("none", "sam"))
    table = layer_table(runs, measures=("hessian_max_eigenvalue", "relative_flatness"))
    neg = table["measure"] == "hessian_max_eigenvalue"
    table.loc[neg & (table["layer"] == 0), "value"] *= -1  # a negative λ_max: linear axis
    na = (table["measure"] == "relative_flatness") & (table["layer"] == 1)
    table.loc[na, "value"] = np.nan  # not applicable to that layer
    table.loc[na, "note"] = "relative flatness needs an nn.Linear layer"
    fig = layer_profile_figure(table, runs, tmp_path / "p.png")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert axes["hessian_max_eigenvalue"].get_yscale() == "linear"
    assert axes["relative_flatness"].get_yscale() == "log"
    lines = run_lines(axes["relative_flatness"], runs)
    assert len(lines) == 8
    rid = run_id(32, 0, "sam")
    assert lines[rid].get_label() == "batch 32 (small), sam"
    assert lines[rid].get_linestyle() != lines[run_id(32, 0)].get_linestyle()
    assert np.isnan(lines[rid].get_ydata()[1])


# -- 2. spectral density -----------------------------------------------------------------------


def test_spectrum_figure(tmp_path):
    runs = make_runs()
    table = spectrum_rows(runs)
    path = tmp_path / "spectrum.png"
    fig = spectrum_figure(table, runs, path)
    assert_png(path)
    assert len(fig.axes) == 1
    (ax,) = fig.axes
    lines = run_lines(ax, runs)
    assert set(lines) == ok_ids(runs)
    assert_styled_by_batch(lines, runs)
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
    ok = table[table.run_id.isin(ok_ids(runs))]
    floor = DENSITY_FLOOR * ok["density"].max()
    chosen = run_id(1024, 0)
    want = table[table.run_id == chosen].sort_values("eigenvalue")
    np.testing.assert_allclose(lines[chosen].get_xdata(), want["eigenvalue"])
    np.testing.assert_allclose(lines[chosen].get_ydata(), np.maximum(want["density"], floor))
    assert min(ln.get_ydata().min() for ln in lines.values()) >= floor
    assert DIVERGED in figure_text(fig)


def test_spectrum_figure_panels_pairs_and_symlog(tmp_path):
    runs = make_runs(regs=("none", "sam"))
    table = spectrum_rows(runs, scale_large=1e4)  # extents 4 decades apart: symlog
    fig = spectrum_figure(table, runs, tmp_path / "regs.png")
    assert len(fig.axes) == 2  # one per regulariser
    for ax, reg in zip(fig.axes, ("none", "sam"), strict=True):
        assert ax.get_title() == reg
        lines = run_lines(ax, runs)
        assert set(lines) == {run_id(b, s, reg) for b in SIZES for s in SEEDS}
        assert_styled_by_batch(lines, runs)
        assert ax.get_xscale() == "symlog"
    pairs = pd.DataFrame(
        dict(pair_id=[f"pair-s{s}" for s in SEEDS],
             small=[run_id(32, s) for s in SEEDS], large=[run_id(1024, s) for s in SEEDS])
    )  # fmt: skip
    fig = spectrum_figure(table, runs, tmp_path / "pairs.png", pairs=pairs)
    assert len(fig.axes) == 2
    for ax, s in zip(fig.axes, SEEDS, strict=True):
        assert ax.get_title() == f"pair-s{s}"
        assert set(run_lines(ax, runs)) == {run_id(32, s), run_id(1024, s)}
    # tuples work too; a pair with the diverged run draws only its ok partner
    fig = spectrum_figure(table, runs, tmp_path / "t.png", pairs=[(DIVERGED, run_id(1024, 0))])
    assert set(run_lines(fig.axes[0], runs)) == {run_id(1024, 0)}


# -- 3. trajectories ---------------------------------------------------------------------------


def test_trajectory_figure(tmp_path):
    runs = make_runs()
    table = trajectory_rows(runs)
    path = tmp_path / "trajectory.png"
    fig = trajectory_figure(table, runs, path)
    assert_png(path)
    measures = list(dict.fromkeys(table.loc[table.run_id != DIVERGED, "measure"]))
    assert sorted(measures) == ["hessian_trace", "relative_flatness"]
    assert len(fig.axes) == len(measures)
    chosen = run_id(32, 1)
    for ax, m in zip(fig.axes, measures, strict=True):
        assert ax.get_title() == m
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        lines = run_lines(ax, runs)
        assert set(lines) == ok_ids(runs)
        assert_styled_by_batch(lines, runs)
        assert lines[chosen].get_marker() == "o"
        want = table[(table.run_id == chosen) & (table.measure == m)].sort_values("epoch")
        np.testing.assert_array_equal(lines[chosen].get_xdata(), want["epoch"])
        np.testing.assert_allclose(lines[chosen].get_ydata(), want["value"])
        sep = [ln for ln in ax.get_lines() if ln.get_gid() == "separation:none"]
        assert len(sep) == 1 and list(sep[0].get_xdata()) == [5, 5]
    assert DIVERGED in figure_text(fig)
    assert "apart from 5" in figure_text(fig)


def test_trajectory_epoch_zero_uses_symlog(tmp_path):
    runs = make_runs()
    fig = trajectory_figure(trajectory_rows(runs, epochs=(0, 1, 10)), runs, tmp_path / "z.png")
    assert all(ax.get_xscale() == "symlog" for ax in fig.axes)


# -- skipped and empty ---------------------------------------------------------------------------


def test_run_missing_from_runs_table_is_skipped(tmp_path):
    runs = make_runs()
    table = layer_table(runs)
    stray = table[table.run_id == run_id(32, 0)].assign(
        run_id="mnist5k-mlp-sgd-none-bs64-lr0.05-s0"
    )
    fig = layer_profile_figure(pd.concat([table, stray]), runs, tmp_path / "s.png")
    assert "bs64" in figure_text(fig) and "not in the runs table" in figure_text(fig)
    assert set(run_lines(fig.axes[0], runs)) == ok_ids(runs)


@pytest.mark.parametrize(
    "fn, make",
    [
        (layer_profile_figure, layer_table),
        (spectrum_figure, spectrum_rows),
        (trajectory_figure, trajectory_rows),
    ],  # fmt: skip
)
def test_empty_tables_give_a_figure(tmp_path, fn, make):
    runs = make_runs()
    table = make(runs)
    empty = fn(table.iloc[:0], runs, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").exists()
    assert "no ok runs" in figure_text(empty)
    only_diverged = fn(table[table.run_id == DIVERGED], runs, tmp_path / "div.png")
    assert "no ok runs" in figure_text(only_diverged) and DIVERGED in figure_text(only_diverged)
    assert "no ok runs" in figure_text(fn(pd.DataFrame(), runs, tmp_path / "bare.png"))
    assert "no ok runs" in figure_text(fn(table, pd.DataFrame(), tmp_path / "noruns.png"))
    all_failed = runs.assign(status="diverged")
    assert "no ok runs" in figure_text(fn(table, all_failed, tmp_path / "none.png"))
