"""Variational families shared by the guide builders.

A local latent site's guide distribution is built from one parameter row per
datapoint (from a per-datapoint table or an encoder head):

* continuous site: ``[z_loc, raw_scale]`` -> :math:`\\mathcal{N}(z\\_loc, z\\_scale^2)`, pushed through
  ``biject_to(support)`` when the support is not the real line;
* discrete site with ``K`` categories: the ``K`` logits per element -> Categorical.

A module that holds such rows for every training datapoint itself (a per-datapoint table) is marked
:class:`PerDatapointParams`, so that inference code can tell it from a network without knowing the guide.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import biject_to, constraints
from torch.nn import functional as F

from ppl_models.spec import LatentSite

__all__ = ["PerDatapointParams", "SCALE_PARAMETERIZATIONS", "check_scale", "z_scale_from_raw", "row_size", "site_distribution"]

#: ``"logvar"``: the raw output is :math:`\log\sigma^2` (the lecture's choice); ``"softplus"``: :math:`\sigma = \mathrm{softplus}(raw)`.
SCALE_PARAMETERIZATIONS = ("logvar", "softplus")


class PerDatapointParams:
    """Marker of a module holding one parameter row per training datapoint (a per-datapoint table).

    Its contract: ``num_data`` (rows, one per datapoint) and ``shard(start, stop)``, which keeps only the rows
    ``start <= i < stop`` (a data-parallel process holds the rows of the datapoints it owns, and these
    parameters are not all-reduced: :mod:`ppl_models.infer.distributed`).
    """

    num_data: int


def check_scale(scale: str) -> None:
    if scale not in SCALE_PARAMETERIZATIONS:
        raise ValueError(
            f"scale parameterization: expected one of {', '.join(SCALE_PARAMETERIZATIONS)}, received {scale!r}"
        )


def z_scale_from_raw(raw: torch.Tensor, scale: str) -> torch.Tensor:
    return torch.exp(0.5 * raw) if scale == "logvar" else F.softplus(raw)


def row_size(site: LatentSite) -> int:
    """Number of variational parameters per datapoint for ``site``."""
    return site.numel * (site.num_categories if site.is_discrete else 2)


def site_distribution(site: LatentSite, params: torch.Tensor, scale: str = "softplus") -> dist.Distribution:
    """The guide distribution of ``site`` from parameter rows ``params`` of shape ``(batch, row_size(site))``."""
    batch = params.shape[:-1]
    if site.is_discrete:
        logits = params.reshape(*batch, *site.event_shape, site.num_categories)
        return dist.Categorical(logits=logits).to_event(len(site.event_shape))
    z_loc, z_scale_raw = params.split(site.numel, dim=-1)
    z_loc = z_loc.reshape(*batch, *site.event_shape)
    z_scale = z_scale_from_raw(z_scale_raw, scale).reshape(*batch, *site.event_shape)
    base = dist.Normal(z_loc, z_scale)
    if site.support is not constraints.real:
        base = dist.TransformedDistribution(base, [biject_to(site.support)])
    return base.to_event(len(site.event_shape))
