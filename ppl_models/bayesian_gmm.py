r"""The Bayesian Gaussian mixture (``"bayesian-gmm"``): the mixture of :mod:`ppl_models.gmm` with priors on its
weights, locations and scales, so that every parameter is a global latent variable.

Generative story, for components :math:`k = 1, \dots, K`, dimensions :math:`d = 1, \dots, D` and datapoints
:math:`i = 1, \dots, N`:

1. :math:`\pi \sim \mathrm{Dirichlet}(\alpha \mathbf{1}_K)`
2. :math:`\mu_k \sim \mathcal{N}(m_0, s_0^2 I_D)`
3. :math:`\sigma_{kd} \sim \mathrm{LogNormal}(a_0, b_0)`
4. :math:`z_i \sim \mathrm{Categorical}(\pi)`
5. :math:`x_i \mid z_i \sim \mathcal{N}(\mu_{z_i}, \mathrm{diag}(\sigma_{z_i}^2))`

``z`` is enumerated by default (``enumerate=True``): ``TraceEnum_ELBO`` sums it out, and NUTS, which needs
continuous latents only, runs on the collapsed model
:math:`p(x_i \mid \pi, \mu, \sigma) = \sum_k \pi_k \mathcal{N}(x_i; \mu_k, \mathrm{diag}(\sigma_k^2))`:
``MCMC(NUTS(model, max_plate_nesting=1), ...)``.  The hyperparameters live in one :class:`BayesianGMMPrior`
module (buffers only), passed as the keyword ``prior``.  A guide over the global latents:
:mod:`ppl_models.guides.bayesian_gmm`.

References:
    Bishop (2006), Pattern Recognition and Machine Learning, §10.2 (variational mixture of Gaussians).
    Murphy (2012), Machine Learning: a Probabilistic Perspective, §11.2.
    Pyro tutorial "Gaussian Mixture Model" (``examples/gmm``); Pyro "Inference with Discrete Latent Variables".
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_models.gmm import check_positive_int, make_spec
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import ShapeError, check_tensor, data_plate

__all__ = ["BayesianGMMPrior", "model", "build"]


class BayesianGMMPrior(nn.Module):
    r"""Sizes and prior hyperparameters of :func:`model` (buffers: nothing to train).

    :param num_components: :math:`K \ge 1`.
    :param data_dim: :math:`D \ge 1`.
    :param loc_loc: :math:`m_0`, prior mean of every location coordinate.
    :param loc_scale: :math:`s_0 > 0`, its prior standard deviation.
    :param scale_loc: :math:`a_0`, location of :math:`\log\sigma_{kd}`.
    :param scale_scale: :math:`b_0 > 0`, scale of :math:`\log\sigma_{kd}`.
    :param concentration: :math:`\alpha > 0` of the symmetric Dirichlet prior on :math:`\pi`.
    :param enumerate: mark ``z`` for parallel enumeration (needed by NUTS).
    """

    def __init__(
        self,
        num_components: int = 3,
        data_dim: int = 2,
        *,
        loc_loc: float = 0.0,
        loc_scale: float = 10.0,
        scale_loc: float = 0.0,
        scale_scale: float = 1.0,
        concentration: float = 1.0,
        enumerate: bool = True,
    ):
        super().__init__()
        check_positive_int("BayesianGMMPrior", "num_components", num_components)
        check_positive_int("BayesianGMMPrior", "data_dim", data_dim)
        for name, value in (("loc_scale", loc_scale), ("scale_scale", scale_scale), ("concentration", concentration)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"BayesianGMMPrior: {name} must be a positive finite number, received {value!r}")
        self.num_components, self.data_dim, self.enumerate = num_components, data_dim, bool(enumerate)
        for name, value in (
            ("loc_loc", loc_loc),
            ("loc_scale", loc_scale),
            ("scale_loc", scale_loc),
            ("scale_scale", scale_scale),
            ("concentration", concentration),
        ):
            self.register_buffer(name, torch.tensor(float(value)))

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, data_dim={self.data_dim}, enumerate={self.enumerate}"


def model(x: torch.Tensor, idx: torch.Tensor | None = None, *, prior: BayesianGMMPrior, num_data: int | None = None):
    r"""The generative story above: global :math:`\pi, \mu, \sigma` (sites ``weights`` ``(K,)``, ``locs``
    ``(K, D)``, ``scales`` ``(K, D)``, the last two in ``pyro.plate("components", K)``), local ``z`` (enumerated
    when ``prior.enumerate``) and ``x``.

    :param x: observations, shape ``(batch, D)``, in the prior buffers' dtype.
    :param idx: indices of the batch in the full data set, shape ``(batch,)``.
    :param prior: the :class:`BayesianGMMPrior` (registered as ``"prior"``).
    :param num_data: size :math:`N` of the full data set.
    """
    _check_x(prior, x)
    pyro.module("prior", prior)
    K, D = prior.num_components, prior.data_dim
    weights = pyro.sample("weights", dist.Dirichlet(prior.concentration.expand(K)))
    with pyro.plate("components", K, dim=-1):
        locs = pyro.sample("locs", dist.Normal(prior.loc_loc, prior.loc_scale).expand([D]).to_event(1))
        scales = pyro.sample("scales", dist.LogNormal(prior.scale_loc, prior.scale_scale).expand([D]).to_event(1))
    infer = {"enumerate": "parallel"} if prior.enumerate else {}
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Categorical(weights), infer=infer)
        pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


def _check_x(prior: BayesianGMMPrior, x: torch.Tensor) -> None:
    check_tensor("x", x, event_shape=(prior.data_dim,))
    if x.dtype != prior.loc_loc.dtype:
        raise ShapeError(
            f"site 'x': expected dtype {prior.loc_loc.dtype} (the dtype of the prior's buffers), received {x.dtype}"
        )


def build(
    num_components: int = 3,
    data_dim: int = 2,
    loc_loc: float = 0.0,
    loc_scale: float = 10.0,
    scale_loc: float = 0.0,
    scale_scale: float = 1.0,
    concentration: float = 1.0,
    enumerate: bool = True,
) -> ModelParts:
    """The declared structure and the prior (``prior``: a :class:`BayesianGMMPrior`)."""
    prior = BayesianGMMPrior(
        num_components,
        data_dim,
        loc_loc=loc_loc,
        loc_scale=loc_scale,
        scale_loc=scale_loc,
        scale_scale=scale_scale,
        concentration=concentration,
        enumerate=enumerate,
    )
    return ModelParts(spec=make_spec(num_components, data_dim, name="bayesian-gmm"), modules={"prior": prior})


register_model("bayesian-gmm", model=model, build=build)
