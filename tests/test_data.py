"""Datasets: fixed stratified splits, normalisation, the offline error, and the resumable loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatness import data as data_module
from flatness.config import DataConfig
from flatness.data import (
    DatasetNotFoundError,
    TensorLoader,
    augment_crop_flip,
    cached_split_path,
    load_dataset,
    stratified_split,
)


def test_mnist5k_split_is_stratified_fixed_and_normalised():
    a = load_dataset(DataConfig(name="mnist5k"))
    assert a.train[0].shape == (4000, 1, 28, 28) and a.test[0].shape == (1000, 1, 28, 28)
    assert torch.bincount(a.train[1]).tolist() == [400] * 10
    assert torch.bincount(a.test[1]).tolist() == [100] * 10
    assert abs(float(a.train[0].mean())) < 0.05 and abs(float(a.train[0].std()) - 1) < 0.05
    b = load_dataset(DataConfig(name="mnist5k"))
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])


def test_digits_split_depends_on_split_seed_only():
    a = load_dataset(DataConfig(name="digits", split_seed=0), dtype=torch.float64)
    b = load_dataset(DataConfig(name="digits", split_seed=1), dtype=torch.float64)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.train[0].dtype == torch.float64
    assert a.train[0].shape[0] + a.test[0].shape[0] == 1797
    assert not torch.equal(a.test[1], b.test[1])
    counts = torch.bincount(a.test[1]).double() / torch.bincount(a.train[1]).double()
    assert torch.allclose(counts, torch.full_like(counts, 0.25), atol=0.02)


def same_splits(a, b) -> bool:
    return all(
        torch.equal(x, y) and x.dtype == y.dtype
        for part in ("train", "test")
        for x, y in zip(getattr(a, part), getattr(b, part), strict=True)
    ) and (a.input_shape, a.num_classes) == (b.input_shape, b.num_classes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "over", [{}, {"split_seed": 3, "test_fraction": 0.25}, {"n_train": 100, "n_test": 20}]
)
def test_cached_split_is_the_source_split_bitwise(tmp_path, monkeypatch, over, dtype):
    cfg = DataConfig(name="digits", **over)
    source = load_dataset(cfg, dtype=dtype)
    first = load_dataset(cfg, dtype=dtype, cache_dir=tmp_path)  # reads the source, keeps it
    assert cached_split_path(cfg, tmp_path).exists() and same_splits(first, source)

    def no_source(cfg):
        raise AssertionError("the cached split was not used")

    monkeypatch.setattr(data_module, "raw_splits", no_source)
    assert same_splits(load_dataset(cfg, dtype=dtype, cache_dir=tmp_path), source)


def test_mnist5k_cached_split_is_the_source_split(tmp_path):
    cfg = DataConfig(name="mnist5k")
    first = load_dataset(cfg, cache_dir=tmp_path)
    again = load_dataset(cfg, cache_dir=tmp_path)
    assert same_splits(first, again) and same_splits(again, load_dataset(cfg))
    assert list(tmp_path.iterdir()) == [cached_split_path(cfg, tmp_path)]  # no temporary left


def test_a_cache_of_another_split_or_a_damaged_one_is_read_again(tmp_path, caplog):
    seed0, seed1 = DataConfig(name="digits", split_seed=0), DataConfig(name="digits", split_seed=1)
    load_dataset(seed0, cache_dir=tmp_path)
    cached_split_path(seed0, tmp_path).rename(cached_split_path(seed1, tmp_path))  # wrong file
    assert same_splits(load_dataset(seed1, cache_dir=tmp_path), load_dataset(seed1))
    assert "holds the split of" in caplog.text
    cached_split_path(seed0, tmp_path).write_bytes(b"not an npz")
    assert same_splits(load_dataset(seed0, cache_dir=tmp_path), load_dataset(seed0))
    assert same_splits(load_dataset(seed0, cache_dir=tmp_path), load_dataset(seed0))  # rewritten


def test_torchvision_and_fake_sets_are_not_copied_into_the_cache(tmp_path):
    load_dataset(DataConfig(name="fake", n_train=8, n_test=8), cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_stratified_split_is_disjoint():
    y = np.repeat(np.arange(3), 20)
    tr, te = stratified_split(y, 0.25, seed=3)
    assert set(tr).isdisjoint(te) and len(tr) + len(te) == 60
    assert np.bincount(y[te]).tolist() == [5, 5, 5]


def test_subsets_take_the_first_samples():
    full = load_dataset(DataConfig(name="digits"))
    sub = load_dataset(DataConfig(name="digits", n_train=100, n_test=20))
    assert torch.equal(sub.train[0], full.train[0][:100]) and sub.test[0].shape[0] == 20


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10", "cifar100", "svhn"])
def test_missing_offline_data_is_one_line_error(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DataConfig(name=name, root=str(tmp_path), download=False))
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "data.download: true" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_fake_data_shapes():
    s = load_dataset(DataConfig(name="fake", n_train=32, n_test=8))
    assert s.train[0].shape == (32, 3, 32, 32) and s.input_shape == (3, 32, 32)


def test_augmentation_is_a_shifted_possibly_flipped_copy():
    X = torch.randn(16, 3, 8, 8)
    out = augment_crop_flip(X, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == X.shape
    # every output is X[i] shifted by (dy, dx) ∈ [-2, 2]² with zeros entering, maybe flipped
    for i in range(16):
        padded = torch.nn.functional.pad(X[i], (2, 2, 2, 2))
        found = any(
            torch.equal(out[i], c)
            for dy in range(5)
            for dx in range(5)
            for c in (
                padded[:, dy : dy + 8, dx : dx + 8],
                padded[:, dy : dy + 8, dx : dx + 8].flip(2),
            )
        )
        assert found
    again = augment_crop_flip(X, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)


def test_loader_covers_every_sample_once_and_resumes_mid_epoch():
    X, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    a = TensorLoader(X, y, batch_size=3, seed=5, augment=False)
    seen = torch.cat([t for _, t in a.epoch_batches()])
    assert sorted(seen.tolist()) == list(range(10)) and a.epoch == 1
    it = a.epoch_batches()
    next(it)
    state = a.state_dict()
    rest = [t.tolist() for _, t in it] + [t.tolist() for _, t in a.epoch_batches()]
    b = TensorLoader(X, y, batch_size=3, seed=5)
    b.load_state_dict(state)
    again = [t.tolist() for _, t in b.epoch_batches()] + [t.tolist() for _, t in b.epoch_batches()]
    assert rest == again
    other = TensorLoader(X, y, batch_size=3, seed=6)
    assert [t.tolist() for _, t in other.epoch_batches()] != [t.tolist() for t in seen.split(3)]
