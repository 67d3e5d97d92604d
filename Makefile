# The two commands a researcher types: `make run` and `make test`. Both set up .venv themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.flatness-installed
# pip prints a "Location ... is ignored" line per local wheel folder on these machines: noise.
PIP_QUIET := 2> >(grep -v 'is ignored' >&2)

.PHONY: help install system-deps run report test test-fast lint bench lock clean paper \
	paper-keskar paper-rangamani paper-petzka paper-fam

help:
	@echo "make run    - set up .venv, run the default study on $(CORES) cores, build report/report.html"
	@echo "make test   - set up .venv (and chromium/slurm when root), lint, run every test"
	@echo "make bench  - side-by-side benchmarks against the reference algorithms"
	@echo "make paper  - the four paper reproductions on mnist5k (report/<study>.html each);"
	@echo "              one at a time: make paper-keskar | paper-rangamani | paper-petzka | paper-fam"

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock $(PIP_QUIET)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . $(PIP_QUIET)
	touch $@

install: $(STAMP)

# Debian's chromium (report browser test) and SLURM (one-node cluster test); needs root.
system-deps:
	bash .ci/system_deps.sh

# After a crash (SIGKILL, power loss) Snakemake's lock stays: unlock it unless Snakemake runs here.
run: $(STAMP)
	$(PY) -m flatness unlock-stale
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete
	$(BIN)/snakemake --cores $(CORES) --report report/report.html
	@echo "report: report/report.html"

# Paper reproductions on the bundled MNIST digits: each study in its own working directory
# results/paper/<config>/ (results/, logs, Snakemake state), its report at report/<config>.html.
PAPER_STUDIES := keskar:keskar_f1_mnist5k rangamani:rangamani_mnist5k \
	petzka:petzka_lenet5_mnist5k fam:fam_mlp_mnist5k
paper_config = $(word 2,$(subst :, ,$(filter $(1):%,$(PAPER_STUDIES))))

PAPER_TARGETS := $(foreach s,$(PAPER_STUDIES),paper-$(word 1,$(subst :, ,$(s))))

paper: $(PAPER_TARGETS)

# A static pattern rule: make skips implicit rules for .PHONY targets.
$(PAPER_TARGETS): paper-%: $(STAMP)
	mkdir -p results/paper/$(call paper_config,$*) report
	$(PY) -m flatness unlock-stale --directory results/paper/$(call paper_config,$*)
	$(BIN)/snakemake -s $(CURDIR)/Snakefile --cores $(CORES) --rerun-incomplete \
		--directory results/paper/$(call paper_config,$*) \
		--configfile $(CURDIR)/config/paper/$(call paper_config,$*).yaml
	$(BIN)/snakemake -s $(CURDIR)/Snakefile --cores $(CORES) \
		--directory results/paper/$(call paper_config,$*) \
		--configfile $(CURDIR)/config/paper/$(call paper_config,$*).yaml \
		--report $(CURDIR)/report/$(call paper_config,$*).html
	@echo "report: report/$(call paper_config,$*).html"

report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --report report/report.html

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --cores 1

test: $(STAMP) system-deps lint
	$(PY) -m pytest

# Package tests only (no Snakemake runs): the quick loop while editing src/flatness.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not slurm and not browser"

bench: $(STAMP)
	$(PY) -m benchmarks.run --out benchmarks/out

# Re-pin requirements.lock from what pyproject.toml resolves to today.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q ".[workflow,dev]" pyhessian setuptools $(PIP_QUIET)
	.venv-lock/bin/pip freeze --all --exclude-editable | grep -v '^flatness' > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf results report .snakemake benchmarks/out
