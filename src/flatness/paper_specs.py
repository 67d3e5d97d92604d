"""What each paper study reads: the measure labels its table needs (torch-free, so the workflow
checks a study config against it while parsing, before any job runs).

The tables themselves are built in :mod:`flatness.analysis.papers`, which imports these lists.
"""

from __future__ import annotations

KESKAR_ROWS = (  # (runs.csv column, what it is, the paper's table)
    ("train_acc", "training accuracy (%)", "Table 2"),
    ("test_acc", "test accuracy (%)", "Table 2"),
    ("keskar_sharpness", "ε-sharpness, full space, ε = 1e-3", "Table 3"),
    ("keskar_sharpness_5e4", "ε-sharpness, full space, ε = 5e-4", "Table 3"),
    ("keskar_subspace", "ε-sharpness, random 100-d subspace, ε = 1e-3", "Table 4"),
    ("keskar_subspace_5e4", "ε-sharpness, random 100-d subspace, ε = 5e-4", "Table 4"),
)
KESKAR_OURS_ONLY = ("quotient_sharpness", "relative_flatness", "hessian_max_eigenvalue")
RANGAMANI_ROWS = (
    "test_acc",
    "train_acc",
    "quotient_sharpness_normalized",
    "quotient_sharpness",
    "hessian_max_eigenvalue",
)
PETZKA_MEASURES = (
    "relative_flatness_std",
    "hessian_trace",
    "fisher_rao_norm",
    "weight_norm",
    "pacbayes_sigma",
)

#: study → the measure labels its table reads.
REQUIRED_MEASURES = {
    "keskar2017": [c for c, _, _ in KESKAR_ROWS[2:]] + list(KESKAR_OURS_ONLY),
    "rangamani2019": list(RANGAMANI_ROWS[2:]),
    "petzka2021": list(PETZKA_MEASURES),
    "adilova2023": ["relative_flatness"],
}


def missing_measures(study: str | None, labels) -> list[str]:
    """The labels ``study``'s table needs that the study does not measure ([] for no study)."""
    if study is None:
        return []
    if study not in REQUIRED_MEASURES:
        raise ValueError(f"paper.study = {study!r}; choose one of {sorted(REQUIRED_MEASURES)}")
    return [m for m in REQUIRED_MEASURES[study] if m not in set(labels)]
