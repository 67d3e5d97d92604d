"""Every model builds and runs on its input shape; save/load round-trips without the run config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatness.models import build_model, load_model, save_model
from flatness.reparam import layerwise_rescale, weight_layers

CASES = [
    ("mlp", (1, 8, 8), {"widths": [16, 16]}),
    ("mlp", (1, 28, 28), {"widths": [32], "batchnorm": True, "dropout": 0.2}),
    ("lenet5", (1, 28, 28), {}),
    ("lenet5", (3, 32, 32), {"bias": False}),
    ("alexnet_rangamani", (3, 32, 32), {}),
    ("keskar_c1", (3, 32, 32), {"batchnorm": True, "dropout": 0.5}),
    ("vgg16", (3, 32, 32), {"batchnorm": True, "dropout": 0.5}),
    ("resnet18", (3, 32, 32), {}),
]


@pytest.mark.parametrize("name, shape, opts", CASES, ids=[f"{c[0]}-{c[1][-1]}" for c in CASES])
def test_builds_and_runs(name, shape, opts):
    torch.manual_seed(0)
    net = build_model({"name": name, "in_shape": shape, "num_classes": 10, **opts}).eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if opts.get("bias") is False:
        assert all(m.bias is None for m in weight_layers(net))


def test_alexnet_matches_the_reference_shapes():
    net = build_model({"name": "alexnet_rangamani", "in_shape": (3, 32, 32), "num_classes": 10})
    lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(384, 4096), (192, 384), (10, 192)]


def test_bn_free_nets_are_rescalable():
    torch.manual_seed(0)
    net = build_model({"name": "lenet5", "in_shape": (1, 28, 28), "num_classes": 10}).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    out = layerwise_rescale(net, [2.0, 0.5, 4.0, 0.25, 1.0])(x)
    assert torch.allclose(out, net(x), atol=1e-10)


def test_unknown_key_and_small_input_are_errors():
    with pytest.raises(ValueError, match="'depth'"):
        build_model({"name": "mlp", "depth": 3, "in_shape": (1, 8, 8), "num_classes": 10})
    with pytest.raises(ValueError, match="too small"):
        build_model({"name": "lenet5", "in_shape": (1, 8, 8), "num_classes": 10})


def test_save_load_round_trip(tmp_path):
    cfg = {"name": "mlp", "widths": (8,), "in_shape": (1, 8, 8), "num_classes": 10}
    torch.manual_seed(1)
    net = build_model(cfg).double()
    save_model(net, cfg, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert back.training is False and next(back.parameters()).dtype == torch.float64
    assert torch.equal(back(x), net.eval()(x))
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("name", ["lenet5", "keskar_c1", "vgg16"])
def test_building_leaves_batchnorm_statistics_untouched(name):
    """The flattened size is probed in eval mode without autograd: a fresh BN model has
    num_batches_tracked == 0, running_mean == 0 and running_var == 1, and stays in train mode."""
    torch.manual_seed(0)
    net = build_model({"name": name, "in_shape": (3, 32, 32), "num_classes": 10, "batchnorm": True})
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert all(m.training for m in net.modules())


def test_atomic_torch_save_is_the_checkpoint_helper():
    from flatness import checkpoint, models

    assert models.atomic_torch_save is checkpoint.atomic_torch_save


def test_resnet18_bottleneck_head_is_the_fam_authors_head(tmp_path):
    # FAM's ResNet-18 (METHODS.md §7.4): 512 → 64 → 10, two Linear layers with nothing between,
    # the regularised layer being the last (10 × 64), so λ's 1/m carries m = 64.
    from flatness.lastlayer import features_and_logits, last_linear

    cfg = {"name": "resnet18", "head_widths": [64], "in_shape": [3, 32, 32], "num_classes": 10}
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    assert isinstance(net.fc, nn.Sequential)
    assert [type(m) for m in net.fc] == [nn.Linear, nn.Linear]
    assert (net.fc[0].in_features, net.fc[0].out_features) == (512, 64)
    assert last_linear(net) is net.fc[1] and tuple(net.fc[1].weight.shape) == (10, 64)
    # What relative flatness and FAM read on a forward pass: φ is the 64-d bottleneck output, the
    # bottleneck's plain affine image of the pooled 512-d features (no activation in between).
    pooled: list[torch.Tensor] = []
    hook = net.fc[0].register_forward_hook(lambda mod, inp, out: pooled.append(inp[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        phi, logits = features_and_logits(net, x)
    hook.remove()
    assert phi.shape == (2, 64) and pooled[0].shape == (2, 512)
    torch.testing.assert_close(phi, net.fc[0](pooled[0]), rtol=0, atol=0)
    torch.testing.assert_close(logits, net.fc[1](phi), rtol=0, atol=0)
    save_model(net, cfg, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(again(x), logits)
    assert last_linear(again) is again.fc[1]
    plain = build_model({**cfg, "head_widths": []})
    assert isinstance(plain.fc, nn.Linear) and plain.fc.in_features == 512


def test_head_widths_only_for_resnet18_and_mlp():
    with pytest.raises(ValueError, match="head_widths"):
        build_model({"name": "lenet5", "head_widths": [4], "in_shape": [1, 28, 28],
                     "num_classes": 10})  # fmt: skip


def test_mlp_bottleneck_head_is_linear_and_rescalable():
    from flatness import reparam

    torch.manual_seed(0)
    net = build_model({"name": "mlp", "widths": [8], "head_widths": [4], "in_shape": [1, 4, 4],
                       "num_classes": 3}).double()  # fmt: skip
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 4), (4, 3)]
    assert not isinstance(net[-2], nn.ReLU)  # no activation inside the bottleneck
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    copy = reparam.dinh_alpha_rescale(net, 7.0, layer=-2)
    torch.testing.assert_close(copy(x), net(x), rtol=1e-12, atol=1e-12)
