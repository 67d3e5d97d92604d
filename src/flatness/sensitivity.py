"""How much a measure's value depends on its own settings: an optimizer budget, the number of
training samples it sees. Where our numbers and a paper's differ, this shows whether the measure
itself moves by that much when only its settings change (the model stays the same).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

COLUMNS = ("run_id", "function", "setting", "value_of_setting", "n_samples", "value", "seconds")


def measure_sensitivity(
    model,
    train,
    run_id: str,
    function: str,
    options: Mapping[str, Any],
    option: str | None,
    values: Sequence[Any],
    n_samples: Sequence[int],
    base_n_samples: int,
    subset_seed: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """``function`` on one model: once per value of ``option`` (at ``base_n_samples``), then once
    per training-subset size in ``n_samples`` (at the configured options). Same subset seed as
    the measure stage, so the row at the configured settings reproduces that stage's value."""
    from flatness.measures import MEASURES
    from flatness.suite import training_subset

    fn = MEASURES[function]
    dtype = next(model.parameters()).dtype
    rows = []

    def one(opts, n, setting, value_of_setting):
        X, y = training_subset(*train, int(n), int(subset_seed))
        start = time.perf_counter()
        kwargs = dict(opts)
        if "seed" in inspect.signature(fn).parameters:
            kwargs["seed"] = seed
        try:
            value = float(fn(model, (X.to(dtype), y), **kwargs))
        except ValueError:
            value = math.nan
        rows.append(dict(run_id=run_id, function=function, setting=setting,
                         value_of_setting=value_of_setting, n_samples=int(min(n, len(y))),
                         value=value, seconds=time.perf_counter() - start))  # fmt: skip

    if option is not None:
        for v in values:
            one({**options, option: v}, base_n_samples, option, v)
    for n in n_samples:
        one(options, n, "n_samples", n)
    return pd.DataFrame(rows, columns=list(COLUMNS))
