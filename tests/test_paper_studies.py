"""A tiny twin of each paper study, run through the real Snakemake: the paper's table, verdicts,
figure and front-page section come out, and the table's numbers are recomputed from each run's own
metrics.json and measures.json (not through flatness.analysis).

The twin is the shipped config/paper/<study>.yaml with only its size cut (fewer seeds, samples,
epochs, units): the measures, variants, stopping rule and paper section are the real ones.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tests.workflow_helpers import REPO, run_snakemake

pytestmark = pytest.mark.slow

# config → (grid overrides that keep the study's design at a tiny size)
TWINS = {
    "keskar_f1_mnist5k": {"batch_size": [16, 100], "seed": [0, 1, 2]},
    "rangamani_mnist5k": {"batch_size": [32, 200], "seed": [0, 1]},
    "petzka_lenet5_mnist5k": {"batch_size": [16, 64], "seed": [0, 1, 2]},
    "fam_mlp_mnist5k": {"seed": [0, 1]},
}


def twin(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "paper" / f"{name}.yaml").read_text())
    t = copy.deepcopy(cfg)
    t["grid"].update(TWINS[name])
    for d in t["datasets"].values():
        d.update(n_train=200, n_test=100)
    for m in t["models"].values():
        if "widths" in m:
            m["widths"] = [16] * len(m["widths"])
        if m.get("head_widths"):
            m["head_widths"] = [8]
    t["training"].update(epochs=2, device="cpu")
    for key in ("target_train_loss", "plateau_patience"):
        t["training"].pop(key, None)
    t["measure"].update(n_samples=64, device="cpu")
    if t["interpolation"].get("enabled"):
        t["interpolation"]["num"] = 5
    if t["paper"].get("sensitivity"):
        t["paper"]["sensitivity"].update(values=[2, 10], n_samples=[32, 64])
    return t


@pytest.fixture(scope="module", params=sorted(TWINS))
def paper_study(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    cfg = twin(request.param)
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_snakemake(workdir, configfile=path, cores=2)
    run_snakemake(workdir, "--report", "report/report.html", configfile=path, cores=2)
    return request.param, cfg, workdir


def _run_files(workdir: Path) -> pd.DataFrame:
    """One row per run from its own files: axes, outcomes and original-model measures."""
    rows = []
    for d in sorted((workdir / "results" / "runs").iterdir()):
        m = json.loads((d / "metrics.json").read_text())
        measures = json.loads((d / "measures.json").read_text())
        assert m["run_id"] == d.name
        row = {"run_id": m["run_id"], **m["axes"], "test_acc": m["test_acc"],
               "train_acc": m["train_acc"], "gap_loss": m["gap_loss"], "status": m["status"]}  # fmt: skip
        for r in measures if isinstance(measures, list) else measures["rows"]:
            assert r["run_id"] == d.name
            key = r["measure"] if r["variant"] == "original" else f"{r['measure']}@{r['variant']}"
            row[key] = r["value"]
        rows.append(row)
    return pd.DataFrame(rows)


def test_paper_outputs_and_front_page(paper_study):
    name, cfg, workdir = paper_study
    tables = workdir / "results" / "tables"
    for f in ("paper.csv", "paper.md", "paper.rst", "paper.html"):
        assert (tables / f).stat().st_size > 100, f
    assert (workdir / "results" / "figures" / "paper.png").stat().st_size > 10_000
    md = (tables / "paper.md").read_text()
    assert any(f"**{v}**" in md for v in ("replicated", "not replicated", "inconclusive"))
    front = (workdir / "results" / "report" / "front_page.rst").read_text()
    first_verdict = md.split("- **", 1)[1].split("\n", 1)[0]
    assert first_verdict[:60] in front
    assert (workdir / "report" / "report.html").stat().st_size > 100_000


def test_paper_table_recomputed_from_the_run_files(paper_study):
    name, cfg, workdir = paper_study
    runs = _run_files(workdir)
    ok = runs[runs.status == "ok"]
    table = pd.read_csv(workdir / "results" / "tables" / "paper.csv")
    study = cfg["paper"]["study"]
    if study in ("keskar2017", "rangamani2019"):
        sb, lb = min(cfg["grid"]["batch_size"]), max(cfg["grid"]["batch_size"])
        col = "keskar_sharpness" if study == "keskar2017" else "quotient_sharpness_normalized"
        sel = table[table["column" if study == "keskar2017" else "quantity"] == col]
        groups = ok.groupby("model") if study == "rangamani2019" else [(None, ok)]
        for model, g in groups:
            row = sel[sel["model"] == model].iloc[0] if model else sel.iloc[0]
            a, b = g[g.batch_size == sb][col], g[g.batch_size == lb][col]
            mean_col = f"ours SB {sb} (mean)" if study == "keskar2017" else f"SB {sb} (mean)"
            assert row[mean_col] == pytest.approx(a.mean(), rel=1e-9)
            assert row["Mann–Whitney p"] == pytest.approx(
                stats.mannwhitneyu(b, a, alternative="two-sided").pvalue
            )
        if study == "keskar2017":
            # The sensitivity row at the configured settings is the measure stage's own value.
            sens = pd.read_csv(workdir / "results" / "tables" / "sensitivity.csv")
            assert set(sens.run_id) == {
                f"mnist5k-f1-adam-none-bs{b}-lr0.001-s0" for b in (sb, lb)
            }
            at10 = sens[(sens.setting == "maxiter") & (sens.value_of_setting == 10)]
            for r in at10.itertuples():
                assert r.value == pytest.approx(
                    runs.set_index("run_id").loc[r.run_id, "keskar_sharpness"], rel=1e-6
                )
            assert "Settings alone" in (workdir / "results" / "tables" / "paper.md").read_text()
            k = table.set_index("column").loc["keskar_sharpness"]
            assert k["paper SB 256"] == "1.23 ± 0.83"  # Table 3, F1, ε = 1e-3
            ratio = (ok["keskar_sharpness@dinh_alpha10"] / ok["keskar_sharpness"]).median()
            assert k["copy/original under dinh_alpha10 (median)"] == pytest.approx(ratio)
    elif study == "petzka2021":
        for m in ("relative_flatness_std", "hessian_trace", "weight_norm"):
            for weights, key in (("trained", m), ("random_alpha0 (α 5–25)", f"{m}@random_alpha0")):
                row = table[(table.measure == m) & (table.weights == weights)].iloc[0]
                r = stats.linregress(ok[key], ok["gap_loss"]).rvalue
                assert row["Pearson ρ"] == pytest.approx(r, abs=1e-12)
        # The copies are the same functions: relative flatness keeps its value on each.
        rel = ok["relative_flatness_std@random_alpha0"] / ok["relative_flatness_std"]
        assert np.allclose(rel, 1.0, rtol=1e-6)
        # … and each network got its own α in 5…25 (recorded in the rows' factor).
        factors = set()
        for d in (workdir / "results" / "runs").iterdir():
            rows = json.loads((d / "measures.json").read_text())
            rows = rows if isinstance(rows, list) else rows["rows"]
            factors |= {r["factor"] for r in rows if r["variant"] == "random_alpha0"}
        assert len(factors) > 1 and all(5 <= f <= 25 and f == int(f) for f in factors)
    else:  # adilova2023: each regulariser paired with SGD of the same seed
        table = table.set_index("regularizer")
        base = ok[ok.regularizer == "none"].set_index("seed")["test_acc"]
        for reg in ("sam", "asam", "fam"):
            other = ok[ok.regularizer == reg].set_index("seed")["test_acc"]
            d = 100 * (other - base.reindex(other.index))
            assert table.loc[reg, "Δ test acc vs SGD (points)"] == pytest.approx(d.mean())
            p = table.loc[reg, "paired t p"]
            expect = stats.ttest_rel(100 * other, 100 * base.reindex(other.index)).pvalue
            assert (math.isnan(p) and math.isnan(expect)) or p == pytest.approx(expect)
