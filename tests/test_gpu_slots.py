"""GPU slots (flatness.gpu_slots) on CPU with fake device ids: real processes contend for flocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flatness import gpu_slots
from flatness.gpu_slots import GpuSlotTimeout, claim_gpu

# A job: claim a slot, record what it got and when, hold it, exit (the kernel drops the flock).
WORKER = """
import json, os, sys, time
from flatness.gpu_slots import claim_gpu
slot = claim_gpu("cuda", poll=0.05)
start = time.time()
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
end = time.time()
with open(sys.argv[1], "w") as f:
    json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "slot": slot.gpu_id,
               "start": start, "end": end}, f)
"""


def _env(lock_dir, ids):
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    env.update(FLATNESS_GPU_IDS=ids, FLATNESS_GPU_LOCK_DIR=str(lock_dir), FLATNESS_GPU_SLOTS="auto")
    return env


@pytest.fixture
def slot_env(monkeypatch, tmp_path):
    """In-process claims: a private lock dir, no SLURM, CUDA_VISIBLE_DEVICES restored afterwards."""
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "FLATNESS_GPU_IDS", "FLATNESS_GPU_SLOTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLATNESS_GPU_LOCK_DIR", str(tmp_path / "locks"))
    yield monkeypatch
    for slot in list(gpu_slots._HELD):
        slot.release()


def test_concurrent_jobs_get_distinct_gpus(tmp_path):
    hold, n = 1.0, 6
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"job{i}.json"), str(hold)],
            env=_env(tmp_path / "locks", "0,1,2"),
        )
        for i in range(n)
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    jobs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(n)]
    assert all(j["cvd"] == j["slot"] for j in jobs)
    assert {j["cvd"] for j in jobs} == {"0", "1", "2"}
    # No two holders of one id overlap in time.
    for gpu in "012":
        spans = sorted((j["start"], j["end"]) for j in jobs if j["cvd"] == gpu)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end
    # At most three at any instant; the three that waited started once some holder had ended.
    by_start = sorted(jobs, key=lambda j: j["start"])
    for j in by_start[3:]:
        assert j["start"] >= min(k["end"] for k in by_start[:3])
    for j in jobs:
        assert sum(k["start"] <= j["start"] < k["end"] for k in jobs) <= 3


def test_killed_holder_releases_its_slot(slot_env, tmp_path):
    lock_dir = tmp_path / "locks"
    holder = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "never.json"), "120"],
        env=_env(lock_dir, "0"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        slot_env.setenv("FLATNESS_GPU_IDS", "0")
        with pytest.raises(GpuSlotTimeout, match=str(lock_dir)):
            claim_gpu("cuda", timeout=0.3, poll=0.05)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        t0 = time.monotonic()
        slot = claim_gpu("cuda", timeout=5, poll=0.05)
        assert slot.gpu_id == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert time.monotonic() - t0 < 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()


def test_slots_within_one_process_and_release(slot_env):
    slot_env.setenv("FLATNESS_GPU_IDS", "0,1")
    with claim_gpu("auto") as a:
        b = claim_gpu("cuda", timeout=2)
        assert {a.gpu_id, b.gpu_id} == {"0", "1"}
        assert os.environ["CUDA_VISIBLE_DEVICES"] == b.gpu_id
        with pytest.raises(GpuSlotTimeout):
            claim_gpu("cuda", timeout=0.1, poll=0.02)
    assert claim_gpu("cuda", timeout=1).gpu_id == a.gpu_id  # a's slot came back with the block


def test_jobs_per_device_doubles_up_after_filling_each_gpu(slot_env):
    slot_env.setenv("FLATNESS_GPU_IDS", "0,1")
    slot_env.setenv("FLATNESS_GPU_JOBS_PER_DEVICE", "2")
    got = [claim_gpu("cuda", timeout=2).gpu_id for _ in range(4)]
    assert got == ["0", "1", "0", "1"]


def test_cuda_visible_devices_with_one_id_is_kept(slot_env):
    slot_env.setenv("CUDA_VISIBLE_DEVICES", "3")
    slot = claim_gpu("cuda")
    assert slot.gpu_id == "3" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert slot.path.name == "gpu-3.0.lock"


def test_cuda_visible_devices_list_is_shared_out(slot_env):
    got = []
    for _ in range(2):  # a claim narrows CUDA_VISIBLE_DEVICES; each job starts from the full list
        slot_env.setenv("CUDA_VISIBLE_DEVICES", "2,5")
        got.append(claim_gpu("cuda", timeout=2).gpu_id)
    assert got == ["2", "5"]


def test_slurm_job_is_left_alone(slot_env):
    slot_env.setenv("SLURM_JOB_ID", "123")
    slot_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert claim_gpu("cuda") is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    slot_env.setenv("FLATNESS_GPU_SLOTS", "on")  # a local run inside an salloc
    assert claim_gpu("cuda").gpu_id == "0"


@pytest.mark.parametrize("device", ["cpu", "cuda:1", "mps"])
def test_non_slot_devices_are_noops(slot_env, device):
    slot_env.setenv("FLATNESS_GPU_IDS", "0,1,2")
    assert claim_gpu(device) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_auto_without_gpu_and_off_are_noops(slot_env):
    slot_env.setenv("FLATNESS_GPU_IDS", "")
    assert claim_gpu("auto") is None
    slot_env.setenv("CUDA_VISIBLE_DEVICES", "-1")
    slot_env.delenv("FLATNESS_GPU_IDS")
    assert claim_gpu("auto") is None
    slot_env.setenv("FLATNESS_GPU_IDS", "0")
    slot_env.setenv("FLATNESS_GPU_SLOTS", "off")
    assert claim_gpu("cuda") is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "-1"
