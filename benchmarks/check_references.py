"""``python -m benchmarks.check_references``: the reference algorithms against dense float64
Hessians on tiny nets (a few seconds). The benchmark's agreement columns rest on these."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.func import functional_call, hessian

from benchmarks.references import (
    exact_trace_piecewise_linear,
    fam_authors_step,
    petzka_exact_kappa,
    rangamani_power_iteration,
)


def _dense_hessian(net: nn.Module, X, y) -> torch.Tensor:
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss(f):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = f[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, params, (X,)), y)

    return hessian(loss)(flat)


def _nets():
    yield nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(18, 5), nn.ReLU(), nn.Linear(5, 3),
    )  # fmt: skip
    yield nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(48, 4, bias=False), nn.ReLU(), nn.Linear(4, 3),
    )  # fmt: skip


def main() -> int:
    torch.manual_seed(0)
    X = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    ok = True
    for i, net in enumerate(_nets()):
        net = net.double()
        H = _dense_hessian(net, X, y)
        params = list(net.parameters())
        D = torch.cat([torch.full((p.numel(),), float(p.detach().norm())) for p in params])
        D = D.double()
        eig = torch.linalg.eigvalsh(D[:, None] * H * D[None, :])
        top = float(eig[-1] if eig[-1].abs() >= eig[0].abs() else eig[0])  # largest magnitude
        W = net[-1].weight
        d, m = W.shape
        start = sum(p.numel() for p in params[:-2])
        HW = H[start : start + d * m, start : start + d * m].reshape(d, m, d, m)
        kappa = float((W.detach() @ W.detach().T * torch.einsum("stut->su", HW)).sum())
        # (ours, dense, tolerance): the power iteration stops on its iterate's change (or after
        # 1000 steps), so its bar is the benchmark's 1e-6; the exact routes are float64 exact.
        checks = {
            "Rangamani power iteration vs dense λ(DHD)": (
                rangamani_power_iteration(net, X, y, tol=1e-10)[0], top, 1e-6),
            "Petzka exact κ vs dense layer block": (
                petzka_exact_kappa(net, X, y, net[-1]), kappa, 1e-10),
            "piecewise-linear exact trace vs dense trace": (
                exact_trace_piecewise_linear(net, X, y, chunk=7), float(H.trace()), 1e-10),
        }  # fmt: skip
        for what, (got, want, tol) in checks.items():
            rel = abs(got - want) / abs(want)
            ok &= rel <= tol
            print(f"net {i}: {what}: {got:.12g} vs {want:.12g} (rel {rel:.1e}, bar {tol:g})")
        # FAM as released: R's gradient w.r.t. W is (C + Cᵀ)W/m·λ on top of the loss gradient.
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        before = W.detach().clone()
        loss_grad = torch.autograd.grad(nn.functional.cross_entropy(net(X), y), W)[0]
        C = torch.einsum("stut->su", HW)
        fam_authors_step(net, opt, X, y, lam=0.5)
        want = before - (loss_grad + 0.5 * (C + C.T) @ before / m)
        rel = float((W.detach() - want).abs().max() / want.abs().max())
        ok &= rel <= 1e-10
        print(f"net {i}: FAM-as-released step vs W − (∇ℓ + λ(C + Cᵀ)W/m): rel {rel:.1e}")
    print("all references agree" if ok else "DISAGREEMENT: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
