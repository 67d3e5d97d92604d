"""The study's tables joined on run identity: runs.csv, history.csv, mean ± std over seeds.

Every row carries its ``run_id`` and is built from the files that recorded that id (see
:mod:`flatness.analysis.integrity`), never from the position of two lists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from flatness.suite import AXES, ORIGINAL

#: Outcome columns of runs.csv (DESIGN.md contract 2), taken from each run's metrics.json.
OUTCOMES = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "gap_loss",
    "gap_acc",
    "epochs",
    "steps",
    "wall_time_s",
    "status",
    "stopped_by",
)


def _metrics_of(metrics: Mapping[str, Mapping[str, Any]], run_id: str) -> Mapping[str, Any]:
    if run_id not in metrics:
        raise KeyError(f"no metrics.json recorded for run {run_id!r}")
    m = metrics[run_id]
    if m.get("run_id", run_id) != run_id:  # a dict keyed by one id holding another run's file
        raise ValueError(f"metrics filed under {run_id!r} record run {m['run_id']!r}")
    return m


def runs_table(
    runs: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    long: pd.DataFrame,
) -> pd.DataFrame:
    """One row per run: the grid axes, the outcomes, one column per measure (original model).

    ``runs``: dicts with ``run_id`` and the grid axes; ``metrics``: run id → that run's
    metrics.json; ``long``: the long measure table. Every column of a row is looked up by the
    row's run id. Measure columns follow the order of first appearance.
    """
    rows = []
    for r in runs:
        m = _metrics_of(metrics, r["run_id"])
        rows.append({**dict(r), **{k: m.get(k, math.nan) for k in OUTCOMES}})
    table = pd.DataFrame(rows, columns=["run_id", *AXES, *OUTCOMES])
    original = long[long["variant"] == ORIGINAL]
    labels = list(dict.fromkeys(long["measure"]))
    wide = original.pivot_table(index="run_id", columns="measure", values="value", dropna=False)
    wide = wide.reindex(index=table["run_id"], columns=labels)
    for label in labels:
        table[label] = wide[label].to_numpy(dtype=float)
    return table


def history_table(
    runs: Sequence[Mapping[str, Any]], metrics: Mapping[str, Mapping[str, Any]]
) -> pd.DataFrame:
    """Training curves in long form: run id, grid axes, then one row per history record.

    ``history`` in metrics.json may be a list of per-epoch dicts or a dict of equal-length lists.
    A history key that clashes with a grid axis (the trainer's per-epoch ``lr``, the scaled and
    scheduled rate) is renamed ``epoch_<key>``. Besides the record, each row carries the run's
    ``batches_per_epoch`` and the cumulative ``step`` at the end of that epoch, so a curve can be
    read against optimizer steps as well as epochs.
    """
    frames = []
    for r in runs:
        m = _metrics_of(metrics, r["run_id"])
        frame = pd.DataFrame(m.get("history") or [])
        if frame.empty:
            continue
        frame = frame.rename(
            columns={k: f"epoch_{k}" for k in frame.columns if k in ("run_id", *AXES)}
        )
        if "epoch" not in frame:
            frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
        per_epoch = m.get("batches_per_epoch")
        frame["batches_per_epoch"] = per_epoch if per_epoch is not None else math.nan
        frame["step"] = frame["epoch"] * frame["batches_per_epoch"]
        for key in reversed(["run_id", *AXES]):
            frame.insert(0, key, r[key])
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run_id", *AXES, "epoch"])
    return pd.concat(frames, ignore_index=True)


def measurement_se(long: pd.DataFrame) -> pd.DataFrame:
    """run_id × measure → the measurement's own standard error on the original model:
    √(data_se² + seed_sd²) (the spread over data folds and measure seeds, ``measure.error_bars``);
    NaN where error bars were off or not computable."""
    orig = long[long["variant"] == "original"]
    if "data_se" not in orig.columns:
        return pd.DataFrame(index=pd.Index([], name="run_id"))
    se = np.sqrt(orig["data_se"].astype(float) ** 2 + orig["seed_sd"].astype(float) ** 2)
    return orig.assign(se=se).pivot_table(
        index="run_id", columns="measure", values="se", aggfunc="first", dropna=False
    )


def seed_summary(
    runs: pd.DataFrame, measures: Sequence[str], long: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Mean and std over seeds of the outcomes and measures, per setting of the other axes.

    One row per (dataset, model, optimizer, regularizer, batch_size, lr); columns ``<col>_mean``
    and ``<col>_std`` (sample std, NaN for one seed) and ``seeds`` (runs that did not diverge).
    With the long measure table of a study that has error bars, also ``<measure>_meas_se``: the
    measurement error of the mean, √(Σ se_i²)/k over its k runs (joined by run id), beside the
    seed std it should be small against.
    """
    keys = [a for a in AXES if a != "seed"]
    values = ["train_loss", "test_loss", "train_acc", "test_acc", "gap_loss", "gap_acc", "epochs"]
    values += [m for m in measures if m not in values]
    ok = runs[runs["status"] == "ok"]
    grouped = ok.groupby(keys, sort=True, dropna=False)[values]
    mean, std = grouped.mean().add_suffix("_mean"), grouped.std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out = out[[f"{v}_{s}" for v in values for s in ("mean", "std")]]
    se = measurement_se(long) if long is not None else pd.DataFrame()
    with_se = [m for m in measures if m in se.columns and se[m].notna().any()]
    if with_se:
        err = ok[["run_id", *keys]].join(se[with_se] ** 2, on="run_id")
        g = err.groupby(keys, sort=True, dropna=False)[with_se]
        meas = (np.sqrt(g.sum(min_count=1)) / g.count()).add_suffix("_meas_se")
        out = out.join(meas)
    out.insert(0, "seeds", grouped.size())
    return out.reset_index()


def markdown_tables(tables: Mapping[str, pd.DataFrame]) -> str:
    """Several tables as Markdown sections (``floatfmt .4g``)."""
    parts = []
    for title, df in tables.items():
        body = df.to_markdown(index=False, floatfmt=".4g") if not df.empty else "(empty)"
        parts.append(f"## {title}\n\n{body}\n")
    return "\n".join(parts)
