"""rule startup_probe: a timed start-up probe per rule → startup.csv (read by rule costs).

Start-up probe: a fresh ``python -c`` (this job's interpreter, as Snakemake runs scripts) that
executes the script preamble's imports and the job script's own module-level imports; for figure
rules it also runs papermill on a notebook holding only the figure notebook's imports (kernel
launch included). Timed ``params.repeats`` times; the median is the rule's start-up per job.
Identical probes (the five figure rules) are timed once. A job of its own with no inputs, so it
runs beside the study's first jobs instead of as a serial tail before the report.
"""

import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from flatness.analysis import PREAMBLE_IMPORTS, notebook_imports, script_imports

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log[0], "w")


def probe_code(script, notebook, scratch):
    lines = list(PREAMBLE_IMPORTS) + script_imports(Path(script).read_text())
    if notebook:
        cells = notebook_imports(json.loads(Path(notebook).read_text()))
        nb = {
            "cells": [
                {
                    "cell_type": "code",
                    "execution_count": None,
                    "metadata": {},
                    "outputs": [],
                    "source": "\n".join(cells),
                }
            ],
            "metadata": {
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
            "nbformat": 4,
            "nbformat_minor": 4,
        }
        # named by its content: figure notebooks with the same imports share one probe
        digest = hashlib.sha1("\n".join(cells).encode()).hexdigest()[:12]
        path = scratch / f"imports_{digest}.ipynb"
        path.write_text(json.dumps(nb))
        lines += [
            *(["import papermill"] if "import papermill" not in lines else []),
            f"papermill.execute_notebook({str(path)!r}, {str(path.with_suffix('.out.ipynb'))!r},"
            " kernel_name='python3', progress_bar=False)",
        ]
    return "\n".join(lines)


def time_probe(code, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


startup, timed = [], {}
with tempfile.TemporaryDirectory() as tmp:
    for rule, src in sm.params.jobs.items():
        code = probe_code(src["script"], src["notebook"], Path(tmp))
        if code not in timed:
            timed[code] = time_probe(code, sm.params.repeats)
            print(f"probe for {rule}: {[round(t, 3) for t in timed[code][1]]} s\n  {code!r}")
        startup.append({"rule": rule, "startup_s": timed[code][0]})

pd.DataFrame(startup).to_csv(sm.output[0], index=False, float_format="%.4g")
