r"""The variational RNN (Chung et al. 2015) as a sentence model: a latent :math:`z_t` at every step.

Generative story, for each sentence :math:`i = 1, \dots, N` (tokens :math:`x_1, \dots, x_{T_i}`, the last one
``<eos>``), with :math:`h_0 = 0`:

1. for :math:`t = 1, \dots, T_i`:

   a. prior :math:`z_t \sim \mathcal{N}(\mu_\theta(h_{t-1}), \mathrm{diag}\,\sigma^2_\theta(h_{t-1}))`
      (:math:`\log\sigma^2` parameterization), i.e. :math:`p(z_t \mid h_{t-1})`
   b. emission :math:`x_t \sim \mathrm{Categorical}(\mathrm{softmax}(W g_\theta(\varphi_z(z_t), h_{t-1}) + b))`
      over the vocabulary without ``<pad>``/``<bos>``
   c. recurrence :math:`h_t = \mathrm{GRU}_\theta([\varphi_x(x_t), \varphi_z(z_t)], h_{t-1})`

with feature maps :math:`\varphi_x` (a word embedding) and :math:`\varphi_z` (linear + ReLU).  The guide
(:mod:`ppl_models.guides.vrnn`) is :math:`q(z_t \mid x_t, h_{t-1})`, sharing :math:`\varphi_x, \varphi_z` and the recurrence
with the model, as in Chung et al.  (Chung et al. use an LSTM; a GRU cell is used here.)

In Pyro: the steps run under ``pyro.markov`` with sites ``z_0, z_1, ...`` (0-based), each masked with
``arange(T) < lengths`` so that a ragged batch's padded steps contribute nothing; the emissions of all steps form
one masked observed site ``x`` (the same density as per-step sites).  The number of latent sites varies with
the batch's longest sentence, so the declared spec lists none; the evaluator reads the sites from the traces.
Like the text VAE, ``z_t`` is sampled inside ``poutine.scale(scale=kl_weight)`` (KL annealing).

Evaluation: :math:`-\log p(x) \le -\mathrm{IWAE}_K \le -\mathrm{ELBO}`, so ``exp(-IWAE_K / tokens)`` is an upper
bound on the perplexity.

References:
    Chung, Kastner, Dinh, Goel, Courville & Bengio (2015), A Recurrent Latent Variable Model for Sequential Data.
    Pyro examples: ``dmm.py`` (a deep Markov model with ``pyro.markov`` and masks).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ppl_models.distributions import TokenCategorical
from ppl_models.encodings import PAD_INDEX
from ppl_models.lstm_lm import check_sequences, never_predicted, sequence_spec, shift_inputs
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import data_plate

__all__ = ["VRNNCore", "model", "build"]


def _flat_apply(fn, *tensors):
    """Broadcast the leading dims of ``tensors`` (each ``(..., d_k)``), apply ``fn`` to their 2-d flattening and
    restore the leading dims."""
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    flat = [t.expand(*lead, t.shape[-1]).reshape(-1, t.shape[-1]) for t in tensors]
    out = fn(*flat)
    return out.reshape(*lead, out.shape[-1])


class VRNNCore(nn.Module):
    """The model's networks: :math:`\\varphi_x`, :math:`\\varphi_z`, the prior, the emission and the recurrence.

    Shapes (leading dims ``...`` broadcast): ``h`` ``(..., hidden_dim)``, ``z`` ``(..., z_dim)``, word features
    ``(..., embed_dim)``, ``z`` features ``(..., feature_dim)``.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 256, z_dim: int = 16,
                 feature_dim: int = 64):
        super().__init__()
        self.vocab_size, self.embed_dim, self.hidden_dim, self.z_dim = vocab_size, embed_dim, hidden_dim, z_dim
        self.phi_x = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_INDEX)
        self.phi_z = nn.Sequential(nn.Linear(z_dim, feature_dim), nn.ReLU())
        self.prior_hidden = nn.Sequential(nn.Linear(hidden_dim, feature_dim), nn.ReLU())
        self.prior_loc = nn.Linear(feature_dim, z_dim)
        self.prior_logvar = nn.Linear(feature_dim, z_dim)
        self.emission_hidden = nn.Sequential(nn.Linear(feature_dim + hidden_dim, hidden_dim), nn.Tanh())
        self.output = nn.Linear(hidden_dim, vocab_size)
        self.cell = nn.GRUCell(embed_dim + feature_dim, hidden_dim)

    def prior(self, h: torch.Tensor):
        """``(z_loc, z_scale)`` of :math:`p(z_t \\mid h_{t-1})`."""
        f = self.prior_hidden(h)
        return self.prior_loc(f), torch.exp(0.5 * self.prior_logvar(f))

    def emission_features(self, z_feat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """:math:`g(\\varphi_z(z_t), h_{t-1})`, ``(..., hidden_dim)``; the logits are ``logits(g)``."""
        return _flat_apply(lambda a, b: self.emission_hidden(torch.cat([a, b], -1)), z_feat, h)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        return never_predicted(self.output(g))

    def step(self, x_feat: torch.Tensor, z_feat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """:math:`h_t = \\mathrm{GRU}([\\varphi_x(x_t), \\varphi_z(z_t)], h_{t-1})`."""
        return _flat_apply(lambda a, b, c: self.cell(torch.cat([a, b], -1), c), x_feat, z_feat, h)


def _check_word_keep(word_keep: float) -> None:
    if word_keep != 1.0:
        raise ValueError(
            f"vrnn: word dropout is not supported (its inputs feed the guide); received word_keep={word_keep}"
        )


def model(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *, core: VRNNCore,
          num_data: int | None = None, kl_weight: float = 1.0, word_keep: float = 1.0):
    """The generative story above.

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0 after each sentence.
    :param lengths: ``(batch,)`` int64 sentence lengths (``<eos>`` included).
    :param idx: ``(batch,)`` rows of the batch in the data set (``None``: the batch is the data set).
    :param core: the :class:`VRNNCore`, registered as ``"core"``.
    :param num_data: number of sentences in the data set.
    :param kl_weight: :math:`\\beta > 0`, the scale of the latent sites (KL annealing).
    :param word_keep: must be 1 (no word dropout for the VRNN).
    """
    check_sequences(tokens, lengths, core.vocab_size)
    _check_word_keep(word_keep)
    pyro.module("core", core)
    _, targets, mask = shift_inputs(tokens, lengths)
    x_feat = core.phi_x(targets)  # (batch, T, embed_dim)
    batch, T = tokens.shape
    h = x_feat.new_zeros(batch, core.hidden_dim)
    features = []
    with data_plate(tokens, idx, num_data):
        for t in pyro.markov(range(T)):
            z_loc, z_scale = core.prior(h)
            with poutine.mask(mask=mask[:, t]), poutine.scale(scale=kl_weight):
                z_t = pyro.sample(f"z_{t}", dist.Normal(z_loc, z_scale).to_event(1))
            z_feat = core.phi_z(z_t)
            features.append(core.emission_features(z_feat, h))
            h = core.step(x_feat[:, t], z_feat, h)
        g = torch.stack(torch.broadcast_tensors(*features), dim=-2)  # (..., batch, T, hidden_dim)
        pyro.sample("x", TokenCategorical(core.logits(g)).mask(mask).to_event(1), obs=targets)


def build(vocab_size: int = 10002, embed_dim: int = 128, hidden_dim: int = 256, z_dim: int = 16,
          feature_dim: int = 64, max_len: int = 100) -> ModelParts:
    """The networks (``core``) and declared structure."""
    core = VRNNCore(vocab_size, embed_dim, hidden_dim, z_dim, feature_dim)
    return ModelParts(spec=sequence_spec("vrnn", vocab_size, max_len), modules={"core": core})


register_model("vrnn", model=model, build=build)
