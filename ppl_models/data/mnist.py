r"""MNIST (LeCun et al. 1998) and fixed binarized MNIST (Larochelle & Murray 2011), and the data sets built on them.

Loaders return tensors of shape ``(N, 784)`` (row-major 28x28 images):

* :func:`load_mnist`: grey levels :math:`x = \text{pixel} / 255 \in [0, 1]` (``float32``) and labels (``int64``);
* :func:`load_binarized_mnist`: the fixed 0/1 binarization, splits train 50000 / valid 10000 / test 10000.

Data sets follow the engine's :class:`ppl_models.data.Dataset` protocol (``num_data`` and
``batch(idx, generator)``):

* :class:`TensorDataset`: fixed tensors, ``batch`` returns ``(x[idx],)``;
* :class:`DynamicBinarized`: a fresh :math:`x \sim \mathrm{Bernoulli}(p)` draw every time a row is
  used (dynamic binarization, as in Burda et al. 2015), randomness only from the given generator.

:func:`mnist_splits` assembles train/valid/test data sets for either binarization.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch.distributions import constraints

from ppl_models.data.files import DataFormatError, fetch, read_bytes
from ppl_models.registry import UnknownNameError
from ppl_models.spec import check_tensor

__all__ = [
    "MNIST_SPLITS",
    "BINARIZED_MNIST_SPLITS",
    "BINARIZATIONS",
    "read_idx",
    "parse_binarized_amat",
    "load_mnist",
    "load_binarized_mnist",
    "TensorDataset",
    "DynamicBinarized",
    "binarize",
    "mnist_splits",
]

#: split -> (images file, labels file, number of images)
MNIST_SPLITS: Dict[str, Tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
#: split -> number of images of the fixed binarized MNIST
BINARIZED_MNIST_SPLITS: Dict[str, int] = {"train": 50000, "valid": 10000, "test": 10000}
#: valid ``binarization`` arguments of :func:`mnist_splits`
BINARIZATIONS = ("dynamic", "fixed")

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
NUM_PIXELS = 784
_AMAT_LINE = 2 * NUM_PIXELS  # "0 1 ... 0\n": 784 digits, 783 spaces, one newline


def _fmt(dims) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def read_idx(path: str | os.PathLike, magic: int, dims: Sequence[int | None]) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (``.gz`` or raw) with numpy.

    :param path: the file.
    :param magic: the expected big-endian magic number (2051 images, 2049 labels).
    :param dims: the expected dimensions; ``None`` matches any size.
    :returns: a read-only ``uint8`` array of shape ``dims``.
    :raises DataFormatError: naming the file and what was expected.
    """
    raw = read_bytes(path)
    ndim = len(dims)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(
            f"IDX file {path}: expected a header of {header} bytes (magic {magic}, {ndim} dims), "
            f"received a file of {len(raw)} bytes"
        )
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise DataFormatError(
            f"IDX file {path}: expected magic number {magic} (unsigned bytes, {ndim} dims), received {got_magic}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(want is not None and want != got for want, got in zip(dims, shape)):
        raise DataFormatError(f"IDX file {path}: expected dimensions {_fmt(dims)}, received {_fmt(shape)}")
    size = header + math.prod(shape)
    if len(raw) != size:
        raise DataFormatError(
            f"IDX file {path}: dimensions {_fmt(shape)} need {size} bytes (header {header} + data), "
            f"received {len(raw)} bytes"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _check_split(split: str, valid, what: str) -> None:
    if split not in valid:
        raise UnknownNameError(f"{what} split", split, valid)


def load_mnist(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST images and labels of one split.

    :param split: ``"train"`` (60000 images) or ``"test"`` (10000).
    :param data_dir: a directory holding ``mnist/<file>`` searched first (see :func:`~ppl_models.data.fetch`).
    :param download: download the files into the cache when not found.
    :returns: ``(images, labels)``: images ``float32`` of shape ``(N, 784)`` equal to pixel / 255,
        labels ``int64`` of shape ``(N,)`` in 0..9.
    """
    _check_split(split, MNIST_SPLITS, "MNIST")
    images_name, labels_name, n = MNIST_SPLITS[split]
    images_path = fetch("mnist", images_name, data_dir=data_dir, download=download)
    labels_path = fetch("mnist", labels_name, data_dir=data_dir, download=download)
    images = read_idx(images_path, IDX_IMAGES_MAGIC, (n, 28, 28))
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, (n,))
    if labels.size and labels.max() > 9:
        raise DataFormatError(f"IDX file {labels_path}: expected labels in 0..9, received {int(labels.max())}")
    x = torch.from_numpy(images.reshape(n, NUM_PIXELS).copy()).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def parse_binarized_amat(raw: bytes, source: str = "<bytes>", num_rows: int | None = None) -> np.ndarray:
    """Parse the ``.amat`` text of binarized MNIST: one image per line, 784 ``0``/``1`` separated by single spaces.

    :param raw: the (decompressed) file content.
    :param source: the file name, for error messages.
    :param num_rows: the expected number of rows (``None``: any).
    :returns: ``uint8`` array of shape ``(N, 784)`` with values 0/1.
    :raises DataFormatError: when the layout is not exactly that.
    """
    layout = f"lines of {NUM_PIXELS} space-separated 0/1 values ending in '\\n' ({_AMAT_LINE} bytes per line)"
    if len(raw) == 0 or len(raw) % _AMAT_LINE:
        raise DataFormatError(
            f"binarized MNIST file {source}: expected {layout}, received {len(raw)} bytes "
            f"(not a positive multiple of {_AMAT_LINE})"
        )
    rows = np.frombuffer(raw, np.uint8).reshape(-1, _AMAT_LINE)
    seps = rows[:, 1::2]
    values = rows[:, ::2] - 48  # b"0" -> 0, b"1" -> 1; anything else wraps to > 1
    if not ((seps[:, :-1] == 32).all() and (seps[:, -1] == 10).all() and (values <= 1).all()):
        bad = int(np.flatnonzero((seps[:, :-1] != 32).any(1) | (seps[:, -1] != 10) | (values > 1).any(1))[0])
        snippet = bytes(rows[bad, :40]).decode("latin-1")
        raise DataFormatError(
            f"binarized MNIST file {source}: expected {layout}, received line {bad + 1} starting {snippet!r}"
        )
    if num_rows is not None and rows.shape[0] != num_rows:
        raise DataFormatError(f"binarized MNIST file {source}: expected {num_rows} rows, received {rows.shape[0]}")
    return values


def load_binarized_mnist(split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> torch.Tensor:
    """The fixed binarized MNIST of Larochelle & Murray (2011) (Salakhutdinov & Murray 2008).

    :param split: ``"train"`` (50000), ``"valid"`` (10000) or ``"test"`` (10000).
    :param data_dir: a directory holding ``binarized_mnist/<file>`` searched first.
    :param download: download the file into the cache when not found.
    :returns: ``float32`` tensor of shape ``(N, 784)`` with values 0/1.
    """
    _check_split(split, BINARIZED_MNIST_SPLITS, "binarized MNIST")
    path: Path = fetch("binarized_mnist", f"binarized_mnist_{split}.amat", data_dir=data_dir, download=download)
    values = parse_binarized_amat(read_bytes(path), str(path), BINARIZED_MNIST_SPLITS[split])
    return torch.from_numpy(values).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Data sets (the engine's Dataset protocol: num_data and batch(idx, generator))
# --------------------------------------------------------------------------------------------------


class TensorDataset:
    """Fixed tensors sharing their first dimension :math:`N`.

    ``batch(idx, generator)`` returns ``(t[idx] for t in tensors)``; the generator is unused.

    :param tensors: one or more tensors of shape ``(N, ...)``.
    """

    def __init__(self, *tensors: torch.Tensor):
        if not tensors:
            raise ValueError("TensorDataset: expected at least one tensor, received none")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"TensorDataset: tensor {i}: expected a tensor of shape (N, ...), received {got}")
            if t.shape[0] != tensors[0].shape[0]:
                raise ValueError(
                    f"TensorDataset: tensor {i}: expected first dimension N={tensors[0].shape[0]} "
                    f"(as tensor 0), received shape {tuple(t.shape)}"
                )
        self.tensors = tuple(tensors)
        self.num_data = int(tensors[0].shape[0])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> Tuple[torch.Tensor, ...]:
        return tuple(t[idx] for t in self.tensors)

    def __len__(self) -> int:
        return self.num_data

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"TensorDataset({shapes})"


class DynamicBinarized:
    r"""Dynamic binarization: each use of row :math:`i` draws :math:`x_i \sim \mathrm{Bernoulli}(p_i)` afresh.

    :param probs: pixel probabilities in [0, 1], shape ``(N, ...)`` (e.g. MNIST grey levels ``(N, 784)``).

    ``batch(idx, generator)`` returns ``(torch.bernoulli(probs[idx], generator=generator),)``:
    the same generator state gives the same draw.  The generator must be on ``probs``' device.
    """

    def __init__(self, probs: torch.Tensor):
        check_tensor("probs", probs, support=constraints.unit_interval)
        if probs.dim() == 0:
            raise ValueError("DynamicBinarized: expected probs of shape (N, ...), received a scalar")
        self.probs = probs
        self.num_data = int(probs.shape[0])

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor]:
        return (torch.bernoulli(self.probs[idx], generator=generator),)

    def __len__(self) -> int:
        return self.num_data

    def __repr__(self) -> str:
        return f"DynamicBinarized(probs={tuple(self.probs.shape)})"


def binarize(probs: torch.Tensor, seed: int) -> torch.Tensor:
    r"""One fixed draw :math:`x \sim \mathrm{Bernoulli}(p)` (e.g. for a test set), reproducible from ``seed``.

    :param probs: probabilities in [0, 1], any shape.
    :returns: a tensor of ``probs``' shape, dtype and device with values 0/1.
    """
    check_tensor("probs", probs, support=constraints.unit_interval)
    generator = torch.Generator(device=probs.device).manual_seed(int(seed))
    return torch.bernoulli(probs, generator=generator)


def mnist_splits(
    binarization: str = "dynamic",
    valid_size: int = 10000,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    seed: int = 0,
) -> Dict[str, object]:
    """Train, validation and test data sets of binary MNIST.

    * ``"dynamic"``: train = the first ``60000 - valid_size`` MNIST training images, dynamically
      binarized (:class:`DynamicBinarized`); valid = the last ``valid_size`` training images
      binarized once with ``seed``; test = the 10000 test images binarized once with ``seed + 1``.
    * ``"fixed"``: the fixed binarized MNIST train (50000) / valid (10000) / test (10000) as
      :class:`TensorDataset` (its validation split is fixed: ``valid_size`` must be 10000).

    :returns: ``{"train": Dataset, "valid": Dataset, "test": Dataset}``; each batch is ``(x,)`` with
        ``x`` of shape ``(batch, 784)``, values 0/1.
    """
    if binarization not in BINARIZATIONS:
        raise UnknownNameError("binarization", binarization, BINARIZATIONS)
    if binarization == "fixed":
        if valid_size != BINARIZED_MNIST_SPLITS["valid"]:
            raise ValueError(
                f"mnist_splits: binarization 'fixed' has a fixed validation split of "
                f"{BINARIZED_MNIST_SPLITS['valid']} rows, received valid_size={valid_size}"
            )
        return {
            split: TensorDataset(load_binarized_mnist(split, data_dir=data_dir, download=download))
            for split in ("train", "valid", "test")
        }
    x_train, x_valid, x_test = train_valid_test_images(valid_size, data_dir, download, caller="mnist_splits")
    return {
        "train": DynamicBinarized(x_train),
        "valid": TensorDataset(binarize(x_valid, seed)),
        "test": TensorDataset(binarize(x_test, seed + 1)),
    }


def train_valid_test_images(valid_size: int, data_dir=None, download: bool = True, caller: str = "mnist"):
    """Grey-level MNIST images ``(train, valid, test)``: the first ``60000 - valid_size`` training images, the
    last ``valid_size`` of them, and the 10000 test images; a bad ``valid_size`` is one error naming ``caller``."""
    n_total = MNIST_SPLITS["train"][2]
    if isinstance(valid_size, bool) or not isinstance(valid_size, int) or not 0 <= valid_size < n_total:
        raise ValueError(f"{caller}: expected an integer valid_size in [0, {n_total}), received {valid_size!r}")
    x_train, _ = load_mnist("train", data_dir=data_dir, download=download)
    x_test, _ = load_mnist("test", data_dir=data_dir, download=download)
    n_train = n_total - valid_size
    return x_train[:n_train], x_train[n_train:], x_test
