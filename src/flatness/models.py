"""The architectures of the reproduced papers, built from a plain dict that travels with the weights.

``build_model(cfg)`` takes the model section of the run config plus ``in_shape`` (C, H, W) and
``num_classes`` (filled in by the trainer from the dataset), so a saved ``model.pt`` rebuilds
itself without the run's config. The BN-free nets are flat ``nn.Sequential`` chains of
Linear/Conv2d/ReLU/MaxPool2d/Flatten so that ``flatness.reparam``'s rescalings apply to them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from flatness.batches import eval_mode
from flatness.checkpoint import atomic_torch_save  # noqa: F401  (re-exported: its old home)

MODEL_KEYS = {
    "name", "widths", "bias", "batchnorm", "dropout", "head_widths", "in_shape", "num_classes"
}  # fmt: skip
_DEFAULTS = {
    "widths": (512, 512), "bias": True, "batchnorm": False, "dropout": 0.0, "head_widths": ()
}  # fmt: skip

VGG16_CONVS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def _flat_size(features: nn.Module, in_shape) -> int:
    """Size of the flattened output of ``features`` for one input, probed in ``eval()`` without
    autograd, so building a model changes no BatchNorm running statistics (nor
    ``num_batches_tracked``); each module's mode is restored."""
    with eval_mode(features), torch.no_grad():
        try:
            return int(features(torch.zeros(1, *in_shape)).numel())
        except RuntimeError as err:
            raise ValueError(
                f"input shape {tuple(in_shape)} is too small for this architecture ({err})"
            ) from None


def _conv_block(cin, cout, k, pad, bias, bn) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return [*layers, nn.ReLU()]


def _fc_block(fin, fout, bias, bn, dropout) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(fin, fout, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm1d(fout))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def mlp(
    in_shape, num_classes, widths, bias, batchnorm, dropout, head_widths=(), **_
) -> nn.Sequential:
    """Flatten → (Linear → [BN] → ReLU → [Dropout]) per width → [Linear per head width, no
    activation] → Linear. Keskar F1: widths 5×512. ``head_widths=[64]`` is the FAM authors' linear
    bottleneck before the classifier (see :func:`resnet18`)."""
    layers: list[nn.Module] = [nn.Flatten()]
    fin = int(torch.tensor(in_shape).prod())
    for w in widths:
        layers += _fc_block(fin, int(w), bias, batchnorm, dropout)
        fin = int(w)
    for w in head_widths:
        layers.append(nn.Linear(fin, int(w), bias=bias))
        fin = int(w)
    return nn.Sequential(*layers, nn.Linear(fin, num_classes, bias=bias))


def lenet5(in_shape, num_classes, bias, batchnorm, dropout, **_) -> nn.Sequential:
    """conv6-5×5 → ReLU → maxpool2 → conv16-5×5 → ReLU → maxpool2 → fc120 → fc84 → fc.

    28×28 inputs get padding 2 on conv1 (the usual MNIST LeNet), 32×32 none; both give 16×5×5.
    """
    pad = 2 if in_shape[-1] == 28 else 0
    feats = [
        *_conv_block(in_shape[0], 6, 5, pad, bias, batchnorm),
        nn.MaxPool2d(2),
        *_conv_block(6, 16, 5, 0, bias, batchnorm),
        nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    flat = _flat_size(nn.Sequential(*feats), in_shape)
    return nn.Sequential(
        *feats,
        *_fc_block(flat, 120, bias, batchnorm, dropout),
        *_fc_block(120, 84, bias, batchnorm, dropout),
        nn.Linear(84, num_classes, bias=bias),
    )


def _two_conv_net(in_shape, num_classes, bias, batchnorm, dropout) -> nn.Sequential:
    # conv 5×5 "same" and maxpool 3/2 "same" (padding 1): 32×32 → 16 → 8, so 64·8·8 = 4096 → 384.
    feats = [
        *_conv_block(in_shape[0], 64, 5, 2, bias, batchnorm),
        nn.MaxPool2d(3, 2, padding=1),
        *_conv_block(64, 64, 5, 2, bias, batchnorm),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(),
    ]
    flat = _flat_size(nn.Sequential(*feats), in_shape)
    return nn.Sequential(
        *feats,
        *_fc_block(flat, 384, bias, batchnorm, dropout),
        *_fc_block(384, 192, bias, batchnorm, dropout),
        nn.Linear(192, num_classes, bias=bias),
    )


def alexnet_rangamani(in_shape, num_classes, bias, batchnorm, dropout, **_) -> nn.Sequential:
    """Rangamani et al.'s CIFAR AlexNet-like net (METHODS §7.2): conv5×5-64 → maxpool3/2 →
    conv5×5-64 → maxpool3/2 → fc4096→384 → fc192 → fc, ReLU, biases; BN/dropout off unless set."""
    return _two_conv_net(in_shape, num_classes, bias, batchnorm, dropout)


def keskar_c1(in_shape, num_classes, bias, batchnorm, dropout, **_) -> nn.Sequential:
    """Keskar et al.'s C1/C3 (METHODS §7.1): the same conv5×5-64 / maxpool 3/2 / FC384 / FC192 body
    as :func:`alexnet_rangamani`; the paper's BN and dropout 0.5 are the ``batchnorm: true,
    dropout: 0.5`` options (off by default so the BN-free form stays rescalable)."""
    return _two_conv_net(in_shape, num_classes, bias, batchnorm, dropout)


def vgg16(in_shape, num_classes, bias, batchnorm, dropout, **_) -> nn.Sequential:
    """VGG16 for 32×32 (13 conv 3×3, 5 maxpools → 512×1×1) with Rangamani's classifier
    512 → 512 → 240 → classes; BN after each conv and dropout in the classifier optional."""
    layers: list[nn.Module] = []
    cin = in_shape[0]
    for v in VGG16_CONVS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_block(cin, v, 3, 1, bias, batchnorm)
            cin = v
    layers.append(nn.Flatten())
    flat = _flat_size(nn.Sequential(*layers), in_shape)
    return nn.Sequential(
        *layers,
        *_fc_block(flat, 512, bias, False, dropout),
        *_fc_block(512, 240, bias, False, dropout),
        nn.Linear(240, num_classes, bias=bias),
    )


def resnet18(in_shape, num_classes, head_widths=(), **_) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3×3 conv, stride 1, no maxpool); BN intrinsic.

    ``head_widths`` puts linear layers with **no** activation between the 512-d pooled features
    and the classifier: ``[64]`` is the FAM authors' 512 → 64 → 10 head (METHODS.md §7.4), whose
    10 × 64 last layer FAM regularises (its penalty carries 1/m, m = 64). The linear bottleneck
    adds a GL(64) symmetry that no measure here is invariant to (METHODS.md §1).
    """
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_shape[0], 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    if head_widths:
        widths = [net.fc.in_features, *(int(w) for w in head_widths), num_classes]
        net.fc = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)))
    return net


#: Models that take ``head_widths`` (a linear bottleneck before the classifier).
HEAD_MODELS = frozenset({"mlp", "resnet18"})

BUILDERS = {
    "mlp": mlp,
    "lenet5": lenet5,
    "alexnet_rangamani": alexnet_rangamani,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "keskar_c1": keskar_c1,
}


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Build the model named ``cfg["name"]`` (float32, torch's default initialisation drawn from the
    global RNG: the caller seeds it). ``cfg`` needs ``in_shape`` and ``num_classes``.

    >>> net = build_model({"name": "mlp", "widths": [8], "in_shape": [1, 8, 8], "num_classes": 10})
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    unknown = sorted(set(cfg) - MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown model key {unknown[0]!r}; allowed: {sorted(MODEL_KEYS)}")
    missing = [k for k in ("name", "in_shape", "num_classes") if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks {missing[0]!r}")
    if cfg["name"] not in BUILDERS:
        raise ValueError(f"model.name = {cfg['name']!r}; choose one of {sorted(BUILDERS)}")
    if cfg.get("head_widths") and cfg["name"] not in HEAD_MODELS:
        raise ValueError(
            f"model.head_widths is an option of {sorted(HEAD_MODELS)}, not of {cfg['name']!r}"
        )
    opts = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
    in_shape = tuple(int(s) for s in cfg["in_shape"])
    return BUILDERS[cfg["name"]](in_shape, int(cfg["num_classes"]), **opts)


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    # lists, not tuples, so the saved dict equals its JSON form
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in cfg.items()}


def save_model(
    model: nn.Module,
    cfg: dict[str, Any],
    path: str | os.PathLike,
    run_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Save ``{"state_dict", "model_config", "run_id"}`` atomically (tensors moved to the CPU).

    ``meta`` adds plain entries (a kept snapshot's ``epoch`` and ``config``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {**(meta or {}), "state_dict": state, "model_config": _plain(cfg), "run_id": run_id}
    atomic_torch_save(blob, path)


def load_model(
    path: str | os.PathLike,
    map_location=None,
    expect_run_id: str | None = None,
    expect_epoch: int | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (``weights_only=True``: no code is unpickled),
    in the dtype it was saved in, in ``eval()`` mode. With ``expect_run_id``, a file recorded for
    another run (or for none) raises ``ValueError``: a stage never measures another run's model.
    ``expect_epoch`` does the same for a snapshot's recorded ``requested_epoch``."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if expect_run_id is not None and blob.get("run_id") != expect_run_id:
        raise ValueError(
            f"{path} holds the model of run {blob.get('run_id')!r}, not {expect_run_id!r}; "
            "retrain it (delete the file) so each path holds its own run"
        )
    if expect_epoch is not None and blob.get("requested_epoch") != expect_epoch:
        raise ValueError(
            f"{path} holds the snapshot for epoch {blob.get('requested_epoch')!r}, "
            f"not {expect_epoch}; delete it so it is taken again"
        )
    model = build_model(blob["model_config"])
    floats = [v for v in blob["state_dict"].values() if v.is_floating_point()]
    if floats:
        model = model.to(device=floats[0].device, dtype=floats[0].dtype)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
