r"""The lecture's bigram language model, with Dirichlet-smoothed transition probabilities.

Generative story, for each sentence :math:`i = 1, \dots, N` (tokens :math:`x_1, \dots, x_{T_i}`, the last one
``<eos>``; :math:`x_0 = \langle bos \rangle`):

1. for every previous word :math:`v`: a distribution over next words
   :math:`\theta_v \sim \mathrm{Dirichlet}(\alpha\, u)`, with :math:`u` the (add-one) unigram distribution of
   the training words and :math:`\alpha > 0` the concentration;
2. for :math:`t = 1, \dots, T_i`: :math:`x_t \sim \mathrm{Categorical}(\theta_{x_{t-1}})`, i.e.
   :math:`x_t \sim p(x \mid x_{t-1})`; the sentence ends with the first ``<eos>``.

Fitting: the transitions are not learned by gradients.  Given the training bigram counts :math:`c(v, w)` the
posterior of :math:`\theta_v` is :math:`\mathrm{Dirichlet}(\alpha u + c(v, \cdot))` and the model's transition
probabilities are its mean, the posterior predictive (MacKay & Peto 1995)

.. math::  p(w \mid v) = \frac{c(v, w) + \alpha\, u(w)}{c(v) + \alpha},

held by :class:`BigramTransitions` (:meth:`BigramTransitions.fit`; :math:`\alpha` chosen on validation data by
:meth:`BigramTransitions.choose_alpha`).  With :math:`\alpha \to 0` this is the maximum-likelihood bigram, which
gives unseen test bigrams probability zero.  The Pyro model then has only the observed site ``x``; its
log-likelihood is exact (the evaluator needs one sample with the empty guide, :mod:`ppl_models.guides.bigram`).

Counts are stored sparsely (rows of a CSR table), so the 10k x 10k transition matrix is never materialized;
the model builds the ``(batch, T, V)`` rows it needs.

References:
    Jurafsky & Martin, *Speech and Language Processing*, ch. 3 (n-gram language models).
    MacKay & Peto (1995), A hierarchical Dirichlet language model.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import pyro
import torch
from torch import nn

from ppl_models.distributions import TokenCategorical
from ppl_models.encodings import BOS_INDEX, PAD_INDEX
from ppl_models.lstm_lm import check_sequences, sequence_spec, shift_inputs
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import data_plate

__all__ = ["BigramTransitions", "model", "build"]


class BigramTransitions(nn.Module):
    r"""Sparse bigram counts and the smoothed transition probabilities :math:`p(w \mid v)` (see the module docstring).

    Buffers: ``row_ptr`` ``(V + 1,)`` and ``cols``/``counts`` ``(nnz,)`` (CSR counts :math:`c(v, w)`),
    ``row_totals`` ``(V,)`` (:math:`c(v)`), ``log_unigram`` ``(V,)`` (:math:`\log u`, :math:`-\infty` for
    ``<pad>`` and ``<bos>``), and ``alpha`` (a 0-dim tensor).
    """

    def __init__(self, vocab_size: int, alpha: float = 1.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("row_ptr", torch.zeros(vocab_size + 1, dtype=torch.long))
        self.register_buffer("cols", torch.zeros(0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("row_totals", torch.zeros(vocab_size))
        unigram = torch.full((vocab_size,), -math.log(vocab_size - 2))
        unigram[PAD_INDEX] = unigram[BOS_INDEX] = float("-inf")
        self.register_buffer("log_unigram", unigram)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    # ----------------------------------------------------------------- fit
    def fit(self, sequences: Iterable[Sequence[int]]) -> "BigramTransitions":
        """Count the bigrams ``(x_{t-1}, x_t)`` of index sequences (each ending in ``<eos>``; ``x_0 = <bos>``)
        and the add-one unigram distribution of their tokens."""
        V = self.vocab_size
        prev, nxt = [], []
        for seq in sequences:
            seq = list(seq)
            prev += [BOS_INDEX] + seq[:-1]
            nxt += seq
        prev_t, next_t = torch.tensor(prev, dtype=torch.long), torch.tensor(nxt, dtype=torch.long)
        keys, counts = torch.unique(prev_t * V + next_t, return_counts=True)  # sorted by (v, w)
        rows = keys // V
        self.cols = keys % V
        self.counts = counts.to(torch.get_default_dtype())
        self.row_ptr = torch.zeros(V + 1, dtype=torch.long)
        self.row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=V), 0)
        self.row_totals = torch.zeros(V).index_add_(0, rows, self.counts)
        uni = torch.bincount(next_t, minlength=V).to(torch.get_default_dtype()) + 1.0
        uni[PAD_INDEX] = uni[BOS_INDEX] = 0.0
        self.log_unigram = torch.log(uni / uni.sum())
        return self

    def set_alpha(self, alpha: float) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha: expected a positive finite concentration, received {alpha!r}")
        self.alpha.fill_(float(alpha))

    # ------------------------------------------------------------- lookups
    def pair_counts(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """:math:`c(v, w)` for index tensors ``prev``, ``nxt`` of the same shape (binary search in the sorted keys
        :math:`v V + w` of the stored entries)."""
        if self.cols.numel() == 0:
            return torch.zeros(prev.shape)
        rows = torch.repeat_interleave(torch.arange(self.vocab_size), self.row_ptr[1:] - self.row_ptr[:-1])
        keys = rows * self.vocab_size + self.cols
        query = prev * self.vocab_size + nxt
        pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        return torch.where(keys[pos] == query, self.counts[pos], torch.zeros(()))

    def log_prob_pairs(self, prev: torch.Tensor, nxt: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        r""":math:`\log p(w \mid v)` elementwise for index tensors of the same shape."""
        a = self.alpha if alpha is None else torch.tensor(float(alpha))
        num = self.pair_counts(prev, nxt) + a * self.log_unigram[nxt].exp()
        return torch.log(num) - torch.log(self.row_totals[prev] + a)

    def log_probs(self, prev: torch.Tensor) -> torch.Tensor:
        r"""Rows :math:`\log p(\cdot \mid v)` for an index tensor ``prev`` of any shape: ``prev.shape + (V,)``."""
        V = self.vocab_size
        flat = prev.reshape(-1)
        starts = self.row_ptr[flat]
        sizes = self.row_ptr[flat + 1] - starts
        which = torch.repeat_interleave(torch.arange(flat.numel()), sizes)
        offsets = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        entries = starts[which] + offsets
        dense = torch.zeros(flat.numel(), V)
        dense[which, self.cols[entries]] = self.counts[entries]
        dense = dense + self.alpha * self.log_unigram.exp()
        out = torch.log(dense) - torch.log(self.row_totals[flat] + self.alpha)[:, None]
        return out.reshape(*prev.shape, V)

    @torch.no_grad()
    def choose_alpha(self, sequences: Iterable[Sequence[int]],
                     grid: Sequence[float] = tuple(2.0**k for k in range(-2, 13))) -> dict:
        """Set :math:`\\alpha` to the grid value with the highest log-likelihood of ``sequences`` (validation data);
        returns ``{alpha: total log-likelihood}``."""
        prev, nxt = [], []
        for seq in sequences:
            seq = list(seq)
            prev += [BOS_INDEX] + seq[:-1]
            nxt += seq
        prev_t, next_t = torch.tensor(prev), torch.tensor(nxt)
        scores = {float(a): float(self.log_prob_pairs(prev_t, next_t, a).sum()) for a in grid}
        self.set_alpha(max(scores, key=scores.get))
        return scores


def model(tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor | None = None, *,
          transitions: BigramTransitions, num_data: int | None = None):
    """The generative story above (step 2; the fitted :math:`\\theta` are held by ``transitions``).

    :param tokens: ``(batch, T)`` int64 token indices, padded with 0 after each sentence.
    :param lengths: ``(batch,)`` int64 sentence lengths (``<eos>`` included).
    :param idx: ``(batch,)`` rows of the batch in the data set (``None``: the batch is the data set).
    :param transitions: the :class:`BigramTransitions`, registered as ``"transitions"``.
    :param num_data: number of sentences in the data set.
    """
    check_sequences(tokens, lengths, transitions.vocab_size)
    pyro.module("transitions", transitions)
    inputs, targets, mask = shift_inputs(tokens, lengths)
    with data_plate(tokens, idx, num_data):
        logits = transitions.log_probs(inputs)  # (batch, T, V), normalized
        pyro.sample("x", TokenCategorical(logits).mask(mask).to_event(1), obs=targets)


def build(vocab_size: int = 10002, alpha: float = 1.0, max_len: int = 100) -> ModelParts:
    """The (unfitted) transitions and the declared structure; call ``transitions.fit`` on training data."""
    return ModelParts(spec=sequence_spec("bigram", vocab_size, max_len),
                      modules={"transitions": BigramTransitions(vocab_size, alpha)})


register_model("bigram", model=model, build=build)
