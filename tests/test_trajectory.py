"""Curvature along training: the weights kept at chosen epochs, and their replay."""

from __future__ import annotations

import pytest
import torch

from flatness.models import load_model
from flatness.train import kept_path, snapshot_at, train_run

from .test_train import small


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """One 4-epoch run (dropout + augmentation: every RNG stream) keeping epochs 0, 1, 3."""
    root = tmp_path_factory.mktemp("kept")
    cfg = small(data={"augment": True})
    metrics = train_run(cfg, root / "out", run_id="r", keep_epochs=[0, 1, 3], keep_dir=root)
    return cfg, root, metrics


def test_the_trainer_keeps_the_chosen_epochs_with_their_identity(kept_run):
    cfg, root, metrics = kept_run
    assert sorted(p.name for p in root.glob("epoch*.pt")) == ["epoch0.pt", "epoch1.pt", "epoch3.pt"]
    blob = torch.load(kept_path(root, 3), weights_only=True)
    assert (blob["run_id"], blob["epoch"], blob["requested_epoch"]) == ("r", 3, 3)
    model = load_model(kept_path(root, 1), expect_run_id="r", expect_epoch=1)
    assert model.training is False
    with pytest.raises(ValueError, match="epoch 1, not 3"):
        load_model(kept_path(root, 1), expect_epoch=3)
    # the weights differ from epoch to epoch, and epoch 4 (the last) equals model.pt
    assert not equal(weights(kept_path(root, 0)), weights(kept_path(root, 1)))
    assert metrics["epochs"] == 4


@pytest.mark.parametrize("epoch", [0, 1, 3])
def test_a_replayed_snapshot_equals_the_kept_one_bitwise(kept_run, tmp_path, epoch):
    cfg, root, _ = kept_run
    info = snapshot_at(cfg, epoch, tmp_path / "s.pt", run_id="r")
    assert info == {"source": "replayed", "epoch": epoch}
    assert equal(weights(tmp_path / "s.pt"), weights(kept_path(root, epoch)))


def test_a_kept_snapshot_is_used_only_for_its_own_run_and_config(kept_run, tmp_path):
    cfg, root, _ = kept_run
    assert snapshot_at(cfg, 1, tmp_path / "a.pt", run_id="r", keep_dir=root)["source"] == (
        "kept by the trainer"
    )
    assert equal(weights(tmp_path / "a.pt"), weights(kept_path(root, 1)))
    other = small(data={"augment": True}, seed=4)
    info = snapshot_at(other, 1, tmp_path / "b.pt", run_id="r", keep_dir=root)
    assert info["source"] == "replayed"
    assert not equal(weights(tmp_path / "b.pt"), weights(kept_path(root, 1)))


def test_an_epoch_after_the_run_stopped_is_its_final_model(tmp_path):
    cfg = small(epochs=6, target_train_loss=10.0)  # stops after epoch 1
    m = train_run(cfg, tmp_path / "out", run_id="r")
    assert m["epochs"] == 1
    info = snapshot_at(cfg, 5, tmp_path / "s.pt", run_id="r",
                       final_model=tmp_path / "out" / "model.pt", trained_epochs=m["epochs"])  # fmt: skip
    assert info == {"source": "final model", "epoch": 1}
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    assert (blob["epoch"], blob["requested_epoch"]) == (1, 5)
    assert equal(blob["state_dict"], weights(tmp_path / "out" / "model.pt"))
    # a replay that stops early (nothing told it the run ended) gives the same weights
    info = snapshot_at(cfg, 5, tmp_path / "r.pt", run_id="r")
    assert info == {"source": "replayed", "epoch": 1}
    assert equal(weights(tmp_path / "r.pt"), blob["state_dict"])


def test_keeping_epochs_does_not_change_the_run(tmp_path, kept_run):
    cfg, _, metrics = kept_run
    plain = train_run(cfg, tmp_path, run_id="r")
    assert plain["history"] == [
        {**row, "time_s": plain["history"][i]["time_s"]} for i, row in enumerate(metrics["history"])
    ]
    assert equal(weights(tmp_path / "model.pt"), weights(kept_run[1] / "out" / "model.pt"))
