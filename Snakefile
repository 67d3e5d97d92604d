# flatness-repro: train across batch sizes and regularisers, measure flatness on every model and
# on reparameterised copies, correlate with the generalisation gap, render the report.
# `snakemake --cores N` runs the default study; `--configfile config/paper/<study>.yaml` replaces it.
import os

from snakemake.utils import min_version

min_version("9.13")


# A --configfile on the command line is a whole study: do not merge the default study under it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# The report's first page is generated (rule front_page: workflow/report/workflow.rst plus the
# headline numbers and the invariance figure) and read only when the report is built, after the
# run. An absolute path, since `report:` resolves relative paths against this file, not --directory.
FRONT_PAGE = "results/report/front_page.rst"


report: os.path.abspath(FRONT_PAGE)


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/curvature.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.input,
