r"""The guide of the variational RNN (:mod:`ppl_models.vrnn`), Chung et al. (2015).

``filtering`` — for each sentence, with :math:`h_0 = 0` and for :math:`t = 1, \dots, T`:

1. :math:`q_\phi(z_t \mid x_t, h_{t-1}) = \mathcal{N}(z\_loc_t, \mathrm{diag}\, z\_scale_t^2)` with
   :math:`(z\_loc_t, \log z\_scale_t^2) = \mathrm{MLP}_\phi([\varphi_x(x_t), h_{t-1}])`
2. :math:`h_t = \mathrm{GRU}_\theta([\varphi_x(x_t), \varphi_z(z_t)], h_{t-1})` — the model's own recurrence and
   feature maps (shared: the guide's ``core`` is the model's), run on the guide's draws.

Sites ``z_0, z_1, ...`` under ``pyro.markov``, masked with ``arange(T) < lengths`` and scaled by ``kl_weight``
exactly as in the model.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ppl_models.lstm_lm import check_sequences, shift_inputs
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate
from ppl_models.vrnn import VRNNCore, _check_word_keep, _flat_apply

__all__ = ["Posterior", "guide", "build"]


class Posterior(nn.Module):
    """``(x_feat (..., embed_dim), h (..., hidden_dim))`` -> ``(z_loc, z_scale)``, each ``(..., z_dim)``."""

    def __init__(self, embed_dim: int, hidden_dim: int, z_dim: int, feature_dim: int = 64):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(embed_dim + hidden_dim, feature_dim), nn.ReLU())
        self.z_loc = nn.Linear(feature_dim, z_dim)
        self.z_logvar = nn.Linear(feature_dim, z_dim)

    def forward(self, x_feat: torch.Tensor, h: torch.Tensor):
        f = _flat_apply(lambda a, b: self.hidden(torch.cat([a, b], -1)), x_feat, h)
        return self.z_loc(f), torch.exp(0.5 * self.z_logvar(f))


def guide(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *, core: VRNNCore,
          posterior: Posterior, num_data: int | None = None, kl_weight: float = 1.0, word_keep: float = 1.0):
    r""":math:`\prod_t q(z_t \mid x_t, h_{t-1})`; same signature as :func:`ppl_models.vrnn.model`.

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0.
    :param lengths: ``(batch,)`` int64 sentence lengths.
    :param idx: ``(batch,)`` rows of the batch in the data set.
    :param core: the model's :class:`~ppl_models.vrnn.VRNNCore` (shared), registered as ``"core"``.
    :param posterior: the :class:`Posterior` network, registered as ``"posterior"``.
    :param num_data: number of sentences in the data set.
    :param kl_weight: :math:`\beta > 0`, the scale of the latent sites (KL annealing).
    """
    check_sequences(tokens, lengths, core.vocab_size)
    _check_word_keep(word_keep)
    pyro.module("core", core)
    pyro.module("posterior", posterior)
    _, targets, mask = shift_inputs(tokens, lengths)
    x_feat = core.phi_x(targets)
    batch, T = tokens.shape
    h = x_feat.new_zeros(batch, core.hidden_dim)
    with data_plate(tokens, idx, num_data):
        for t in pyro.markov(range(T)):
            z_loc, z_scale = posterior(x_feat[:, t], h)
            with poutine.mask(mask=mask[:, t]), poutine.scale(scale=kl_weight):
                z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).to_event(1))
            h = core.step(x_feat[:, t], core.phi_z(z_t), h)


def build(spec: ModelSpec, num_data: int | None = None, feature_dim: int = 64, *, model_modules):
    """``{"core": the model's VRNNCore (shared), "posterior": Posterior}``."""
    core = model_modules["core"]
    return {"core": core, "posterior": Posterior(core.embed_dim, core.hidden_dim, core.z_dim, feature_dim)}


register_guide("filtering", model="vrnn", guide=guide, build=build)
