r"""Simulated data sets with known generating parameters.

* :func:`factor_analysis_splits` — data set ``ppca-simulated``: draws of a factor-analysis model
  (:mod:`ppl_models.ppca`) with known loadings, for fits whose exact log-likelihood is known.
"""

from __future__ import annotations

import torch

from ppl_models.data.mnist import TensorDataset

__all__ = ["factor_analysis_splits"]


def factor_analysis_splits(num_train: int = 2000, num_test: int = 1000, z_dim: int = 2, x_dim: int = 5,
                           seed: int = 1) -> dict:
    r"""Train and test sets drawn from one factor-analysis model, all from a generator seeded with ``seed``:

    1. :math:`W_{dj} \sim \mathcal{N}(0, 1)` (``(x_dim, z_dim)``), :math:`b_d \sim \mathcal{N}(0, 1)`, noise scales
       :math:`\sigma_d \sim \mathcal{U}(0.2, 1)`;
    2. for each datapoint :math:`z_i \sim \mathcal{N}(0, I)`, :math:`x_i = W z_i + b + \sigma \odot \epsilon_i`,
       :math:`\epsilon_i \sim \mathcal{N}(0, I)`.

    :return: ``{"train": TensorDataset (num_train, x_dim), "valid": None, "test": TensorDataset (num_test, x_dim)}``.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test), ("z_dim", z_dim), ("x_dim", x_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data 'ppca-simulated': {name}: expected a positive integer, received {value!r}")
    g = torch.Generator().manual_seed(seed)
    loading, bias = torch.randn(x_dim, z_dim, generator=g), torch.randn(x_dim, generator=g)
    noise_scale = 0.2 + 0.8 * torch.rand(x_dim, generator=g)
    n = num_train + num_test
    z = torch.randn(n, z_dim, generator=g)
    x = z @ loading.T + bias + noise_scale * torch.randn(n, x_dim, generator=g)
    return {"train": TensorDataset(x[:num_train]), "valid": None, "test": TensorDataset(x[num_train:])}
