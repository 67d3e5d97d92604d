# Curvature beyond the final number: along training (trajectory), per weight layer (layer_profile)
# and as a spectral density (spectrum). Each is off unless its config section turns it on.
#
# Along training: the trainer keeps the weights after each of trajectory.epochs in the undeclared
# results/ckpt/{run}/epochs/ (scripts/train.py reads the list from the config, not from params:
# the list does not change the model, so editing it must not retrain). `snapshot` takes that copy,
# or replays the run to the epoch (bitwise equal on the CPU) when the run was trained before the
# epoch was listed; `measure_epoch` measures it. Adding an epoch adds only these two jobs per run.
#
# Each group of rules exists only when the study turns it on: every rule's output patterns are
# tried against every input path while the DAG is built, so rules a study does not use would
# cost each of its jobs (≈ 0.6 ms a job on the 1,000-run grid, `make bench` topic dag).


if TRAJECTORY_EPOCHS:

    rule snapshot:
        input:
            model="results/runs/{run}/model.pt",
            metrics="results/runs/{run}/metrics.json",
        output:
            "results/runs/{run}/epochs/epoch{epoch}.pt",
        log:
            "results/logs/snapshot/{run}/epoch{epoch}.log",
        benchmark:
            "results/benchmarks/snapshot/{run}.epoch{epoch}.tsv"
        group:
            run_group
        conda:
            "../../envs/flatness.yaml"
        threads: 1
        resources:
            mem_mb=per_attempt(4000),
            runtime=per_attempt(120),
            gpu=run_gpu,
        params:
            run_id="{run}",
            axes=run_axes,
            config=run_config,
            keep_dir="results/ckpt/{run}/epochs",
        script:
            "../scripts/snapshot.py"

    rule measure_epoch:
        input:
            snapshot="results/runs/{run}/epochs/epoch{epoch}.pt",
            metrics="results/runs/{run}/metrics.json",
        output:
            "results/runs/{run}/epochs/epoch{epoch}.json",
        log:
            "results/logs/measure_epoch/{run}/epoch{epoch}.log",
        benchmark:
            "results/benchmarks/measure_epoch/{run}.epoch{epoch}.tsv"
        group:
            run_group
        conda:
            "../../envs/flatness.yaml"
        threads: 1
        resources:
            mem_mb=per_attempt(4000),
            runtime=per_attempt(120),
            gpu=uses_gpu(config["measure"]["device"]),
        params:
            run_id="{run}",
            data=run_data,
            measure=epoch_measure_config(config),
        script:
            "../scripts/measure_epoch.py"

    rule trajectory:
        input:
            runs="results/tables/runs.csv",
            epochs=expand(
                "results/runs/{run}/epochs/epoch{epoch}.json",
                run=RUN_IDS,
                epoch=TRAJECTORY_EPOCHS,
            ),
        output:
            table=report(
                "results/tables/trajectory.csv",
                caption="../report/trajectory.rst",
                category="Curvature",
                labels={"table": "measures along training"},
            ),
            figure=report(
                "results/figures/trajectory.png",
                caption="../report/trajectory.rst",
                category="Curvature",
                labels={"figure": "measures along training"},
            ),
        log:
            "results/logs/trajectory.log",
        benchmark:
            "results/benchmarks/trajectory/trajectory.tsv"
        conda:
            "../../envs/flatness.yaml"
        params:
            kind="trajectory",
        script:
            "../scripts/curvature_table.py"


if LAYER_MEASURES:

    rule layers:
        input:
            model="results/runs/{run}/model.pt",
            metrics="results/runs/{run}/metrics.json",
        output:
            "results/runs/{run}/layers.json",
        log:
            "results/logs/layers/{run}.log",
        benchmark:
            "results/benchmarks/layers/{run}.tsv"
        group:
            run_group
        conda:
            "../../envs/flatness.yaml"
        threads: 1
        resources:
            mem_mb=per_attempt(4000),
            runtime=per_attempt(120),
            gpu=uses_gpu(config["measure"]["device"]),
        params:
            run_id="{run}",
            data=run_data,
            measure=config["measure"],
            measures=LAYER_MEASURES,
        script:
            "../scripts/layers.py"

    rule layer_profile:
        input:
            runs="results/tables/runs.csv",
            layers=expand("results/runs/{run}/layers.json", run=RUN_IDS),
        output:
            table=report(
                "results/tables/layer_profile.csv",
                caption="../report/layer_profile.rst",
                category="Curvature",
                labels={"table": "per-layer profile"},
            ),
            figure=report(
                "results/figures/layer_profile.png",
                caption="../report/layer_profile.rst",
                category="Curvature",
                labels={"figure": "per-layer profile"},
            ),
        log:
            "results/logs/layer_profile.log",
        benchmark:
            "results/benchmarks/layer_profile/layer_profile.tsv"
        conda:
            "../../envs/flatness.yaml"
        params:
            kind="layer_profile",
        script:
            "../scripts/curvature_table.py"


if SPECTRUM["enabled"]:

    rule spectrum_run:
        input:
            model="results/runs/{run}/model.pt",
            metrics="results/runs/{run}/metrics.json",
        output:
            "results/runs/{run}/spectrum.csv",
        log:
            "results/logs/spectrum_run/{run}.log",
        benchmark:
            "results/benchmarks/spectrum_run/{run}.tsv"
        group:
            run_group
        conda:
            "../../envs/flatness.yaml"
        threads: 1
        resources:
            mem_mb=per_attempt(4000),
            runtime=per_attempt(120),
            gpu=uses_gpu(config["measure"]["device"]),
        params:
            run_id="{run}",
            data=run_data,
            measure=config["measure"],
            spectrum=SPECTRUM,
        script:
            "../scripts/spectrum.py"

    rule spectrum:
        input:
            runs="results/tables/runs.csv",
            spectra=expand("results/runs/{run}/spectrum.csv", run=RUN_IDS),
        output:
            table=report(
                "results/tables/spectrum.csv",
                caption="../report/spectrum.rst",
                category="Curvature",
                labels={"table": "Hessian spectral density"},
            ),
            figure=report(
                "results/figures/spectrum.png",
                caption="../report/spectrum.rst",
                category="Curvature",
                labels={"figure": "Hessian spectral density"},
            ),
        log:
            "results/logs/spectrum.log",
        benchmark:
            "results/benchmarks/spectrum/spectrum.tsv"
        conda:
            "../../envs/flatness.yaml"
        params:
            kind="spectrum",
        script:
            "../scripts/curvature_table.py"
