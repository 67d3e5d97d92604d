"""Trainer: FAM step (closed-form curvature) vs a plain SGD step and vs FAM as released
(``torch.autograd.functional.hessian`` of the last weight); the trainer's throughput vs a bare
PyTorch loop doing the same job; the device-resident loader vs torch's DataLoader."""

from __future__ import annotations

import copy
import tempfile

import torch
from torch import nn

from benchmarks.harness import Row, failed_row, speed_row, time_fn, time_pair
from benchmarks.references import fam_authors_step

TOPIC = "trainer"
BATCH = 128
LAM = 0.1


def run(ctx) -> list[Row]:
    rows = []
    for part in (_fam_rows, _throughput_rows, _loader_rows):
        for name in ("mlp", "lenet5") if part is _fam_rows else ("mlp",):
            try:
                rows += part(ctx, name)
            except Exception as exc:  # noqa: BLE001 — a missing API must not stop the others
                rows.append(failed_row(TOPIC, f"{name}: {part.__name__.strip('_')}", exc))
    return rows


def _batches(ctx, count: int):
    X, y = ctx.X.to(ctx.device), ctx.y.to(ctx.device)
    return [(X[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(count)]


def _steps(step, model, batches):
    """A closure running one optimizer step per batch on its own copy of ``model``."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def go():
        for X, y in batches:
            step(net, opt, X, y)

    return go


def _fam_rows(ctx, name: str) -> list[Row]:
    from flatness.config import RegularizerConfig
    from flatness.regularizers import fam_step, plain_step

    cfg = RegularizerConfig(name="fam", lam=LAM)
    model = ctx.model(name)
    n_steps = 5 if ctx.quick else 20
    batches = _batches(ctx, n_steps)
    reps = ctx.repeats()

    def ours(net, opt, X, y):
        fam_step(net, X, y, opt, cfg)

    def plain(net, opt, X, y):
        plain_step(net, X, y, opt)

    def authors(net, opt, X, y):
        fam_authors_step(net, opt, X, y, lam=LAM)

    t_ours, t_plain, _, _ = time_pair(
        _steps(ours, model, batches), _steps(plain, model, batches), ctx.device, reps
    )
    # The released FAM step takes seconds on the MLP (d·m = 5,120 backward passes): few steps.
    few = batches[: 1 if ctx.quick else 3]
    t_auth_few, _ = time_fn(_steps(authors, model, few), ctx.device, 1, warmup=1)
    scale = len(batches) / len(few)
    t_auth = type(t_auth_few)(*(x * scale for x in (t_auth_few.median, t_auth_few.low,
                                                    t_auth_few.high)), runs=[])  # fmt: skip

    # Agreement: one step of each FAM from the same state and batch gives the same parameters.
    diffs = []
    nets = [copy.deepcopy(model).train() for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.01) for n in nets]
    X, y = batches[0]
    fam_step(nets[0], X, y, opts[0], cfg)
    fam_authors_step(nets[1], opts[1], X, y, lam=LAM)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        diffs.append(float((a - b).abs().max()))
    agree = max(diffs)

    auth_vs_plain = t_auth.median / t_plain.median
    rows = [
        speed_row(
            TOPIC,
            f"{name}: FAM step (closed-form curvature) vs plain SGD step, batch {BATCH}",
            t_ours,
            t_plain,
            max_cost=1.2,
            notes=f"{len(batches)} steps",
        ),
        speed_row(
            TOPIC,
            f"{name}: FAM step vs FAM as released (autograd.functional.hessian of W)",
            t_ours,
            t_auth,
            agreement=f"params after one step: max abs Δ {agree:.1e}",
            agree_ok=agree <= 1e-5,
            notes=f"released step = {auth_vs_plain:.3g}× a plain step",
            extra={"released_vs_plain": auth_vs_plain, "released_steps_timed": len(few)},
        ),
    ]
    rows[-1].target = "agree ≤ 1e-5"
    return rows


def _throughput_rows(ctx, name: str) -> list[Row]:
    from flatness.train import train_run

    epochs = 1 if ctx.quick else 3
    cfg = {
        "data": {"name": "mnist5k"},
        "model": {"name": name},
        "batch_size": BATCH,
        "epochs": epochs,
        "seed": 0,
        "device": ctx.device.type,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t_trainer, t_bare, metrics, bare_acc = time_pair(
            lambda: train_run(cfg, tmp),
            lambda: _bare_loop(ctx, name, epochs, tmp),
            ctx.device,
            ctx.repeats(),
        )
    row = speed_row(
        TOPIC,
        f"{name}: trainer (train_run) vs bare PyTorch loop, {epochs} epochs, batch {BATCH}",
        t_trainer,
        t_bare,
        min_speedup=0.9,
        agreement=f"train acc {metrics['train_acc']:.3f} vs {bare_acc:.3f}",
        notes="both load data, evaluate train/test each epoch, save the model",
    )
    row.target = "throughput ≥ 0.9× bare (ref/ours ≥ 0.9)"
    return [row]


def _bare_loop(ctx, name: str, epochs: int, out_dir: str) -> float:
    """The same job in plain PyTorch: load, shuffle, step, evaluate each epoch, save."""
    from benchmarks.fixtures import build
    from flatness.config import DataConfig
    from flatness.data import load_dataset

    splits = load_dataset(DataConfig(name="mnist5k"), ctx.device)
    (Xtr, ytr), (Xte, yte) = splits.train, splits.test
    torch.manual_seed(0)
    model = build(name).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(Xtr.shape[0], generator=gen).to(ctx.device)
        for i in range(0, Xtr.shape[0], BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for X, y in ((Xtr, ytr), (Xte, yte)):
                logits = torch.cat([model(X[i : i + 1024]) for i in range(0, X.shape[0], 1024)])
                nn.functional.cross_entropy(logits, y)
                acc = float((logits.argmax(1) == y).float().mean())
    torch.save(model.state_dict(), f"{out_dir}/bare.pt")
    return acc


def _loader_rows(ctx, name: str) -> list[Row]:
    from torch.utils.data import DataLoader, TensorDataset

    from flatness.data import TensorLoader

    X, y = ctx.X.to(ctx.device), ctx.y.to(ctx.device)
    epochs = 2 if ctx.quick else 10
    ours_loader = TensorLoader(X, y, BATCH, seed=0)
    ref_loader = DataLoader(TensorDataset(ctx.X, ctx.y), batch_size=BATCH, shuffle=True)

    def ours():
        return sum(xb.shape[0] for _ in range(epochs) for xb, _ in ours_loader.epoch_batches())

    def ref():
        seen = 0
        for _ in range(epochs):
            for xb, yb in ref_loader:
                xb, yb = xb.to(ctx.device), yb.to(ctx.device)
                seen += xb.shape[0]
        return seen

    t_ours, t_ref, _, _ = time_pair(ours, ref, ctx.device, ctx.repeats())
    row = speed_row(
        TOPIC,
        f"mnist5k: device-resident TensorLoader vs torch DataLoader, {epochs} epochs of batch {BATCH}",
        t_ours,
        t_ref,
        min_speedup=1.0,
        notes=f"{X.shape[0]} samples, shuffled",
    )
    return [row]
