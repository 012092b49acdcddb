"""The data layer: known files (registry, search, cache, checksums, download), loaders and data sets.

* :mod:`ppl_models.data.files`: :func:`fetch` returns a verified local copy of a registered file
  (``data_dir``, then ``$PPL_MODELS_DATA``, then the cache, then a download into the cache).
* :mod:`ppl_models.data.mnist`: MNIST and binarized MNIST loaders, and the data sets
  (:class:`TensorDataset`, :class:`DynamicBinarized`) that the training engine consumes through
  the :class:`Dataset` protocol below.
* :data:`DATASETS`: the data sets by name (``[data] name`` of a config, ``ppl-models list``), each a loader
  ``loader(**options) -> {"train": Dataset, "valid": Dataset, "test": Dataset}``; :func:`register_dataset` adds
  one (e.g. from a user's model file), :func:`dataset_loader` looks one up.
"""

from __future__ import annotations

from typing import Callable, Dict, Protocol, Tuple, runtime_checkable

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
    "DATASETS",
    "register_dataset",
    "dataset_loader",
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

from ppl_models.data.parallel import multi30k_splits, parallel_splits, synthetic_splits  # noqa: E402
from ppl_models.data.ptb import ptb_splits  # noqa: E402
from ppl_models.data.quadrants import quadrant_splits  # noqa: E402
from ppl_models.data.simulated import factor_analysis_splits  # noqa: E402
from ppl_models.registry import UnknownNameError  # noqa: E402

#: The data sets by name: ``loader(**options) -> {"train": Dataset, "valid": Dataset, "test": Dataset}``, the
#: options being ``[data]``'s keys other than ``name`` and ``limit_<split>``.
DATASETS: Dict[str, Callable[..., dict]] = {
    "mnist": mnist_splits,  # MNIST grey levels or binarized (ppl_models.data.mnist)
    "mnist-quadrants": quadrant_splits,  # MNIST images cut into observed and predicted quadrants
    "multi30k": multi30k_splits,  # Multi30k sentence pairs
    "parallel": parallel_splits,  # any tokenized parallel text
    "ppca-simulated": factor_analysis_splits,  # draws of a factor-analysis model with known loadings (ppl_models.ppca)
    "ptb": ptb_splits,  # Penn Treebank sentences (Mikolov's preprocessing)
    "synthetic-alignment": synthetic_splits,  # the synthetic reverse-and-transliterate task with gold alignments
}


def register_dataset(name: str, loader: Callable[..., dict]) -> None:
    """Add (or replace) the data set ``name``: ``loader(**options)`` returns ``{"train", "valid", "test"}``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_dataset: expected a non-empty string name, received {name!r}")
    if not callable(loader):
        raise TypeError(f"register_dataset({name!r}): expected a callable loader, received {type(loader).__name__}")
    DATASETS[name] = loader


def dataset_loader(name: str) -> Callable[..., dict]:
    """The loader of data set ``name``.

    :raises UnknownNameError: naming the registered data sets.
    """
    if name not in DATASETS:
        raise UnknownNameError("data set", name, DATASETS)
    return DATASETS[name]
