"""Shared fixtures: the float64 test network of METHODS.md §10 and low torch thread counts."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# 2-core machines: several pytest workers or a parallel Snakemake job must not oversubscribe.
torch.set_num_threads(int(os.environ.get("FLATNESS_TEST_THREADS", "1")))


def make_mlp(widths=(12, 8, 6, 4), bias=True, dtype=torch.float64, seed=0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a**0.5)
            if bias:
                lin.bias.copy_(0.1 * torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def fixture_data(n=64, d_in=12, classes=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def train_full_batch(model, X, y, steps=3000, lr=0.5, momentum=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="session")
def fixture_data64():
    """N = 64 Gaussian inputs in R^12, 4 random classes, float64."""
    return fixture_data()


@pytest.fixture(scope="session")
def trained_mlp64(fixture_data64):
    """ReLU MLP 12-8-6-4 with biases trained to loss ≈ 1e-5 by full-batch SGD (METHODS.md §10).

    Session-scoped and shared: tests must not modify it (reparam functions return copies)."""
    X, y = fixture_data64
    # Init seed 5 memorises the random labels (loss ≈ 1.6e-5, gradient norm ≈ 4e-5, as METHODS.md
    # §10 describes); other seeds stall in a poor local minimum, which would void "at a minimum" tests.
    model = train_full_batch(make_mlp(seed=5), X, y)
    loss = float(nn.functional.cross_entropy(model(X), y).detach())
    assert loss < 1e-4, f"fixture did not reach a minimum (loss {loss})"
    return model


@pytest.fixture()
def random_mlp64():
    """The same architecture at random init (invariances hold at every θ, not only minima)."""
    return make_mlp(seed=3)


LAYERWISE_FACTORS = (7.0, 0.2, 1 / 1.4)


def neuron_scales(n=6, dtype=torch.float64):
    return torch.linspace(0.2, 5.0, n, dtype=dtype)
