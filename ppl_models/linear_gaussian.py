r"""A conjugate linear-Gaussian latent model (probabilistic PCA / factor analysis with isotropic noise).

Generative story, for each datapoint :math:`i = 1, \dots, N`:

1. :math:`z_i \sim \mathcal{N}(0, I_{z\_dim})`
2. :math:`x_i \mid z_i \sim \mathcal{N}(W z_i + b, \sigma^2 I_{x\_dim})`

with :math:`W \in \mathbb{R}^{x\_dim \times z\_dim}`, :math:`b \in \mathbb{R}^{x\_dim}` and
:math:`\sigma > 0` held by one :class:`LinearGaussianParams` module, passed as the keyword ``params``
to the model and to its guides (registered with ``pyro.module("params", ...)``).

Everything is exactly solvable, which makes the model the package's ground truth for inference and
evaluation code:

* posterior (:func:`exact_posterior`): :math:`p(z_i \mid x_i) = \mathcal{N}(\mu_i, \Sigma)` with precision
  :math:`\Lambda = I + W^\top W / \sigma^2`, :math:`\Sigma = \Lambda^{-1}` and
  :math:`\mu_i = \Sigma W^\top (x_i - b) / \sigma^2`;
* evidence (:func:`log_evidence`): :math:`p(x_i) = \mathcal{N}(x_i; b, W W^\top + \sigma^2 I)`.

Guides are in :mod:`ppl_models.guides.linear_gaussian` (``"exact"``: :math:`q = ` the true posterior); the generic
``"mean-field"`` and ``"amortized-mlp"`` guides apply too.

References:
    Tipping & Bishop (1999), Probabilistic Principal Component Analysis.
    Bishop (2006), Pattern Recognition and Machine Learning, §2.3.3 and §12.2.
"""

from __future__ import annotations

import math
from typing import Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, check_tensor, data_plate

__all__ = ["LinearGaussianParams", "make_spec", "model", "exact_posterior", "log_evidence", "simulate", "build"]


class LinearGaussianParams(nn.Module):
    r"""The model's parameters :math:`W` ``(x_dim, z_dim)``, :math:`b` ``(x_dim,)`` and :math:`\log\sigma` ``()``.

    :math:`\sigma = \exp(\log\sigma)` is positive by construction.

    :param z_dim: latent dimension.
    :param x_dim: observed dimension.
    :param init_sigma: initial noise scale :math:`\sigma`.
    :param weight_scale: the initial entries of :math:`W` are drawn from :math:`\mathcal{N}(0, weight\_scale^2)`
        and those of :math:`b` from :math:`\mathcal{N}(0, bias\_scale^2)`.
    :param bias_scale: see ``weight_scale``; 0 starts :math:`b` at zero.
    :param generator: random generator of the initial values (``None``: torch's global one).
    """

    def __init__(
        self,
        z_dim: int = 2,
        x_dim: int = 5,
        *,
        init_sigma: float = 1.0,
        weight_scale: float = 1.0,
        bias_scale: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (("z_dim", z_dim), ("x_dim", x_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearGaussianParams: {name} must be a positive integer, received {value!r}")
        if not init_sigma > 0:
            raise ValueError(f"LinearGaussianParams: init_sigma must be positive, received {init_sigma!r}")
        self.z_dim, self.x_dim = z_dim, x_dim
        self.W = nn.Parameter(torch.randn(x_dim, z_dim, generator=generator) * weight_scale)
        self.b = nn.Parameter(torch.randn(x_dim, generator=generator) * bias_scale)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(init_sigma)))

    @property
    def sigma(self) -> torch.Tensor:
        r""":math:`\sigma`, shape ``()``."""
        return self.log_sigma.exp()

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, x_dim={self.x_dim}"


def make_spec(z_dim: int = 2, x_dim: int = 5) -> ModelSpec:
    return ModelSpec(
        name="linear-gaussian",
        observed=ObservedSite("x", (x_dim,), constraints.real),
        data_plate="data",
        local_latents=(LatentSite("z", (z_dim,), constraints.real),),
    )


def model(
    x: torch.Tensor, idx: torch.Tensor | None = None, *, params: LinearGaussianParams, num_data: int | None = None
):
    """The generative story above.

    :param x: observations, shape ``(batch, x_dim)``.
    :param idx: indices of the batch in the full data set, shape ``(batch,)``; ``None`` when ``x`` is
        the whole data set.
    :param params: the :class:`LinearGaussianParams` (registered as ``"params"``).
    :param num_data: size :math:`N` of the full data set (for the ELBO's N/batch scale).
    """
    check_tensor("x", x, event_shape=(params.x_dim,))
    pyro.module("params", params)
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([params.z_dim]).to_event(1))
        x_loc = z @ params.W.T + params.b  # (..., batch, x_dim)
        pyro.sample("x", dist.Normal(x_loc, params.sigma).to_event(1), obs=x)


def _posterior_precision_cholesky(params: LinearGaussianParams) -> torch.Tensor:
    """Cholesky factor of :math:`\\Lambda = I + W^\\top W / \\sigma^2`, shape ``(z_dim, z_dim)``."""
    W, sigma2 = params.W, params.sigma**2
    precision = torch.eye(params.z_dim, dtype=W.dtype, device=W.device) + W.T @ W / sigma2
    return torch.linalg.cholesky(precision)


def exact_posterior(params: LinearGaussianParams, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The exact posterior :math:`p(z_i \mid x_i) = \mathcal{N}(z\_loc_i, L L^\top)` of every row of ``x``.

    :param params: the model's parameters.
    :param x: observations, shape ``(batch, x_dim)``.
    :return: ``z_loc`` of shape ``(batch, z_dim)`` and the covariance's lower Cholesky factor
        ``scale_tril`` of shape ``(z_dim, z_dim)`` (the same for every datapoint).
    """
    check_tensor("x", x, event_shape=(params.x_dim,))
    chol_precision = _posterior_precision_cholesky(params)
    # z_loc = Λ⁻¹ Wᵀ (x - b) / σ², solved for all rows at once.
    rhs = ((x - params.b) @ params.W / params.sigma**2).T  # (z_dim, batch)
    z_loc = torch.cholesky_solve(rhs, chol_precision).T
    covariance = torch.cholesky_inverse(chol_precision)
    scale_tril = torch.linalg.cholesky(covariance)
    return z_loc, scale_tril


def log_evidence(params: LinearGaussianParams, x: torch.Tensor) -> torch.Tensor:
    r"""Exact :math:`\log p(x_i) = \log \mathcal{N}(x_i; b, W W^\top + \sigma^2 I)` of every row.

    :param params: the model's parameters.
    :param x: observations, shape ``(batch, x_dim)``.
    :return: shape ``(batch,)``.
    """
    check_tensor("x", x, event_shape=(params.x_dim,))
    W = params.W
    covariance = W @ W.T + params.sigma**2 * torch.eye(params.x_dim, dtype=W.dtype, device=W.device)
    return dist.MultivariateNormal(params.b, covariance_matrix=covariance).log_prob(x)


def simulate(
    params: LinearGaussianParams, num_data: int, generator: torch.Generator | None = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw a data set from the model itself (steps 1 and 2 above), without Pyro.

    :param params: the model's parameters.
    :param num_data: number of datapoints :math:`N`.
    :param generator: the only source of randomness (``None``: torch's global generator).
    :return: ``x`` of shape ``(num_data, x_dim)`` and the latents ``z`` of shape ``(num_data, z_dim)``,
        in the parameters' dtype.
    """
    if not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"simulate: num_data must be a positive integer, received {num_data!r}")
    W = params.W.detach()
    with torch.no_grad():
        z = torch.randn(num_data, params.z_dim, generator=generator, dtype=W.dtype)
        noise = torch.randn(num_data, params.x_dim, generator=generator, dtype=W.dtype)
        x = z @ W.T + params.b.detach() + params.sigma.detach() * noise
    return x, z


def build(
    z_dim: int = 2,
    x_dim: int = 5,
    init_sigma: float = 1.0,
    weight_scale: float = 1.0,
    bias_scale: float = 0.0,
    seed: int | None = None,
) -> ModelParts:
    """The declared structure and the parameters (``params``) for given sizes.

    :param seed: seeds the initial values of :math:`W` and :math:`b` (``None``: torch's global generator).
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    params = LinearGaussianParams(
        z_dim, x_dim, init_sigma=init_sigma, weight_scale=weight_scale, bias_scale=bias_scale, generator=generator
    )
    return ModelParts(spec=make_spec(z_dim, x_dim), modules={"params": params})


register_model("linear-gaussian", model=model, build=build)
