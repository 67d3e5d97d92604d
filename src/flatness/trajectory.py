"""The workflow's view of curvature along training and per-layer profiles (torch-free).

The Snakefile reads these at parse time, so nothing here imports torch: :func:`check_curvature`
validates the ``trajectory`` / ``layer_profile`` sections against the measure suite before any
job runs, and :func:`epoch_measure_config` is the ``measure`` section that a kept model is
measured with (the chosen labels, the configured options and samples, no copies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Columns of the trajectory table, in order.
TRAJECTORY_COLUMNS = (
    "run_id",
    "epoch",
    "epoch_reached",
    "source",
    "measure",
    "function",
    "value",
    "seconds",
    "note",
)


def trajectory_labels(config: Mapping[str, Any]) -> list[str]:
    """The measure labels taken along training (all of measure.measures when none are named)."""
    labels = [m.get("label") or m["function"] for m in config["measure"]["measures"]]
    chosen = list(config["trajectory"]["measures"]) or labels
    unknown = [c for c in chosen if c not in labels]
    if unknown:
        raise ValueError(
            f"trajectory.measures names {unknown}, which are not labels of measure.measures "
            f"(known: {labels})"
        )
    return chosen


def check_curvature(config: Mapping[str, Any]) -> None:
    """``ValueError`` naming the key when a trajectory setting cannot run."""
    trajectory_labels(config)
    epochs = config["trajectory"]["epochs"]
    cap = config.get("training", {}).get("epochs")
    if cap is not None and epochs and max(epochs) > int(cap):
        raise ValueError(
            f"trajectory.epochs has {max(epochs)} > training.epochs = {cap}: no run trains "
            "that long"
        )


def epoch_measure_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``measure`` section a kept model is measured with: the trajectory's labels only, on
    the original weights (no layer-wise, Dinh or random-α copies, no error bars)."""
    measure = dict(config["measure"])
    chosen = set(trajectory_labels(config))
    measure["measures"] = [
        m for m in measure["measures"] if (m.get("label") or m["function"]) in chosen
    ]
    measure["layerwise"] = {**measure.get("layerwise", {}), "copies": 0}
    measure["dinh_alpha"] = []
    measure["random_alpha"] = {**measure.get("random_alpha", {}), "copies": 0}
    if "error_bars" in measure:
        measure["error_bars"] = {"folds": 0, "seeds": 1}
    return measure
