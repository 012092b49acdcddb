"""The data layer: known files (registry, search, cache, checksums, download), loaders and data sets.

* :mod:`ppl_models.data.files`: :func:`fetch` returns a verified local copy of a registered file
  (``data_dir``, then ``$PPL_MODELS_DATA``, then the cache, then a download into the cache).
* :mod:`ppl_models.data.mnist`: MNIST and binarized MNIST loaders, and the data sets
  (:class:`TensorDataset`, :class:`DynamicBinarized`) that the training engine consumes through
  the :class:`Dataset` protocol below.
"""

from __future__ import annotations

from typing import Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class Dataset(Protocol):
    """What the training engine needs of a data set.

    ``num_data`` is the number of datapoints :math:`N`; ``batch(idx, generator)`` returns the
    model's data arguments (those before ``idx``) for the rows ``idx`` (a ``LongTensor`` of shape
    ``(batch,)``), taking any randomness only from ``generator``.
    """

    num_data: int

    def batch(self, idx: torch.LongTensor, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
        """The model's data arguments (before idx) for rows idx; randomness only from `generator`."""
        ...


from ppl_models.data.files import (  # noqa: E402
    CACHE_ENV,
    DATA_ENV,
    FILES,
    URL_ENV,
    ChecksumError,
    DataFile,
    DataFileError,
    DataFormatError,
    DataNotFoundError,
    FileForm,
    TransferError,
    cache_dir,
    dataset_names,
    fetch,
    file_digest,
    get_file,
    open_binary,
    read_bytes,
    register_file,
    search_dirs,
    verify,
)
from ppl_models.data.mnist import (  # noqa: E402
    BINARIZATIONS,
    BINARIZED_MNIST_SPLITS,
    MNIST_SPLITS,
    DynamicBinarized,
    TensorDataset,
    binarize,
    load_binarized_mnist,
    load_mnist,
    mnist_splits,
    parse_binarized_amat,
    read_idx,
)

__all__ = [
    "Dataset",
    # files
    "CACHE_ENV",
    "DATA_ENV",
    "URL_ENV",
    "FILES",
    "DataFile",
    "FileForm",
    "DataFileError",
    "ChecksumError",
    "TransferError",
    "DataNotFoundError",
    "DataFormatError",
    "cache_dir",
    "dataset_names",
    "fetch",
    "file_digest",
    "get_file",
    "open_binary",
    "read_bytes",
    "register_file",
    "search_dirs",
    "verify",
    # mnist
    "BINARIZATIONS",
    "BINARIZED_MNIST_SPLITS",
    "MNIST_SPLITS",
    "DynamicBinarized",
    "TensorDataset",
    "binarize",
    "load_binarized_mnist",
    "load_mnist",
    "mnist_splits",
    "parse_binarized_amat",
    "read_idx",
]
