"""Flatness and sharpness measures of a trained ``nn.Module`` (DESIGN.md contract 1).

Every function takes ``(model, data)``, ``data`` an ``(X, y)`` pair or an iterable of ``(X, y)``
batches; the loss is the mean cross-entropy over all samples unless ``loss_fn=`` is given; it
computes in the model's dtype and on its device, in ``eval()`` mode (the caller's mode restored),
and returns a Python ``float``. Stochastic measures take ``seed=`` and, with
``return_stderr=True``, return ``(value, standard_error)``. A measure that needs the run's
initial weights takes ``init_model=`` (:func:`flatness.suite.measure_run` rebuilds and passes it).
The Hessian-based measures and relative flatness take ``layer=`` (an index into
:func:`flatness.reparam.weight_layers`); :func:`layer_profile` tabulates them measure × layer.
:func:`hessian_spectrum` gives the Hessian's spectral density (stochastic Lanczos quadrature;
:func:`spectrum_table`, :func:`spectrum_nodes` make it tables). Neither returns a float, so
neither is in ``MEASURES``.
"""

from flatness.measures.curvature import (
    adaptive_sharpness,
    hessian_max_eigenvalue,
    hessian_trace,
    quotient_sharpness,
)
from flatness.measures.fisher_rao import fisher_rao_norm
from flatness.measures.keskar import keskar_sharpness
from flatness.measures.norms import (
    distance_from_init,
    path_norm,
    spectral_norm_product,
    weight_norm,
)
from flatness.measures.pacbayes import pacbayes_magnitude_sigma, pacbayes_sigma
from flatness.measures.profile import LAYER_MEASURES, layer_profile
from flatness.measures.relative import (
    relative_flatness,
    relative_flatness_col,
    relative_flatness_max,
    rho_sigma,
)
from flatness.measures.robustness import feature_robustness
from flatness.measures.spectrum import hessian_spectrum, spectrum_nodes, spectrum_table, top_node

#: name → function, for the workflow's config validation and the measure rule. Keys are the
#: function names, which are also the column names of results/tables/runs.csv.
MEASURES = {
    f.__name__: f
    for f in (
        hessian_max_eigenvalue,
        hessian_trace,
        quotient_sharpness,
        adaptive_sharpness,
        relative_flatness,
        relative_flatness_max,
        relative_flatness_col,
        rho_sigma,
        fisher_rao_norm,
        feature_robustness,
        keskar_sharpness,
        pacbayes_sigma,
        pacbayes_magnitude_sigma,
        weight_norm,
        distance_from_init,
        spectral_norm_product,
        path_norm,
    )
}

# Defined beside the signatures (torch-free), so the analysis jobs need not import torch.
from flatness.measure_signatures import HIGHER_IS_FLATTER  # noqa: E402

__all__ = sorted(MEASURES) + [
    "MEASURES",
    "HIGHER_IS_FLATTER",
    "LAYER_MEASURES",
    "layer_profile",
    "hessian_spectrum",
    "spectrum_table",
    "spectrum_nodes",
    "top_node",
]
