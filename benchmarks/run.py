"""``python -m benchmarks.run --out benchmarks/out [--quick] [--only NAME]``: every benchmark topic in
one process, side by side with its reference, written to ``results.json`` and ``results.md``.

``--quick`` shrinks the data (N = 512) and the repeats for development on a busy machine; the
figures in benchmarks/RESULTS.md come from a full run on a quiet one.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
import traceback

import torch

from benchmarks.harness import Row, failed_row, machine_description, markdown_table, write_results

#: topic name → module (``run(ctx) -> list[Row]``) or ``module:function`` (a function of that form).
TOPICS = {
    "relative": "benchmarks.bench_relative",
    "curvature": "benchmarks.bench_curvature",
    "trainer": "benchmarks.bench_trainer",
    "keskar": "benchmarks.bench_keskar",
    "measure_cost": "benchmarks.bench_keskar:run_cost",
    "dag": "benchmarks.bench_dag",  # `snakemake -n` on the 1,000-run grid vs bare Snakemake
    # last: its probes run in fresh processes, which need the trained models cached above
    "memory": "benchmarks.bench_memory",
}


RESULTS_MD = os.path.join(os.path.dirname(__file__), "RESULTS.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def publish(out_dir: str, target: str = RESULTS_MD) -> str:
    """Replace the table between the markers of ``target`` by the one in ``out_dir``."""
    with open(os.path.join(out_dir, "results.md")) as f:
        table = f.read()
    with open(target) as f:
        text = f.read()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(target, "w") as f:
        f.write(f"{head}{START}\n{table}{END}{tail}")
    return target


def _reference_check_row() -> Row:
    """The references against dense float64 Hessians on tiny nets: the agreement columns below
    compare against them, so they are checked first (a few seconds)."""
    from benchmarks import check_references

    ok = check_references.main() == 0
    return Row(
        "references",
        "Rangamani, Petzka, exact trace, FAM as released vs dense float64 Hessians (tiny nets)",
        agreement="see python -m benchmarks.check_references",
        target="rel ≤ 1e-10 (power iteration 1e-6)",
        passed=ok,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out", help="folder for results and caches")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--only", action="append", choices=sorted(TOPICS), help="repeatable")
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"only copy OUT/results.json's table into {RESULTS_MD} (no benchmark is run)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 2 for a full run, 1 with --quick on a shared machine)",
    )
    args = parser.parse_args(argv)

    if args.publish:
        print(f"wrote {publish(args.out)}")
        return 0
    threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(threads)
    from benchmarks.fixtures import make_context

    start = time.perf_counter()
    ctx = make_context(args.out, quick=args.quick)
    print(f"setup {time.perf_counter() - start:.1f} s, train accuracy {ctx.train_acc}", flush=True)
    rows = [_reference_check_row()]
    for topic in args.only or list(TOPICS):
        t0 = time.perf_counter()
        try:
            module, _, func = TOPICS[topic].partition(":")
            rows += getattr(importlib.import_module(module), func or "run")(ctx)
        except Exception as exc:  # noqa: BLE001 — report the topic as not run, keep the others
            traceback.print_exc()
            rows.append(failed_row(topic, "(whole topic)", exc))
        print(f"{topic}: {time.perf_counter() - t0:.1f} s", flush=True)

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(ctx.device),
        "device": str(ctx.device),
        "threads": threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "total_s": round(time.perf_counter() - start, 1),
        "n_eval": ctx.n_eval,
        "train_acc": ctx.train_acc,
    }
    json_path, md_path = write_results(rows, args.out, meta)
    print(markdown_table(rows))
    print(f"wrote {json_path} and {md_path} in {meta['total_s']} s")
    # A missed target is a finding, written to the table, not a crash of `make bench`.
    return 0


if __name__ == "__main__":
    sys.exit(main())
