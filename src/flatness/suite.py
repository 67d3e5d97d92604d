"""The study as data: the grid of runs, the measure suite and the reparameterised copies.

The workflow (``workflow/rules/common.smk``) validates the study config against its JSON schema and
hands it to :func:`expand_grid`, which returns one :class:`Run` per grid point with its fully
resolved :class:`flatness.config.RunConfig` dict; :func:`measure_model` takes every configured
measure on a model and on function-preserving reparameterised copies of it and returns long-format
rows ``(measure, function, variant, factor, value, stderr, seconds, note)`` plus the optional
error bars (:data:`ERROR_COLUMNS`, ``measure.error_bars``). Nothing here reads files or the
``snakemake`` object, so it is tested without Snakemake.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import logging
import math
import numbers
import os
import re
import statistics
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flatness.config import RunConfig
from flatness.measure_signatures import (
    DATA_INDEPENDENT,
    MEASURE_PARAMETERS,
    parameters,
    takes_option,
)

if TYPE_CHECKING:
    # torch is imported in the functions that use it: the workflow builds its DAG with
    # expand_grid, measure_specs, ... of this module, and importing torch there costs ≈ 2 s per
    # `snakemake` call (tests/test_scale.py checks that the grid path stays torch-free).
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: The grid axes, in run-id order.
AXES = ("dataset", "model", "optimizer", "regularizer", "batch_size", "lr", "seed")
#: Grid axes that name an entry of a config section (id → that section's dict).
SECTIONS = {
    "dataset": "datasets",
    "model": "models",
    "optimizer": "optimizers",
    "regularizer": "regularizers",
}
#: The error-bar columns (:func:`measure_model`, ``measure.error_bars``): on every row, NaN where
#: not computed (``error_seconds`` 0.0: no extra time was spent).
ERROR_COLUMNS = ("data_se", "seed_sd", "ci_low", "ci_high", "error_seconds", "error_note")
#: Columns of the long measure table, in order.
MEASURE_COLUMNS = (
    "run_id",
    "measure",
    "function",
    "variant",
    "factor",
    "value",
    "stderr",
    "seconds",
    "note",
    *ERROR_COLUMNS,
)
ORIGINAL = "original"
#: Added to ``measure.seed`` to seed the fold permutation of the error bars: its own stream,
#: independent of ``measure.subset_seed`` (which drew the subset) and of the measures' seeds.
FOLD_SEED_OFFSET = 104_729
#: Two-sided 95% normal quantile of the error bars' interval.
Z95 = 1.96


def format_lr(lr: float) -> str:
    """Learning rate as it appears in run ids: shortest round-trip form (0.05, 0.0001, 1.6)."""
    text = repr(float(lr))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Run:
    """One grid point: the axis values (ids for the sectioned axes) and the resolved run config."""

    run_id: str
    axes: dict[str, Any]
    config: dict[str, Any]


def make_run_id(axes: Mapping[str, Any]) -> str:
    """``mnist5k-mlp-sgd-sam-bs32-lr0.05-s0``."""
    return (
        f"{axes['dataset']}-{axes['model']}-{axes['optimizer']}-{axes['regularizer']}"
        f"-bs{axes['batch_size']}-lr{format_lr(axes['lr'])}-s{axes['seed']}"
    )


def _alternation(options: Sequence[str]) -> str:
    if len(options) == 1:
        return options[0]
    return "(?:" + "|".join(options) + ")"


def id_regex(ids: Sequence[str], sep: str = "-") -> str:
    """A regular expression that matches exactly the strings in ``ids`` (and nothing else).

    For the ``run``/``pair`` wildcard constraints: an alternation of every id (1,000 runs ≈ 40 kB)
    is embedded in every file pattern and scanned on every wildcard substitution, which made DAG
    building slow. Here the ids are split at ``sep`` and factored like a product grid: ids whose
    remaining segments are the same set share one branch, so a full grid gives
    ``digits-mlp-sgd-(?:none|sam)-(?:bs16|bs32)-lr0\\.05-(?:s0|s1)`` (size ∝ sum of the axis
    lengths), and a grid with ``exclude`` rules branches only where the exclusion applies. The
    language is still exactly ``ids``: a path whose wildcard is not one of them does not match.
    No ids gives a pattern that matches nothing.
    """
    rows = {tuple(i.split(sep)) for i in ids}
    if not rows:
        return "(?!x)x"
    esc = re.escape(sep)
    memo: dict[frozenset, str] = {}

    def factor(rows: frozenset, lead: str) -> str:
        # Regex for {lead + sep.join(r) for r in rows}, () standing for "" (the id ends here).
        key = (rows, lead)
        if key in memo:
            return memo[key]
        tails_of: dict[str, set] = {}
        alts = [""] if () in rows else []
        for r in rows:
            if r:
                tails_of.setdefault(r[0], set()).add(r[1:])
        heads_of: dict[frozenset, list[str]] = {}
        for head, tails in tails_of.items():
            heads_of.setdefault(frozenset(tails), []).append(head)
        for tails, heads in sorted(heads_of.items(), key=lambda kv: sorted(kv[1])):
            heads = _alternation([re.escape(h) for h in sorted(heads, key=lambda h: (-len(h), h))])
            rest = "" if tails == {()} else factor(tails, esc)
            alts.append(lead + heads + rest)
        memo[key] = out = _alternation(alts)
        return out

    return factor(frozenset(rows), "")


def expand_grid(config: Mapping[str, Any]) -> list[Run]:
    """Every combination of ``config['grid']`` as a :class:`Run` (validated by RunConfig).

    ``config`` is the schema-validated study config (defaults filled in). A grid id missing from
    its section, or a value RunConfig rejects, raises ``ValueError`` naming the config key.
    """
    grid = config["grid"]
    for axis, section in SECTIONS.items():
        for key in grid[axis]:
            if key not in config.get(section, {}):
                raise ValueError(
                    f"grid.{axis} names {key!r}, which is not a key of {section!r} "
                    f"(known: {sorted(config.get(section, {}))})"
                )
    excluded = [{a: v for a, v in e.items() if v is not None} for e in grid.get("exclude", [])]
    for i, rule in enumerate(excluded):
        if not rule:
            raise ValueError(f"grid.exclude[{i}] names no axis value")
        for axis, value in rule.items():
            if value not in grid[axis]:
                raise ValueError(
                    f"grid.exclude[{i}].{axis} = {value!r} is not one of grid.{axis} {grid[axis]}"
                )
    runs = []
    for values in itertools.product(*(grid[a] for a in AXES)):
        axes = dict(zip(AXES, values, strict=True))
        if any(all(axes[a] == v for a, v in rule.items()) for rule in excluded):
            continue
        optimizer = dict(config["optimizers"][axes["optimizer"]], lr=float(axes["lr"]))
        raw = dict(
            config.get("training", {}),
            data=dict(config["datasets"][axes["dataset"]]),
            model=dict(config["models"][axes["model"]]),
            optimizer=optimizer,
            regularizer=dict(config["regularizers"][axes["regularizer"]]),
            batch_size=int(axes["batch_size"]),
            seed=int(axes["seed"]),
        )
        resolved = RunConfig.from_dict(raw).to_dict()
        runs.append(Run(make_run_id(axes), axes, resolved))
    ids = [r.run_id for r in runs]
    if not runs:
        raise ValueError("grid.exclude removes every run; the study would be empty")
    if len(set(ids)) != len(ids):
        raise ValueError("two grid points give the same run id; make the grid ids distinct")
    return runs


@dataclass(frozen=True)
class Pair:
    """A small- and a large-batch run equal on every other axis (Keskar's 1-D interpolation)."""

    pair_id: str
    small: str
    large: str


def batch_pairs(runs: Sequence[Run], across: Sequence[str] = ()) -> list[Pair]:
    """For each group of runs equal on every axis but batch size: (smallest, largest) batch.

    Axes in ``across`` are ignored too (e.g. ``optimizer`` when each batch size has its own
    optimizer settings, excluded from the other via ``grid.exclude``); the pair id then names
    the small-batch run's values.
    """
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        key = tuple(r.axes[a] for a in AXES if a != "batch_size" and a not in across)
        groups.setdefault(key, []).append(r)
    pairs = []
    for members in groups.values():
        if len({r.axes["batch_size"] for r in members}) < 2:
            continue
        small = min(members, key=lambda r: r.axes["batch_size"])
        large = max(members, key=lambda r: r.axes["batch_size"])
        a = small.axes
        pair_id = (
            f"{a['dataset']}-{a['model']}-{a['optimizer']}-{a['regularizer']}-lr{format_lr(a['lr'])}"
            f"-s{a['seed']}-bs{a['batch_size']}vs{large.axes['batch_size']}"
        )
        pairs.append(Pair(pair_id, small.run_id, large.run_id))
    return pairs


# --------------------------------------------------------------------------------------------
# The measure suite


@dataclass(frozen=True)
class MeasureSpec:
    """One measure column: ``label`` (the column name), the function's name and its options."""

    label: str
    function: str
    options: dict[str, Any] = field(default_factory=dict)


def measure_specs(
    entries: Sequence[Mapping[str, Any]], registry: Mapping[str, Callable] | None = None
) -> list[MeasureSpec]:
    """Config entries ``{function, label, options}`` → specs, options checked against signatures.

    An option the function does not take, or a repeated label, raises ``ValueError`` naming the
    config key (``measure.measures[i].options.<name>``).
    """
    # The default registry's signatures without importing it (torch): flatness.measure_signatures.
    if registry is None:
        signatures = MEASURE_PARAMETERS
    else:
        signatures = {name: parameters(fn) for name, fn in registry.items()}
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        fn_name = entry["function"]
        if fn_name not in signatures:
            raise ValueError(f"measure.measures[{i}].function = {fn_name!r} is not in MEASURES")
        label = entry.get("label") or fn_name
        if label in seen:
            raise ValueError(
                f"measure.measures[{i}].label: {label!r} is used twice; give each entry a label"
            )
        seen.add(label)
        options = dict(entry.get("options") or {})
        params = signatures[fn_name]
        for name in options:
            if name in ("seed", "return_stderr"):
                raise ValueError(
                    f"measure.measures[{i}].options.{name} is set by the workflow (measure.seed)"
                )
            if name == "init_model":
                raise ValueError(
                    f"measure.measures[{i}].options.init_model is set by the workflow (the run's "
                    "initialisation)"
                )
            if not takes_option(params, name):
                raise ValueError(
                    f"measure.measures[{i}].options.{name}: {fn_name} takes no option {name!r} "
                    f"(it takes {sorted(params)})"
                )
        specs.append(MeasureSpec(label, fn_name, options))
    return specs


@dataclass(frozen=True)
class Variant:
    """A function-preserving copy of the model: ``kind`` original | layerwise | dinh."""

    name: str
    kind: str
    factor: float = 1.0  # dinh: α; layerwise: the spread
    # random_alpha: Dinh's T_α with an integer α drawn per model from [low, high] (Petzka et al.
    # 2021: fc2 ÷ f, fc3 × f, f ∈ {5, …, 25}); the row's factor is the α drawn.
    low: int = 0
    high: int = 0


def variants_from_config(measure_cfg: Mapping[str, Any]) -> list[Variant]:
    """The original, ``layerwise.copies`` random layer-wise copies and one copy per Dinh α."""
    out = [Variant(ORIGINAL, "original")]
    lw = measure_cfg.get("layerwise", {})
    for k in range(int(lw.get("copies", 0))):
        out.append(Variant(f"layerwise{k}", "layerwise", float(lw.get("spread", 10.0))))
    for alpha in measure_cfg.get("dinh_alpha", []):
        out.append(Variant(f"dinh_alpha{format_lr(alpha)}", "dinh", float(alpha)))
    ra = measure_cfg.get("random_alpha", {})
    low, high = int(ra.get("low", 5)), int(ra.get("high", 25))
    for k in range(int(ra.get("copies", 0))):
        out.append(Variant(f"random_alpha{k}", "random_alpha", math.nan, low, high))
    return out


def drawn_alpha(variant: Variant, run_id: str, index: int) -> float:
    """The α of a ``random_alpha`` copy: uniform on the integers [low, high], drawn from the run
    id (not the measure seed, which every run shares), so each model gets its own."""
    import torch

    seed = zlib.crc32(f"{run_id}/{index}".encode())
    g = torch.Generator().manual_seed(seed)
    return float(torch.randint(variant.low, variant.high + 1, (1,), generator=g).item())


def reparameterise(
    model: nn.Module, variant: Variant, seed: int, index: int = 0, dinh_layer: int = -2
) -> nn.Module:
    """The variant's copy of ``model``; raises ``ValueError`` where it does not apply (e.g. BN)."""
    import torch

    from flatness import reparam

    if variant.kind == "original":
        return model
    if variant.kind == "layerwise":
        g = torch.Generator().manual_seed(int(seed) * 1000 + index)
        n = len(reparam.weight_layers(model))
        return reparam.layerwise_rescale(
            model, reparam.random_layerwise_factors(n, variant.factor, g)
        )
    if variant.kind in ("dinh", "random_alpha"):
        return reparam.dinh_alpha_rescale(model, variant.factor, layer=dinh_layer)
    raise ValueError(f"unknown variant kind {variant.kind!r}")


def _call_measure(
    fn: Callable,
    model: nn.Module,
    data,
    options: Mapping[str, Any],
    seed: int,
    init_model: nn.Module | None = None,
) -> tuple[float, float]:
    params = inspect.signature(fn).parameters
    kwargs = dict(options)
    if "seed" in params:
        kwargs["seed"] = int(seed)
    if "init_model" in params:  # None when unknown: the measure raises ValueError (a NaN row)
        kwargs["init_model"] = init_model
    if "return_stderr" in params:
        value, stderr = fn(model, data, return_stderr=True, **kwargs)
        return float(value), float(stderr)
    return float(fn(model, data, **kwargs)), math.nan


def _row(
    run_id, spec: MeasureSpec, variant: Variant, value, stderr, seconds, note, errors=None
) -> dict:
    return dict(
        run_id=run_id,
        measure=spec.label,
        function=spec.function,
        variant=variant.name,
        factor=variant.factor,
        value=value,
        stderr=stderr,
        seconds=seconds,
        note=note,
        **(errors if errors is not None else _error_columns(value)),
    )


# --------------------------------------------------------------------------------------------
# Error bars: spread over the data (disjoint folds) and over the measures' seeds


@dataclass(frozen=True)
class ErrorBars:
    """``measure.error_bars``: ``folds`` disjoint parts of the data (0 = off, else ≥ 2) and
    ``seeds`` seeds of the stochastic measures (1 = off)."""

    folds: int = 0
    seeds: int = 1

    @property
    def on(self) -> bool:
        return self.folds > 0 or self.seeds > 1


def error_bar_settings(cfg: Mapping[str, Any] | None) -> ErrorBars:
    """``measure.error_bars`` checked; a bad setting raises ``ValueError`` naming its key.

    ``folds = 1`` is refused (the schema refuses it too): a standard deviation needs two folds.
    """
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in ("folds", "seeds"):
            raise ValueError(f"measure.error_bars.{key} is not a setting (folds, seeds)")
    folds, seeds = cfg.get("folds", 0), cfg.get("seeds", 1)
    for key, v in (("folds", folds), ("seeds", seeds)):
        # 2.0 is an integer to JSON Schema (and so to the config's validation): take it as 2.
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v).is_integer():
            raise ValueError(f"measure.error_bars.{key} must be an integer, got {v!r}")
    if folds < 0 or folds == 1:
        raise ValueError(
            f"measure.error_bars.folds must be 0 (off) or ≥ 2 (a standard deviation needs two "
            f"folds), got {folds}"
        )
    if seeds < 1:
        raise ValueError(f"measure.error_bars.seeds must be ≥ 1 (1 = off), got {seeds}")
    return ErrorBars(int(folds), int(seeds))


def data_folds(data, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``folds`` disjoint, equal-size parts of ``data`` by a fixed permutation.

    ``data`` is an ``(X, y)`` pair or an iterable of batches, which is concatenated first (in
    iteration order; every measure accepts either form and the subset fits in memory). The
    permutation is seeded by ``seed + FOLD_SEED_OFFSET`` (``seed`` = ``measure.seed``), so it is
    the same for every run and variant; the ``N mod folds`` samples left over are not used
    (equal sizes keep the batch-means standard error exact for sample means). Each part keeps
    the samples' order. More folds than samples raise ``ValueError``.
    """
    import torch

    from flatness.batches import Batches

    X, y = Batches(data, chunk_size=None).concatenated()
    size = X.shape[0] // folds
    if size == 0:
        raise ValueError(f"{folds} folds of {X.shape[0]} samples would be empty")
    g = torch.Generator().manual_seed(int(seed) + FOLD_SEED_OFFSET)
    parts = torch.randperm(X.shape[0], generator=g)[: folds * size].view(folds, size)
    out = []
    for idx in parts:
        idx = idx.sort().values.to(X.device)
        out.append((X[idx], y[idx]))
    return out


def _error_columns(
    value: float,
    data_se: float = math.nan,
    seed_sd: float = math.nan,
    seconds: float = 0.0,
    note: str = "off",
) -> dict:
    # A NaN spread (not computed or failed) leaves no interval: one part alone would be too narrow.
    if math.isnan(data_se) or math.isnan(seed_sd):
        half = math.nan
    else:
        half = Z95 * math.hypot(data_se, seed_sd)
    return dict(
        data_se=data_se,
        seed_sd=seed_sd,
        ci_low=value - half,
        ci_high=value + half,
        error_seconds=seconds,
        error_note=note,
    )


def _data_spread(evaluate: Callable, function: str, parts: Callable, folds: int, seed: int):
    """(data_se, note): batch-means standard error over ``folds`` disjoint parts (``parts()``
    gives them: cut once per model, shared by its measures)."""
    if function in DATA_INDEPENDENT:
        return 0.0, "does not depend on the data"
    if folds == 0:
        return math.nan, "folds off"
    try:
        values = [evaluate(part, seed) for part in parts()]
    except ValueError as err:
        return math.nan, f"folds={folds} failed: {err}"
    return statistics.stdev(values) / math.sqrt(folds), f"folds={folds}"


def _seed_spread(evaluate: Callable, fn: Callable, data, seeds: int, seed: int, value, stderr):
    """(seed_sd, note): sd over the original seed and ``seeds − 1`` further ones."""
    if "seed" not in inspect.signature(fn).parameters:
        return 0.0, "deterministic"
    # hessian_trace, relative_flatness, ... take a seed but return stderr 0.0 when the method
    # they chose is exact: the seed is unused, so extra seeds would only cost time.
    if stderr == 0.0:
        return 0.0, "deterministic (exact method, stderr 0)"
    if seeds == 1:
        return math.nan, "seeds off"
    try:
        values = [value] + [evaluate(data, seed + k) for k in range(1, seeds)]
    except ValueError as err:
        return math.nan, f"seeds={seeds} failed: {err}"
    return statistics.stdev(values), f"seeds={seeds}"


def _error_bars(
    fn: Callable,
    model: nn.Module,
    data,
    spec: MeasureSpec,
    seed: int,
    init_model: nn.Module | None,
    bars: ErrorBars,
    value: float,
    stderr: float,
    parts: Callable,
) -> dict:
    """The error columns of the original model's row; ``value`` and ``stderr`` are its main
    result (full data, original seed), which the extra evaluations leave as they are."""
    if not bars.on:
        return _error_columns(value)
    if math.isnan(value):
        return _error_columns(value, note="not computed: the measure gave no value")

    def evaluate(d, s):
        return _call_measure(fn, model, d, spec.options, s, init_model)[0]

    start = time.perf_counter()
    seed_sd, seed_note = _seed_spread(evaluate, fn, data, bars.seeds, seed, value, stderr)
    data_se, data_note = _data_spread(evaluate, spec.function, parts, bars.folds, seed)
    seconds = time.perf_counter() - start
    return _error_columns(value, data_se, seed_sd, seconds, f"{seed_note}; {data_note}")


def measure_model(
    model: nn.Module,
    data,
    specs: Sequence[MeasureSpec],
    variants: Sequence[Variant],
    seed: int = 0,
    run_id: str = "",
    dinh_layer: int = -2,
    registry: Mapping[str, Callable] | None = None,
    init_model: nn.Module | None = None,
    error_bars: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Every measure on the model and on each variant copy, as long-format rows.

    ``init_model`` (the run's initialisation, on the model's device and dtype) goes to every
    measure that takes ``init_model=``, unrescaled on every copy.

    A variant that does not apply to the architecture (a ReLU rescaling of a BatchNorm net, a
    Dinh α on a one-layer net) gives rows with ``value = NaN`` and the reason in ``note``; so does
    a measure that raises ``ValueError`` for this model (e.g. a non-finite result). Other errors
    propagate: a broken measure must fail the job, not hide in a table.

    ``error_bars`` (``{folds, seeds}``, :func:`error_bar_settings`; default off) adds, on the
    original model's rows, the columns of :data:`ERROR_COLUMNS`; ``value``, ``stderr`` and
    ``seconds`` stay those of the one full-data, original-seed evaluation.

    - ``data_se``: the measure on each of ``folds`` disjoint equal parts of ``data``
      (:func:`data_folds`), ``sd(fold values, ddof=1) / sqrt(folds)``, the batch-means standard
      error of the full-data value. Exact for measures that are means over samples (the Hessian
      trace, the Fisher–Rao norm, relative flatness, linear in the per-sample Hessians), given
      a mean-reduced loss; for nonlinear ones (λ_max, the PAC-Bayes σ, ε-sharpness) an
      approximation: a part's value is not an unbiased sample of the full-data value's noise.
      0 for the measures in :data:`flatness.measure_signatures.DATA_INDEPENDENT`.
    - ``seed_sd``: for a measure that takes ``seed``, ``sd(ddof=1)`` of the values at seeds
      ``seed, seed + 1, …, seed + seeds − 1`` on the full data; 0 ("deterministic") for one
      that does not take a seed, or that reports stderr 0.0 (an exact method, seed unused).
    - ``ci_low``, ``ci_high``: ``value ± 1.96·sqrt(data_se² + seed_sd²)``; NaN when either
      spread is NaN (off, or failed).
    - ``error_seconds``: the time of the extra evaluations; ``error_note`` what was done, e.g.
      ``"seeds=3; folds=4"``, ``"deterministic; folds=4"``, ``"off"``.

    An extra evaluation that raises ``ValueError`` leaves that spread NaN with the reason in
    ``error_note``; other errors propagate. The copies get NaN error columns ("not computed for
    copies"): the error bars cost ≈ 1× (folds) + (seeds − 1)× the measure, and a copy's
    spread comes from the same data and seeds as the original's.
    """
    if registry is None:
        from flatness.measures import MEASURES as registry
    bars = error_bar_settings(error_bars)
    # The folds of the data, cut on first use and shared by every measure of the original model
    # (a ValueError, e.g. more folds than samples, is not cached: each measure reports it).
    parts = functools.cache(lambda: data_folds(data, bars.folds, seed))
    copy_note = "not computed for copies" if bars.on else "off"
    rows = []
    for index, variant in enumerate(variants):
        if variant.kind == "random_alpha":
            variant = dataclasses.replace(variant, factor=drawn_alpha(variant, run_id, index))
        try:
            copy = reparameterise(model, variant, seed, index, dinh_layer)
        except ValueError as err:
            note = f"not applicable: {err}"
            log.info("%s %s: %s", run_id, variant.name, note)
            errors = _error_columns(math.nan, note=copy_note)
            rows += [_row(run_id, s, variant, math.nan, math.nan, 0.0, note, errors) for s in specs]
            continue
        for spec in specs:
            fn = registry[spec.function]
            start = time.perf_counter()
            try:
                value, stderr = _call_measure(fn, copy, data, spec.options, seed, init_model)
                note = ""
            except ValueError as err:
                value, stderr, note = math.nan, math.nan, f"not applicable: {err}"
            seconds = time.perf_counter() - start
            if variant.kind == "original":
                errors = _error_bars(
                    fn, copy, data, spec, seed, init_model, bars, value, stderr, parts
                )
            else:
                errors = _error_columns(value, note=copy_note)
            log.info(
                "%s %s %s = %s (%.2f s) %s %s",
                run_id,
                variant.name,
                spec.label,
                value,
                seconds,
                note,
                errors["error_note"],
            )
            rows.append(_row(run_id, spec, variant, value, stderr, seconds, note, errors))
    return rows


def skipped_rows(
    run_id: str, specs: Sequence[MeasureSpec], variants: Sequence[Variant], reason: str
) -> list[dict]:
    """NaN rows for a run that is not measured (e.g. diverged), so every run has its rows."""
    errors = _error_columns(math.nan, note="not measured")
    return [
        _row(run_id, s, v, math.nan, math.nan, 0.0, reason, errors) for v in variants for s in specs
    ]


def training_subset(
    X: torch.Tensor, y: torch.Tensor, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` samples (all when ``n`` ≥ N); the same for every run."""
    import torch

    if n >= X.shape[0]:
        return X, y
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(X.shape[0], generator=g)[:n].sort().values.to(X.device)
    return X[idx], y[idx]


def metrics_of_run(path: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """One run's metrics.json, for a job of that run: ``ValueError`` when the file records
    another run (a stage never works on another run's outputs)."""
    metrics = json.loads(Path(path).read_text())
    if metrics.get("run_id") != run_id:
        raise ValueError(f"{path} records run {metrics.get('run_id')!r}, not {run_id!r}")
    return metrics


def measurement_data(
    model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], measure_cfg: Mapping[str, Any]
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model and the samples every measure of a run sees: the fixed training subset of
    ``measure_cfg`` (``n_samples``, ``subset_seed``), in its ``dtype`` on its ``device``, the
    model in ``eval()`` mode. One place, so the per-layer profile, the spectrum and the measures
    along training see exactly what :func:`measure_run` sees."""
    import torch

    from flatness.train import resolve_device

    dtype = getattr(torch, measure_cfg.get("dtype", "float64"))
    device = resolve_device(measure_cfg.get("device", "auto"))
    X, y = training_subset(*train, int(measure_cfg["n_samples"]), int(measure_cfg["subset_seed"]))
    model = model.to(device=device, dtype=dtype).eval()
    return model, (X.to(device=device, dtype=dtype), y.to(device))


def measure_run(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    measure_cfg: Mapping[str, Any],
    run_id: str,
    status: str = "ok",
    provenance: Mapping[str, Any] | None = None,
) -> list[dict]:
    """The measure stage of one run: subset, precision, specs and variants from ``measure_cfg``.

    ``train`` is the un-augmented training set; ``measure_cfg`` the validated ``measure`` section
    of the study config. A run whose training ``status`` is not ``ok`` gets NaN rows.
    ``provenance`` is the run's metrics.json block (its ``config`` and ``model_config``): from it
    :func:`flatness.train.initial_model` rebuilds θ₀ for measures that take ``init_model=``
    (without it they give NaN rows saying so). ``measure_cfg["error_bars"]`` (``{folds, seeds}``)
    goes to :func:`measure_model`; the folds split the measured subset.
    """
    specs = measure_specs(measure_cfg["measures"])
    variants = variants_from_config(measure_cfg)
    error_bars = measure_cfg.get("error_bars")
    error_bar_settings(error_bars)  # a bad setting fails every run, measured or not
    if status != "ok":
        return skipped_rows(run_id, specs, variants, f"not measured: training status {status}")
    import torch

    model, data = measurement_data(model, train, measure_cfg)
    device, dtype = data[0].device, data[0].dtype
    init_model = None
    takes_init = any("init_model" in MEASURE_PARAMETERS[s.function] for s in specs)
    if provenance is not None and takes_init:
        from flatness.train import initial_model

        with torch.random.fork_rng(devices=[]):  # it reseeds the global RNG; keep the caller's
            init_model = initial_model(provenance["config"], provenance["model_config"])
        init_model = init_model.to(device=device, dtype=dtype).eval()
    return measure_model(
        model,
        data,
        specs,
        variants,
        seed=int(measure_cfg.get("seed", 0)),
        run_id=run_id,
        dinh_layer=int(measure_cfg.get("dinh_layer", -2)),
        init_model=init_model,
        error_bars=error_bars,
    )


def interpolation_table(
    small: nn.Module,
    large: nn.Module,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alphas: Sequence[float],
    n_samples: int | None = None,
) -> list[dict]:
    """Keskar's 1-D plot on each split: rows ``split, alpha, loss, accuracy, note``.

    Loss at (1 − α)θ_small + αθ_large via :func:`flatness.slices.interpolate_loss` on the first
    ``n_samples`` of each split. A non-finite loss (e.g. a diverged end point) gives a NaN row with
    the reason instead of failing the job.
    """
    from flatness.slices import interpolate_loss

    dtype = next(small.parameters()).dtype
    rows = []
    for split, (X, y) in splits.items():
        if n_samples:
            X, y = X[:n_samples], y[:n_samples]
        for alpha in alphas:  # one α at a time: a non-finite point does not blank the rest
            try:
                (r,) = interpolate_loss(small, large, (X.to(dtype), y), [alpha]).to_dict("records")
                rows.append(dict(split=split, **r, note=""))
            except ValueError as err:
                rows.append(
                    dict(
                        split=split,
                        alpha=float(alpha),
                        loss=math.nan,
                        accuracy=math.nan,
                        note=str(err),
                    )
                )
    return rows
