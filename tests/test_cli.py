"""The command line: exit codes, one-line errors, and a real SIGTERM to a training process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
import yaml

from flatness.cli import main
from flatness.train import train_run


def write_cfg(path, **over):
    cfg = {
        "data": {"name": "digits", "n_train": 256, "n_test": 64},
        "model": {"name": "mlp", "widths": [16]},
        "optimizer": {"lr": 0.05},
        "batch_size": 16,
        "epochs": 2,
        "device": "cpu",
        **over,
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def test_train_command_writes_outputs(tmp_path):
    write_cfg(tmp_path / "run.yaml")
    assert (
        main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 0
    )
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["status"] == "ok"


def test_diverged_run_exits_zero(tmp_path):
    write_cfg(tmp_path / "run.yaml", optimizer={"lr": 1e12})
    assert (
        main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 0
    )
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["status"] == "diverged"


def test_bad_key_is_a_one_line_error(tmp_path, capsys):
    write_cfg(tmp_path / "run.yaml", optimizer={"lr": 0.1, "momentun": 0.9})
    assert (
        main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer.momentun" in err[0]


def test_missing_offline_data_is_a_one_line_error(tmp_path, capsys):
    write_cfg(tmp_path / "run.yaml", data={"name": "cifar10", "root": str(tmp_path / "none")})
    assert (
        main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "none") in err[0] and "download" in err[0]


def test_sigterm_checkpoints_exits_nonzero_and_resume_is_bitwise(tmp_path):
    cfg = write_cfg(tmp_path / "run.yaml", epochs=120, seed=2, model={"name": "mlp",
                    "widths": [16], "dropout": 0.1})  # fmt: skip
    ck = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flatness", "train", "--config", str(tmp_path / "run.yaml"),
         "--out", str(tmp_path / "killed"), "--resume-dir", str(ck), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (ck / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    stopped_at = torch.load(ck / "checkpoint.pt", weights_only=True)["progress"]["steps"]
    assert 0 < stopped_at < 120 * 16

    resumed = train_run(cfg, tmp_path / "resumed", resume_dir=ck)
    straight = train_run(cfg, tmp_path / "straight")
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "steps", "epochs"):
        assert resumed[key] == straight[key]
    a = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
