r"""Per-datapoint mean-field guide, built for any model from its declared local latents.

For every datapoint :math:`i` and local latent site :math:`z` the guide holds
its own variational parameters :math:`\lambda_i` (Hoffman et al. 2013):

* real support: :math:`q(z_i) = \mathcal{N}(z\_loc_i, \mathrm{diag}(z\_scale_i^2))`;
* other continuous supports: that Normal pushed through ``biject_to(support)``;
* discrete support with ``K`` categories: :math:`q(z_i) = \mathrm{Categorical}(\mathrm{softmax}(\lambda_i))`
  (no reparameterization: Pyro's ELBOs use score-function gradients for it).

The :math:`\lambda_i` of all ``N`` datapoints live in one
``nn.Embedding(N, ·, sparse=True)`` table per site, so a minibatch step reads
and writes only the rows of its own datapoints: the engine hands sparse
gradients to :class:`torch.optim.SparseAdam`.  A dense ``pyro.param`` of shape
``(N, ·)`` with Adam is slower and moves rows that are not in the batch.  Under data
parallelism each process keeps only the rows of the datapoints it owns
(:meth:`LocalParams.shard`, used by :mod:`ppl_models.infer.distributed`).
"""

from __future__ import annotations

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from ppl_models.families import PerDatapointParams, row_size, site_distribution
from ppl_models.registry import register_guide
from ppl_models.spec import LatentSite, ModelSpec, check_tensor, data_plate

__all__ = ["LocalParams", "guide", "build"]


def _inv_softplus(y: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(y))))


class LocalParams(nn.Module, PerDatapointParams):
    r"""Tables of per-datapoint variational parameters :math:`\lambda_i`, one per local latent site.

    Row ``i`` of table ``z`` holds ``[z_loc_i, softplus^{-1}(z_scale_i)]`` (continuous sites)
    or the ``K`` category logits per element (discrete sites).

    :param spec: the model's declared structure.
    :param num_data: number of datapoints ``N`` (rows of each table).
    :param init_scale: initial :math:`z\_scale` of continuous sites.
    :param init_loc_scale: the initial :math:`z\_loc` are drawn from :math:`\mathcal{N}(0, init\_loc\_scale^2)`.
    """

    def __init__(self, spec: ModelSpec, num_data: int, init_scale: float = 0.1, init_loc_scale: float = 0.0):
        super().__init__()
        if num_data is None or num_data < 1:
            raise ValueError(f"per-datapoint guide: num_data must be a positive integer, received {num_data!r}")
        self.spec, self.num_data = spec, num_data
        self.row_start, self.row_stop = 0, num_data  # the rows held here (all of them unless sharded)
        self.tables = nn.ModuleDict()
        for site in spec.local_latents:
            if site.is_discrete:
                if not site.num_categories:
                    raise ValueError(f"site {site.name!r}: a discrete local latent must declare num_categories")
                table = nn.Embedding(num_data, row_size(site), sparse=True)
                nn.init.zeros_(table.weight)
            else:
                table = nn.Embedding(num_data, row_size(site), sparse=True)
                with torch.no_grad():
                    table.weight[:, : site.numel].normal_(0.0, init_loc_scale)  # std 0 gives zeros
                    table.weight[:, site.numel :].fill_(_inv_softplus(init_scale))
            self.tables[site.name] = table

    def forward(self, site: LatentSite, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (global datapoint indices) of ``site``'s table, shape ``(batch, row_size)``
        (a sparse-gradient read)."""
        table = self.tables[site.name]
        if self.row_start != 0 or self.row_stop != self.num_data:
            if idx.numel() and (int(idx.min()) < self.row_start or int(idx.max()) >= self.row_stop):
                raise ValueError(
                    f"per-datapoint guide: this shard holds the rows [{self.row_start}, {self.row_stop}), "
                    f"received indices in [{int(idx.min())}, {int(idx.max())}]"
                )
            idx = idx - self.row_start
        return F.embedding(idx, table.weight, sparse=True)

    def shard(self, start: int, stop: int) -> "LocalParams":
        r"""Keep only the rows :math:`\lambda_i`, ``start <= i < stop``: the datapoints this process owns under
        data parallelism (:mod:`ppl_models.infer.distributed`).  ``forward`` still takes global indices.
        Call before the tables are registered with Pyro (before the first model/guide run)."""
        if (self.row_start, self.row_stop) != (0, self.num_data):
            raise ValueError(f"LocalParams.shard: already sharded to rows [{self.row_start}, {self.row_stop})")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_data):
            raise ValueError(
                f"LocalParams.shard: expected 0 <= start < stop <= num_data={self.num_data}, "
                f"received start={start!r}, stop={stop!r}"
            )
        for name, table in list(self.tables.items()):
            rows = nn.Embedding(stop - start, table.embedding_dim, sparse=True)
            rows.to(table.weight.device, table.weight.dtype)
            with torch.no_grad():
                rows.weight.copy_(table.weight[start:stop])
            self.tables[name] = rows
        self.row_start, self.row_stop = start, stop
        return self


def guide(x: torch.Tensor, idx: torch.Tensor | None = None, *, local_params: LocalParams, num_data: int | None = None):
    r"""Mean-field :math:`q(z_i) = \prod_{\text{sites}} q_{\lambda_i}(z_i)` for the datapoints ``idx``.

    :param x: the observed batch, shape ``(batch,) + observed.event_shape`` (used for its batch size).
    :param idx: indices of the batch rows among the ``N`` training datapoints, shape ``(batch,)``;
        ``None`` means ``x`` is the whole training set.
    :param local_params: the :class:`LocalParams` tables (registered as ``"local_params"``).
    :param num_data: ``N``.
    """
    spec = local_params.spec
    check_tensor(spec.observed.name, x, event_shape=spec.observed.event_shape, support=spec.observed.support)
    if idx is None:
        if x.shape[0] != local_params.num_data:
            raise ValueError(
                f"per-datapoint guide: idx is required unless x is the whole training set "
                f"({local_params.num_data} rows); received a batch of {x.shape[0]} rows and no idx"
            )
        idx = torch.arange(x.shape[0])
    else:
        check_tensor("idx", idx, event_shape=(), dtype_kind="int")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= local_params.num_data):
            raise ValueError(
                f"per-datapoint guide: idx must lie in [0, {local_params.num_data}), "
                f"received values in [{int(idx.min())}, {int(idx.max())}]"
            )
    pyro.module("local_params", local_params)
    with data_plate(x, idx, num_data, name=spec.data_plate):
        for site in spec.local_latents:
            pyro.sample(site.name, site_distribution(site, local_params(site, idx)))


def build(spec: ModelSpec, num_data: int | None, init_scale: float = 0.1, init_loc_scale: float = 0.0):
    """Networks of the per-datapoint guide: ``{"local_params": LocalParams}``."""
    return {"local_params": LocalParams(spec, num_data, init_scale=init_scale, init_loc_scale=init_loc_scale)}


register_guide("mean-field", model="*", guide=guide, build=build)
