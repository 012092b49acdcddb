r"""A guide for the Bayesian Gaussian mixture :mod:`ppl_models.bayesian_gmm` (model ``"bayesian-gmm"``).

``mean-field-globals`` — mean-field :math:`q(\pi)\prod_k q(\mu_k) q(\sigma_k)` over the global latents; the
model's ``z`` is summed out by enumeration (``TraceEnum_ELBO``), so the guide draws no local latent:

1. :math:`\pi \sim \mathrm{Dirichlet}(\mathrm{softplus}(a))`, :math:`a \in \mathbb{R}^K`
2. :math:`\mu_k \sim \mathcal{N}(m_k, \mathrm{diag}(\mathrm{softplus}(s_k)^2))`, :math:`m_k, s_k \in \mathbb{R}^D`
3. :math:`\sigma_k \sim \mathrm{LogNormal}(u_k, \mathrm{softplus}(v_k))`, :math:`u_k, v_k \in \mathbb{R}^D`

Positive quantities go through a softplus.  Start the location means at the data (k-means++ seeds,
``GMMParams(K, D).init_from_data(x).locs``) with the guide hyperparameter ``init_locs``: the components are
exchangeable, and a start at the prior's draws can leave two of them on one cluster.

References:
    Blei, Kucukelbir & McAuliffe (2017), Variational Inference: A Review for Statisticians, §2-3.
    Bishop (2006), Pattern Recognition and Machine Learning, §10.2.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, ShapeError

__all__ = ["BayesianGMMGuideParams", "guide", "build"]


class BayesianGMMGuideParams(nn.Module):
    r"""Variational parameters of :func:`guide`: a Dirichlet over :math:`\pi` and, per component, Normal
    locations and LogNormal scales.

    :param num_components: :math:`K`.
    :param data_dim: :math:`D`.
    :param init_locs: initial location means, shape ``(K, D)`` (e.g. k-means++ seeds).
    :param init_log_scales: initial means of :math:`\log\sigma_{kd}`, shape ``(K, D)`` or broadcastable.
    :param init_sd: initial standard deviation of the locations and of :math:`\log\sigma` under ``q``.
    """

    def __init__(self, num_components: int, data_dim: int, init_locs: torch.Tensor, init_log_scales=0.0, init_sd=0.1):
        super().__init__()
        K, D = num_components, data_dim
        inv_sp = math.log(math.expm1(init_sd))
        self.num_components, self.data_dim = K, D
        self.weights_raw = nn.Parameter(torch.full((K,), math.log(math.expm1(10.0))))
        self.locs_loc = nn.Parameter(init_locs.detach().clone().reshape(K, D))
        self.locs_scale_raw = nn.Parameter(torch.full((K, D), inv_sp))
        log_scales = torch.as_tensor(init_log_scales, dtype=torch.get_default_dtype())
        self.scales_loc = nn.Parameter(torch.broadcast_to(log_scales, (K, D)).clone())
        self.scales_scale_raw = nn.Parameter(torch.full((K, D), inv_sp))


def guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, q_globals: BayesianGMMGuideParams,
          num_data: int | None = None):
    r"""Draw the global latents ``weights`` ``(K,)``, ``locs`` ``(K, D)`` and ``scales`` ``(K, D)`` from the
    mean-field ``q`` above; same signature as :func:`ppl_models.bayesian_gmm.model`.

    :param x: observations ``(batch, D)`` (unused but for the signature).
    :param idx: indices of the batch, shape ``(batch,)`` (unused but for the signature).
    :param q_globals: the :class:`BayesianGMMGuideParams` (registered as ``"q_globals"``).
    :param num_data: size of the full data set (unused: the latents are global).
    """
    pyro.module("q_globals", q_globals)
    K = q_globals.num_components
    pyro.sample("weights", dist.Dirichlet(F.softplus(q_globals.weights_raw)))
    with pyro.plate("components", K, dim=-1):
        pyro.sample("locs", dist.Normal(q_globals.locs_loc, F.softplus(q_globals.locs_scale_raw)).to_event(1))
        pyro.sample("scales", dist.LogNormal(q_globals.scales_loc, F.softplus(q_globals.scales_scale_raw)).to_event(1))


def build(
    spec: ModelSpec,
    num_data: int | None = None,
    *,
    model_modules: dict,
    init_locs: torch.Tensor | None = None,
    init_log_scales: torch.Tensor | None = None,
    init_sd: float = 0.1,
) -> dict:
    """The guide's parameters, sized by the model's prior.

    :param init_locs: initial location means, shape ``(K, D)`` (``None``: drawn from the prior of the locations,
        with torch's global generator).
    :param init_log_scales: initial means of :math:`\\log\\sigma`, shape ``(K, D)`` or broadcastable (``None``: 0).
    :param init_sd: initial standard deviation of the locations and of :math:`\\log\\sigma` under ``q``.
    """
    if spec.name != "bayesian-gmm":
        raise ValueError(f"guide 'mean-field-globals': expected the model 'bayesian-gmm', received {spec.name!r}")
    prior = model_modules["prior"]
    K, D = prior.num_components, prior.data_dim
    if init_locs is None:
        init_locs = prior.loc_loc + prior.loc_scale * torch.randn(K, D)
    elif tuple(init_locs.shape) != (K, D):
        raise ShapeError(f"guide 'mean-field-globals': init_locs: expected shape {(K, D)} (components, data_dim), "
                         f"received {tuple(init_locs.shape)}")
    log_scales = 0.0 if init_log_scales is None else init_log_scales
    return {"q_globals": BayesianGMMGuideParams(K, D, init_locs, log_scales, init_sd)}


register_guide("mean-field-globals", model="bayesian-gmm", guide=guide, build=build)
