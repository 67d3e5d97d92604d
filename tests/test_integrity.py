"""Study integrity: per-run files are read back by the id they record, joins are on that id, and
the sanity checks catch a run whose numbers contradict each other.

The fixtures are real metrics.json/measures.json files written by the trainer's format; the grid
rows, the files and the long table are shuffled independently, so any positional pairing of two
lists would put a run's numbers on another run's row.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from flatness import analysis as an
from flatness.suite import AXES, make_run_id

N_TRAIN = 1000


def grid():
    rows = []
    for reg in ("none", "fam"):
        for bs in (32, 1024):
            for seed in (0, 1):
                axes = dict(dataset="d", model="mlp", optimizer="sgd", regularizer=reg,
                            batch_size=bs, lr=0.05, seed=seed)  # fmt: skip
                rows.append(dict(run_id=make_run_id(axes), **axes))
    return rows


def metrics_for(row: dict, k: int) -> dict:
    """A self-consistent metrics.json of run ``row``; ``k`` makes every run's numbers distinct."""
    axes = {a: row[a] for a in AXES}
    per_epoch = math.ceil(N_TRAIN / row["batch_size"])
    epochs = 3 + k
    history = [
        dict(epoch=e, lr=0.1, batch_loss=1.0 / e, train_loss=1.0 / e + k, train_acc=0.5 + e / 100,
             test_loss=2.0 / e + k, test_acc=0.4 + e / 100 + k / 1000, time_s=float(e))
        for e in range(1, epochs + 1)
    ]  # fmt: skip
    last = history[-1]
    return dict(
        run_id=row["run_id"],
        axes=axes,
        **{key: last[key] for key in ("train_loss", "test_loss", "train_acc", "test_acc")},
        gap_loss=last["test_loss"] - last["train_loss"],
        gap_acc=last["train_acc"] - last["test_acc"],
        epochs=epochs,
        steps=epochs * per_epoch,
        wall_time_s=float(k),
        status="ok",
        stopped_by="epochs",
        n_train=N_TRAIN,
        n_test=200,
        batches_per_epoch=per_epoch,
        history=history,
        provenance=dict(config=dict(batch_size=row["batch_size"], seed=row["seed"],
                                    optimizer=dict(lr=row["lr"]))),  # fmt: skip
    )


def measure_rows(run_id: str, k: int) -> list[dict]:
    return [
        dict(run_id=run_id, measure=m, function=m, variant=v, factor=f, value=float(10 * k + j),
             stderr=None, seconds=0.1, note="")
        for j, m in enumerate(("quotient_sharpness", "relative_flatness"))
        for v, f in (("original", 1.0), ("dinh_alpha10", 10.0))
    ]  # fmt: skip


@pytest.fixture()
def study(tmp_path):
    """Per-run files on disk (folder = run id), written in sorted id order as a glob would list."""
    rows = grid()
    truth = {}
    for k, row in enumerate(rows):
        folder = tmp_path / "results" / "runs" / row["run_id"]
        folder.mkdir(parents=True)
        m = metrics_for(row, k)
        (folder / "metrics.json").write_text(json.dumps(m))
        (folder / "measures.json").write_text(json.dumps(measure_rows(row["run_id"], k)))
        truth[row["run_id"]] = (m, k)
    ids = sorted(truth)
    metrics_paths = [tmp_path / "results" / "runs" / i / "metrics.json" for i in ids]
    measures_paths = [tmp_path / "results" / "runs" / i / "measures.json" for i in ids]
    return rows, truth, metrics_paths, measures_paths


def test_grid_order_differs_from_file_order(study):
    rows, _, metrics_paths, _ = study
    assert [r["run_id"] for r in rows] != [p.parent.name for p in metrics_paths]


@pytest.mark.parametrize("shuffle_seed", [0, 1, 2])
def test_every_runs_table_value_is_the_runs_own(study, shuffle_seed):
    rows, truth, metrics_paths, measures_paths = study
    rng = random.Random(shuffle_seed)
    rows = rng.sample(rows, len(rows))
    metrics = an.read_metrics(rng.sample(metrics_paths, len(metrics_paths)))
    long = an.read_measures(rng.sample(measures_paths, len(measures_paths)))
    long = long.sample(frac=1.0, random_state=shuffle_seed)
    an.check_study(rows, metrics, long)
    table = an.runs_table(rows, metrics, long)
    assert list(table["run_id"]) == [r["run_id"] for r in rows]
    for _, r in table.iterrows():
        m, k = truth[r["run_id"]]
        for key in ("train_loss", "test_loss", "train_acc", "test_acc", "gap_loss", "gap_acc",
                    "epochs", "steps", "wall_time_s", "status"):  # fmt: skip
            assert r[key] == m[key], (r["run_id"], key)
        for a in AXES:
            assert r[a] == m["axes"][a]
        assert r["quotient_sharpness"] == 10 * k and r["relative_flatness"] == 10 * k + 1
    hist = an.history_table(rows, metrics)
    for run_id, frame in hist.groupby("run_id"):
        m, _ = truth[run_id]
        assert list(frame["train_loss"]) == [h["train_loss"] for h in m["history"]]
        assert (frame["batch_size"] == m["axes"]["batch_size"]).all()
        assert list(frame["step"]) == [h["epoch"] * m["batches_per_epoch"] for h in m["history"]]


def test_a_file_under_another_runs_folder_is_refused(study):
    _, _, metrics_paths, measures_paths = study
    a, b = metrics_paths[0], metrics_paths[1]
    text_a, text_b = a.read_text(), b.read_text()
    a.write_text(text_b), b.write_text(text_a)  # swapped, as a positional bug would
    with pytest.raises(an.StudyIntegrityError, match=f"sits under '{a.parent.name}'"):
        an.read_metrics(metrics_paths)
    rows = json.loads(measures_paths[0].read_text())
    rows[1]["run_id"] = measures_paths[1].parent.name
    measures_paths[0].write_text(json.dumps(rows))
    with pytest.raises(an.StudyIntegrityError, match=measures_paths[1].parent.name):
        an.read_measures(measures_paths)


def test_metrics_without_a_run_id_are_refused(study):
    _, _, metrics_paths, _ = study
    m = json.loads(metrics_paths[0].read_text())
    del m["run_id"]
    metrics_paths[0].write_text(json.dumps(m))
    with pytest.raises(an.StudyIntegrityError, match="records no run_id"):
        an.read_metrics(metrics_paths)


def corrupt(metrics: dict, what: str) -> None:
    if what == "steps":  # a batch-1024 count of steps on a batch-32 run
        metrics["steps"] = metrics["epochs"] * math.ceil(N_TRAIN / 1024)
    elif what == "batches_per_epoch":
        metrics["batches_per_epoch"] += 1
    elif what == "history":
        metrics["history"][-1]["test_acc"] += 0.01
    elif what == "history_length":
        metrics["history"].pop()
    elif what == "axes":
        metrics["axes"]["regularizer"] = "fam"
    elif what == "config":
        metrics["provenance"]["config"]["batch_size"] = 1024


@pytest.mark.parametrize(
    "what, message",
    [
        ("steps", "steps in"),
        ("batches_per_epoch", "batches per epoch"),
        ("history", "last history record differs"),
        ("history_length", "history records for"),
        ("axes", "recorded axes give the id"),
        ("config", "config it was trained with differs"),
    ],
)
def test_sanity_checks_name_the_run_and_the_violation(study, what, message):
    rows, _, metrics_paths, measures_paths = study
    metrics = an.read_metrics(metrics_paths)
    victim = next(r["run_id"] for r in rows if r["batch_size"] == 32 and r["regularizer"] == "none")
    corrupt(metrics[victim], what)
    with pytest.raises(an.StudyIntegrityError) as err:
        an.check_study(rows, metrics, an.read_measures(measures_paths))
    text = str(err.value)
    assert f"{victim}: " in text and message in text, text
    named = [line.split(":")[0].strip() for line in text.splitlines()[1:]]
    assert set(named) == {victim}, "only the corrupted run is named"


def test_check_study_names_missing_and_extra_runs(study):
    rows, _, metrics_paths, measures_paths = study
    metrics = an.read_metrics(metrics_paths)
    long = an.read_measures(measures_paths)
    with pytest.raises(an.StudyIntegrityError, match="no metrics.json for"):
        an.check_study(rows + [dict(rows[0], run_id="ghost")], metrics, long)
    with pytest.raises(an.StudyIntegrityError, match="no measure rows for"):
        an.check_study(rows, metrics, long[long["run_id"] != rows[0]["run_id"]])


def test_a_diverged_run_is_not_held_to_the_step_count(study):
    rows, _, metrics_paths, measures_paths = study
    metrics = an.read_metrics(metrics_paths)
    m = metrics[rows[0]["run_id"]]
    m.update(status="diverged", steps=m["steps"] - 3, history=m["history"][:-1])
    an.check_study(rows, metrics, an.read_measures(measures_paths))


# --------------------------------------------------------------------------------------------
# Bootstrap intervals


def test_kendall_tau_b_matches_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(3)
    for n in (3, 8, 30):
        x, y = rng.integers(0, 4, n).astype(float), rng.normal(size=n).round(1)
        assert float(an.kendall_tau_b(x, y)) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert math.isnan(float(an.kendall_tau_b(np.ones(5), np.arange(5.0))))


def test_bootstrap_interval_covers_the_truth_at_its_nominal_rate():
    # difference of means of two normal samples, true difference 1: a 95% percentile interval
    # should cover it in roughly 95% of repetitions (≥ 85% of 200 is far outside chance for 95%).
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(200):
        a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
        lo, hi = an.bootstrap_ci(an.mean_difference, a, b, paired=False, n_resamples=500, seed=rep)
        covered += lo <= 1.0 <= hi
    assert 0.85 <= covered / 200 <= 0.99, covered


def test_bootstrap_is_reproducible_and_paired_resamples_keep_pairs():
    x = np.arange(12.0)
    same = an.bootstrap_ci(an.kendall_tau_b, x, 2 * x, paired=True, seed=5)
    assert same == (1.0, 1.0)  # a paired resample of a monotone relation stays monotone
    assert same == an.bootstrap_ci(an.kendall_tau_b, x, 2 * x, paired=True, seed=5)
    lo, hi = an.bootstrap_ci(an.kendall_tau_b, x, 2 * x, paired=False, seed=5)
    assert lo < 0 < hi  # unpaired resampling destroys the relation


def test_batch_comparison_outcome_rows_with_intervals():
    rows = grid()
    runs = pd.DataFrame(rows).assign(status="ok")
    runs["test_acc"] = np.where(runs["batch_size"] == 32, 0.95, 0.93) + 0.001 * runs["seed"]
    runs["train_acc"], runs["gap_loss"] = 1.0, 0.1
    runs["gap_acc"] = runs["train_acc"] - runs["test_acc"]
    runs["m"] = runs["batch_size"].astype(float)
    table = an.batch_comparison(runs, ["m"]).set_index("measure")
    acc = table.loc["test_acc"]
    assert acc["kind"] == "outcome" and pd.isna(acc["large_sharper"])
    assert acc["diff_mean"] == pytest.approx(-0.02)
    assert acc["diff_ci_low"] <= -0.02 <= acc["diff_ci_high"] < 0
    assert acc["cliffs_delta"] == -1 and acc["n_small"] == acc["n_large"] == 4
    assert table.loc["m", "kind"] == "measure" and bool(table.loc["m", "large_sharper"])


def test_front_page_states_the_headline_with_intervals_and_inlines_the_figure():
    rows = grid()
    runs = pd.DataFrame(rows).assign(status="ok", train_acc=1.0, gap_loss=0.1)
    runs["test_acc"] = np.where(runs["batch_size"] == 32, 0.95, 0.93)
    runs["gap_acc"] = 1.0 - runs["test_acc"]
    runs["quotient_sharpness"] = runs["batch_size"] / 10.0 + runs["seed"]
    batch = an.batch_comparison(runs, ["quotient_sharpness"])
    kendall = an.kendall_table(runs, ["quotient_sharpness"])
    inv = pd.DataFrame(
        [dict(measure="quotient_sharpness", variant="dinh_alpha10", n=8, invariant=True)]
    )
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 200
    page = an.front_page_rst("Title\n=====\n\nIntro.\n", runs, batch, kendall, inv, png)
    assert page.startswith("Title\n=====\n\nIntro.")
    assert "**Batch 1024 vs batch 32**" in page and "test accuracy" in page
    assert "-0.02 [" in page  # the difference with its interval
    assert "``quotient_sharpness``" in page and "Kendall τ of each invariant measure" in page
    assert "data:image/png;base64," in page
    assert max(len(line) for line in page.splitlines()) < 10_000  # docutils' line limit
    from docutils.core import publish_parts

    html = publish_parts(page, writer_name="html")["html_body"]
    assert "<table" in html and 'src="data:image/png;base64,' in html
