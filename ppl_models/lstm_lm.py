r"""An LSTM language model over sentences (the baseline of equal size for the text VAE).

Generative story, for each sentence :math:`i = 1, \dots, N` (tokens :math:`x_1, \dots, x_{T_i}`, the last one
``<eos>``; :math:`x_0 = \langle bos \rangle`):

1. :math:`h_0 = c_0 = 0`
2. for :math:`t = 1, \dots, T_i`: :math:`(h_t, c_t) = \mathrm{LSTM}_\theta(e_\theta(x_{t-1}), (h_{t-1}, c_{t-1}))`
3. :math:`x_t \sim \mathrm{Categorical}(\mathrm{softmax}(W h_t + b))` over the vocabulary without ``<pad>`` and
   ``<bos>`` (their logits are :math:`-\infty`); the sentence ends with the first ``<eos>``.

There is no latent variable: :math:`\log p(x) = \sum_t \log p(x_t \mid x_{<t})` is the ELBO of the empty guide
(:func:`ppl_models.guides.lstm_lm.empty_guide`), so SVI with ``Trace_ELBO`` is maximum likelihood and the
evaluator's importance-sampled log-likelihood is exact with one sample.

All sequence models here take ``tokens`` of shape ``(batch, T)`` (``int64``, padded with ``<pad>`` = 0 after each
sentence) and ``lengths`` of shape ``(batch,)`` (``1 <= lengths <= T``); tokens after a sentence's length never
change its likelihood (the observed site is masked with ``arange(T) < lengths``).  The special tokens' indices are
:mod:`ppl_models.encodings`', the categorical over the vocabulary is
:class:`ppl_models.distributions.TokenCategorical`.  This module also holds the pieces the text VAE and the VRNN
share: :func:`check_sequences`, :func:`shift_inputs`, :func:`word_dropout` and :class:`LSTMDecoder`.

References:
    Mikolov et al. (2010), Recurrent neural network based language model.
    Zaremba, Sutskever & Vinyals (2014), Recurrent Neural Network Regularization.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import torch
from torch import nn
from torch.distributions import constraints

from ppl_models.distributions import TokenCategorical
from ppl_models.encodings import BOS_INDEX, EOS_INDEX, PAD_INDEX, UNK_INDEX
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate

__all__ = [
    "check_sequences",
    "shift_inputs",
    "word_dropout",
    "LSTMDecoder",
    "model",
    "build",
    "sequence_spec",
]


def check_sequences(tokens, lengths, vocab_size: int, site: str = "x") -> None:
    """One :class:`~ppl_models.spec.ShapeError` unless ``tokens`` is an integer ``(batch, T)`` tensor with values in
    ``[0, vocab_size)`` and ``lengths`` an integer ``(batch,)`` tensor with ``1 <= lengths <= T``."""
    check_tensor(site, tokens, event_shape=None, dtype_kind="int")
    if tokens.dim() != 2:
        raise ShapeError(f"site {site!r}: expected tokens of shape (batch, T), received {tuple(tokens.shape)}")
    check_tensor(f"{site} lengths", lengths, event_shape=(), dtype_kind="int")
    if lengths.shape[0] != tokens.shape[0]:
        raise ShapeError(
            f"site {site!r}: expected lengths of shape ({tokens.shape[0]},) (one per sentence), "
            f"received {tuple(lengths.shape)}"
        )
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"site {site!r}: expected token indices in [0, {vocab_size - 1}], received {bad}")
    if lengths.numel():
        if int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]:
            bad = int(lengths.min()) if int(lengths.min()) < 1 else int(lengths.max())
            raise ShapeError(
                f"site {site!r}: expected lengths in [1, {tokens.shape[1]}] (T = tokens.shape[1]), received {bad}"
            )


def shift_inputs(tokens: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, mask)`` for teacher forcing, each ``(batch, T)``.

    ``inputs = [<bos>, x_1, ..., x_{T-1}]``; ``targets`` are the tokens with padded positions set to ``<eos>`` (a
    value of the support; they are masked out); ``mask = arange(T) < lengths[:, None]``.
    """
    batch, T = tokens.shape
    mask = torch.arange(T, device=tokens.device) < lengths[:, None]
    inputs = torch.cat([tokens.new_full((batch, 1), BOS_INDEX), tokens[:, :-1]], dim=1)
    targets = tokens.masked_fill(~mask, EOS_INDEX)
    return inputs, targets, mask


def word_dropout(inputs: torch.Tensor, keep: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bowman et al.'s word dropout on decoder inputs: each input after the leading ``<bos>`` is replaced by
    ``<unk>`` independently with probability ``1 - keep``.

    :param inputs: ``(batch, T)`` decoder inputs, column 0 the ``<bos>`` token (never dropped).
    :param keep: the keep rate in ``[0, 1]``.
    :return: a new ``(batch, T)`` tensor.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"word_keep: expected a keep rate in [0, 1], received {keep!r}")
    if keep == 1.0:
        return inputs
    u = torch.rand(inputs.shape, generator=generator, device=inputs.device)
    drop = u >= keep
    drop[..., 0] = False
    return inputs.masked_fill(drop, UNK_INDEX)


def _broadcast_leading(inputs: torch.Tensor, z: Optional[torch.Tensor]):
    """Expand ``inputs`` ``(batch, T)`` and ``z`` ``(..., batch, z_dim)`` to common leading dims."""
    if z is None:
        return inputs, None, inputs.shape[:-1]
    lead = torch.broadcast_shapes(inputs.shape[:-1], z.shape[:-1])
    return inputs.expand(*lead, inputs.shape[-1]), z.expand(*lead, z.shape[-1]), lead


class LSTMDecoder(nn.Module):
    r"""Teacher-forced LSTM over the decoder inputs, optionally conditioned on a latent :math:`z`.

    With ``z_dim > 0`` the latent sets the initial state, :math:`(h_0, c_0) = \tanh(W_z z)` split in two
    (Bowman et al. 2016), and with ``z_inputs`` it is also concatenated to every input embedding.

    ``forward(inputs, z=None)``: ``inputs`` ``(batch, T)`` int64; ``z`` ``(..., batch, z_dim)`` (leading sample
    dims allowed); returns logits ``(..., batch, T, vocab_size)`` with ``<pad>`` and ``<bos>`` at :math:`-\infty`.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 256, z_dim: int = 0,
                 z_inputs: bool = False, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.embed_dim, self.hidden_dim, self.z_dim = vocab_size, embed_dim, hidden_dim, z_dim
        self.z_inputs = bool(z_inputs and z_dim > 0)
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_INDEX)
        self.lstm = nn.LSTM(embed_dim + (z_dim if self.z_inputs else 0), hidden_dim, batch_first=True)
        self.z_to_state = nn.Linear(z_dim, 2 * hidden_dim) if z_dim > 0 else None
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def forward(self, inputs: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (z is None) != (self.z_dim == 0):
            raise ValueError(f"LSTMDecoder with z_dim={self.z_dim}: z {'missing' if z is None else 'given'}")
        inputs, z, lead = _broadcast_leading(inputs, z)
        T = inputs.shape[-1]
        flat = inputs.reshape(-1, T)
        emb = self.dropout(self.embedding(flat))  # (n, T, embed_dim)
        state = None
        if z is not None:
            z_flat = z.reshape(-1, self.z_dim)
            h0, c0 = torch.tanh(self.z_to_state(z_flat)).chunk(2, dim=-1)
            state = (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
            if self.z_inputs:
                emb = torch.cat([emb, z_flat.unsqueeze(1).expand(-1, T, -1)], dim=-1)
        hidden, _ = self.lstm(emb, state)
        logits = never_predicted(self.output(self.dropout(hidden)))
        return logits.reshape(*lead, T, self.vocab_size)


def never_predicted(logits: torch.Tensor) -> torch.Tensor:
    """Set the logits of ``<pad>`` and ``<bos>`` (never a target) to :math:`-\\infty`, in place; returns ``logits``."""
    return logits.index_fill_(-1, torch.tensor([PAD_INDEX, BOS_INDEX], device=logits.device), float("-inf"))


def sequence_spec(name: str, vocab_size: int, max_len: int, latents=()) -> ModelSpec:
    """The declared structure of a sentence model: observed ``x`` (up to ``max_len + 1`` tokens, ``<eos>``
    included; the actual length varies per batch), data plate ``"data"``."""
    return ModelSpec(
        name=name,
        observed=ObservedSite("x", (max_len + 1,), constraints.integer_interval(0, vocab_size - 1)),
        data_plate="data",
        local_latents=tuple(latents),
    )


def model(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *, decoder: LSTMDecoder,
          num_data: int | None = None):
    """The generative story above.

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0 after each sentence.
    :param lengths: ``(batch,)`` int64 sentence lengths (``<eos>`` included).
    :param idx: ``(batch,)`` rows of the batch in the data set (``None``: the batch is the data set).
    :param decoder: the :class:`LSTMDecoder` (``z_dim = 0``), registered as ``"decoder"``.
    :param num_data: number of sentences in the data set (the plate's N / batch scale).
    """
    check_sequences(tokens, lengths, decoder.vocab_size)
    pyro.module("decoder", decoder)
    inputs, targets, mask = shift_inputs(tokens, lengths)
    with data_plate(tokens, idx, num_data):
        logits = decoder(inputs)
        pyro.sample("x", TokenCategorical(logits).mask(mask).to_event(1), obs=targets)


def build(vocab_size: int = 10004, embed_dim: int = 128, hidden_dim: int = 256, dropout: float = 0.0,
          max_len: int = 100) -> ModelParts:
    """Networks (``decoder``) and declared structure of the LSTM LM."""
    decoder = LSTMDecoder(vocab_size, embed_dim, hidden_dim, z_dim=0, dropout=dropout)
    return ModelParts(spec=sequence_spec("lstm-lm", vocab_size, max_len), modules={"decoder": decoder})


register_model("lstm-lm", model=model, build=build)
