"""The GPU-hour estimate: counted FLOPs against hand counts, the regulariser multipliers against a
real step's FLOP count, the dataset size table against the loaded data, and the CLI on every paper
study without any dataset on disk."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from flatness.cli import main
from flatness.config import REGULARIZERS, DataConfig, RegularizerConfig
from flatness.data import dataset_sizes, load_dataset
from flatness.estimate import (
    BACKWARD_FACTOR,
    GRADIENT_PASSES,
    estimate_run,
    estimate_study,
    forward_flops,
)
from flatness.models import build_model
from flatness.regularizers import STEPS
from flatness.suite import expand_grid

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((REPO / "config" / "paper").glob("*.yaml"))


def run_cfg(regularizer="none", **over):
    return {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [7, 5]},
        "regularizer": {"name": regularizer},
        "batch_size": 100,
        "epochs": 3,
        **over,
    }


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_forward_flops_are_two_in_out_per_linear(bias):
    # FlopCounterMode counts a matmul (m×k)·(k×n) as 2·m·n·k and ignores bias adds and ReLU.
    widths, in_shape, classes = [7, 5], [1, 3, 4], 4
    dims = [12, *widths, classes]
    expected = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    cfg = {"name": "mlp", "widths": widths, "bias": bias, "in_shape": in_shape,
           "num_classes": classes}  # fmt: skip
    assert forward_flops(cfg) == expected == 2 * (12 * 7 + 7 * 5 + 5 * 4)


def test_forward_flops_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    forward_flops({"name": "lenet5", "in_shape": [1, 28, 28], "num_classes": 10})
    assert torch.equal(state, torch.random.get_rng_state())


def test_every_regularizer_has_a_pass_count_and_sam_asam_cost_two():
    assert set(GRADIENT_PASSES) == set(REGULARIZERS)
    assert GRADIENT_PASSES["sam"] == GRADIENT_PASSES["asam"] == 2
    assert GRADIENT_PASSES["none"] == GRADIENT_PASSES["fam"] == 1
    plain, sam = estimate_run(run_cfg("none")), estimate_run(run_cfg("sam"))
    assert sam.train_flops == 2 * plain.train_flops
    assert sam.eval_flops == plain.eval_flops  # evaluation is one forward either way


def _step_flops(model, regularizer, X, y) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as counter:
        STEPS[regularizer](model, X, y, opt, RegularizerConfig(name=regularizer))
    return counter.get_total_flops()


@pytest.mark.parametrize("model_cfg", [
    {"name": "mlp", "widths": [512, 512], "head_widths": [64], "in_shape": [1, 28, 28]},
    {"name": "lenet5", "in_shape": [1, 28, 28]},
])  # fmt: skip
def test_pass_counts_match_a_counted_training_step(model_cfg):
    """One real step under FlopCounterMode: SAM/ASAM exactly twice a plain step, FAM within 2%
    of it (its head term is O(N·d² + d²·m), small beside the net: not so on a toy MLP, hence the
    FAM study's MLP here), and a plain step at most BACKWARD_FACTOR forwards (an upper bound)."""
    cfg = {**model_cfg, "num_classes": 10}
    torch.manual_seed(0)
    model = build_model(cfg).train()
    X, y = torch.randn(4, *cfg["in_shape"]), torch.randint(0, 10, (4,))
    fwd = forward_flops(cfg)
    plain = _step_flops(model, "none", X, y)
    assert 2 * fwd * 4 <= plain <= BACKWARD_FACTOR * fwd * 4
    for reg in ("sam", "asam", "fam"):
        ratio = _step_flops(model, reg, X, y) / plain
        assert ratio == pytest.approx(GRADIENT_PASSES[reg], rel=0.02), reg


def test_run_estimate_is_the_stated_formula():
    est = estimate_run(run_cfg(epochs=4, batch_size=100))
    n_train, n_test, shape, classes = dataset_sizes(DataConfig(name="digits"))
    fwd = 2 * (64 * 7 + 7 * 5 + 5 * 10)
    assert (est.n_train, est.n_test, est.forward_flops) == (n_train, n_test, fwd)
    assert est.train_flops == 3 * fwd * n_train * 4
    assert est.eval_flops == fwd * (n_train + n_test) * 4
    assert est.steps == math.ceil(n_train / 100) * 4 and est.epochs == 4


def test_time_is_flops_over_throughput_or_the_pass_floor():
    cfg = run_cfg(epochs=2, batch_size=100, eval_batch_size=1000)
    est = estimate_run(cfg, throughput=1e30, pass_overhead_s=0.003)  # every pass at the floor
    n_train, n_test = est.n_train, est.n_test
    eval_batches = math.ceil(n_train / 1000) + math.ceil(n_test / 1000)
    assert est.seconds == pytest.approx(est.steps * 0.003 + 2 * eval_batches * 0.001)
    est = estimate_run(run_cfg("sam"), throughput=1e9, pass_overhead_s=0.0)  # pure FLOPs
    assert est.seconds == pytest.approx(est.flops / 1e9)


@pytest.mark.parametrize("data", [
    {"name": "digits"},
    {"name": "digits", "test_fraction": 0.3, "n_train": 500, "n_test": 100},
    {"name": "mnist5k", "test_fraction": 0.2},
])  # fmt: skip
def test_dataset_sizes_match_the_loaded_data(data):
    cfg = DataConfig(**data)
    splits = load_dataset(cfg)
    assert dataset_sizes(cfg) == (
        splits.train[0].shape[0], splits.test[0].shape[0], splits.input_shape,
        splits.num_classes,
    )  # fmt: skip


def test_torchvision_sizes_are_the_documented_ones():
    assert dataset_sizes(DataConfig(name="cifar10")) == (50_000, 10_000, (3, 32, 32), 10)
    assert dataset_sizes(DataConfig(name="cifar100"))[3] == 100
    assert dataset_sizes(DataConfig(name="mnist")) == (60_000, 10_000, (1, 28, 28), 10)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_cli_estimates_every_paper_study_without_data(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here: nothing may be read or downloaded
    assert main(["estimate", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    runs = expand_grid(yaml.safe_load(path.read_text()))
    first = out.splitlines()[0]
    assert first.startswith(f"{path}: ≈ ") and f"{len(runs)} runs" in first and "GPU-hours" in first
    ids = {r.run_id for r in runs}
    rows = [
        line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ids
    ]
    assert sorted(r[0] for r in rows) == sorted(r.run_id for r in runs)
    total = float(first.split("≈ ")[1].split()[0])
    assert total > 0 and total == pytest.approx(sum(float(r[-1]) for r in rows), rel=0.02)
    assert not (tmp_path / "data").exists()


def test_cli_bad_config_is_a_one_line_error(tmp_path, capsys):
    bad = yaml.safe_load(PAPER_CONFIGS[0].read_text())
    bad["models"][next(iter(bad["models"]))]["widht"] = [3]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["estimate", "--configfile", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "widht" in err[0]


FULL_SIZE = ["keskar_f1_mnist", "rangamani_cifar10_alexnet", "petzka_lenet5_cifar10",
             "fam_cifar10_resnet18"]  # fmt: skip


@pytest.mark.parametrize("name", FULL_SIZE)
def test_recorded_gpu_hours_match_the_estimate(name):
    """The ``# Expected: ≈ N GPU-hours`` first line of each full-size config and its README row
    hold the estimate, to the rounding shown (so an edit that changes the cost fails here)."""
    path = REPO / "config" / "paper" / f"{name}.yaml"
    total = sum(e.gpu_hours for e in estimate_study(yaml.safe_load(path.read_text())))
    first = path.read_text().splitlines()[0]
    m = re.match(r"# Expected: ≈ ([\d.]+) GPU-hours at ", first)
    assert m and f"--configfile config/paper/{name}.yaml" in first, first
    assert float(m.group(1)) == pytest.approx(total, rel=0.1)
    (row,) = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith(f"| `config/paper/{name}.yaml` |")
    ]
    cell = row.rstrip(" |").rsplit("|", 1)[1].strip()
    assert cell.startswith("≈ ") and float(cell[2:]) == float(m.group(1)), row
