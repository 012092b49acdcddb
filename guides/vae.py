r"""Guides for the deep generative model :mod:`ppl_models.vae`.

``amortized`` — the VAE's inference network (Kingma & Welling 2014):

1. :math:`h = \mathrm{MLP}_\phi(x)` (hidden layers ``hidden_dims``, ``activation`` ReLU or tanh)
2. :math:`z\_loc = W_\mu h + b_\mu`, and :math:`z\_scale = \exp(\tfrac12 (W_\sigma h + b_\sigma))`
   (``scale="logvar"``, the lecture's :math:`\log\sigma^2`) or :math:`\mathrm{softplus}(W_\sigma h + b_\sigma)`
3. :math:`q_\phi(z \mid x) = \mathcal{N}(z\_loc, \mathrm{diag}(z\_scale^2))`

``mean-field`` — SVI with a :math:`\lambda_i = (z\_loc_i, z\_scale_i)` per training
datapoint (Hoffman et al. 2013): the generic :mod:`ppl_models.guides.mean_field` guide applied
to the VAE's declared latent ``z``; its rows are sparse-updated.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ppl_models.guides import mean_field
from ppl_models.families import check_scale, z_scale_from_raw
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, check_tensor, data_plate
from ppl_models.vae import ACTIVATIONS, mlp

__all__ = ["Encoder", "guide", "build"]


class Encoder(nn.Module):
    """``x`` of shape ``(batch, x_dim)`` -> ``(z_loc, z_scale)``, each ``(batch, z_dim)``."""

    def __init__(self, x_dim: int = 784, hidden_dims: Sequence[int] = (400,), z_dim: int = 20, scale: str = "softplus",
                 activation: str = "relu"):
        super().__init__()
        check_scale(scale)
        self.scale, self.x_dim = scale, x_dim
        self.body = nn.Sequential(mlp([x_dim, *hidden_dims], activation), ACTIVATIONS[activation]())
        self.z_loc = nn.Linear(hidden_dims[-1], z_dim)
        self.z_scale = nn.Linear(hidden_dims[-1], z_dim)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.z_loc(h), z_scale_from_raw(self.z_scale(h), self.scale)


def guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, encoder: Encoder, num_data: int | None = None):
    r""":math:`q_\phi(z \mid x)` for a batch; same signature as :func:`ppl_models.vae.model`.

    :param x: pixels, shape ``(batch, x_dim)``.
    :param idx: indices of the batch in the data set, shape ``(batch,)``.
    :param encoder: the :class:`Encoder`, registered as ``"encoder"``.
    :param num_data: size of the full data set.
    """
    check_tensor("x", x, event_shape=(encoder.x_dim,), support=constraints.unit_interval)
    pyro.module("encoder", encoder)
    z_loc, z_scale = encoder(x)
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))


def build(spec: ModelSpec, num_data: int | None = None, hidden_dims: Sequence[int] = (400,), scale: str = "softplus",
          activation: str = "relu"):
    """Networks of the amortized guide: ``{"encoder": Encoder}``, sized from the model's spec."""
    (z_site,) = spec.local_latents
    return {"encoder": Encoder(spec.observed.event_shape[0], hidden_dims, z_site.event_shape[0], scale, activation)}


register_guide("amortized", model="vae", guide=guide, build=build)
register_guide("mean-field", model="vae", guide=mean_field.guide, build=mean_field.build)
