"""The training loop: resume equals uninterrupted (bitwise, CPU), divergence, stopping, outputs."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from flatness import regularizers
from flatness.checkpoint import CheckpointError
from flatness.config import DataConfig, RunConfig
from flatness.data import load_dataset
from flatness.models import load_model
from flatness.train import TrainingInterrupted, evaluate, lr_at_epoch, train_run

TIME_KEYS = {"time_s", "wall_time_s"}
AUG = {"augment": True}


def small(**over) -> dict:
    """digits, 256 training samples, an MLP with dropout (``AUG`` adds augmentation, so the
    resume tests use every RNG stream: global, data order, augmentation)."""
    cfg = {
        "data": {"name": "digits", "n_train": 256, "n_test": 128, "augment": False},
        "model": {"name": "mlp", "widths": [32], "dropout": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "batch_size": 48,  # 256/48: the last batch is partial
        "epochs": 4,
        "seed": 3,
        "device": "cpu",
    }
    for k, v in over.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


def strip_times(obj):
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if k not in TIME_KEYS | {"provenance"}}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


def same_weights(dir_a, dir_b) -> bool:
    a = torch.load(dir_a / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(dir_b / "model.pt", weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_and_reloaded_model_reproduce_test_accuracy(tmp_path):
    m = train_run(small(), tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["epochs"] == 4 and on_disk["steps"] == 4 * 6
    assert len(on_disk["history"]) == 4 and on_disk["stopped_by"] == "epochs"
    assert on_disk["gap_acc"] == pytest.approx(m["train_acc"] - m["test_acc"])
    prov = on_disk["provenance"]
    assert prov["seed"] == 3 and prov["config"]["data"]["name"] == "digits"
    assert {"torch", "numpy", "python", "device", "git_commit"} <= set(prov)
    import torchvision  # read from its version file, not imported, by the trainer

    assert prov["torchvision"] == torchvision.__version__ and prov["torch"] == torch.__version__
    model = load_model(tmp_path / "model.pt")
    X, y = load_dataset(DataConfig(name="digits", n_train=256, n_test=128)).test
    loss, acc = evaluate(model, X, y, 1024)
    assert acc == m["test_acc"] and loss == pytest.approx(m["test_loss"], rel=1e-6)
    assert m["test_acc"] > 0.5  # it learned something


def test_the_cached_split_trains_the_same_run_bitwise(tmp_path):
    """The workflow's split cache (data_cache) changes nothing a run computes."""
    a = train_run(small(), tmp_path / "source")
    b = train_run(small(), tmp_path / "cached", data_cache=tmp_path / "cache")
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    assert strip_times(a) == strip_times(b) and same_weights(tmp_path / "source", tmp_path / "cached")


def test_one_seed_gives_identical_metrics_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_run(small(epochs=2), tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    b = train_run(small(epochs=2), tmp_path / "b")
    c = train_run(small(epochs=2, seed=4), tmp_path / "c")
    assert strip_times(a) == strip_times(b) and same_weights(tmp_path / "a", tmp_path / "b")
    assert strip_times(a) != strip_times(c)


def test_resumed_to_a_larger_cap_equals_uninterrupted(tmp_path):
    straight = train_run(small(epochs=4, data=AUG), tmp_path / "straight")
    train_run(small(epochs=2, data=AUG), tmp_path / "half", resume_dir=tmp_path / "ck")
    resumed = train_run(small(epochs=4, data=AUG), tmp_path / "resumed", resume_dir=tmp_path / "ck")
    assert strip_times(resumed) == strip_times(straight)
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_signal_mid_epoch_checkpoints_and_resume_is_bitwise(tmp_path, monkeypatch):
    cfg = small(optimizer={"name": "adam", "lr": 1e-3}, data=AUG)
    straight = train_run(cfg, tmp_path / "straight")
    plain, calls = regularizers.STEPS["none"], []

    def step_then_signal(*args, **kw):
        calls.append(1)
        if len(calls) == 9:  # mid-epoch 2 (6 batches per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return plain(*args, **kw)

    monkeypatch.setitem(regularizers.STEPS, "none", step_then_signal)
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        train_run(cfg, tmp_path / "killed", resume_dir=tmp_path / "ck")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    monkeypatch.setitem(regularizers.STEPS, "none", plain)
    resumed = train_run(cfg, tmp_path / "resumed", resume_dir=tmp_path / "ck")
    assert strip_times(resumed) == strip_times(straight)
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_resume_dir_of_another_run_is_refused(tmp_path):
    train_run(small(epochs=1), tmp_path / "a", resume_dir=tmp_path / "ck")
    with pytest.raises(CheckpointError, match="batch_size"):
        train_run(small(epochs=2, batch_size=32), tmp_path / "b", resume_dir=tmp_path / "ck")


def test_outputs_and_checkpoint_record_the_runs_identity(tmp_path):
    axes = {"batch_size": 48, "seed": 3}
    m = train_run(small(epochs=1), tmp_path / "a", tmp_path / "ck", run_id="run-a", axes=axes)
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk["run_id"] == m["run_id"] == "run-a" and on_disk["axes"] == axes
    # 256 samples in batches of 48: 6 batches an epoch, the last partial
    assert (on_disk["n_train"], on_disk["batches_per_epoch"]) == (256, 6)
    assert on_disk["steps"] == on_disk["epochs"] * 6
    ck = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    assert ck["run_id"] == "run-a" and ck["axes"] == axes
    assert load_model(tmp_path / "a" / "model.pt", expect_run_id="run-a") is not None
    with pytest.raises(ValueError, match="holds the model of run 'run-a', not 'run-b'"):
        load_model(tmp_path / "a" / "model.pt", expect_run_id="run-b")
    # the same config under another run id is another run: its checkpoint is not resumed
    with pytest.raises(CheckpointError, match="run_id"):
        train_run(small(epochs=2), tmp_path / "b", tmp_path / "ck", run_id="run-b", axes=axes)


def test_changed_config_restarts_from_scratch_when_asked(tmp_path):
    # What the workflow does when an edited config reruns a finished job: the old checkpoint is
    # stale, so the run must equal a fresh one, not fail and not resume from the other config.
    train_run(small(epochs=2), tmp_path / "old", resume_dir=tmp_path / "ck")
    edited = small(epochs=2, optimizer={"momentum": 0.5})
    fresh = train_run(edited, tmp_path / "fresh")
    rerun = train_run(edited, tmp_path / "rerun", tmp_path / "ck", on_config_change="restart")
    assert strip_times(rerun) == strip_times(fresh)
    assert same_weights(tmp_path / "fresh", tmp_path / "rerun")
    with pytest.raises(ValueError, match="on_config_change"):
        train_run(edited, tmp_path / "x", on_config_change="ignore")


def test_divergence_ends_the_run_normally_with_nan_metrics(tmp_path):
    m = train_run(small(optimizer={"lr": 1e12}, model={"dropout": 0.0}), tmp_path)
    assert m["status"] == "diverged" and m["stopped_by"] == "non-finite loss"
    assert all(math.isnan(m[k]) for k in ("train_loss", "test_acc", "gap_loss", "gap_acc"))
    assert (tmp_path / "model.pt").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_target_train_loss_stops_early(tmp_path):
    m = train_run(small(epochs=40, target_train_loss=0.5, optimizer={"lr": 0.1}), tmp_path)
    assert m["stopped_by"] == "target_train_loss" and m["epochs"] < 40
    assert m["train_loss"] <= 0.5 < m["history"][-2]["train_loss"]


def test_plateau_stops_when_the_best_loss_stops_improving(tmp_path):
    # The stopping rule recomputed from the run's own history: epoch e is a new best when its
    # loss is below best − 0.001; the run ends at the first `patience` non-improving epochs.
    m = train_run(small(epochs=60, plateau_patience=3, optimizer={"lr": 0.3}), tmp_path)
    losses = [h["train_loss"] for h in m["history"]]
    best, since, stop = math.inf, 0, None
    for epoch, loss in enumerate(losses, 1):
        best, since = (loss, 0) if loss < best - 1e-3 else (best, since + 1)
        if since == 3:
            stop = epoch
            break
    assert stop is not None and m["epochs"] == stop < 60 and m["stopped_by"] == "plateau"
    # A frozen model never improves after its first epoch: it stops at 1 + patience.
    frozen = train_run(small(plateau_patience=2, epochs=10, optimizer={"lr": 1e-30}),
                       tmp_path / "frozen")  # fmt: skip
    assert frozen["epochs"] == 3 and frozen["stopped_by"] == "plateau"


def test_plateau_patience_is_validated():
    with pytest.raises(ValueError, match="plateau_patience"):
        RunConfig.from_dict(small(plateau_patience=0))


def test_history_follows_the_schedule(tmp_path):
    cfg = small(epochs=3, optimizer={"schedule": "step", "step_size": 1, "gamma": 0.5,
                                     "lr_scaling": "linear", "base_batch_size": 24})  # fmt: skip
    m = train_run(cfg, tmp_path)
    o = RunConfig.from_dict(cfg).optimizer
    assert [h["lr"] for h in m["history"]] == [lr_at_epoch(o, 0.1, e, 3) for e in range(3)]
    assert [h["lr"] for h in m["history"]] == [0.1, 0.05, 0.025]


@pytest.mark.parametrize("name", sorted(regularizers.STEPS))
def test_every_regularizer_trains(tmp_path, name):
    cfg = small(epochs=1, regularizer={"name": name, "lam": 0.01}, model={"dropout": 0.0})
    m = train_run(cfg, tmp_path)
    assert m["status"] == "ok" and m["history"][0]["batch_loss"] < math.log(10)


def test_float64_run_and_lenet_on_mnist5k_subset(tmp_path):
    m = train_run(small(epochs=1, dtype="float64", deterministic=True), tmp_path / "f64")
    assert load_model(tmp_path / "f64" / "model.pt").state_dict()["1.weight"].dtype == torch.float64
    cfg = small(epochs=1, data={"name": "mnist5k", "n_train": 128, "n_test": 64, "augment": False},
                model={"name": "lenet5"})  # fmt: skip
    assert train_run(cfg, tmp_path / "lenet")["status"] == "ok" and m["status"] == "ok"


def test_metrics_json_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    from flatness import train

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    path = tmp_path / "metrics.json"
    train._atomic_json({"a": 1}, path)
    assert events == ["fsync", "replace"]
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    from flatness.checkpoint import atomic_write

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
