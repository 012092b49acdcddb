r"""Factor analysis and probabilistic PCA, declared in a few lines (:mod:`ppl_models.declarative`).

Generative story, for each datapoint :math:`i = 1, \dots, N`:

1. :math:`z_i \sim \mathcal{N}(0, I_{z\_dim})`
2. :math:`x_i \mid z_i \sim \mathcal{N}(W z_i + b, \Psi)`, :math:`\Psi = \mathrm{diag}(\mathrm{noise\_scale}^2)`
   (one shared noise scale if ``isotropic``: probabilistic PCA, Tipping & Bishop 1999)

Exact marginal likelihood: :math:`x_i \sim \mathcal{N}(b, W W^\top + \Psi)` (Bishop 2006, §12.2.4),
:func:`exact_log_likelihood`, against which the ELBO and the IWAE bound are checked.  Shapes: ``x`` is
``(batch, x_dim)``, ``z`` is ``(batch, z_dim)``, ``W`` is ``(x_dim, z_dim)``.

The guides are the generic ones built from the declared latent ``z`` (``mean-field``, ``amortized-mlp``, alias
``amortized``); the simulated data set of ``examples/configs/ppca.toml`` is ``ppca-simulated``
(:func:`ppl_models.data.simulated.factor_analysis_splits`).  ``examples/ppca.py`` fits it and prints the exact
log-likelihood beside the ELBO and IWAE estimates.

References:
    Tipping & Bishop (1999), Probabilistic Principal Component Analysis.
    Bishop (2006), Pattern Recognition and Machine Learning, §12.2.4.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ppl_models.declarative import DeclaredNetworks, Latent, Observed, declare_model

__all__ = ["ppca", "exact_log_likelihood"]

ppca = declare_model(
    "ppca",
    doc=r"""Factor analysis (isotropic=True: probabilistic PCA, Tipping & Bishop 1999), for each datapoint i:

    1. z_i ~ N(0, I_{z_dim})
    2. x_i | z_i ~ N(W z_i + b, Ψ),  Ψ = diag(noise_scale²) (one shared noise_scale if isotropic)

    Exact marginal likelihood: x_i ~ N(b, W Wᵀ + Ψ) (Bishop 2006, §12.2.4).""",
    hparams={"z_dim": 2, "x_dim": 5, "isotropic": False},
    networks={"loading": lambda z_dim, x_dim: torch.nn.Linear(z_dim, x_dim)},  # W z + b
    params={"log_noise_scale": lambda x_dim, isotropic: torch.zeros(1 if isotropic else x_dim)},
    sites=[
        Latent("z", ("z_dim",), lambda: dist.Normal(0.0, 1.0)),
        Observed("x", ("x_dim",), lambda z, loading, log_noise_scale: dist.Normal(loading(z), log_noise_scale.exp())),
    ],
)


def exact_log_likelihood(networks: DeclaredNetworks, x: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x_i) = \\log \\mathcal{N}(x_i; b, W W^\\top + \\Psi)` for ``x`` of shape ``(batch, x_dim)``;
    shape ``(batch,)``."""
    loading, psi = networks.nets["loading"], networks.params["log_noise_scale"].exp().pow(2)
    covariance = loading.weight @ loading.weight.T + torch.diag(psi.expand(loading.out_features))
    return dist.MultivariateNormal(loading.bias, covariance_matrix=covariance).log_prob(x)
