"""Each paper study's figure, drawn the way the paper draws it, from the study's tables.

Keskar et al.: sharpness of SB and LB solutions (ours as points per run, the paper's mean as a
bar outline) beside their Figure 3, the loss and accuracy along θ_SB + α(θ_LB − θ_SB).
Rangamani et al.: λ_R per run, SB vs LB, one panel per architecture.
Petzka et al.: the gap against each measure, trained networks above and rescaled copies below
(their Fig. 5). Adilova et al.: test accuracy per regulariser, each seed's runs joined by a line.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from flatness.analysis.papers import (  # noqa: E402
    KESKAR_F1,
    _batch_groups,
    _first_variant,
    _ok,
    variant_table,
)
from flatness.paper_specs import KESKAR_ROWS, PETZKA_MEASURES, RANGAMANI_ROWS  # noqa: E402
from flatness.plotting import log_axis, positive  # noqa: E402
from flatness.suite import ORIGINAL  # noqa: E402


def _strip(ax, groups: dict[str, np.ndarray], paper: dict[str, float] | None = None) -> None:
    for i, (name, values) in enumerate(groups.items()):
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        jitter = np.linspace(-0.12, 0.12, max(len(v), 1))[: len(v)]
        ax.plot(i + jitter, v, "o", ms=4, alpha=0.8, label="ours (one run)" if i == 0 else None)
        if len(v):
            ax.hlines(v.mean(), i - 0.25, i + 0.25, color="k", lw=1.5,
                      label="ours (mean)" if i == 0 else None)  # fmt: skip
        if paper and name in paper:
            ax.hlines(paper[name], i - 0.3, i + 0.3, color="tab:red", ls="--", lw=1.5,
                      label="paper (mean)" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_xlim(-0.6, len(groups) - 0.4)


def keskar_figure(runs, long, interpolation: pd.DataFrame | None, path) -> None:
    ok = _ok(runs)
    sb, lb = _batch_groups(ok)
    sharp = [r for r in KESKAR_ROWS if r[0].startswith("keskar")]
    fig, axes = plt.subplots(1, len(sharp) + 1, figsize=(4 * (len(sharp) + 1), 3.6))
    for ax, (col, what, where) in zip(axes, sharp, strict=False):
        groups = {f"SB {sb}": ok.loc[ok.batch_size == sb, col],
                  f"LB {lb}": ok.loc[ok.batch_size == lb, col]}  # fmt: skip
        paper = KESKAR_F1[col]
        _strip(ax, groups, {f"SB {sb}": paper[0][0], f"LB {lb}": paper[1][0]})
        if positive(pd.concat(list(groups.values()))):
            log_axis(ax)
        ax.set_title(f"{what}\n({where})", fontsize=9)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    if interpolation is not None and not interpolation.empty:
        pair = sorted(interpolation["pair"].unique())[0]
        t = interpolation[interpolation["pair"] == pair].sort_values("alpha")
        acc_ax = ax.twinx()
        for split, style in (("train", "-"), ("test", "--")):
            s = t[t["split"] == split]
            ax.plot(s["alpha"], s["loss"], "b" + style, label=f"{split} loss")
            acc_ax.plot(s["alpha"], 100 * s["accuracy"], "r" + style, label=f"{split} accuracy")
        ax.set_xlabel("α (0 = SB solution, 1 = LB solution)")
        ax.set_ylabel("cross-entropy", color="b")
        acc_ax.set_ylabel("accuracy (%)", color="r")
        ax.set_title(f"Their Figure 3, pair {pair}", fontsize=9)
        if positive(t["loss"]):
            log_axis(ax)
        ax.legend(fontsize=7, loc="upper left")
        acc_ax.legend(fontsize=7, loc="lower left")
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rangamani_figure(runs, long, interpolation, path) -> None:
    ok = _ok(runs)
    sb, lb = _batch_groups(ok)
    models = sorted(ok["model"].unique())
    cols = [c for c in RANGAMANI_ROWS if c.startswith(("quotient", "hessian"))]
    fig, axes = plt.subplots(len(models), len(cols), figsize=(3.8 * len(cols), 3.2 * len(models)),
                             squeeze=False)  # fmt: skip
    for i, model in enumerate(models):
        sub = ok[ok["model"] == model]
        for j, col in enumerate(cols):
            ax = axes[i, j]
            groups = {f"SB {sb}": sub.loc[sub.batch_size == sb, col],
                      f"LB {lb}": sub.loc[sub.batch_size == lb, col]}  # fmt: skip
            _strip(ax, groups)
            if positive(sub[col]):
                log_axis(ax)
            ax.set_title(f"{model}: {col}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def petzka_figure(runs, long, interpolation, path, gap: str = "gap_loss") -> None:
    ok = _ok(runs).set_index("run_id")
    copy = _first_variant(long, "random_alpha")
    variants = [ORIGINAL] + ([copy] if copy else [])
    fig, axes = plt.subplots(len(variants), len(PETZKA_MEASURES),
                             figsize=(3.4 * len(PETZKA_MEASURES), 3.0 * len(variants)),
                             squeeze=False)  # fmt: skip
    batches = sorted(ok["batch_size"].unique())
    colors = dict(zip(batches, plt.cm.viridis(np.linspace(0, 0.9, len(batches))), strict=True))
    for j, m in enumerate(PETZKA_MEASURES):
        wide = variant_table(long, m).reindex(ok.index)
        for i, variant in enumerate(variants):
            ax = axes[i, j]
            x = wide[variant] if variant in wide else pd.Series(np.nan, index=ok.index)
            for b in batches:
                sel = ok["batch_size"] == b
                ax.plot(x[sel], ok.loc[sel, gap], "o", ms=4, color=colors[b],
                        label=f"batch {b}")  # fmt: skip
            if positive(x):
                log_axis(ax, "x")
            finite = pd.concat([x, ok[gap]], axis=1).dropna()
            r = np.corrcoef(finite.iloc[:, 0], finite.iloc[:, 1])[0, 1] if len(finite) > 2 else np.nan
            ax.set_title(f"{m}\n{'trained' if variant == ORIGINAL else variant}: ρ = {r:.2f}",
                         fontsize=8)  # fmt: skip
            if j == 0:
                ax.set_ylabel("gap (test − train CE)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def adilova_figure(runs, long, interpolation, path) -> None:
    ok = _ok(runs)
    regs = sorted(ok["regularizer"].unique(), key=lambda r: (r != "none", r))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, col, label in ((axes[0], "test_acc", "test accuracy (%)"),
                           (axes[1], "relative_flatness", "relative flatness")):  # fmt: skip
        wide = ok.pivot_table(index="seed", columns="regularizer", values=col)[regs]
        scale = 100 if col == "test_acc" else 1
        for _, row in wide.iterrows():
            ax.plot(range(len(regs)), scale * row.to_numpy(float), "-", color="0.8", lw=0.8)
        _strip(ax, {r: scale * wide[r].to_numpy(float) for r in regs})
        ax.set_xticks(range(len(regs)), ["SGD" if r == "none" else r.upper() for r in regs])
        ax.set_ylabel(label)
        if col != "test_acc" and positive(ok[col]):
            log_axis(ax)
    axes[0].set_title("grey lines join one seed's runs", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sensitivity_figure(table: pd.DataFrame, path) -> None:
    """The measure against each varied setting, one line per model (flatness.sensitivity)."""
    settings = list(dict.fromkeys(table["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        sub = table[table["setting"] == setting]
        for run_id, g in sub.groupby("run_id", sort=True):
            ax.plot(g["value_of_setting"].astype(float), g["value"], "o-", label=run_id)
        ax.set_xlabel(setting)
        ax.set_ylabel(str(sub["function"].iloc[0]))
        if positive(sub["value"]):
            log_axis(ax)
        log_axis(ax, "x")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FIGURES = {
    "keskar2017": keskar_figure,
    "rangamani2019": rangamani_figure,
    "petzka2021": petzka_figure,
    "adilova2023": adilova_figure,
}


def paper_figure(study: str, runs, long, interpolation, path) -> None:
    FIGURES[study](runs, long, interpolation, path)
