"""HessianOperator against the dense float64 Hessian (torch.func.hessian) on the §10 fixture."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness.batches import eval_mode
from flatness.hvp import HessianOperator
from tests.conftest import make_mlp


def dense_hessian(model, X, y, loss_fn=None, names=None):
    """Dense H of the mean loss w.r.t. the flattened parameters (all, or those in ``names``), in
    ``named_parameters()`` order, in eval mode."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    keys = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        ps = {k: c.view(s) for k, c, s in zip(keys, flat.split(numels), shapes, strict=True)}
        return loss_fn(functional_call(model, ps, (X,)), y)

    with eval_mode(model):
        return torch.func.hessian(f)(theta)


def rel_err(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, snap) -> bool:
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap, strict=True))


@pytest.fixture(params=["trained", "random"])
def net(request, trained_mlp64, random_mlp64):
    return trained_mlp64 if request.param == "trained" else random_mlp64


def probe(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("budget", [0, None], ids=["recompute", "kept-graph"])
def test_matvec_matches_dense(net, fixture_data64, budget):
    X, y = fixture_data64
    kw = {} if budget is None else {"graph_budget_bytes": budget}
    op = HessianOperator(net, (X, y), chunk_size=16, **kw)
    assert op.keeps_graph == (budget is None)
    H = dense_hessian(net, X, y)
    assert op.num_params == H.shape[0] == 186 and op.shape == (186, 186)
    for s in range(3):
        v = probe(op.num_params, s)
        assert rel_err(op.matvec(v), H @ v) <= 1e-10


def test_data_forms_and_chunking_agree(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    v = probe(186)
    ref = HessianOperator(trained_mlp64, (X, y), chunk_size=None).matvec(v)
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 64, 10)]  # unequal last batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=24)
    for data, chunk in [((X, y), 16), ((X, y), 7), (batches, None), (loader, None)]:
        for budget in (0, 1 << 30):
            hv = HessianOperator(
                trained_mlp64, data, chunk_size=chunk, graph_budget_bytes=budget
            ).matvec(v)
            assert rel_err(hv, ref) <= 1e-12


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "kept-graph"])
def test_twice_bitwise_identical_and_counts(trained_mlp64, fixture_data64, budget):
    op = HessianOperator(trained_mlp64, fixture_data64, chunk_size=16, graph_budget_bytes=budget)
    v = probe(op.num_params)
    a, b = op.matvec(v), op.matvec(v)
    assert torch.equal(a, b)
    assert op.num_matvecs == 2


def test_mode_restored_and_params_unchanged(fixture_data64):
    X, y = fixture_data64
    # Dropout makes train mode visible: the operator must use eval() (dropout off).
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    net.train()
    snap = snapshot(net)
    H = dense_hessian(net, X, y)  # eval mode
    assert net.training
    for budget in (0, 1 << 30):
        op = HessianOperator(net, (X, y), graph_budget_bytes=budget)
        v = probe(op.num_params)
        assert rel_err(op.matvec(v), H @ v) <= 1e-10
        assert net.training and net[2].training
        op.gradient()
        op.close()
        assert net.training
    assert unchanged(net, snap)


def test_gradient_and_loss(net, fixture_data64):
    X, y = fixture_data64
    net2 = copy.deepcopy(net)
    loss = nn.functional.cross_entropy(net2(X), y)
    g_ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net2.parameters()))])
    for budget in (0, 1 << 30):
        op = HessianOperator(net, (X, y), chunk_size=16, graph_budget_bytes=budget)
        assert rel_err(op.gradient(), g_ref) <= 1e-12
        assert op.loss() == pytest.approx(float(loss.detach()), rel=1e-12)


def test_parameter_subset_is_dense_block(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    last = trained_mlp64[4]
    names = {"4.weight", "4.bias"}
    H = dense_hessian(trained_mlp64, X, y, names=names)
    op = HessianOperator(trained_mlp64, (X, y), params=[last.weight, last.bias])
    assert op.num_params == 28
    v = probe(28)
    assert rel_err(op.matvec(v), H @ v) <= 1e-10


def test_linear_operator_matches_matvec(trained_mlp64, fixture_data64):
    op = HessianOperator(trained_mlp64, fixture_data64)
    lin = op.as_linear_operator()
    assert lin.shape == (186, 186) and lin.dtype == np.float64
    v = probe(186)
    out = lin.matvec(v.numpy())
    assert out.dtype == np.float64
    assert np.allclose(out, op.matvec(v).numpy(), rtol=0, atol=1e-14)


def test_kept_graph_follows_parameter_changes(fixture_data64):
    X, y = fixture_data64
    net = make_mlp(seed=5)
    op = HessianOperator(net, (X, y))
    assert op.keeps_graph
    v = probe(op.num_params)
    op.matvec(v)
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    assert rel_err(op.matvec(v), dense_hessian(net, X, y) @ v) <= 1e-10


def test_frozen_model_and_float32(fixture_data64):
    X, y = fixture_data64
    net = make_mlp(seed=4)
    for p in net.parameters():
        p.requires_grad_(False)
    op = HessianOperator(net, (X, y))
    v = probe(op.num_params)
    H = dense_hessian(net, X, y)
    with torch.no_grad():
        hv = op.matvec(v)
    assert rel_err(hv, H @ v) <= 1e-10
    assert not any(p.requires_grad for p in net.parameters())
    net32 = copy.deepcopy(net).float()
    hv32 = HessianOperator(net32, (X, y)).matvec(v)  # data and v follow the model's dtype
    assert hv32.dtype == torch.float32
    assert rel_err(hv32.double(), H @ v) <= 1e-4


def test_bad_input(trained_mlp64, fixture_data64):
    X, y = fixture_data64
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(trained_mlp64, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="samples"):
        HessianOperator(trained_mlp64, (X, y[:10]))
    Xnan = X.clone()
    Xnan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        HessianOperator(trained_mlp64, (Xnan, y), graph_budget_bytes=0).matvec(probe(186))
    with pytest.raises(ValueError, match="entries"):
        HessianOperator(trained_mlp64, (X, y)).matvec(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="parameters"):
        HessianOperator(nn.ReLU(), (X, y))


# --- data loss of a chunked sum (review fixes: one loss helper, input checks, host copies) -------


def _big_data(n=300):
    """N = 300 > DEFAULT_CHUNK (256): a single (X, y) pair is split into two unequal chunks."""
    from tests.conftest import fixture_data

    return fixture_data(n=n)


@pytest.mark.parametrize("budget", [0, 1 << 30], ids=["recompute", "kept-graph"])
@pytest.mark.parametrize("kind", ["module", "partial"])
def test_sum_loss_is_n_times_the_mean_loss_across_chunks(random_mlp64, budget, kind):
    import functools

    from flatness.batches import DEFAULT_CHUNK, Batches, mean_loss

    X, y = _big_data()
    N = X.shape[0]
    assert N > DEFAULT_CHUNK
    if kind == "module":
        summed = nn.CrossEntropyLoss(reduction="sum")
    else:
        summed = functools.partial(nn.functional.cross_entropy, reduction="sum")
    mean_op = HessianOperator(random_mlp64, (X, y), graph_budget_bytes=budget)
    sum_op = HessianOperator(random_mlp64, (X, y), loss_fn=summed, graph_budget_bytes=budget)
    assert len(sum_op.batches) == 2
    v = probe(186)
    assert rel_err(sum_op.matvec(v), N * mean_op.matvec(v)) <= 1e-12
    assert rel_err(sum_op.gradient(), N * mean_op.gradient()) <= 1e-12
    assert sum_op.loss() == pytest.approx(N * mean_op.loss(), rel=1e-12)
    # A module with reduction="mean" is the default loss.
    meanmod = HessianOperator(random_mlp64, (X, y), loss_fn=nn.CrossEntropyLoss())
    assert rel_err(meanmod.matvec(v), mean_op.matvec(v)) <= 1e-12
    b = Batches((X, y))
    with torch.no_grad():
        L_sum, L_mean = float(mean_loss(random_mlp64, b, summed)), float(mean_loss(random_mlp64, b))
    assert L_sum == pytest.approx(N * L_mean, rel=1e-12)
    assert L_mean == pytest.approx(
        float(nn.functional.cross_entropy(random_mlp64(X), y)), rel=1e-12
    )


def test_loss_without_reduction_is_refused(random_mlp64, fixture_data64):
    import functools

    from flatness.batches import loss_reduction

    X, y = fixture_data64
    for bad in (
        nn.CrossEntropyLoss(reduction="none"),
        functools.partial(nn.functional.cross_entropy, reduction="none"),
    ):
        with pytest.raises(ValueError, match="reduction='sum'"):
            HessianOperator(random_mlp64, (X, y), loss_fn=bad)
    assert loss_reduction(nn.MSELoss(reduction="sum")) == "sum"
    assert loss_reduction(nn.KLDivLoss(reduction="batchmean")) == "mean"
    with pytest.raises(ValueError, match="scalar"):  # a plain callable returning a vector
        HessianOperator(random_mlp64, (X, y), loss_fn=lambda o, t: o.sum(1)).matvec(probe(186))


def test_zero_dim_inputs_are_a_clear_value_error():
    from flatness.batches import Batches

    x0, y0 = torch.tensor(1.0), torch.tensor(0)
    for data in [(x0, y0), (torch.zeros(1, 3), y0), [(x0, y0)], [(torch.zeros(2, 3), y0)]]:
        with pytest.raises(ValueError, match="leading sample dimension"):
            Batches(data)


def test_non_blocking_copies_only_onto_cuda(fixture_data64, monkeypatch):
    from flatness.batches import Batches, _non_blocking

    assert _non_blocking(torch.device("cuda")) and _non_blocking("cuda:0")
    assert not _non_blocking(torch.device("cpu"))
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    X, y = fixture_data64
    list(Batches((X, y), chunk_size=16, device="cpu"))
    assert seen and not any(seen)  # a copy to the host must complete before the CPU reads it
