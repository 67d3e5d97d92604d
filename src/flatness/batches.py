"""The two data forms every measure accepts, reduced to one re-iterable stream of batches.

A measure's ``data`` is either a pair ``(X, y)`` of tensors or an iterable of ``(X, y)`` batches (a
list, a DataLoader, a generator). :class:`Batches` validates it once, moves each batch to the model's
device and floating dtype, and can be iterated as often as an iterative eigensolver needs.
The data loss over *all samples* is ``Σ_b w_b · loss_b`` with :func:`batch_weight`: ``w_b = n_b / N``
for a batch-mean loss (the mean over all samples) and ``w_b = 1`` for a sum-reduced loss (the sum
over all samples); :func:`loss_term` applies it and is the one place every chunk loop goes through.

**What a** ``loss_fn`` **must return.** A plain callable ``loss_fn(output, y)`` must return the
*mean* over the batch (a scalar). A torch loss module (or a ``functools.partial`` of a functional
loss) may say otherwise through ``reduction``: ``"mean"`` (or ``"batchmean"``) and ``"sum"`` are
supported, ``"none"`` is rejected (a measure needs a scalar).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Default chunk when a single ``(X, y)`` pair is split for memory; METHODS.md §9 measured CNN
#: chunks of 128–256 as ≈1.8× faster than one batch of 1024 on 2 cores.
DEFAULT_CHUNK = 256


def default_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over the batch (the DESIGN.md default)."""
    return nn.functional.cross_entropy(logits, y)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (or buffer)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _check_pair(item, where: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise ValueError(f"{where}: expected an (X, y) pair of tensors, got {type(item).__name__}")
    X, y = item[0], item[1]
    if not (isinstance(X, Tensor) and isinstance(y, Tensor)):
        raise ValueError(
            f"{where}: X and y must be tensors, got {type(X).__name__} and {type(y).__name__}"
        )
    if X.dim() == 0 or y.dim() == 0:
        raise ValueError(
            f"{where}: X and y need a leading sample dimension, got shapes {tuple(X.shape)} and "
            f"{tuple(y.shape)} (a single sample is X[None], y[None])"
        )
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{where}: X has {X.shape[0]} samples but y has {y.shape[0]}; they must match"
        )
    return X, y


class Batches:
    """A validated, re-iterable sequence of ``(X, y)`` batches on a target device/dtype.

    >>> import torch
    >>> b = Batches((torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)), chunk_size=4)
    >>> [x.shape[0] for x, _ in b], b.num_samples
    ([4, 4, 2], 10)
    """

    def __init__(
        self,
        data,
        chunk_size: int | None = DEFAULT_CHUNK,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        if isinstance(data, Batches):
            self._source: Iterable = data._source
        elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            X, y = _check_pair(data, "data")
            step = X.shape[0] if not chunk_size else int(chunk_size)
            self._source = [(X[i : i + step], y[i : i + step]) for i in range(0, X.shape[0], step)]
        elif isinstance(data, Iterable):
            # A one-shot iterator (generator) cannot be replayed: materialise it once.
            self._source = list(data) if iter(data) is data else data
        else:
            raise ValueError(
                f"data must be an (X, y) pair of tensors or an iterable of (X, y) batches, "
                f"got {type(data).__name__}"
            )
        sizes = []
        for i, item in enumerate(self._source):
            X, _ = _check_pair(item, f"data batch {i}")
            sizes.append(int(X.shape[0]))
        self.batch_sizes = [s for s in sizes if s > 0]
        self.num_samples = sum(sizes)
        if self.num_samples == 0:
            raise ValueError("data is empty: it holds no samples")

    @classmethod
    def for_model(cls, data, model: nn.Module, chunk_size: int | None = DEFAULT_CHUNK) -> Batches:
        device, dtype = model_device_dtype(model)
        return cls(data, chunk_size=chunk_size, device=device, dtype=dtype)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for item in self._source:
            X, y = item[0], item[1]
            if X.shape[0] == 0:
                continue
            if self.device is not None:
                # Asynchronous copies only onto a CUDA device (the stream orders them before the
                # kernels that read them); a copy to the host must finish before the CPU reads it.
                nb = _non_blocking(self.device)
                X, y = X.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
            if self.dtype is not None and X.is_floating_point():
                X = X.to(self.dtype)
            if self.dtype is not None and y.is_floating_point():
                y = y.to(self.dtype)
            yield X, y

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def concatenated(self) -> tuple[Tensor, Tensor]:
        """All samples as one ``(X, y)`` pair (for closed forms that need every sample at once)."""
        Xs, ys = zip(*self, strict=True)
        return torch.cat(Xs), torch.cat(ys)


def _non_blocking(device: torch.device) -> bool:
    """Whether a copy *to* ``device`` may be asynchronous: only onto CUDA."""
    return torch.device(device).type == "cuda"


_MEAN_REDUCTIONS = ("mean", "batchmean", "elementwise_mean")


def loss_reduction(loss_fn: LossFn | None) -> str:
    """``"mean"`` or ``"sum"``: how ``loss_fn`` reduces a batch (see the module docstring).

    Read from ``loss_fn.reduction`` (torch loss modules) or a ``functools.partial``'s
    ``reduction=`` keyword; a plain callable is taken to return the batch mean.

    >>> loss_reduction(None), loss_reduction(nn.CrossEntropyLoss(reduction="sum"))
    ('mean', 'sum')
    """
    if loss_fn is None:
        return "mean"
    red = getattr(loss_fn, "reduction", None)
    if red is None and isinstance(loss_fn, functools.partial):
        red = loss_fn.keywords.get("reduction")
    red = "mean" if red is None else red
    if red in _MEAN_REDUCTIONS:
        return "mean"
    if red == "sum":
        return "sum"
    raise ValueError(
        f"loss_fn has reduction={red!r}; a measure needs a scalar batch loss: use a loss that "
        "returns the batch mean (reduction='mean', the default) or the batch sum (reduction='sum')"
    )


def batch_weight(loss_fn: LossFn | None, batch_size: int, num_samples: int) -> float:
    """Weight of a batch's loss in the data loss: ``n_b / N`` for a mean loss, 1 for a sum loss."""
    return 1.0 if loss_reduction(loss_fn) == "sum" else batch_size / num_samples


def loss_term(
    loss_fn: LossFn | None,
    output: Tensor,
    y: Tensor,
    num_samples: int,
    *,
    check: bool = True,
    what: str = "loss",
) -> Tensor:
    """One batch's contribution to the data loss: ``batch_weight · loss_fn(output, y)``.

    The data loss is the sum of these terms over the batches of :class:`Batches` (of
    ``num_samples`` samples in all), whatever the chunking: the mean over all samples for a
    mean-reduced ``loss_fn`` (the default cross-entropy), the sum over all samples for a
    sum-reduced one. ``check=False`` skips the finiteness test (needed inside ``torch.func``
    transforms, which cannot branch on values; the caller checks the result instead).

    >>> out, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> round(float(loss_term(None, out, y, 4)), 6)  # mean CE ln 3 on 2 of 4 samples
    0.549306
    >>> round(float(loss_term(nn.CrossEntropyLoss(reduction="sum"), out, y, 4)), 6)
    2.197225
    """
    loss_fn = loss_fn or default_loss
    loss = loss_fn(output, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    if check:
        check_finite(loss, what)
    return loss * batch_weight(loss_fn, y.shape[0], num_samples)


def mean_loss(model: nn.Module, batches: Batches, loss_fn: LossFn | None = None) -> Tensor:
    """The data loss over all samples, ``Σ_b`` :func:`loss_term` (the mean for a mean-reduced
    ``loss_fn``, the sum for a sum-reduced one), with the autograd graph kept."""
    total = None
    for X, y in batches:
        term = loss_term(loss_fn, model(X), y, batches.num_samples)
        total = term if total is None else total + term
    check_finite(total, "loss")
    return total


def check_finite(value: Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` when a scalar tensor is NaN or infinite."""
    if not torch.isfinite(value).all():
        raise ValueError(
            f"the {what} is not finite ({value.detach().flatten()[:4].tolist()}); "
            "a diverged model or bad inputs cannot be measured"
        )


class eval_mode:
    """Context manager: put a model in ``eval()`` and restore each module's mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for m, mode in self._modes:
            m.training = mode
