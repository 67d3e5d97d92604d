"""Typed, frozen configuration of one training run (the unit the workflow's grid expands to).

The workflow's JSON schema (workflow/schemas/config.schema.yaml) validates the study config and
fills defaults; each expanded run reaches the trainer as a plain dict and becomes a
:class:`RunConfig` here. ``from_dict`` rejects unknown keys and bad values with a message that
names the key and the allowed values, so ``python -m flatness train`` is as strict as the workflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

DATASETS = ("mnist5k", "digits", "mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "fake")
MODELS = ("mlp", "lenet5", "alexnet_rangamani", "vgg16", "resnet18", "keskar_c1")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
REGULARIZERS = ("none", "weight_decay", "sam", "asam", "fam", "lipschitz")
FAM_VARIANTS = ("as_released", "full")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"  # one of DATASETS
    root: str = "data"  # torchvision data root (relative to the working directory)
    download: bool = False  # torchvision datasets: fetch into root if missing
    augment: bool = False  # random crop + flip on the training batches (images only)
    n_train: int | None = None  # use the first n training samples (None: all)
    n_test: int | None = None  # use the first n test samples (None: all)
    test_fraction: float = 0.2  # mnist5k/digits: stratified hold-out fraction
    split_seed: int = 0  # mnist5k/digits: seed of the fixed stratified split


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # one of MODELS
    widths: tuple[int, ...] = (512, 512)  # mlp: hidden widths
    bias: bool = True  # biases on every linear/conv layer
    batchnorm: bool = False  # BN after each conv/hidden linear (breaks the rescaling symmetry)
    dropout: float = 0.0  # dropout probability (where the architecture has dropout)
    head_widths: tuple[int, ...] = ()  # resnet18/mlp: linear bottleneck widths before the classifier


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # one of OPTIMIZERS
    lr: float = 0.05  # base learning rate (before lr_scaling)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    weight_decay: float = 0.0  # coupled L2 (torch's weight_decay) on every parameter
    lr_scaling: str = "none"  # scale lr with batch size: none | linear | sqrt
    base_batch_size: int = 128  # batch size at which lr applies unscaled
    schedule: str = "constant"  # constant | step | cosine (per epoch)
    step_size: int = 30  # step schedule: epochs between decays
    gamma: float = 0.5  # step schedule: decay factor


@dataclass(frozen=True)
class RegularizerConfig:
    name: str = "none"  # one of REGULARIZERS
    weight_decay: float = 5e-4  # weight_decay: L2 coefficient added to the optimizer's
    rho: float = 0.05  # sam/asam: neighbourhood radius
    eta: float = 0.01  # asam: T_w = |w| + eta
    lam: float = 0.1  # fam/lipschitz: penalty weight λ
    variant: str = "as_released"  # fam: as_released (curvature detached) | full
    lipschitz_k: float = 1.0  # lipschitz: allowed input-gradient norm K


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    batch_size: int = 128  # training minibatch size (samples)
    epochs: int = 20  # maximum number of epochs (the cap when target_train_loss is set)
    target_train_loss: float | None = None  # stop once the full training CE is ≤ this
    # Keskar et al.'s "until the loss function ceased to improve": stop after this many epochs
    # without a new best full training CE (better by the margin below); None = never.
    plateau_patience: int | None = None
    # An absolute margin: a relative one never fires while the loss decays geometrically to 0.
    plateau_min_delta: float = 1e-3  # a new best must be below best − this
    seed: int = 0  # model init, data order, augmentation and regulariser randomness
    checkpoint_every: int = 1  # epochs between resume checkpoints
    deterministic: bool = False  # torch deterministic algorithms (GPU bitwise reproducibility)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    dtype: str = "float32"  # float32 | float64
    eval_batch_size: int = 1024  # batch size of the full-set loss/accuracy evaluations

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build and validate; unknown keys and bad values raise a ValueError naming the key."""
        return _build(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.name": DATASETS,
    "model.name": MODELS,
    "optimizer.name": OPTIMIZERS,
    "optimizer.schedule": SCHEDULES,
    "optimizer.lr_scaling": LR_SCALINGS,
    "regularizer.name": REGULARIZERS,
    "regularizer.variant": FAM_VARIANTS,
    "device": DEVICES,
    "dtype": DTYPES,
}
_POSITIVE = {
    "batch_size",
    "epochs",
    "checkpoint_every",
    "plateau_patience",
    "eval_batch_size",
    "optimizer.lr",
    "optimizer.base_batch_size",
    "optimizer.step_size",
    "data.test_fraction",
    "data.n_train",
    "data.n_test",
}
_BELOW_ONE = {"model.dropout", "data.test_fraction"}
_NON_NEGATIVE = {
    "plateau_min_delta",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "regularizer.weight_decay",
    "regularizer.rho",
    "regularizer.eta",
    "regularizer.lam",
    "regularizer.lipschitz_k",
    "model.dropout",
    "seed",
}


def _build(cls, d: dict[str, Any] | None, prefix: str):
    d = dict(d or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name in known:
        if name not in d:
            continue
        key, value = f"{prefix}{name}", d[name]
        sub = (
            {
                "data": DataConfig,
                "model": ModelConfig,
                "optimizer": OptimizerConfig,
                "regularizer": RegularizerConfig,
            }.get(name)
            if not prefix
            else None
        )
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{name}.")
            continue
        if isinstance(value, list):
            value = tuple(value)
        _check_type(key, value, known[name].type)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(
                f"{key} = {value!r} is not allowed; choose one of {list(_CHOICES[key])}"
            )
        if value is not None and not isinstance(value, (str, tuple, bool)):
            if key in _POSITIVE and not value > 0:
                raise ValueError(f"{key} = {value!r} must be > 0")
            if key in _NON_NEGATIVE and not value >= 0:
                raise ValueError(f"{key} = {value!r} must be ≥ 0")
            if key in _BELOW_ONE and not value < 1:
                raise ValueError(f"{key} = {value!r} must be < 1")
        kwargs[name] = value
    return cls(**kwargs)


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Reject a value whose type does not match the field's annotation (bool is not an int here:
    YAML's ``yes`` must not become an epoch count)."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None:
        if optional:
            return
        raise ValueError(f"{key} must not be null")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif base == "str":
        ok = isinstance(value, str)
    elif base.startswith("tuple[int"):
        ok = isinstance(value, tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        )
    elif base.startswith("tuple[float"):
        ok = isinstance(value, tuple) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    else:  # pragma: no cover - a new field type must be added above
        raise TypeError(f"no type check for {key}: {annotation}")
    if not ok:
        raise ValueError(f"{key} = {value!r} must be of type {annotation}")
