r"""A variational autoencoder for sentences (Bowman et al. 2016): an LSTM language model conditioned on a global
sentence code :math:`z`.

Generative story, for each sentence :math:`i = 1, \dots, N` (tokens :math:`x_1, \dots, x_{T_i}`, the last one
``<eos>``; :math:`x_0 = \langle bos \rangle`):

1. :math:`z^{(i)} \sim \mathcal{N}(0, I_{z\_dim})`
2. :math:`(h_0, c_0) = \tanh(W_z z^{(i)} + b_z)` (and, with ``z_inputs``, :math:`z^{(i)}` is appended to every input)
3. for :math:`t = 1, \dots, T_i`:
   :math:`(h_t, c_t) = \mathrm{LSTM}_\theta(e_\theta(\tilde x_{t-1}), (h_{t-1}, c_{t-1}))`
   and :math:`x_t \sim \mathrm{Categorical}(\mathrm{softmax}(W h_t + b))`,

where :math:`\tilde x_{t-1} = x_{t-1}` except during training with **word dropout** (keyword ``word_keep`` < 1):
each input after ``<bos>`` is replaced by ``<unk>`` with probability ``1 - word_keep``
(:func:`ppl_models.lstm_lm.word_dropout`), which weakens the decoder so that it must use :math:`z`.

**KL annealing**: the latent site ``z`` is sampled inside ``poutine.scale(scale=kl_weight)`` here and in the guide
(:mod:`ppl_models.guides.text_vae`), so with ``kl_weight`` :math:`=\beta` any Pyro ELBO is
:math:`\mathbb{E}_q \log p(x \mid z) - \beta\,\mathrm{KL}(q \,\|\, p)`; the schedules are in
:mod:`ppl_models.infer.annealing`.  The defaults ``kl_weight = 1``, ``word_keep = 1`` are the model itself (used
for evaluation).

With the same ``embed_dim`` and ``hidden_dim`` and ``z_dim = 0`` the decoder is exactly
:mod:`ppl_models.lstm_lm`'s, the baseline of equal size.

References:
    Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio (2016), Generating Sentences from a Continuous Space.
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import constraints

from ppl_models.distributions import TokenCategorical
from ppl_models.encodings import BOS_INDEX, EOS_INDEX
from ppl_models.lstm_lm import (
    LSTMDecoder,
    check_sequences,
    never_predicted,
    sequence_spec,
    shift_inputs,
    word_dropout,
)
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, data_plate

__all__ = ["model", "build", "generate"]


def model(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *, decoder: LSTMDecoder,
          num_data: int | None = None, kl_weight: float = 1.0, word_keep: float = 1.0):
    """The generative story above.

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0 after each sentence.
    :param lengths: ``(batch,)`` int64 sentence lengths (``<eos>`` included).
    :param idx: ``(batch,)`` rows of the batch in the data set (``None``: the batch is the data set).
    :param decoder: the :class:`~ppl_models.lstm_lm.LSTMDecoder` with ``z_dim > 0``, registered as ``"decoder"``.
    :param num_data: number of sentences in the data set (the plate's N / batch scale).
    :param kl_weight: :math:`\\beta > 0`, the scale of the latent site (KL annealing).
    :param word_keep: keep rate of the decoder inputs (word dropout; 1 = none).
    """
    check_sequences(tokens, lengths, decoder.vocab_size)
    pyro.module("decoder", decoder)
    inputs, targets, mask = shift_inputs(tokens, lengths)
    inputs = word_dropout(inputs, word_keep)
    with data_plate(tokens, idx, num_data):
        with poutine.scale(scale=kl_weight):
            z = pyro.sample("z", dist.Normal(tokens.new_zeros((), dtype=torch.get_default_dtype()), 1.0)
                            .expand([decoder.z_dim]).to_event(1))
        logits = decoder(inputs, z)  # (..., batch, T, V)
        pyro.sample("x", TokenCategorical(logits).mask(mask).to_event(1), obs=targets)


def build(vocab_size: int = 10002, embed_dim: int = 128, hidden_dim: int = 256, z_dim: int = 32,
          z_inputs: bool = False, dropout: float = 0.0, max_len: int = 100) -> ModelParts:
    """Decoder network and declared structure (latent ``z`` of shape ``(z_dim,)``)."""
    if z_dim < 1:
        raise ValueError(f"z_dim: expected a positive latent dimension, received {z_dim!r}")
    decoder = LSTMDecoder(vocab_size, embed_dim, hidden_dim, z_dim=z_dim, z_inputs=z_inputs, dropout=dropout)
    spec = sequence_spec("text-vae", vocab_size, max_len, [LatentSite("z", (z_dim,), constraints.real)])
    return ModelParts(spec=spec, modules={"decoder": decoder})


register_model("text-vae", model=model, build=build)


@torch.no_grad()
def generate(decoder: LSTMDecoder, z: torch.Tensor, max_len: int = 30, greedy: bool = True,
             generator: torch.Generator | None = None) -> list:
    """Sentences decoded from latent codes ``z`` of shape ``(n, z_dim)``: token index lists without ``<eos>``.

    Each step feeds the previous output back (``<bos>`` first) and takes the most probable word (``greedy``, as in
    Bowman et al.'s figures) or samples it from ``generator``; a sentence stops at ``<eos>`` or ``max_len`` words.
    """
    if z.dim() != 2 or z.shape[-1] != decoder.z_dim:
        raise ValueError(f"generate: expected z of shape (n, {decoder.z_dim}), received {tuple(z.shape)}")
    n = z.shape[0]
    h0, c0 = torch.tanh(decoder.z_to_state(z)).chunk(2, dim=-1)
    state = (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
    token = torch.full((n,), BOS_INDEX, dtype=torch.long)
    out = []
    for _ in range(max_len + 1):
        emb = decoder.embedding(token).unsqueeze(1)
        if decoder.z_inputs:
            emb = torch.cat([emb, z.unsqueeze(1)], dim=-1)
        hidden, state = decoder.lstm(emb, state)
        logits = never_predicted(decoder.output(hidden[:, 0]))
        if greedy:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        out.append(token)
    rows = torch.stack(out, dim=1).tolist()
    return [row[: row.index(EOS_INDEX)] if EOS_INDEX in row else row[:max_len] for row in rows]
