r"""Guides for the conditional VAE :mod:`ppl_models.cvae`.

``recognition`` (for ``cvae``) — the recognition network of Sohn, Lee & Yan (2015), as in Pyro's ``examples/cvae``:

1. the full image :math:`(x_i, y_i)`: ``x_obs`` with the missing pixels set to ``y``
2. :math:`(z\_loc_i, z\_scale_i) = \mathrm{MLP}_\phi(x_i, y_i)` (ReLU layers ``hidden_dims``, softplus scale)
3. :math:`q_\phi(z_i \mid x_i, y_i) = \mathcal{N}(z\_loc_i, \mathrm{diag}(z\_scale_i^2))`

``none`` (for ``cvae-baseline``) — a model without latent sites needs a guide that samples nothing.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch

from ppl_models.cvae import GaussianNet, check_inputs
from ppl_models.encodings import complete
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["guide", "build", "no_latents_guide"]


def guide(
    x_obs: torch.Tensor,
    y: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    *,
    recognition_net: GaussianNet,
    num_data: int | None = None,
):
    r""":math:`q_\phi(z \mid x, y)` for a batch; same signature as :func:`ppl_models.cvae.model`.

    :param x_obs: observed quadrants, shape ``(batch, x_dim)``, ``-1`` at the missing pixels.
    :param y: the missing pixels, shape ``(batch, num_missing)`` (required: the recognition network reads them).
    :param idx: indices of the batch in the data set, shape ``(batch,)``.
    :param recognition_net: the :class:`~ppl_models.cvae.GaussianNet`, registered as ``"recognition_net"``.
    :param num_data: size of the full data set.
    """
    if y is None:
        raise ValueError("recognition guide: expected the missing pixels y (batch, num_missing), received None; "
                         "to predict y use the prior network (ppl_models.cvae.complete_images)")
    check_inputs(x_obs, y, recognition_net)
    pyro.module("recognition_net", recognition_net)
    z_loc, z_scale = recognition_net(complete(x_obs, y, recognition_net.mask))
    with data_plate(x_obs, idx, num_data):
        pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))


def build(spec: ModelSpec, num_data: int | None = None, hidden_dims: Sequence[int] = (500, 500), model_modules=None):
    """``{"recognition_net": GaussianNet}`` with the layout and ``z_dim`` of the model's prior network."""
    prior_net = model_modules["prior_net"]
    return {"recognition_net": GaussianNet(prior_net.num_quadrant_inputs, hidden_dims, prior_net.z_dim, prior_net.side)}


def no_latents_guide(
    x_obs: torch.Tensor, y: torch.Tensor | None = None, idx: torch.Tensor | None = None, *, num_data=None
):
    """The guide of a model without latent sites (``cvae-baseline``): samples nothing."""


def _build_none(spec: ModelSpec, num_data: int | None = None):
    return {}


register_guide("recognition", model="cvae", guide=guide, build=build)
register_guide("none", model="cvae-baseline", guide=no_latents_guide, build=_build_none)
