"""One training run: config in, ``model.pt`` + ``metrics.json`` out, resumable after a kill.

``train_run`` is what the workflow's train script calls. The loop is plain: per epoch, set the
scheduled lr, take one regulariser step per minibatch (``flatness.regularizers.STEPS``), evaluate
on the full train and test sets in eval mode, log one line, checkpoint every K epochs. SIGTERM and
SIGUSR1 (SLURM's warning signals) checkpoint after the current step and raise
:class:`TrainingInterrupted`, so the job fails and the scheduler's retry resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flatness.batches import eval_mode
from flatness.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from flatness.config import OptimizerConfig, RunConfig
from flatness.data import TensorLoader, load_dataset
from flatness.models import build_model, save_model
from flatness.provenance import provenance
from flatness.regularizers import STEPS, extra_weight_decay

log = logging.getLogger(__name__)

# Keys a resumed run may change: they cap or observe training but do not alter its trajectory.
RESUMABLE_CHANGES = {"epochs", "target_train_loss", "checkpoint_every", "eval_batch_size", "device"}


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal (after checkpointing when a resume dir was given)."""

    def __init__(self, signum: int, checkpointed: bool) -> None:
        self.signum = signum
        where = "checkpoint written" if checkpointed else "no resume dir, nothing saved"
        super().__init__(f"training interrupted by {signal.Signals(signum).name} ({where})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def scaled_lr(cfg: OptimizerConfig, batch_size: int) -> float:
    """Base lr scaled with the batch size B relative to ``base_batch_size`` B₀:
    none → lr, linear → lr·B/B₀ (Goyal et al. 2017), sqrt → lr·√(B/B₀).

    >>> scaled_lr(OptimizerConfig(lr=0.1, lr_scaling="linear", base_batch_size=128), 512)
    0.4
    >>> scaled_lr(OptimizerConfig(lr=0.1, lr_scaling="sqrt", base_batch_size=128), 512)
    0.2
    """
    ratio = batch_size / cfg.base_batch_size
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def lr_at_epoch(cfg: OptimizerConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """Per-epoch schedule (epoch counted from 0): constant; step → base·γ^⌊e/step_size⌋;
    cosine → base·½(1 + cos(π e / epochs)). A pure function of the epoch, so the schedule's
    whole state is the epoch counter in the checkpoint.

    >>> c = OptimizerConfig(schedule="step", step_size=2, gamma=0.5)
    >>> [lr_at_epoch(c, 1.0, e, 10) for e in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    >>> lr_at_epoch(OptimizerConfig(schedule="cosine"), 1.0, 5, 10)
    0.5
    """
    if cfg.schedule == "step":
        return base_lr * cfg.gamma ** (epoch // cfg.step_size)
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam with coupled weight decay = optimizer's + regulariser's."""
    o = cfg.optimizer
    lr = scaled_lr(o, cfg.batch_size)
    wd = o.weight_decay + extra_weight_decay(cfg.regularizer)
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=wd)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=wd
    )


@torch.no_grad()
def evaluate(model, X, y, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole set, in eval mode."""
    total_loss = torch.zeros((), dtype=torch.float64, device=X.device)
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    with eval_mode(model):
        for i in range(0, X.shape[0], batch_size):
            logits = model(X[i : i + batch_size])
            t = y[i : i + batch_size]
            total_loss += torch.nn.functional.cross_entropy(logits, t, reduction="sum").double()
            correct += (logits.argmax(dim=1) == t).sum()
    return float(total_loss) / X.shape[0], int(correct) / X.shape[0]


@contextlib.contextmanager
def _stop_signals():
    """Record SIGTERM/SIGUSR1 in a dict instead of dying; the loop checks it after every step."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    wanted = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    old = {s: signal.signal(s, lambda signum, frame: flag.update(signum=signum)) for s in wanted}
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _deterministic(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if on:
        # cuBLAS needs a fixed workspace for reproducible GEMMs (must precede CUDA init).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _atomic_json(obj: Any, path: Path) -> None:
    """JSON through the package's one atomic write (temporary file, fsync, ``os.replace``)."""
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def train_run(
    cfg: RunConfig | dict,
    out_dir: str | os.PathLike,
    resume_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    on_config_change: str = "raise",
    run_id: str | None = None,
    axes: dict[str, Any] | None = None,
    keep_epochs: Sequence[int] = (),
    keep_dir: str | os.PathLike | None = None,
    stop_at_epoch: int | None = None,
    data_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one run and write ``out_dir/model.pt`` and ``out_dir/metrics.json``; return the
    metrics dict. ``resume_dir`` holds the checkpoint (resumed from when present); ``threads`` sets
    ``torch.set_num_threads``. A non-finite loss ends the run normally with status "diverged".
    The caller's global RNG state is left untouched (the run forks and seeds its own).

    ``run_id`` and ``axes`` (the grid point) are the run's identity: recorded in metrics.json,
    model.pt and the checkpoint, so every later stage joins on them and can refuse a file that
    sits under another run's path. A checkpoint recorded for another run id is "a different run".

    A checkpoint whose config differs (beyond a larger epoch cap or a lower loss target, which
    train on) raises with ``on_config_change="raise"``; ``"restart"`` discards it and trains
    from scratch — what a workflow wants when an edited config reruns the job.

    ``keep_epochs``: the weights after each of these epochs (0 = the initialisation) are kept in
    ``keep_dir/epoch{E}.pt`` (see :func:`kept_path`), with the run id and config inside, for
    measuring curvature along training. ``stop_at_epoch`` ends the loop after that epoch as if
    interrupted there (the lr schedule still spans ``cfg.epochs``): what :func:`snapshot_at`
    replays. ``data_cache``: the ``cache_dir`` of :func:`flatness.data.load_dataset` (the
    workflow passes its split cache).
    """
    if on_config_change not in ("raise", "restart"):
        raise ValueError(f"on_config_change={on_config_change!r}; choose 'raise' or 'restart'")
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    if threads:
        torch.set_num_threads(int(threads))
    device = resolve_device(cfg.device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with (
        _deterministic(cfg.deterministic),
        torch.random.fork_rng(devices=cuda),
        _stop_signals() as stop,
    ):
        identity = {"run_id": run_id, "axes": dict(axes) if axes is not None else None}
        keep = _Keeper(keep_epochs, keep_dir, cfg, run_id)
        return _train(
            cfg, Path(out_dir), resume_dir, device, stop, on_config_change, identity, keep,
            stop_at_epoch, data_cache,
        )  # fmt: skip


def initial_model(cfg: RunConfig | dict[str, Any], model_cfg: dict[str, Any]) -> torch.nn.Module:
    """The run's model at initialisation (θ₀), on the CPU in ``cfg.dtype``: seeds the global RNG
    with ``cfg.seed`` and builds ``model_cfg`` (the model section plus ``in_shape`` and
    ``num_classes``, as metrics.json's ``provenance.model_config`` records it).

    The one source of θ₀: the trainer calls it (and draws its dropout masks from the RNG state it
    leaves), and the measure stage rebuilds θ₀ with it for ``distance_from_init``, bitwise equal
    (wrap the call in ``torch.random.fork_rng`` to keep the caller's RNG state).
    """
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    torch.manual_seed(cfg.seed)
    # built on the CPU, then cast: the same values whichever device the run trains on
    return build_model(dict(model_cfg)).to(dtype=getattr(torch, cfg.dtype))


def kept_path(keep_dir: str | os.PathLike, epoch: int) -> Path:
    """Where the trainer keeps the weights after ``epoch`` epochs."""
    return Path(keep_dir) / f"epoch{int(epoch)}.pt"


@dataclasses.dataclass
class _Keeper:
    """Saves the weights after the chosen epochs (a no-op without epochs or a directory)."""

    epochs: Sequence[int]
    keep_dir: str | os.PathLike | None
    cfg: RunConfig
    run_id: str | None

    def __call__(self, model, model_cfg, epoch: int) -> None:
        if self.keep_dir is None or epoch not in self.epochs:
            return
        meta = {"epoch": epoch, "requested_epoch": epoch, "config": self.cfg.to_dict()}
        save_model(model, model_cfg, kept_path(self.keep_dir, epoch), self.run_id, meta)


def _train(
    cfg: RunConfig,
    out_dir: Path,
    resume_dir,
    device,
    stop,
    on_config_change: str,
    identity,
    keep: _Keeper,
    stop_at_epoch: int | None,
    data_cache,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_dataset(cfg.data, device, getattr(torch, cfg.dtype), cache_dir=data_cache)
    (X_tr, y_tr), (X_te, y_te) = splits.train, splits.test
    model_cfg = {
        **dataclasses.asdict(cfg.model),
        "in_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
    }
    # Seeds the global RNG: the model init here, the dropout masks later in the loop.
    model = initial_model(cfg, model_cfg).to(device=device)
    optimizer = build_optimizer(model, cfg)
    loader = TensorLoader(X_tr, y_tr, cfg.batch_size, seed=cfg.seed, augment=cfg.data.augment)
    step = STEPS[cfg.regularizer.name]
    base_lr = scaled_lr(cfg.optimizer, cfg.batch_size)
    # Everything the loop mutates besides model/optimizer/loader/RNG lives in this dict.
    prog: dict[str, Any] = {
        "epoch": 0,
        "steps": 0,
        "elapsed_s": 0.0,
        "status": "running",
        "stopped_by": None,
        "history": [],
        "loss_sum": 0.0,
        "batches": 0,
    }

    def checkpoint() -> None:
        prog["elapsed_s"] = time.perf_counter() - t0
        save_checkpoint({"config": cfg.to_dict(), **identity, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(),
                         "scheduler": {"epoch": prog["epoch"], "base_lr": base_lr},
                         "rng": rng_states(device), "loader": loader.state_dict(),
                         "progress": prog}, resume_dir)  # fmt: skip

    ck = load_checkpoint(resume_dir) if resume_dir is not None else None
    if ck is not None and on_config_change == "restart":
        try:
            _check_same_run(ck, cfg.to_dict(), identity, resume_dir)
        except CheckpointError as err:
            log.warning("%s: starting from scratch", err)
            ck = None
    if ck is not None:
        _check_same_run(ck, cfg.to_dict(), identity, resume_dir)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        loader.load_state_dict(ck["loader"])
        set_rng_states(ck["rng"], device)
        prog = ck["progress"]
        last = prog["history"][-1]["train_loss"] if prog["history"] else math.inf
        target = cfg.target_train_loss
        if (
            prog["status"] == "ok"
            and prog["epoch"] < cfg.epochs
            and not (target is not None and last <= target)
        ):  # finished under a smaller cap or a lower target: train on
            prog["status"], prog["stopped_by"] = "running", None
        log.info("resumed from %s at epoch %d, step %d", resume_dir, prog["epoch"], prog["steps"])
    t0 = time.perf_counter() - prog["elapsed_s"]
    if ck is None:  # a resumed epoch-0 checkpoint holds mid-epoch weights, not θ₀
        keep(model, model_cfg, 0)

    while prog["status"] == "running" and prog["epoch"] < cfg.epochs:
        if stop_at_epoch is not None and prog["epoch"] >= stop_at_epoch:
            break
        lr = lr_at_epoch(cfg.optimizer, base_lr, prog["epoch"], cfg.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        batches = tqdm(
            loader.epoch_batches(),
            total=len(loader) - loader.position,
            leave=False,
            disable=not sys.stderr.isatty(),
            desc=f"epoch {prog['epoch'] + 1}",
        )
        for X, y in batches:
            loss = float(step(model, X, y, optimizer, cfg.regularizer))
            prog["steps"] += 1
            if not math.isfinite(loss):
                prog["status"], prog["stopped_by"] = "diverged", "non-finite loss"
                break
            prog["loss_sum"] += loss
            prog["batches"] += 1
            if stop["signum"] is not None:
                _interrupt(stop["signum"], resume_dir, checkpoint)
        if prog["status"] == "diverged":
            log.warning("diverged at epoch %d, step %d", prog["epoch"] + 1, prog["steps"])
            break
        prog["epoch"] += 1
        train_loss, train_acc = evaluate(model, X_tr, y_tr, cfg.eval_batch_size)
        test_loss, test_acc = evaluate(model, X_te, y_te, cfg.eval_batch_size)
        row = {"epoch": prog["epoch"], "lr": lr, "batch_loss": prog["loss_sum"] / prog["batches"],
               "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
               "test_acc": test_acc, "time_s": time.perf_counter() - t0}  # fmt: skip
        prog["history"].append(row)
        prog["loss_sum"], prog["batches"] = 0.0, 0
        log.info("epoch %d/%d lr %.4g batch_loss %.4f train %.4f/%.4f test %.4f/%.4f %.1fs",
                 row["epoch"], cfg.epochs, lr, row["batch_loss"], train_loss, train_acc,
                 test_loss, test_acc, row["time_s"])  # fmt: skip
        if not math.isfinite(train_loss):
            prog["status"], prog["stopped_by"] = "diverged", "non-finite loss"
        elif cfg.target_train_loss is not None and train_loss <= cfg.target_train_loss:
            prog["status"], prog["stopped_by"] = "ok", "target_train_loss"
        elif _plateaued(prog, train_loss, cfg):
            prog["status"], prog["stopped_by"] = "ok", "plateau"
        elif prog["epoch"] >= cfg.epochs:
            prog["status"], prog["stopped_by"] = "ok", "epochs"
        if prog["status"] != "diverged":
            keep(model, model_cfg, prog["epoch"])
        if (
            resume_dir is not None
            and prog["status"] != "diverged"
            and (prog["status"] == "ok" or prog["epoch"] % cfg.checkpoint_every == 0)
        ):
            checkpoint()
        if stop["signum"] is not None and prog["status"] == "running":
            _interrupt(stop["signum"], resume_dir, checkpoint)
    if prog["status"] == "running" and stop_at_epoch is not None and prog["epoch"] < cfg.epochs:
        prog["status"], prog["stopped_by"] = "ok", "stop_at_epoch"
    if prog["status"] == "running":  # resumed with a larger cap already reached, or epochs = 0
        prog["status"], prog["stopped_by"] = "ok", "epochs"
    sizes = {"n_train": int(X_tr.shape[0]), "n_test": int(X_te.shape[0]),
             "batches_per_epoch": len(loader)}  # fmt: skip
    wall = time.perf_counter() - t0
    return _write_outputs(cfg, out_dir, model, model_cfg, prog, wall, device, identity, sizes)


def snapshot_at(
    cfg: RunConfig | dict,
    epoch: int,
    path: str | os.PathLike,
    run_id: str | None = None,
    axes: dict[str, Any] | None = None,
    final_model: str | os.PathLike | None = None,
    trained_epochs: int | None = None,
    keep_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    data_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The run's weights after ``epoch`` epochs, written to ``path``; returns where they came from.

    In order: a run that ended before ``epoch`` (``trained_epochs`` < epoch) has no such weights:
    ``final_model`` is copied and its ``epoch`` says where it stopped. Otherwise the copy the
    trainer kept in ``keep_dir`` is used when it is there and recorded for this run id and
    config. Otherwise training is replayed from scratch to ``epoch`` (same seed, same schedule
    over ``cfg.epochs``): the trainer is deterministic on the CPU (and with ``deterministic:
    true`` on CUDA), so the replay gives the weights the run had (tests check kept == replayed).
    The file holds ``epoch`` (reached) and ``requested_epoch``. ``data_cache`` as in
    :func:`train_run`.
    """
    import tempfile

    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)
    epoch = int(epoch)
    if final_model is not None and trained_epochs is not None and trained_epochs < epoch:
        blob = torch.load(final_model, map_location="cpu", weights_only=True)
        blob.update(epoch=int(trained_epochs), requested_epoch=epoch, config=cfg.to_dict())
        atomic_torch_save(blob, path)
        return {"source": "final model", "epoch": int(trained_epochs)}
    if keep_dir is not None and kept_path(keep_dir, epoch).exists():
        blob = torch.load(kept_path(keep_dir, epoch), map_location="cpu", weights_only=True)
        if blob.get("run_id") == run_id and blob.get("config") == cfg.to_dict():
            atomic_torch_save(blob, path)
            return {"source": "kept by the trainer", "epoch": epoch}
        log.warning("%s belongs to another run or config: replaying", kept_path(keep_dir, epoch))
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_run(cfg, Path(tmp) / "out", None, threads, run_id=run_id, axes=axes,
                            keep_epochs=[epoch], keep_dir=tmp, stop_at_epoch=epoch,
                            data_cache=data_cache)  # fmt: skip
        if kept_path(tmp, epoch).exists():
            blob = torch.load(kept_path(tmp, epoch), map_location="cpu", weights_only=True)
        else:  # the replay stopped (loss target, plateau, divergence) before the epoch
            blob = torch.load(Path(tmp) / "out" / "model.pt", map_location="cpu", weights_only=True)
            blob.update(epoch=int(metrics["epochs"]), config=cfg.to_dict())
        blob["requested_epoch"] = epoch
        atomic_torch_save(blob, path)
    return {"source": "replayed", "epoch": int(blob["epoch"])}


def _plateaued(prog: dict[str, Any], train_loss: float, cfg: RunConfig) -> bool:
    """Track the best full training loss; True once ``plateau_patience`` epochs in a row brought
    no new best (lower by at least ``plateau_min_delta``). Kept in ``prog`` so a
    resumed run counts on where it stopped."""
    best = prog.get("best_train_loss", math.inf)
    if train_loss < best - cfg.plateau_min_delta:
        prog["best_train_loss"], prog["epochs_since_best"] = train_loss, 0
    else:
        prog["epochs_since_best"] = prog.get("epochs_since_best", 0) + 1
    patience = cfg.plateau_patience
    return patience is not None and prog["epochs_since_best"] >= patience


def _interrupt(signum: int, resume_dir, checkpoint) -> None:
    if resume_dir is not None:
        checkpoint()
    raise TrainingInterrupted(signum, checkpointed=resume_dir is not None)


def _check_same_run(ck: dict, current: dict, identity: dict, resume_dir) -> None:
    saved = ck["config"]
    diff = sorted(
        k for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    )  # fmt: skip
    diff += [k for k in ("run_id", "axes") if ck.get(k) != identity[k]]
    if diff:
        raise CheckpointError(
            f"the checkpoint in {resume_dir} belongs to a different run (config differs in "
            f"{', '.join(diff)}); delete it or use another resume dir"
        )


def _write_outputs(
    cfg, out_dir, model, model_cfg, prog, wall, device, identity, sizes
) -> dict[str, Any]:
    last = prog["history"][-1] if prog["history"] else {}
    ok = prog["status"] == "ok" and last
    nan = float("nan")
    m = {k: (last[k] if ok else nan) for k in ("train_loss", "test_loss", "train_acc", "test_acc")}
    metrics = {
        **identity,
        **m,
        "gap_loss": m["test_loss"] - m["train_loss"],
        "gap_acc": m["train_acc"] - m["test_acc"],
        "epochs": prog["epoch"],
        "steps": prog["steps"],
        "wall_time_s": wall,
        "status": "ok" if prog["status"] == "ok" else "diverged",
        "stopped_by": prog["stopped_by"],
        **sizes,
        "history": prog["history"],
        "provenance": {**provenance(cfg.to_dict(), device), "model_config": model_cfg},
    }
    save_model(model, model_cfg, out_dir / "model.pt", run_id=identity["run_id"])
    _atomic_json(metrics, out_dir / "metrics.json")
    return metrics
