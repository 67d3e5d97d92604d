"""RunConfig.from_dict: strict validation whose errors name the offending key."""

from __future__ import annotations

import pytest

from flatness.config import RunConfig


def test_round_trip_defaults():
    cfg = RunConfig.from_dict({"model": {"name": "lenet5"}, "optimizer": {"betas": [0.8, 0.9]}})
    assert cfg.model.name == "lenet5" and cfg.optimizer.betas == (0.8, 0.9)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"batch_size": "64"}, "batch_size"),
        ({"optimizer": {"lr": -1.0}}, "optimizer.lr"),
        ({"optimizer": {"schedule": "linear"}}, "optimizer.schedule"),
        ({"regularizer": {"name": "sharp"}}, "regularizer.name"),
        ({"regularizer": {"variant": "wrong"}}, "regularizer.variant"),
        ({"data": {"nam": "digits"}}, "data.nam"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"model": {"widths": [8, 0]}}, "model.widths"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"extra": 1}, "extra"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"'?{key}'?"):
        RunConfig.from_dict(bad)


def test_optional_fields_accept_null():
    assert RunConfig.from_dict({"target_train_loss": None}).target_train_loss is None
    assert RunConfig.from_dict({"data": {"n_train": 100}}).data.n_train == 100
