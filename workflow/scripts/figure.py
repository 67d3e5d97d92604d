"""rules fig_*: execute the figure's papermill notebook with its input tables and output path.

Every named input except ``notebook`` becomes a notebook parameter of the same name, plus
``out``; the executed notebook is kept as the rule's ``log.notebook``. Runs in this job's
interpreter, so the kernel ``python3`` is the venv's (or the conda env's) Python.
"""

import sys

import papermill

sm = snakemake  # noqa: F821
sys.stderr = sys.stdout = open(sm.log.stderr, "w")

parameters = {k: str(v) for k, v in sm.input.items() if k != "notebook"}
parameters["out"] = str(sm.output[0])
papermill.execute_notebook(
    sm.input.notebook,
    sm.log.notebook,
    parameters=parameters,
    kernel_name="python3",
    progress_bar=False,
)
