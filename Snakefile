# flatness-repro: train across batch sizes and regularisers, measure flatness on every model and
# on reparameterised copies, correlate with the generalisation gap, render the report.
# `snakemake --cores N` runs the default study; `--configfile config/paper/<study>.yaml` replaces it.
from snakemake.utils import min_version

min_version("9.13")


# A --configfile on the command line is a whole study: do not merge the default study under it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.input,
