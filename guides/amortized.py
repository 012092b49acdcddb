r"""Amortized MLP encoder guide, built for any model from its declared local latents.

"Inference as prediction" (Kingma & Welling 2014; Rezende et al. 2014): the
variational parameters of datapoint :math:`i` are predicted from it,
:math:`\lambda(x_i) = \mathrm{enc}_\phi(x_i)`, by one network shared by all datapoints.

For each local latent site the encoder's head outputs

* real or other continuous support: ``z_loc`` and a scale, either as
  :math:`\log\sigma^2` (``scale="logvar"``, the lecture's parameterization,
  :math:`\sigma = \exp(\tfrac12 \log\sigma^2)`) or through a softplus
  (``scale="softplus"``); constrained supports push the Normal through ``biject_to``;
* discrete support: the ``K`` category logits per element.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import torch
from torch import nn

from ppl_models.families import check_scale, row_size, site_distribution
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, check_tensor, data_plate

__all__ = ["MLPEncoder", "guide", "build"]


class MLPEncoder(nn.Module):
    """Flattened observation ``(batch, x_numel)`` -> per-site parameter vectors ``{site: (batch, row_size)}``."""

    def __init__(self, spec: ModelSpec, hidden_dims: Sequence[int] = (400,), scale: str = "softplus"):
        super().__init__()
        check_scale(scale)
        self.spec, self.scale = spec, scale
        x_numel = 1
        for s in spec.observed.event_shape:
            x_numel *= s
        layers: list[nn.Module] = []
        sizes = [x_numel, *hidden_dims]
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict()
        for site in spec.local_latents:
            self.heads[site.name] = nn.Linear(sizes[-1], row_size(site))

    def forward(self, x: torch.Tensor) -> dict:
        hidden = self.body(x.reshape(x.shape[0], -1))
        return {name: head(hidden) for name, head in self.heads.items()}


def guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, encoder: MLPEncoder, num_data: int | None = None):
    r""":math:`q_\phi(z \mid x) = \prod_{\text{sites}} q(z; \mathrm{enc}_\phi(x))` for a batch.

    :param x: observed batch, shape ``(batch,) + observed.event_shape``.
    :param idx: indices of the batch in the data set, shape ``(batch,)`` (only for the plate's scale).
    :param encoder: the :class:`MLPEncoder` (registered as ``"encoder"``).
    :param num_data: size of the full data set.
    """
    spec = encoder.spec
    check_tensor(spec.observed.name, x, event_shape=spec.observed.event_shape, support=spec.observed.support)
    pyro.module("encoder", encoder)
    params = encoder(x)
    with data_plate(x, idx, num_data, name=spec.data_plate):
        for site in spec.local_latents:
            pyro.sample(site.name, site_distribution(site, params[site.name], encoder.scale))


def build(spec: ModelSpec, num_data: int | None = None, hidden_dims: Sequence[int] = (400,), scale: str = "softplus"):
    """Networks of the generic amortized guide: ``{"encoder": MLPEncoder}``."""
    return {"encoder": MLPEncoder(spec, hidden_dims, scale)}


register_guide("amortized-mlp", model="*", guide=guide, build=build)
