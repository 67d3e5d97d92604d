"""The config schema mirrors the package, and bad configs stop Snakemake before any job.

Fast tests check the schema file against flatness.measures / flatness.config with jsonschema;
slow ones run ``snakemake -n`` on malformed configs and on every shipped study config.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jsonschema
import pytest
import yaml

from flatness import config as fc
from flatness.measures import MEASURES
from tests.workflow_helpers import REPO, TINY_CONFIG, run_snakemake

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
DEFS = SCHEMA["$defs"]
PAPER_CONFIGS = sorted((REPO / "config/paper").glob("*.yaml"))

# schema object → (dataclass, fields that are grid axes instead)
MIRRORS = {
    "data": (fc.DataConfig, set()),
    "model": (fc.ModelConfig, set()),
    "optimizer": (fc.OptimizerConfig, {"lr"}),
    "regularizer": (fc.RegularizerConfig, set()),
}
GRID_FIELDS = {"data", "model", "optimizer", "regularizer", "batch_size", "seed"}
ENUMS = {
    ("data", "name"): fc.DATASETS,
    ("model", "name"): fc.MODELS,
    ("optimizer", "name"): fc.OPTIMIZERS,
    ("optimizer", "schedule"): fc.SCHEDULES,
    ("optimizer", "lr_scaling"): fc.LR_SCALINGS,
    ("regularizer", "name"): fc.REGULARIZERS,
    ("regularizer", "variant"): fc.FAM_VARIANTS,
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
    return out


def test_measure_enum_is_exactly_the_measures_registry():
    enum = DEFS["measure_spec"]["properties"]["function"]["enum"]
    assert enum == sorted(MEASURES)


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_per_run_sections_mirror_flatness_config(name):
    cls, excluded = MIRRORS[name]
    props = DEFS[name]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(cls)} - excluded
    for key, default in _defaults(cls).items():
        if key not in excluded:
            assert props[key]["default"] == default, f"{name}.{key}"


def test_training_section_mirrors_runconfig_minus_the_grid_axes():
    props = SCHEMA["properties"]["training"]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(fc.RunConfig)} - GRID_FIELDS
    for key, default in _defaults(fc.RunConfig).items():
        if key in props:
            assert props[key]["default"] == default, key
    assert props["device"]["enum"] == list(fc.DEVICES)
    assert props["dtype"]["enum"] == list(fc.DTYPES)


@pytest.mark.parametrize("where", sorted(ENUMS), ids=lambda w: ".".join(w))
def test_enums_mirror_flatness_config(where):
    section, key = where
    assert DEFS[section]["properties"][key]["enum"] == list(ENUMS[where])


def _objects(schema, path="config"):
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            yield path, schema
        for k, v in schema.items():
            yield from _objects(v, f"{path}.{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            yield from _objects(v, f"{path}[{i}]")


def test_every_key_has_a_default_and_a_description_and_objects_are_closed():
    objects = list(_objects(SCHEMA))
    assert len(objects) > 8
    for path, obj in objects:
        assert obj.get("additionalProperties") is False, path
        for key, sub in obj["properties"].items():
            assert "description" in sub, f"{path}.{key}"
            assert "default" in sub, f"{path}.{key}"


def validate(cfg):
    jsonschema.Draft202012Validator(SCHEMA).validate(cfg)


def tiny():
    return yaml.safe_load(TINY_CONFIG.read_text())


BAD = {
    "wrong type": (("grid", "batch_size"), ["16"], "batch_size"),
    "unknown key": (("training", "epochz"), 3, "epochz"),
    "out of range": (("measure", "n_samples"), 0, "n_samples"),
    "bad enum": (("regularizers", "sam", "name"), "sharpness", "sharpness"),
    "bad head width": (("models", "mlp", "head_widths"), [0], "head_widths"),
    "head widths off resnet18/mlp": (
        ("models", "mlp"), {"name": "lenet5", "head_widths": [4]}, "head_widths"
    ),
    "unknown measure": (("measure", "measures"), [{"function": "flatness_9000"}], "flatness_9000"),
    "per-layer measure without layer=": (
        ("layer_profile", "measures"), ["keskar_sharpness"], "keskar_sharpness"
    ),
    "negative trajectory epoch": (("trajectory", "epochs"), [-1], "-1"),
    "one error-bar fold": (("measure", "error_bars", "folds"), 1, "folds"),
}


def _broken(case):
    cfg = tiny()
    keys, value, _ = BAD[case]
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_configs_fail_schema_validation(case):
    with pytest.raises(jsonschema.ValidationError) as err:
        validate(_broken(case))
    assert BAD[case][2] in str(err.value)


def test_shipped_configs_are_valid():
    for path in [REPO / "config/config.yaml", TINY_CONFIG, *PAPER_CONFIGS]:
        validate(copy.deepcopy(yaml.safe_load(path.read_text())))


def test_paper_studies_exist():
    names = {p.stem for p in PAPER_CONFIGS}
    assert {
        "keskar_f1_mnist",
        "rangamani_cifar10_alexnet",
        "petzka_lenet5_cifar10",
        "fam_cifar10_resnet18",
    } <= names


def _dry_run(tmp_path: Path, cfg) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "-n", configfile=path, check=False, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not (tmp_path / "results").exists(), "a job ran before validation failed"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong type", "unknown key", "out of range"])
def test_malformed_configs_fail_snakemake_dry_run_naming_the_key(tmp_path, case):
    out = _dry_run(tmp_path, _broken(case))
    assert BAD[case][2] in out, out[-3000:]


@pytest.mark.slow
def test_grid_id_and_measure_option_errors_fail_the_dry_run(tmp_path):
    cfg = tiny()
    cfg["grid"]["regularizer"] = ["none", "asam"]
    assert "grid.regularizer names 'asam'" in _dry_run(tmp_path, cfg)
    cfg = tiny()
    cfg["measure"]["measures"] = [{"function": "relative_flatness", "options": {"bogus": 1}}]
    assert "measure.measures[0].options.bogus" in _dry_run(tmp_path, cfg)
    cfg = tiny()
    cfg["trajectory"]["measures"] = ["fisher_rao"]
    assert "trajectory.measures names ['fisher_rao']" in _dry_run(tmp_path, cfg)
    cfg = tiny()
    cfg["trajectory"]["epochs"] = [0, 40]
    assert "trajectory.epochs has 40 > training.epochs = 4" in _dry_run(tmp_path, cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [REPO / "config/config.yaml", *PAPER_CONFIGS], ids=lambda p: p.stem
)
def test_shipped_studies_pass_the_dry_run(tmp_path, path):
    proc = run_snakemake(tmp_path, "-n", configfile=path, timeout=300)
    assert "train" in proc.stdout and "fig_measure_vs_gap" in proc.stdout


def _key_paths(schema, prefix=""):
    for key, sub in schema.get("properties", {}).items():
        yield prefix + key
        yield from _key_paths(sub, f"{prefix}{key}.")


def test_config_readme_lists_every_top_level_and_nested_key():
    readme = (REPO / "config/README.md").read_text()
    top = list(_key_paths(SCHEMA))
    nested = [
        f"{sec}.<id>.{k}"
        for sec, d in (
            ("datasets", "data"),
            ("models", "model"),
            ("optimizers", "optimizer"),
            ("regularizers", "regularizer"),
        )
        for k in DEFS[d]["properties"]
    ]
    nested += [f"measure.measures[].{k}" for k in DEFS["measure_spec"]["properties"]]
    nested += [
        f"grid.exclude[].{k}"
        for k in SCHEMA["properties"]["grid"]["properties"]["exclude"]["items"]["properties"]
    ]
    missing = [k for k in top + nested if f"`{k}`" not in readme]
    assert not missing, f"config/README.md lacks {missing}"


def test_fam_study_uses_the_authors_bottleneck_head():
    from snakemake.utils import validate as snakemake_validate

    from flatness.suite import expand_grid

    cfg = yaml.safe_load((REPO / "config/paper/fam_cifar10_resnet18.yaml").read_text())
    snakemake_validate(cfg, str(REPO / "workflow/schemas/config.schema.yaml"))
    runs = expand_grid(cfg)
    assert {tuple(r.config["model"]["head_widths"]) for r in runs} == {(64,)}
