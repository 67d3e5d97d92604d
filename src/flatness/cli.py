"""Command line: ``python -m flatness train --config run.yaml --out DIR [--resume-dir DIR]``;
``python -m flatness unlock-stale`` removes the lock a crashed Snakemake left (``make run`` does);
``python -m flatness estimate --configfile study.yaml`` prints the study's estimated GPU-hours
(:mod:`flatness.estimate`).

Exit status: 0 for a finished run (also a diverged one: divergence is a result, recorded in
``metrics.json``); 2 for a bad config or missing data (one line on stderr); 128 + signal number
when SIGTERM/SIGUSR1 interrupted training (after checkpointing), so a scheduler retries the job.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatness", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run: writes OUT/model.pt and OUT/metrics.json")
    t.add_argument("--config", required=True, type=Path, help="YAML/JSON file with one run config")
    t.add_argument("--out", required=True, type=Path, help="output folder")
    t.add_argument("--resume-dir", type=Path, default=None, help="checkpoint folder (resumes)")
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    u = sub.add_parser(
        "unlock-stale",
        help="remove a Snakemake lock left by a crashed run (refuses while Snakemake runs here)",
    )
    u.add_argument("--directory", type=Path, default=Path("."), help="the working directory")
    from flatness.estimate import PASS_OVERHEAD_S, SUSTAINED_FLOPS

    e = sub.add_parser(
        "estimate",
        help="estimated GPU-hours of a study's training (FLOPs counted, throughput assumed)",
    )
    e.add_argument("--configfile", required=True, nargs="+", type=Path, help="study YAML file(s)")
    e.add_argument(
        "--tflops",
        type=float,
        default=SUSTAINED_FLOPS / 1e12,
        help="assumed sustained float32 throughput, TFLOP/s (default %(default)g)",
    )
    e.add_argument(
        "--pass-overhead-ms",
        type=float,
        default=PASS_OVERHEAD_S * 1e3,
        help="assumed floor per forward+backward pass, ms (default %(default)g)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "unlock-stale":
        return _unlock_stale(args.directory)
    if args.command == "estimate":
        return _estimate(args.configfile, args.tflops * 1e12, args.pass_overhead_ms / 1e3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from flatness.checkpoint import CheckpointError
    from flatness.config import RunConfig
    from flatness.data import DatasetNotFoundError
    from flatness.train import TrainingInterrupted, train_run

    try:
        raw = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config}: expected a mapping of config keys")
        cfg = RunConfig.from_dict(raw)
        metrics = train_run(cfg, args.out, resume_dir=args.resume_dir, threads=args.threads)
    except TrainingInterrupted as err:
        print(f"flatness: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, FileNotFoundError, CheckpointError, yaml.YAMLError) as err:
        # DatasetNotFoundError and config errors are one-line messages meant for the user
        kind = "data" if isinstance(err, DatasetNotFoundError) else "error"
        print(f"flatness {kind}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(
        f"{metrics['status']}: train_loss {metrics['train_loss']:.4g} test_acc "
        f"{metrics['test_acc']:.4f} epochs {metrics['epochs']} -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _unlock_stale(directory: Path) -> int:
    from flatness.workflow_lock import LockHeld, recover

    try:
        print(f"flatness: {recover(directory)}", file=sys.stderr)
    except LockHeld as err:
        print(f"flatness: {err}", file=sys.stderr)
        return 1
    return 0


def _estimate(paths: list[Path], throughput: float, overhead_s: float) -> int:
    from flatness.estimate import estimate_study, format_estimate

    for i, path in enumerate(paths):
        try:
            config = yaml.safe_load(path.read_text()) or {}
            if not isinstance(config, dict):
                raise ValueError(f"{path}: expected a mapping of config keys")
            estimates = estimate_study(config, throughput, overhead_s)
        except (ValueError, KeyError, FileNotFoundError, yaml.YAMLError) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            print(f"flatness error: {path}: {' '.join(what.split())}", file=sys.stderr)
            return 2
        print(("\n" if i else "") + format_estimate(estimates, str(path), throughput, overhead_s))
    return 0
