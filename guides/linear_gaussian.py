r"""Guides for the conjugate model :mod:`ppl_models.linear_gaussian`.

``exact`` — :math:`q(z_i \mid x_i) = p(z_i \mid x_i)`, the true posterior:

1. :math:`\Lambda = I + W^\top W / \sigma^2`, :math:`L L^\top = \Lambda^{-1}`
2. :math:`z\_loc_i = \Lambda^{-1} W^\top (x_i - b) / \sigma^2`
3. :math:`q(z_i \mid x_i) = \mathcal{N}(z\_loc_i, L L^\top)` (full covariance)

It has no parameters of its own: it reads the model's :class:`~ppl_models.linear_gaussian.LinearGaussianParams`,
passed as the same keyword ``params`` as the model's; its ``build`` returns that very module, so
``instantiate("linear-gaussian", "exact", ...)`` binds model and guide to one ``params``.  With it every
importance weight :math:`p(x_i, z) / q(z \mid x_i)` equals :math:`p(x_i)`: the ELBO, the IWAE bound and
the log evidence coincide.

``mean-field`` and ``amortized-mlp`` are the generic guides (:mod:`ppl_models.guides.mean_field`,
:mod:`ppl_models.guides.amortized`), registered for every model.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ppl_models.linear_gaussian import LinearGaussianParams, exact_posterior
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["exact_guide", "build_exact"]


def exact_guide(
    x: torch.Tensor, idx: torch.Tensor | None = None, *, params: LinearGaussianParams, num_data: int | None = None
):
    r""":math:`q(z \mid x) = p(z \mid x)` for a batch; same signature as :func:`ppl_models.linear_gaussian.model`.

    :param x: observations, shape ``(batch, x_dim)``.
    :param idx: indices of the batch in the data set, shape ``(batch,)`` (only for the plate's scale).
    :param params: the model's :class:`~ppl_models.linear_gaussian.LinearGaussianParams` (the model's own
        module, registered under the same name ``"params"``).
    :param num_data: size of the full data set.
    """
    pyro.module("params", params)
    z_loc, scale_tril = exact_posterior(params, x)  # (batch, z_dim), (z_dim, z_dim)
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.MultivariateNormal(z_loc, scale_tril=scale_tril))


def build_exact(spec: ModelSpec, num_data: int | None = None, *, model_modules: dict) -> dict:
    """The exact guide has no network of its own: it shares the model's ``params`` (``instantiate`` hands the
    model's modules in as ``model_modules``), so the guide is called with the very module the model uses."""
    if spec.name != "linear-gaussian":
        raise ValueError(f"guide 'exact': expected the model 'linear-gaussian', received {spec.name!r}")
    if "params" not in model_modules:
        raise ValueError(
            f"guide 'exact': expected the model's modules to hold 'params', received {sorted(model_modules)}"
        )
    return {"params": model_modules["params"]}


register_guide("exact", model="linear-gaussian", guide=exact_guide, build=build_exact)
