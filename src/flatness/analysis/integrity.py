"""Reading a study's per-run files back by identity, and the checks a scientist would make.

Each per-run file records the run it belongs to (``metrics.json``: ``run_id`` and the grid
``axes``; ``measures.json``: ``run_id`` on every row); the reader refuses a file whose recorded id
differs from the folder it sits in (``results/runs/<run_id>/``), and every join downstream is on
that id. :func:`check_study` then verifies, per run, what can be recomputed independently of the
trainer's own bookkeeping: the recorded axes give the run's id and match its grid point and its
resolved config; ``steps ÷ epochs`` equals ⌈N_train / batch size⌉; the last history record is the
final metrics. A violation raises :class:`StudyIntegrityError` naming every offending run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from flatness.suite import AXES, ERROR_COLUMNS, make_run_id

#: Outcomes that the last history record must reproduce exactly.
FINAL_FROM_HISTORY = ("train_loss", "test_loss", "train_acc", "test_acc")
_MEASURE_NUMERIC = ["factor", "value", "stderr", "seconds"]
# The numeric error-bar columns: all-null in JSON when error bars are off.
_ERROR_NUMERIC = [c for c in ERROR_COLUMNS if c != "error_note"]


class StudyIntegrityError(ValueError):
    """A per-run file that belongs to another run, or a run whose numbers contradict each other."""


def run_id_of(path: str | Path) -> str:
    """The run a per-run file belongs to by its place: ``results/runs/<run_id>/<file>``, or
    deeper (``results/runs/<run_id>/epochs/epoch4.json``); the parent folder elsewhere."""
    parts = Path(path).parts
    if "runs" in parts[:-2]:
        return parts[len(parts) - 1 - parts[::-1].index("runs") + 1]
    return Path(path).parent.name


def read_per_run(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The rows of several per-run tables (``.json`` records or ``.csv``), concatenated; each
    file's rows must all record the run its path names (a file under another run is refused)."""
    frames = []
    for path in paths:
        if str(path).endswith(".csv"):
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        else:
            frame = pd.DataFrame(json.loads(Path(path).read_text()))
        where = run_id_of(path)
        wrong = sorted(set(frame.get("run_id", pd.Series([None]))) - {where}, key=str)
        if frame.empty or wrong:
            raise StudyIntegrityError(
                f"{path} sits under run {where!r} but its rows record {wrong or 'no rows'}"
            )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def read_metrics(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """run id → metrics.json, keyed by the id each file records (checked against its folder)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        m = json.loads(Path(path).read_text())
        recorded, where = m.get("run_id"), run_id_of(path)
        if recorded is None:
            raise StudyIntegrityError(
                f"{path} records no run_id (written before runs recorded their identity); "
                "retrain it: delete the file and rerun"
            )
        if recorded != where:
            raise StudyIntegrityError(f"{path} records run {recorded!r} but sits under {where!r}")
        if recorded in out:
            raise StudyIntegrityError(f"two metrics files record run {recorded!r}")
        out[recorded] = m
    return out


def read_measures(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The long measure table of several measures.json, each row's run id checked against its file.

    ``json``, not ``pd.read_json``, which guesses dtypes (dates) from the values; null → NaN.
    """
    long = read_per_run(paths)
    numeric = _MEASURE_NUMERIC + [c for c in _ERROR_NUMERIC if c in long.columns]
    long[numeric] = long[numeric].apply(pd.to_numeric)
    return long


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def run_problems(run: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    """What is inconsistent about one run; ``run`` is its grid row (``run_id`` + axes)."""
    rid, problems = run["run_id"], []
    if metrics.get("run_id") != rid:
        problems.append(f"metrics.json records run {metrics.get('run_id')!r}")
    axes = metrics.get("axes") or {}
    if set(axes) != set(AXES):
        problems.append(f"metrics.json records axes {sorted(axes)}, expected {list(AXES)}")
    else:
        if make_run_id(axes) != rid:
            problems.append(f"its recorded axes give the id {make_run_id(axes)!r}")
        differ = [a for a in AXES if not _same_value(axes[a], run[a])]
        if differ:
            problems.append(f"recorded axes differ from its grid point in {differ}")
        cfg = (metrics.get("provenance") or {}).get("config") or {}
        resolved = {
            "batch_size": cfg.get("batch_size"),
            "seed": cfg.get("seed"),
            "lr": (cfg.get("optimizer") or {}).get("lr"),
        }
        differ = [k for k, v in resolved.items() if not _same_value(v, axes[k])]
        if differ:
            problems.append(f"the config it was trained with differs from its axes in {differ}")
    epochs, steps = metrics.get("epochs"), metrics.get("steps")
    per_epoch, n_train = metrics.get("batches_per_epoch"), metrics.get("n_train")
    batch = run.get("batch_size")
    if None in (epochs, steps, per_epoch, n_train):
        problems.append("metrics.json lacks epochs, steps, batches_per_epoch or n_train")
    elif per_epoch != math.ceil(n_train / batch):
        problems.append(
            f"{per_epoch} batches per epoch, but ⌈{n_train} samples / batch {batch}⌉ = "
            f"{math.ceil(n_train / batch)}"
        )
    elif metrics.get("status") == "ok" and steps != epochs * per_epoch:
        problems.append(
            f"{steps} steps in {epochs} epochs of {per_epoch} batches (expected "
            f"{epochs * per_epoch})"
        )
    history = metrics.get("history") or []
    if metrics.get("status") == "ok":
        if len(history) != epochs or (history and history[-1].get("epoch") != epochs):
            problems.append(f"{len(history)} history records for {epochs} epochs")
        elif history:
            differ = [
                k for k in FINAL_FROM_HISTORY if not _same_value(history[-1].get(k), metrics.get(k))
            ]
            if differ:
                problems.append(f"the last history record differs from the final {differ}")
    return problems


def check_study(
    runs: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]],
    long: pd.DataFrame | None = None,
) -> None:
    """Raise :class:`StudyIntegrityError` listing every run whose files disagree (see module doc).

    ``runs``: the grid rows (``run_id`` + axes); ``metrics``: run id → metrics.json as returned by
    :func:`read_metrics`; ``long``: the long measure table (every run must have rows, no others).
    """
    ids = [r["run_id"] for r in runs]
    lines = []
    missing, extra = sorted(set(ids) - set(metrics)), sorted(set(metrics) - set(ids))
    if missing:
        lines.append(f"no metrics.json for {missing}")
    if extra:
        lines.append(f"metrics.json of runs outside the grid: {extra}")
    for r in runs:
        if r["run_id"] in metrics:
            lines += [f"{r['run_id']}: {p}" for p in run_problems(r, metrics[r["run_id"]])]
    if long is not None:
        measured = set(long["run_id"])
        if set(ids) - measured:
            lines.append(f"no measure rows for {sorted(set(ids) - measured)}")
        if measured - set(ids):
            lines.append(f"measure rows of runs outside the grid: {sorted(measured - set(ids))}")
    if lines:
        raise StudyIntegrityError("study integrity check failed:\n  " + "\n  ".join(lines))
