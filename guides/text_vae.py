r"""The inference network of the text VAE (:mod:`ppl_models.text_vae`), Bowman et al. (2016).

``lstm-encoder`` — for each sentence :math:`x = (x_1, \dots, x_T)`:

1. :math:`h_t = \mathrm{LSTM}_\phi(e_\phi(x_t), h_{t-1})`, :math:`h_0 = 0`, read at the sentence's last token
   :math:`h_T` (a unidirectional LSTM: padding after :math:`T` never reaches :math:`h_T`)
2. :math:`z\_loc = W_\mu h_T + b_\mu`, :math:`\log\sigma^2 = W_\sigma h_T + b_\sigma`,
   :math:`z\_scale = \exp(\tfrac12 \log\sigma^2)` (the log-variance parameterization)
3. :math:`q_\phi(z \mid x) = \mathcal{N}(z\_loc, \mathrm{diag}(z\_scale^2))`, sampled inside
   ``poutine.scale(scale=kl_weight)`` like the model's prior (KL annealing).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ppl_models.encodings import PAD_INDEX
from ppl_models.lstm_lm import check_sequences
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["LSTMEncoder", "guide", "build"]


class LSTMEncoder(nn.Module):
    """``tokens`` ``(batch, T)`` and ``lengths`` ``(batch,)`` -> ``(z_loc, z_scale)``, each ``(batch, z_dim)``."""

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 256, z_dim: int = 32):
        super().__init__()
        self.vocab_size, self.z_dim = vocab_size, z_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_INDEX)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.z_loc = nn.Linear(hidden_dim, z_dim)
        self.z_logvar = nn.Linear(hidden_dim, z_dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor):
        hidden, _ = self.lstm(self.embedding(tokens))  # (batch, T, hidden_dim)
        last = hidden[torch.arange(tokens.shape[0]), lengths - 1]  # (batch, hidden_dim)
        return self.z_loc(last), torch.exp(0.5 * self.z_logvar(last))


def guide(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *, encoder: LSTMEncoder,
          num_data: int | None = None, kl_weight: float = 1.0, word_keep: float = 1.0):
    r""":math:`q_\phi(z \mid x)`; same signature as :func:`ppl_models.text_vae.model` (``word_keep`` is the model's).

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0.
    :param lengths: ``(batch,)`` int64 sentence lengths.
    :param idx: ``(batch,)`` rows of the batch in the data set.
    :param encoder: the :class:`LSTMEncoder`, registered as ``"encoder"``.
    :param num_data: number of sentences in the data set.
    :param kl_weight: :math:`\beta > 0`, the scale of the latent site (KL annealing).
    """
    check_sequences(tokens, lengths, encoder.vocab_size)
    pyro.module("encoder", encoder)
    z_loc, z_scale = encoder(tokens, lengths)
    with data_plate(tokens, idx, num_data):
        with poutine.scale(scale=kl_weight):
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))


def build(spec: ModelSpec, num_data: int | None = None, embed_dim: int = 128, hidden_dim: int = 256):
    """``{"encoder": LSTMEncoder}`` sized from the model's spec (vocabulary and ``z_dim``)."""
    (z_site,) = spec.local_latents
    vocab_size = spec.observed.support.upper_bound + 1
    return {"encoder": LSTMEncoder(vocab_size, embed_dim, hidden_dim, z_site.event_shape[0])}


register_guide("lstm-encoder", model="text-vae", guide=guide, build=build)
