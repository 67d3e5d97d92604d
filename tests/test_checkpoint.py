"""Checkpoints: atomic writes, weights_only loading, arbitrary pickles refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from flatness.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)


class Payload:
    """Stands in for any object whose unpickling would run code."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_round_trip_and_no_temporary_left(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "progress": {"epoch": 2, "history": [{"a": 1.5}]}}
    save_checkpoint(state, tmp_path)
    back = load_checkpoint(tmp_path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["progress"]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_arbitrary_pickle_is_refused(tmp_path, how, capsys):
    path = tmp_path / CHECKPOINT_NAME
    if how == "torch":
        torch.save({"format_version": 1, "evil": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"format_version": 1, "evil": Payload()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_foreign_file_is_refused(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="not a flatness checkpoint"):
        load_checkpoint(tmp_path)


def test_rng_states_round_trip(tmp_path):
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    save_checkpoint({"rng": rng_states(cpu)}, tmp_path)
    expected = torch.rand(4)
    set_rng_states(load_checkpoint(tmp_path)["rng"], cpu)
    assert torch.equal(torch.rand(4), expected)
