"""Side-by-side benchmarks of flatness against the reference algorithms (``make bench``).

Each topic module exposes ``run(ctx) -> list[Row]``; :mod:`benchmarks.run` times them in one process and
writes ``results.json`` and ``results.md``. Timings are not asserted in tests: they live here.
"""
