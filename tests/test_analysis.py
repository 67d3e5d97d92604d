"""flatness.analysis on small synthetic tables with known τ, Ψ and effect sizes (scipy as reference)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatness import analysis as an
from flatness.suite import AXES
from tests.workflow_helpers import CONTRACT_COLUMNS


def grid_runs(measure_fn, gap_fn):
    """Runs over batch_size × regularizer × seed with measure/gap given as functions of the axes."""
    rows = []
    for bs, reg, seed in itertools.product([32, 1024], ["none", "sam", "fam"], [0, 1]):
        r = dict(
            run_id=f"{reg}-{bs}-{seed}",
            dataset="d",
            model="m",
            optimizer="sgd",
            regularizer=reg,
            batch_size=bs,
            lr=0.05,
            seed=seed,
            status="ok",
        )
        r["m"] = measure_fn(bs, reg, seed)
        r["gap_loss"] = gap_fn(bs, reg, seed)
        r["gap_acc"] = 0.1 * r["gap_loss"]
        rows.append(r)
    return pd.DataFrame(rows)


REG = {"none": 0, "sam": 1, "fam": 2}


def test_kendall_matches_scipy_and_handles_constants():
    rng = np.random.default_rng(0)
    runs = pd.DataFrame(
        {"m": rng.normal(size=20), "c": np.ones(20), "gap_loss": rng.normal(size=20)}
    )
    runs["gap_acc"] = runs["gap_loss"] + rng.normal(size=20)
    runs.loc[3, "m"] = np.nan
    table = an.kendall_table(runs, ["m", "c"])
    ok = runs["m"].notna()
    ref = stats.kendalltau(runs.loc[ok, "m"], runs.loc[ok, "gap_loss"])
    row = table.query("measure == 'm' and gap == 'gap_loss'").iloc[0]
    assert row["tau"] == pytest.approx(ref.statistic) and row["p_value"] == pytest.approx(
        ref.pvalue
    )
    assert row["n"] == 19
    assert table.query("measure == 'c'")["tau"].isna().all()


def test_granulated_kendall_known_psi():
    # within a regulariser, larger batch → larger measure and larger gap (τ > 0 along batch_size);
    # within a batch size, the measure rises with the regulariser index while the gap falls
    # (τ < 0 along regularizer). Seeds are repetitions, not an axis: they stay inside the groups.
    runs = grid_runs(
        lambda bs, reg, s: bs + REG[reg], lambda bs, reg, s: bs - 0.1 * REG[reg] + 0.001 * s
    )
    assert an.varying_axes(runs) == ["regularizer", "batch_size"]
    g = an.granulated_kendall(runs, ["m"], gaps=["gap_loss"]).set_index("axis")["psi"]
    assert "seed" not in g
    expected = {
        axis: np.mean(
            [
                stats.kendalltau(grp["m"], grp["gap_loss"]).statistic
                for _, grp in runs.groupby(other)
            ]
        )
        for axis, other in (("batch_size", "regularizer"), ("regularizer", "batch_size"))
    }
    assert expected["batch_size"] > 0 > expected["regularizer"]
    assert g["batch_size"] == pytest.approx(expected["batch_size"])
    assert g["regularizer"] == pytest.approx(expected["regularizer"])
    assert g["Psi"] == pytest.approx((expected["batch_size"] + expected["regularizer"]) / 2)


def test_granulated_kendall_needs_two_varying_axes():
    runs = grid_runs(lambda bs, reg, s: bs, lambda bs, reg, s: bs)
    one_axis = runs[(runs["regularizer"] == "none") & (runs["seed"] == 0)]
    assert an.granulated_kendall(one_axis, ["m"]).empty


def test_effect_sizes_against_hand_computed_values():
    a, b = [3.0, 4.0, 5.0], [1.0, 2.0, 4.0]
    # pairs a>b: 3>1,3>2,4>1,4>2,5>1,5>2,5>4 = 7; a<b: 3<4 = 1; ties: 4=4 → (7 − 1)/9
    assert an.cliffs_delta(a, b) == pytest.approx(6 / 9)
    pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    assert an.hedges_g(a, b) == pytest.approx((4 - 7 / 3) / pooled * (1 - 3 / (4 * 6 - 9)))
    assert math.isnan(an.hedges_g([1.0], b))


def test_batch_comparison_signs_and_scipy_p_value():
    runs = grid_runs(lambda bs, reg, s: bs / 32 + REG[reg], lambda bs, reg, s: 0.0)
    runs["pacbayes_sigma"] = 1.0 / runs["m"]  # larger σ = flatter
    table = an.batch_comparison(runs, ["m", "pacbayes_sigma"]).set_index("measure")
    large = runs.loc[runs["batch_size"] == 1024, "m"]
    small = runs.loc[runs["batch_size"] == 32, "m"]
    ref = stats.mannwhitneyu(large, small, alternative="two-sided")
    assert table.loc["m", "p_value"] == pytest.approx(ref.pvalue)
    assert table.loc["m", "mannwhitney_u"] == pytest.approx(ref.statistic)
    assert table.loc["m", "cliffs_delta"] == pytest.approx(1.0)
    assert table.loc["m", "large_sharper"] is True or table.loc["m", "large_sharper"] == True  # noqa: E712
    # the same ordering under a flatness-oriented measure is still "large batch sharper"
    assert table.loc["pacbayes_sigma", "cliffs_delta"] == pytest.approx(-1.0)
    assert bool(table.loc["pacbayes_sigma", "large_sharper"])
    assert (table["small_batch"] == 32).all() and (table["large_batch"] == 1024).all()


def long_table():
    rows = []
    for run, base in (("a", 2.0), ("b", 3.0)):
        for measure, exponent in (("invariant", 0.0), ("euclid", 2.0)):
            rows.append(
                dict(
                    run_id=run,
                    measure=measure,
                    function=measure,
                    variant="original",
                    factor=1.0,
                    value=base,
                    note="",
                )
            )
            for alpha in (10.0, 100.0):
                rows.append(
                    dict(
                        run_id=run,
                        measure=measure,
                        function=measure,
                        variant=f"dinh_alpha{alpha:g}",
                        factor=alpha,
                        value=base * alpha**exponent * (1 + 1e-4),
                        note="",
                    )
                )
        rows.append(
            dict(
                run_id=run,
                measure="bn",
                function="bn",
                variant="original",
                factor=1.0,
                value=1.0,
                note="",
            )
        )
        rows.append(
            dict(
                run_id=run,
                measure="bn",
                function="bn",
                variant="dinh_alpha10",
                factor=10.0,
                value=np.nan,
                note="not applicable: BatchNorm",
            )
        )
    return pd.DataFrame(rows)


def test_invariance_table_ratios_exponents_and_not_applicable():
    inv = an.invariance_table(long_table(), tolerance=0.01).set_index(["measure", "variant"])
    assert bool(inv.loc[("invariant", "dinh_alpha100"), "invariant"])
    assert inv.loc[("invariant", "dinh_alpha100"), "alpha_exponent"] == pytest.approx(0.0, abs=1e-3)
    assert not bool(inv.loc[("euclid", "dinh_alpha10"), "invariant"])
    assert inv.loc[("euclid", "dinh_alpha100"), "median_ratio"] == pytest.approx(1e4, rel=1e-3)
    assert inv.loc[("euclid", "dinh_alpha100"), "alpha_exponent"] == pytest.approx(2.0, abs=1e-3)
    assert inv.loc[("bn", "dinh_alpha10"), "n"] == 0
    assert "BatchNorm" in inv.loc[("bn", "dinh_alpha10"), "note"]


def test_runs_table_has_contract_columns_and_measure_values():
    runs = [dict(run_id="a", **{k: 1 for k in AXES}), dict(run_id="b", **{k: 2 for k in AXES})]
    metrics = {
        r["run_id"]: dict(
            train_loss=0.1,
            test_loss=0.3,
            train_acc=1.0,
            test_acc=0.9,
            gap_loss=0.2,
            gap_acc=0.1,
            epochs=5,
            steps=50,
            wall_time_s=1.0,
            status="ok",
            history=[{"epoch": 1, "train_loss": 1.0, "lr": 0.3}],
        )
        for r in runs
    }
    table = an.runs_table(runs, metrics, long_table())
    for col in (*CONTRACT_COLUMNS, "invariant", "euclid", "bn"):
        assert col in table.columns
    assert table.set_index("run_id").loc["b", "euclid"] == 3.0
    hist = an.history_table(runs, metrics)
    assert list(hist["run_id"]) == ["a", "b"] and "train_loss" in hist
    assert list(hist["lr"]) == [1, 2] and list(hist["epoch_lr"]) == [0.3, 0.3]


def test_findings_sentences_follow_the_numbers():
    runs = grid_runs(lambda bs, reg, s: bs / 32 + REG[reg], lambda bs, reg, s: bs / 32 + 0.01 * s)
    for col in ("test_acc", "epochs"):
        runs[col] = 1.0
    kendall = an.kendall_table(runs, ["m"])
    batch = an.batch_comparison(runs, ["m"])
    inv = an.invariance_table(long_table())
    text = "\n".join(an.findings(runs, kendall, an.granulated_kendall(runs, ["m"]), batch, inv))
    assert (
        "Invariant (every copy/original ratio within 1 ± 0.01) on every copy measured — "
        "dinh_alpha10 (n = 2), dinh_alpha100 (n = 2): invariant." in text
    )
    assert "euclid is not invariant" in text and "α^2" in text
    assert "batch 1024 solutions came out sharper than batch 32" in text
    assert "significant at 0.05" in text
    assert "as 'flat minima generalise' predicts" in text
    # reverse the relation: the sentence must flip
    flipped = an.kendall_table(runs.assign(gap_loss=-runs["gap_loss"]), ["m"])
    text = "\n".join(
        an.findings(runs, flipped, pd.DataFrame(columns=["axis"]), batch.iloc[0:0], inv.iloc[0:0])
    )
    assert "against 'flat minima generalise'" in text


def test_seed_summary_mean_and_std_over_seeds():
    runs = grid_runs(lambda bs, reg, s: bs + s, lambda bs, reg, s: 0.1 * s)
    for col in ("train_loss", "test_loss", "train_acc", "test_acc", "epochs"):
        runs[col] = 1.0
    runs.loc[0, "status"] = "diverged"  # none-32-0: left out of its group
    table = an.seed_summary(runs, ["m"]).set_index(["regularizer", "batch_size"])
    assert len(table) == 6
    row = table.loc[("sam", 1024)]
    assert row["seeds"] == 2
    assert row["m_mean"] == pytest.approx(1024.5) and row["m_std"] == pytest.approx(
        np.std([0, 1], ddof=1)
    )
    assert row["gap_loss_mean"] == pytest.approx(0.05)
    lone = table.loc[("none", 32)]
    assert lone["seeds"] == 1 and lone["m_mean"] == 33 and math.isnan(lone["m_std"])


def test_seed_summary_carries_each_means_measurement_error_joined_by_run_id():
    runs = grid_runs(lambda bs, reg, s: bs + s, lambda bs, reg, s: 0.1 * s)
    for col in ("train_loss", "test_loss", "train_acc", "test_acc", "epochs"):
        runs[col] = 1.0
    rows = []
    for i, r in enumerate(runs.itertuples()):  # each run's own se, listed in reverse order
        for variant in ("original", "dinh_alpha10"):
            rows.append(dict(run_id=r.run_id, measure="m", variant=variant, data_se=0.3 * i,
                             seed_sd=0.4 * i if variant == "original" else 99.0))  # fmt: skip
    long = pd.DataFrame(rows[::-1])
    table = an.seed_summary(runs, ["m"], long).set_index(["regularizer", "batch_size"])
    ses = {r.run_id: 0.5 * i for i, r in enumerate(runs.itertuples())}  # √(0.3² + 0.4²)·i
    group = runs[(runs.regularizer == "sam") & (runs.batch_size == 1024)]
    expected = math.sqrt(sum(ses[r] ** 2 for r in group.run_id)) / len(group)
    assert table.loc[("sam", 1024), "m_meas_se"] == pytest.approx(expected)
    # without error bars (all NaN, or no long table) there is no such column
    assert "m_meas_se" not in an.seed_summary(runs, ["m"], long.assign(data_se=np.nan)).columns
    assert "m_meas_se" not in an.seed_summary(runs, ["m"]).columns


def test_psi_sentence_of_a_flatness_measure_says_which_sign_agrees():
    runs = grid_runs(lambda bs, reg, s: bs + REG[reg], lambda bs, reg, s: bs - 0.1 * REG[reg])
    runs["pacbayes_sigma"] = runs["m"]
    for col in ("test_acc", "epochs"):
        runs[col] = 1.0
    psi = an.granulated_kendall(runs, ["m", "pacbayes_sigma"])
    no_batch = an.batch_comparison(runs, ["m"]).iloc[0:0]
    text = an.findings(runs, an.kendall_table(runs, ["m"]), psi, no_batch, pd.DataFrame())
    sigma = [t for t in text if t.startswith("Granulated Kendall Ψ of pacbayes_sigma")]
    plain = [t for t in text if t.startswith("Granulated Kendall Ψ of m ")]
    assert sigma and all("larger means flatter" in t for t in sigma)
    assert plain and not any("flatter" in t for t in plain)
