"""The keyword parameters of every measure in ``flatness.measures.MEASURES``, without torch.

The workflow validates the study's ``measure.measures`` entries (function names, option keys)
while Snakemake parses the Snakefile, once per ``snakemake`` call; importing the measures for
their signatures costs ≈ 3 s of torch and scipy imports there, more than the rest of the
1,000-run DAG build. So :func:`flatness.suite.measure_specs` reads this table instead.

The functions stay the one source of truth: ``tests/test_suite.py`` asserts that this table is
exactly :func:`parameters` of each function of ``MEASURES`` (no measure missing or extra, same
names in the same order). After adding a measure or changing a signature, paste the table that
test prints on failure.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

#: Parameters every measure takes positionally, never set from the config.
POSITIONAL = ("model", "data")

#: measure function name → its parameters after ``(model, data)``, in signature order
#: (``*name`` / ``**name`` for variadic ones, as :func:`parameters` writes them).
MEASURE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "adaptive_sharpness": (
        "loss_fn",
        "kind",
        "rho",
        "p",
        "eta",
        "tol",
        "seed",
        "method",
        "num_iter",
        "aggregate",
        "batch_size",
        "chunk_size",
        "graph_budget_bytes",
    ),
    "distance_from_init": ("init_model",),
    "feature_robustness": ("loss_fn", "delta", "num_samples", "seed", "return_stderr"),
    "fisher_rao_norm": ("loss_fn",),
    "hessian_max_eigenvalue": (
        "loss_fn",
        "params",
        "layer",
        "tol",
        "seed",
        "method",
        "chunk_size",
        "graph_budget_bytes",
    ),
    "hessian_trace": (
        "loss_fn",
        "layer",
        "rel_stderr",
        "num_probes",
        "seed",
        "return_stderr",
        "max_probes",
        "exact_max_params",
        "chunk_size",
        "graph_budget_bytes",
        "method",
    ),
    "keskar_sharpness": (
        "loss_fn",
        "epsilon",
        "subspace_dim",
        "maxiter",
        "seed",
        "start",
        "return_stderr",
    ),
    "pacbayes_magnitude_sigma": (
        "loss_fn",
        "target_drop",
        "tol",
        "num_samples",
        "sigma_max",
        "depth",
        "eps",
        "seed",
        "return_stderr",
    ),
    "pacbayes_sigma": (
        "loss_fn",
        "target_drop",
        "tol",
        "num_samples",
        "sigma_max",
        "depth",
        "seed",
        "return_stderr",
    ),
    "path_norm": (),
    "quotient_sharpness": (
        "loss_fn",
        "layer",
        "normalized",
        "epsilon",
        "tol",
        "seed",
        "method",
        "chunk_size",
        "graph_budget_bytes",
    ),
    "relative_flatness": (
        "loss_fn",
        "layer",
        "normalize_features",
        "divide_by_m",
        "method",
        "num_probes",
        "seed",
        "return_stderr",
    ),
    "relative_flatness_col": ("loss_fn", "method"),
    "relative_flatness_max": ("loss_fn", "normalize_features", "method"),
    "rho_sigma": ("loss_fn", "method"),
    "spectral_norm_product": (),
    "weight_norm": ("include_bias",),
}


#: Measures whose value does not depend on the data's values: functions of the weights alone
#: (:mod:`flatness.measures.norms`; ``path_norm`` reads only the shape of one input,
#: ``distance_from_init`` the weights and θ₀). Their fold spread is 0 by construction, so
#: :func:`flatness.suite.measure_model` gives them ``data_se = 0`` without evaluating folds.
#: ``tests/test_error_bars.py`` checks that each gives the same value on different data.
DATA_INDEPENDENT: frozenset[str] = frozenset(
    {"distance_from_init", "path_norm", "spectral_norm_product", "weight_norm"}
)


#: Measures that grow as the minimum gets flatter (a noise scale); every other one grows with
#: sharpness. Analyses flip their sign so that "sharper" always points the same way. Here, not in
#: flatness.measures: the analysis jobs read it and importing the measures costs ≈ 3 s of torch.
HIGHER_IS_FLATTER: frozenset[str] = frozenset({"pacbayes_sigma", "pacbayes_magnitude_sigma"})


def parameters(fn: Callable) -> tuple[str, ...]:
    """``fn``'s parameters after ``(model, data)`` as this table writes them."""
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return tuple(
        prefix.get(p.kind, "") + name
        for name, p in inspect.signature(fn).parameters.items()
        if name not in POSITIONAL
    )


def takes_option(params: tuple[str, ...], name: str) -> bool:
    """Whether a function with ``params`` accepts the keyword option ``name``."""
    return name in params or any(p.startswith("**") for p in params)
