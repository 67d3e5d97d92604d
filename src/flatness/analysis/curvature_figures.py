"""Report figures on the curvature of small- vs large-batch solutions, from tidy tables.

- :func:`layer_profile_figure`: the per-layer measures (:func:`flatness.measures.layer_profile`),
  one panel per measure, one line per run across the weight layers.
- :func:`spectrum_figure`: the Hessian's spectral density
  (:func:`flatness.measures.hessian_spectrum` → :func:`flatness.measures.spectrum_table`), one
  line per run.
- :func:`trajectory_figure`: measures taken on weights kept at chosen epochs, against the epoch.

Each takes its table (a ``run_id`` column) and the runs table (one row per run, with ``run_id``,
``batch_size``, ``regularizer``, ``seed``, ``status``), joins them **by run id**, writes a PNG at
``path`` and returns the matplotlib ``Figure`` (closed in pyplot, still inspectable). Colour =
batch size (blue the smallest, red the largest; a colour map for more than two), line style =
regulariser when there is more than one; each run's line carries its run id as ``gid`` and a
label naming its batch size (and regulariser), which the legend shows once per group. Runs whose
status is not ``"ok"``, and table rows whose run id is not in the runs table, are skipped and
listed in a note at the bottom of the figure. A table with nothing left to plot gives a figure
that says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from flatness.plotting import log_axis, positive  # noqa: E402

#: Colours of the smallest and the largest batch size (two batch sizes in the grid).
SMALL_COLOR, LARGE_COLOR = "tab:blue", "tab:red"
#: Line styles of the regularisers, in order ("none" first, then alphabetical).
REG_STYLES = ("-", "--", ":", "-.")
#: Densities below this fraction of a panel's maximum are drawn at it (log axis).
DENSITY_FLOOR = 1e-8
#: Symlog eigenvalue axis when the runs' extents max|λ| differ by more than this many decades.
SYMLOG_DECADES = 3.0
#: How many skipped run ids the note names (the rest are counted).
NOTE_MAX_IDS = 4


# -- joining and styling -----------------------------------------------------------------------


class _Runs:
    """The runs table joined to a figure's table by run id: which runs to draw and their style."""

    def __init__(self, table: pd.DataFrame, runs: pd.DataFrame) -> None:
        if runs.empty and "run_id" not in runs.columns:  # e.g. read from an empty file
            runs = pd.DataFrame(columns=["run_id", "batch_size", "status"])
        _check_columns(runs, ("run_id", "batch_size"), "runs")
        _check_columns(table, ("run_id",), "figure's")
        if runs["run_id"].duplicated().any():
            dup = sorted(runs.loc[runs["run_id"].duplicated(), "run_id"].astype(str).unique())
            raise ValueError(f"the runs table has more than one row for run id(s) {dup}")
        info = runs.set_index("run_id")
        status = (
            info["status"].astype(str) if "status" in info else pd.Series("ok", index=info.index)
        )
        present = list(dict.fromkeys(table["run_id"]))
        self.skipped: list[str] = []
        ok_ids = []
        for rid in present:
            if rid not in info.index:
                self.skipped.append(f"{rid} (not in the runs table)")
            elif status[rid] != "ok":
                self.skipped.append(f"{rid} ({status[rid]})")
            else:
                ok_ids.append(rid)
        self.info = info.loc[ok_ids].copy()
        self.info["batch_size"] = pd.to_numeric(self.info["batch_size"])
        if "regularizer" not in self.info:
            self.info["regularizer"] = "none"
        self.info["regularizer"] = self.info["regularizer"].fillna("none").astype(str)
        self.table = table[table["run_id"].isin(ok_ids)]
        self.sizes = sorted(self.info["batch_size"].unique())
        self.regs = sorted(self.info["regularizer"].unique(), key=lambda r: (r != "none", r))

    @property
    def empty(self) -> bool:
        return self.table.empty

    def ids(self) -> list[str]:
        """The ok run ids, ordered by (regulariser, batch size, seed, run id)."""
        key = self.info.assign(
            _reg=[self.regs.index(r) for r in self.info["regularizer"]],
            _seed=self.info["seed"] if "seed" in self.info else 0,
            _id=self.info.index,
        )
        return list(key.sort_values(["_reg", "batch_size", "_seed", "_id"]).index)

    def color(self, batch_size) -> str | tuple:
        sizes = self.sizes
        if len(sizes) <= 2:
            return SMALL_COLOR if batch_size == sizes[0] else LARGE_COLOR
        cmap = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
        return tuple(cmap[sizes.index(batch_size)])

    def style(self, regularizer: str) -> str:
        return REG_STYLES[self.regs.index(regularizer) % len(REG_STYLES)]

    def group_label(self, batch_size, regularizer: str) -> str:
        b = int(batch_size) if float(batch_size).is_integer() else batch_size
        label = f"batch {b}"
        if len(self.sizes) >= 2 and batch_size in (self.sizes[0], self.sizes[-1]):
            label += " (small)" if batch_size == self.sizes[0] else " (large)"
        if len(self.regs) > 1:
            label += f", {regularizer}"
        return label

    def of(self, run_id: str) -> dict:
        """Plot keywords of a run's line: colour, style, label (by batch size), gid = run id."""
        row = self.info.loc[run_id]
        b, r = row["batch_size"], row["regularizer"]
        return {"color": self.color(b), "ls": self.style(r), "label": self.group_label(b, r),
                "gid": run_id}  # fmt: skip

    def groups(self) -> Iterable[tuple[tuple, list[str]]]:
        """((batch size, regulariser), run ids) over the groups the seeds are averaged in."""
        ids = self.ids()
        for r in self.regs:
            for b in self.sizes:
                members = [
                    i for i in ids
                    if self.info.at[i, "batch_size"] == b and self.info.at[i, "regularizer"] == r
                ]  # fmt: skip
                if members:
                    yield (b, r), members

    def note(self) -> str:
        if not self.skipped:
            return ""
        shown = ", ".join(self.skipped[:NOTE_MAX_IDS])
        more = len(self.skipped) - NOTE_MAX_IDS
        tail = f" and {more} more" if more > 0 else ""
        n = len(self.skipped)
        return f"skipped {n} run{'s' if n > 1 else ''}: {shown}{tail}"


def _panels(n: int, width: float = 4.2, height: float = 3.4, ncols_max: int = 3):
    """A figure with exactly ``n`` axes (a grid of up to ``ncols_max`` columns, spares removed)."""
    ncols = max(1, min(n, ncols_max))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.4),
                             squeeze=False)  # fmt: skip
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _legend(ax) -> None:
    """One legend entry per label (the runs of a group share one)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(list(unique.values()), list(unique.keys()), fontsize=7)


def _finish(fig, path, note: str):
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _empty(path, what: str, note: str):
    fig, (ax,) = _panels(1, width=6.0, height=3.0)
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{what}: no ok runs to plot", ha="center", va="center", fontsize=11,
            transform=ax.transAxes)  # fmt: skip
    return _finish(fig, path, note)


def _check_columns(table: pd.DataFrame, needed: Iterable[str], what: str) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"the {what} table lacks the column(s) {missing}")


def _y_log(ax, values) -> None:
    v = pd.to_numeric(pd.Series(values), errors="coerce")
    v = v[np.isfinite(v)]
    if positive(v):
        log_axis(ax)


# -- 1. per-layer profile ----------------------------------------------------------------------

def _run_and_mean_lines(ax, sub: pd.DataFrame, joined: _Runs, x: str, order: list | None = None):
    """One thin line per run of ``sub`` (value against column ``x``) and, per (batch size,
    regulariser) with two or more runs, a thick line of their mean at each ``x``."""
    for rid in joined.ids():
        g = sub[sub["run_id"] == rid].sort_values(x)
        if g.empty:
            continue
        ax.plot(g[x], g["value"], marker="o", ms=3, lw=1, alpha=0.6, **joined.of(rid))
    for (b, r), members in joined.groups():
        g = sub[sub["run_id"].isin(members)]
        n = g["run_id"].nunique()
        if n < 2:  # one seed (or none): the run's own line is the mean
            continue
        mean = g.groupby(x)["value"].mean().sort_index()
        if order is not None:
            mean = mean.reindex(order)
        ax.plot(mean.index, mean.to_numpy(float), ls=joined.style(r), lw=2.8,
                color=joined.color(b), gid=f"mean:{b}:{r}",
                label=f"{joined.group_label(b, r)}, mean of {n}")  # fmt: skip


def _joined(table: pd.DataFrame, runs: pd.DataFrame, columns, what: str, path):
    """``(joined runs, None)``, or ``(None, a figure saying there is nothing to plot)``."""
    if table.empty:
        return None, _empty(path, what, "")
    _check_columns(table, columns, what)
    joined = _Runs(table, runs)
    if joined.empty:
        return None, _empty(path, what, joined.note())
    return joined, None


LAYER_COLUMNS = ("run_id", "measure", "layer", "layer_name", "value")


def layer_profile_figure(table: pd.DataFrame, runs: pd.DataFrame, path):
    """The per-layer measures of every run: one panel per measure (in table order), x = weight
    layer index (ticks named by ``layer_name``), y = value (log when every finite value is > 0),
    one thin line per run and, per (batch size, regulariser), a thick line of the mean over its
    runs (seeds) at each layer. ``table``: the columns of :func:`flatness.measures.layer_profile`
    plus ``run_id``; NaN values (a measure that does not apply to a layer) leave gaps.
    """
    joined, nothing = _joined(table, runs, LAYER_COLUMNS, "per-layer profile", path)
    if joined is None:
        return nothing
    t = joined.table.assign(value=pd.to_numeric(joined.table["value"], errors="coerce"))
    measures = list(dict.fromkeys(t["measure"]))
    fig, axes = _panels(len(measures))
    for ax, m in zip(axes, measures, strict=True):
        sub = t[t["measure"] == m]
        layers = sorted(int(x) for x in sub["layer"].unique())
        _run_and_mean_lines(ax, sub.assign(layer=sub["layer"].astype(int)), joined, "layer",
                            layers)  # fmt: skip
        names = sub.groupby("layer")["layer_name"].agg(
            lambda s: "/".join(dict.fromkeys(str(x) for x in s))
        )
        ax.set_xticks(layers, [f"{i}: {names.get(i, '')}" for i in layers])
        ax.set_xlabel("weight layer")
        ax.set_title(m, fontsize=9)
        _y_log(ax, sub["value"])
    _legend(axes[0])
    return _finish(fig, path, joined.note())


# -- 2. spectral density -----------------------------------------------------------------------

SPECTRUM_COLUMNS = ("run_id", "eigenvalue", "density")


def _pair_list(pairs) -> list[tuple[str, str, str]]:
    """``pairs`` as (title, small run id, large run id): Pair-like objects (``small``, ``large``,
    optional ``pair_id``), (small, large) tuples, or a DataFrame with columns small, large."""
    if isinstance(pairs, pd.DataFrame):
        _check_columns(pairs, ("small", "large"), "pairs")
        pairs = pairs.to_dict("records")
    out = []
    for p in pairs:
        if isinstance(p, dict):
            small, large, pid = p["small"], p["large"], p.get("pair_id")
        elif hasattr(p, "small") and hasattr(p, "large"):
            small, large, pid = p.small, p.large, getattr(p, "pair_id", None)
        else:
            small, large = p
            pid = None
        out.append((str(pid) if pid else f"{small} vs {large}", small, large))
    return out


def _eigen_axis(ax, extents: list[float]) -> None:
    """Symlog x when the runs' extents max|λ| differ by more than :data:`SYMLOG_DECADES`."""
    ext = [e for e in extents if e > 0 and math.isfinite(e)]
    if len(ext) >= 2 and math.log10(max(ext) / min(ext)) > SYMLOG_DECADES:
        ax.set_xscale("symlog", linthresh=min(ext))


def spectrum_figure(table: pd.DataFrame, runs: pd.DataFrame, path, pairs=None):
    """The Hessian's spectral density of small- vs large-batch solutions, one line per run
    (coloured by batch size), y = density on a log axis (clipped below at
    :data:`DENSITY_FLOOR` × the panel's maximum), x = eigenvalue (symlog when the runs' extents
    max|λ| differ by more than three decades, linear threshold the smallest extent).

    Panels: one per regulariser (one panel when there is one); with ``pairs`` (Pair-like objects
    with ``small``/``large`` run ids, (small, large) tuples, or a DataFrame with columns small,
    large and optionally pair_id, e.g. from :func:`flatness.suite.batch_pairs`), one panel per
    pair with just its two runs. ``table``: ``run_id, eigenvalue, density``, each run's grid
    (:func:`flatness.measures.spectrum_table`).
    """
    joined, nothing = _joined(table, runs, SPECTRUM_COLUMNS, "Hessian spectral density", path)
    if joined is None:
        return nothing
    t = joined.table
    ok = set(joined.info.index)
    if pairs is not None:
        plist = _pair_list(pairs)
        if not plist:
            return _empty(path, "Hessian spectral density (no pairs given)", joined.note())
        panels = [(title, [i for i in (s, lg) if i in ok]) for title, s, lg in plist]
    elif len(joined.regs) > 1:
        ids = joined.ids()
        panels = [(r, [i for i in ids if joined.info.at[i, "regularizer"] == r])
                  for r in joined.regs]  # fmt: skip
    else:
        panels = [("", joined.ids())]
    fig, axes = _panels(len(panels), width=5.0, height=3.6, ncols_max=2)
    for ax, (title, ids) in zip(axes, panels, strict=True):
        curves = []
        for rid in ids:
            g = t[t["run_id"] == rid].sort_values("eigenvalue")
            if not g.empty:
                curves.append((rid, g["eigenvalue"].to_numpy(float), g["density"].to_numpy(float)))
        if not curves:
            ax.text(0.5, 0.5, "no ok run with a spectrum", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
            ax.set_title(title, fontsize=8)
            continue
        top = max(float(np.nanmax(d)) if np.isfinite(d).any() else 0.0 for _, _, d in curves)
        floor = DENSITY_FLOOR * top if top > 0 else DENSITY_FLOOR
        for rid, x, d in curves:
            ax.plot(x, np.maximum(d, floor), lw=1.2, alpha=0.8, **joined.of(rid))
        ax.set_ylim(bottom=floor)
        ax.set_yscale("log")
        _eigen_axis(ax, [float(np.nanmax(np.abs(x))) for _, x, _ in curves])
        ax.set_xlabel("eigenvalue of H")
        ax.set_ylabel("spectral density")
        ax.set_title(title, fontsize=8)
        _legend(ax)
    return _finish(fig, path, joined.note())


# -- 3. trajectories over training ---------------------------------------------------------------

TRAJECTORY_COLUMNS = ("run_id", "epoch", "measure", "value")


def _separation_epoch(sub: pd.DataFrame, small: list[str], large: list[str]) -> float | None:
    """The first epoch from which the small- and large-batch runs' value ranges (over seeds) are
    disjoint at every later common epoch; ``None`` when they never are at the last one."""
    wide = sub.pivot_table(index="epoch", columns="run_id", values="value", aggfunc="mean")
    s_cols = [c for c in small if c in wide]
    l_cols = [c for c in large if c in wide]
    if not s_cols or not l_cols:
        return None
    a, b = wide[s_cols], wide[l_cols]
    common = a.notna().any(axis=1) & b.notna().any(axis=1)
    a, b = a[common], b[common]
    apart = (a.max(axis=1) < b.min(axis=1)) | (b.max(axis=1) < a.min(axis=1))
    if apart.empty or not apart.iloc[-1]:
        return None
    together = apart[~apart]
    later = apart.index if together.empty else apart.index[apart.index > together.index[-1]]
    return float(later[0])


def trajectory_figure(table: pd.DataFrame, runs: pd.DataFrame, path):
    """Measures along training: one panel per measure (in table order), x = epoch (log; symlog
    with a linear part up to 1 when epoch 0 is present), y = value (log when every finite value
    is > 0), one line with markers per run coloured by batch size, a thick line of the mean over
    seeds per (batch size, regulariser), and a dotted vertical line at the epoch from which the
    smallest- and largest-batch runs' ranges over seeds stay apart (per regulariser).
    ``table``: ``run_id, epoch, measure, value`` (and ``note``).
    """
    joined, nothing = _joined(table, runs, TRAJECTORY_COLUMNS, "measures along training", path)
    if joined is None:
        return nothing
    t = joined.table.assign(
        value=pd.to_numeric(joined.table["value"], errors="coerce"),
        epoch=pd.to_numeric(joined.table["epoch"]),
    )
    measures = list(dict.fromkeys(t["measure"]))
    fig, axes = _panels(len(measures))
    for ax, m in zip(axes, measures, strict=True):
        sub = t[t["measure"] == m]
        _run_and_mean_lines(ax, sub, joined, "epoch")
        if len(joined.sizes) >= 2:
            for k, r in enumerate(joined.regs):
                by = dict(joined.groups())
                small = by.get((joined.sizes[0], r), [])
                large = by.get((joined.sizes[-1], r), [])
                e = _separation_epoch(sub, small, large)
                if e is not None:
                    what = f" ({r})" if len(joined.regs) > 1 else ""
                    ax.axvline(e, color="0.4", ls=":", lw=1, gid=f"separation:{r}")
                    ax.annotate(f"apart from {e:g}{what}", (e, 1.0),
                                xycoords=("data", "axes fraction"), xytext=(2, -2 - 8 * k),
                                textcoords="offset points", ha="left", va="top", fontsize=6,
                                color="0.3")  # fmt: skip
        if (sub["epoch"] > 0).all():
            log_axis(ax, "x")
        else:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("epoch")
        ax.set_title(m, fontsize=9)
        _y_log(ax, sub["value"])
    _legend(axes[0])
    return _finish(fig, path, joined.note())
