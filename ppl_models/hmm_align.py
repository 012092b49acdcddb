r"""The HMM alignment model (Vogel, Ney & Tillmann 1996) with NULL (Och & Ney 2003), fitted by EM.

IBM Model 1 (:mod:`ppl_models.ibm1`) draws every alignment independently and uniformly; the HMM makes the alignment
a first-order Markov chain over target positions whose moves are *jumps* in the source sentence, so neighbouring
target words align to neighbouring source words.

Generative story (``"hmm-align"``), for each sentence pair: a source sentence :math:`e = e_1 \dots e_l` (given)
and the NULL word :math:`e_0`; a target sentence :math:`f = f_1 \dots f_m` (:math:`m` given), with :math:`i_0 = 0`
(the chain starts before the first source word):

1. for each target position :math:`j = 1 \dots m`, the alignment :math:`a_j`:

   * with probability :math:`p_0` (``null_prob``) NULL: :math:`a_j = 0`, and the chain remembers its source
     position, :math:`i_j = i_{j-1}`;
   * else a source word :math:`a_j = i_j = i \in \{1, \dots, l\}`, chosen by its jump from the last source
     position: :math:`p(i \mid i_{j-1}, l) = s(i - i_{j-1}) / \sum_{i'=1}^{l} s(i' - i_{j-1})`, where the jump
     distribution :math:`s(d)` has one weight per width :math:`d \in \{-D, \dots, D\}` (``max_jump`` :math:`D`;
     wider jumps count as :math:`\pm D`);
2. the target word :math:`f_j \mid a_j \sim \mathrm{Categorical}(t(\cdot \mid e_{a_j}))`, the translation table of
   IBM Model 1 (:class:`~ppl_models.ibm1.IBM1Params`, sparse over co-occurring pairs).

As an HMM its hidden state is :math:`(a_j, i_j)`: :math:`K = 2L + 1` states for a source length :math:`L` — a real
state per source word (index :math:`i - 1`) and a NULL state per remembered position :math:`i_j = 0 \dots L`
(index :math:`L + i_j`; the start state is NULL with memory 0, and it emits nothing).  The rows of the transition
matrix depend only on the remembered position.

**EM** (:func:`ppl_models.infer.em.fit_em`; :class:`HMMAlignParams` is an
:class:`~ppl_models.infer.em.EMModel` on an :class:`HMMCorpus`): the E-step runs the scaled forward–backward
recursions (Rabiner 1989) over length-sorted, padded chunks of the corpus; its statistics are the expected
translation counts :math:`c(e, f)` (as in IBM Model 1, over the posterior :math:`\gamma_j`) and the expected moves
:math:`C_l(i', i) = \sum_{n: l_n = l} \sum_j \xi_j(i', i)` from position :math:`i'` to source word :math:`i`, per
source length :math:`l`.  The M-step sets :math:`t(f \mid e) = c(e, f) / \sum_{f'} c(e, f')` and maximizes the
jumps' part of the expected complete-data log-likelihood,

.. math:: Q(s) = \sum_{l, i', i} C_l(i', i) \Big[\log s(i - i') - \log \sum_{k=1}^{l} s(k - i')\Big],

which is concave in :math:`\theta = \log s` (a linear term minus log-sum-exps), by L-BFGS — so both updates are
exact and the log-likelihood never decreases.  (Vogel et al. and GIZA++ set :math:`s(d) \propto \sum C`, which
ignores the normalizers: with clipped jumps it overweights the wide buckets that many positions share.)  The table
starts from IBM Model 1's EM (the usual training scheme: Model 1 iterations, then HMM iterations), :math:`s` from
uniform.  :math:`p_0` is a fixed hyperparameter (Och & Ney tune it on held-out alignments).

**Enumeration.**  :func:`model` writes the chain with :func:`pyro.markov` and enumerates each :math:`a_j` in
parallel, so ``TraceEnum_ELBO(max_plate_nesting=1)`` with the empty guide (:mod:`ppl_models.guides.hmm_align`)
returns exactly :math:`-\log p(f \mid e)` of :func:`log_likelihood` (the forward algorithm).  Padded target
positions are point masses that emit with probability 1.

**Shapes.**  Padded batches as in :mod:`ppl_models.ibm1`: ``src`` ``(batch, S)`` / ``tgt`` ``(batch, T)``
``int64`` without NULL and ``<eos>``, padded with 0, source words :math:`\ge 1`, lengths ``(batch,)``; the link
posteriors are ``(batch, T, S + 1)`` with column 0 NULL (the total of the NULL states), column ``i`` source word
``i``.

References:
    Vogel, Ney & Tillmann (1996), HMM-Based Word Alignment in Statistical Translation. COLING.
    Och & Ney (2003), A Systematic Comparison of Various Statistical Alignment Models. Computational Linguistics
    29(1) (the NULL states, §2.1.1).
    Rabiner (1989), A Tutorial on Hidden Markov Models and Selected Applications in Speech Recognition.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch import nn
from torch.distributions import constraints

from ppl_models.ibm1 import NULL_INDEX, IBM1Corpus, IBM1Params, TranslationCategorical, check_batch
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, data_plate

__all__ = ["HMMCorpus", "HMMAlignParams", "HMMTables", "make_spec", "model", "tables", "forward_backward",
           "log_likelihood", "posterior", "build"]


class HMMCorpus:
    r"""A corpus of sentence pairs for EM of the HMM: IBM Model 1's flat corpus (``ibm1``: the co-occurring pairs
    that the translation table holds) and the pairs as padded chunks of similar source length.

    :ivar ibm1: the :class:`~ppl_models.ibm1.IBM1Corpus` of the same pairs.
    :ivar chunks: ``(rows, src, src_lengths, tgt, tgt_lengths)`` per chunk: the pairs' indices ``(B,)`` and their
        padded tensors (shapes as :func:`model`).
    """

    def __init__(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], src_vocab_size: int,
                 tgt_vocab_size: int, chunk_size: int = 256):
        self.ibm1 = IBM1Corpus(src, tgt, src_vocab_size, tgt_vocab_size)  # checks indices, lengths and sizes
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"HMMCorpus: chunk_size must be a positive integer, received {chunk_size!r}")
        order = sorted(range(len(src)), key=lambda n: (len(src[n]), len(tgt[n])))
        self.chunks = []
        for start in range(0, len(order), chunk_size):
            rows = order[start : start + chunk_size]
            self.chunks.append((torch.tensor(rows),) + _pad([src[n] for n in rows]) + _pad([tgt[n] for n in rows]))

    @property
    def num_data(self) -> int:
        return self.ibm1.num_data

    @property
    def src_vocab_size(self) -> int:
        return self.ibm1.src_vocab_size

    @property
    def tgt_vocab_size(self) -> int:
        return self.ibm1.tgt_vocab_size

    @property
    def tgt_lengths(self) -> torch.Tensor:
        """:math:`m_n`, shape ``(N,)``."""
        return self.ibm1.tgt_lengths


def _pad(sentences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sentences])
    out = torch.zeros(len(sentences), int(lengths.max()), dtype=torch.long)
    for n, s in enumerate(sentences):
        out[n, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


class HMMTables(NamedTuple):
    """A padded batch's HMM (see the module docstring), ``K = 2S + 1`` states.

    :ivar init: :math:`p(\\text{state}_1)`, ``(B, K)``.
    :ivar trans: transition matrices, ``(B, K, K)``.
    :ivar jump: :math:`p(i \\mid i')` of the real states, from position ``i' = 0..S`` to ``i = 1..S``,
        ``(B, S + 1, S)`` (0 beyond the sentence).
    :ivar emit: :math:`p(f_j \\mid \\text{state})`, ``(B, T, K)`` (1 at padded target positions).
    :ivar state_word: the source word each state emits from (NULL for the NULL states), ``(B, K)``.
    :ivar tgt_mask: real target positions, ``(B, T)``.
    """

    init: torch.Tensor
    trans: torch.Tensor
    jump: torch.Tensor
    emit: torch.Tensor
    state_word: torch.Tensor
    tgt_mask: torch.Tensor


class HMMAlignParams(nn.Module):
    r"""The HMM's parameters: the translation table ``trans`` (an :class:`~ppl_models.ibm1.IBM1Params`) and the
    jump distribution :math:`s(d)`, buffer ``jump`` ``(2D + 1,)`` for :math:`d = -D \dots D`; :math:`p_0` is fixed.
    An :class:`~ppl_models.infer.em.EMModel` on an :class:`HMMCorpus`.

    :param src_vocab_size: :math:`V_e` (index 0 = NULL).
    :param tgt_vocab_size: :math:`V_f`.
    :param max_jump: :math:`D \ge 1`.
    :param null_prob: :math:`p_0 \in [0, 1)`.
    :param update_jumps: re-estimate :math:`s` in the M-step (``False``: keep it fixed).
    :param ibm1_iterations: EM iterations of IBM Model 1 that start the translation table
        (:meth:`init_from_corpus`).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, max_jump: int = 7, null_prob: float = 0.2,
                 update_jumps: bool = True, ibm1_iterations: int = 5, dtype: torch.dtype = torch.float64):
        super().__init__()
        if not isinstance(max_jump, int) or isinstance(max_jump, bool) or max_jump < 1:
            raise ValueError(f"HMMAlignParams: max_jump must be an integer >= 1, received {max_jump!r}")
        if not (isinstance(null_prob, (int, float)) and 0.0 <= null_prob < 1.0):
            raise ValueError(f"HMMAlignParams: null_prob must be a probability in [0, 1), received {null_prob!r}")
        if not isinstance(ibm1_iterations, int) or isinstance(ibm1_iterations, bool) or ibm1_iterations < 0:
            raise ValueError(f"HMMAlignParams: ibm1_iterations must be an integer >= 0, received {ibm1_iterations!r}")
        self.trans = IBM1Params(src_vocab_size, tgt_vocab_size, dtype=dtype)
        self.ibm1_iterations = ibm1_iterations
        self.max_jump, self.null_prob, self.update_jumps = max_jump, float(null_prob), bool(update_jumps)
        self.register_buffer("jump", torch.full((2 * max_jump + 1,), 1.0 / (2 * max_jump + 1), dtype=dtype))

    @property
    def src_vocab_size(self) -> int:
        return self.trans.src_vocab_size

    @property
    def tgt_vocab_size(self) -> int:
        return self.trans.tgt_vocab_size

    @property
    def num_entries(self) -> int:
        """Entries of the translation table."""
        return self.trans.num_entries

    @torch.no_grad()
    def init_from_corpus(self, corpus: HMMCorpus) -> "HMMAlignParams":
        """The translation table after ``ibm1_iterations`` EM iterations of IBM Model 1 from uniform rows over the
        corpus's co-occurring pairs; a uniform jump distribution."""
        self._check_corpus(corpus)
        self.trans.init_from_corpus(corpus.ibm1)
        for _ in range(self.ibm1_iterations):
            self.trans.m_step(corpus.ibm1, self.trans.e_step(corpus.ibm1))
        self.jump.fill_(1.0 / len(self.jump))
        return self

    def _check_corpus(self, corpus) -> None:
        if not isinstance(corpus, HMMCorpus):
            raise TypeError(f"HMMAlignParams: expected an HMMCorpus, received {type(corpus).__name__}")
        self.trans._check_corpus(corpus.ibm1)

    def jump_buckets(self, S: int) -> torch.Tensor:
        """The bucket of :math:`s` of every move from position ``i' = 0..S`` to ``i = 1..S``, ``(S + 1, S)``."""
        d = torch.arange(1, S + 1)[None, :] - torch.arange(S + 1)[:, None]
        return d.clamp(-self.max_jump, self.max_jump) + self.max_jump

    # ------------------------------------------------------------------ EM (ppl_models.infer.em.EMModel)
    @torch.no_grad()
    def e_step(self, corpus: HMMCorpus) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(translation counts (K,) over corpus.ibm1.codes, moves (L + 1, L + 1, L))``: the expected moves
        :math:`C_l(i', i)` at ``[l, i', i - 1]``, :math:`L` the longest source sentence."""
        self._check_corpus(corpus)
        dtype = self.jump.dtype
        counts = torch.zeros(len(corpus.ibm1.codes), dtype=dtype)
        L = int(corpus.ibm1.src_lengths.max())
        moves = torch.zeros(L + 1, L + 1, L, dtype=dtype)
        for _, src, src_lengths, tgt, tgt_lengths in corpus.chunks:
            fb = forward_backward(self, src, src_lengths, tgt, tgt_lengths)
            S, Vf = src.shape[1], self.tgt_vocab_size
            src_null = torch.cat([torch.full_like(src[:, :1], NULL_INDEX), src], 1)
            codes = src_null[:, None, :] * Vf + tgt[:, :, None]  # (B, T, S + 1)
            mask = fb["links"] > 0
            keys = torch.searchsorted(corpus.ibm1.codes, codes[mask])
            counts.index_add_(0, keys, fb["links"][mask])
            moves[:, : S + 1, :S].index_add_(0, src_lengths, fb["jump_counts"])
        return counts, moves

    @torch.no_grad()
    def m_step(self, corpus: HMMCorpus, stats: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """:math:`t` from the translation counts (IBM Model 1's M-step); with ``update_jumps`` the :math:`s` that
        maximizes :math:`Q(s)` (:meth:`jump_objective`) given the expected moves."""
        counts, moves = stats
        L = int(corpus.ibm1.src_lengths.max())
        if moves.shape != (L + 1, L + 1, L):
            raise ShapeError(f"HMMAlignParams.m_step: expected moves of shape {(L + 1, L + 1, L)} (the corpus's "
                             f"longest source sentence has {L} words), received {tuple(moves.shape)}")
        self.trans.m_step(corpus.ibm1, counts)
        if self.update_jumps and float(moves.sum()) > 0:
            self.jump.copy_(self._maximize_jumps(moves))

    def jump_objective(self, log_s: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
        r""":math:`Q(s)` of the module docstring for :math:`\log s` ``(2D + 1,)`` (unnormalized) and the expected
        ``moves`` of :meth:`e_step`."""
        L = moves.shape[-1]
        theta = log_s[self.jump_buckets(L)]  # (L + 1, L): theta of the move i' -> i
        norm = torch.logcumsumexp(theta, dim=1)  # [i', l - 1] = log sum_{k <= l} s(k - i')
        leaving = moves.sum(-1)  # [l, i']: the moves from i' in sentences of length l
        return (moves * theta).sum() - (leaving[1:] * norm.T).sum()

    def _maximize_jumps(self, moves: torch.Tensor) -> torch.Tensor:
        """The maximizer of the concave :math:`Q` over :math:`\\log s`, by L-BFGS from the current :math:`s`; the
        current :math:`s` stays if the optimizer finds no better point (so EM never decreases the likelihood)."""
        start = self.jump.clamp_min(torch.finfo(self.jump.dtype).tiny).log()
        log_s = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([log_s], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -self.jump_objective(log_s, moves)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        found = log_s.detach()
        better = bool(torch.isfinite(found).all()) and float(self.jump_objective(found, moves)) >= float(
            self.jump_objective(start, moves))
        return torch.softmax(found if better else start, 0)

    @torch.no_grad()
    def log_likelihood(self, corpus: HMMCorpus) -> torch.Tensor:
        r"""Exact :math:`\log p(f^{(n)} \mid e^{(n)})` of every sentence pair (the forward algorithm), ``(N,)``."""
        self._check_corpus(corpus)
        out = torch.zeros(corpus.num_data, dtype=self.jump.dtype)
        for rows, src, src_lengths, tgt, tgt_lengths in corpus.chunks:
            out[rows] = log_likelihood(self, src, src_lengths, tgt, tgt_lengths)
        return out

    @torch.no_grad()
    def link_posteriors(self, corpus: HMMCorpus) -> List[torch.Tensor]:
        r""":math:`p(a_j = i \mid e, f)` per pair, in corpus order: ``(m, l + 1)`` tensors, column 0 NULL."""
        self._check_corpus(corpus)
        out: List[torch.Tensor] = [None] * corpus.num_data
        for rows, src, src_lengths, tgt, tgt_lengths in corpus.chunks:
            post = posterior(self, src, src_lengths, tgt, tgt_lengths)
            for b, n in enumerate(rows.tolist()):
                out[n] = post[b, : int(tgt_lengths[b]), : int(src_lengths[b]) + 1]
        return out

    def extra_repr(self) -> str:
        return (f"max_jump={self.max_jump}, null_prob={self.null_prob}, update_jumps={self.update_jumps}, "
                f"ibm1_iterations={self.ibm1_iterations}")


# ---------------------------------------------------------------------------------------------------------
# A padded batch's HMM, the forward-backward recursions, and the Pyro model
# ---------------------------------------------------------------------------------------------------------


def tables(params: HMMAlignParams, src, src_lengths, tgt, tgt_lengths) -> HMMTables:
    """The HMM of a padded batch (:class:`HMMTables`); shapes as :func:`model`."""
    check_batch(params.trans, src, src_lengths, tgt, tgt_lengths)
    B, S = src.shape
    dtype, p0 = params.jump.dtype, params.null_prob
    valid = torch.arange(1, S + 1)[None, :] <= src_lengths[:, None]  # (B, S) real positions
    weight = params.jump[params.jump_buckets(S)][None] * valid[:, None, :]  # (B, S + 1, S)
    jump = (1.0 - p0) * weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    K = 2 * S + 1
    trans = torch.zeros(B, K, K, dtype=dtype)
    trans[:, :S, :S] = jump[:, 1:]  # real i' -> real i
    trans[:, S:, :S] = jump  # NULL with memory i' -> real i
    stay = torch.arange(S + 1)
    trans[:, stay[1:] - 1, S + stay[1:]] = p0  # real i' -> NULL remembering i'
    trans[:, S + stay, S + stay] = p0  # NULL remembering i' -> NULL remembering i'
    init = trans[:, S].clone()  # from the start state: NULL remembering position 0
    state_word = torch.cat([src, torch.full((B, S + 1), NULL_INDEX, dtype=src.dtype)], 1)  # (B, K)
    tgt_mask = torch.arange(tgt.shape[1])[None, :] < tgt_lengths[:, None]
    emit = params.trans.prob(state_word[:, None, :], tgt[:, :, None])  # (B, T, K)
    emit = torch.where(tgt_mask[:, :, None], emit, torch.ones_like(emit))
    return HMMTables(init, trans, jump, emit, state_word, tgt_mask)


def _unemittable(hmm: HMMTables) -> torch.Tensor:
    """Target positions no state can emit, ``(B, T)``: a word that co-occurred with none of the sentence's words
    (nor NULL) in training, e.g. ``<unk>``; its sentence has probability 0."""
    return hmm.tgt_mask & (hmm.emit.sum(-1) == 0)


def _forward(params: HMMAlignParams, src, src_lengths, tgt, tgt_lengths):
    """The scaled forward recursion: ``(hmm, zero, alpha (B, T, K), scale (B, T), log_likelihood (B,))``, the
    HMM's tables with the unemittable words (``zero``, :func:`_unemittable`) left out of the chain."""
    hmm = tables(params, src, src_lengths, tgt, tgt_lengths)
    zero = _unemittable(hmm)
    hmm = hmm._replace(emit=torch.where(zero[:, :, None], torch.ones_like(hmm.emit), hmm.emit))
    B, T, K = hmm.emit.shape
    alpha = torch.zeros(B, T, K, dtype=hmm.emit.dtype)
    scale = torch.ones(B, T, dtype=hmm.emit.dtype)
    prev = None
    for j in range(T):
        pred = hmm.init if j == 0 else torch.bmm(prev[:, None, :], hmm.trans)[:, 0]
        u = pred * hmm.emit[:, j]
        c = u.sum(-1)
        cur = u / c.clamp_min(torch.finfo(u.dtype).tiny)[:, None]
        m = hmm.tgt_mask[:, j]
        prev = cur if j == 0 else torch.where(m[:, None], cur, prev)
        alpha[:, j] = prev
        scale[:, j] = torch.where(m, c, torch.ones_like(c))
    log_lik = torch.where(zero.any(-1), torch.tensor(-math.inf, dtype=scale.dtype), scale.log().sum(-1))
    return hmm, zero, alpha, scale, log_lik


def forward_backward(params: HMMAlignParams, src, src_lengths, tgt, tgt_lengths) -> dict:
    r"""The scaled forward–backward recursions of a padded batch.

    Returns ``log_likelihood`` ``(B,)``, ``links`` :math:`p(a_j = i \mid e, f)` ``(B, T, S + 1)`` (column 0 NULL;
    0 at padded positions) and ``jump_counts`` ``(B, S + 1, S)``: the expected number of moves from position
    :math:`i'` to source word :math:`i` (the first move from :math:`i' = 0`).

    A target word that no state can emit (unseen with any of the sentence's words in training) makes its
    sentence's ``log_likelihood`` :math:`-\infty`, as in IBM Model 1; for the links it is left out of the chain
    (marginalized: it informs no alignment) and gets none itself (a zero row), so it does not erase the
    sentence's other links."""
    hmm, zero, alpha, scale, log_lik = _forward(params, src, src_lengths, tgt, tgt_lengths)
    B, T, K = hmm.emit.shape
    S = src.shape[1]
    beta = torch.ones(B, T, K, dtype=alpha.dtype)
    for j in range(T - 1, 0, -1):
        back = torch.bmm(hmm.trans, (hmm.emit[:, j] * beta[:, j])[:, :, None])[:, :, 0] / scale[:, j, None]
        beta[:, j - 1] = torch.where(hmm.tgt_mask[:, j, None], back, beta[:, j])
    gamma = alpha * beta * (hmm.tgt_mask & ~zero)[:, :, None]
    links = torch.cat([gamma[:, :, S:].sum(-1, keepdim=True), gamma[:, :, :S]], -1)
    # moves into real states: weight of the position moved from (real i' and NULL remembering i' share rows)
    came_from = torch.zeros(B, T, S + 1, dtype=alpha.dtype)
    came_from[:, 0, 0] = 1.0  # the start
    came_from[:, 1:] = alpha[:, :-1, S:]
    came_from[:, 1:, 1:] += alpha[:, :-1, :S]
    arrive = hmm.emit[:, :, :S] * beta[:, :, :S] / scale[:, :, None] * hmm.tgt_mask[:, :, None]  # (B, T, S)
    jump_counts = torch.einsum("btp,bti->bpi", came_from, arrive) * hmm.jump
    return {"log_likelihood": log_lik, "links": links, "jump_counts": jump_counts}


def log_likelihood(params: HMMAlignParams, src, src_lengths, tgt, tgt_lengths) -> torch.Tensor:
    r"""Exact :math:`\log p(f \mid e)` of every pair of a padded batch, ``(B,)`` (the forward algorithm alone)."""
    return _forward(params, src, src_lengths, tgt, tgt_lengths)[-1]


def posterior(params: HMMAlignParams, src, src_lengths, tgt, tgt_lengths) -> torch.Tensor:
    r""":math:`p(a_j = i \mid e, f)`, ``(B, T, S + 1)`` (column 0 NULL; padded target rows are 0)."""
    return forward_backward(params, src, src_lengths, tgt, tgt_lengths)["links"]


def make_spec(name: str = "hmm-align") -> ModelSpec:
    return ModelSpec(
        name=name,
        observed=ObservedSite("f", (), constraints.nonnegative_integer),
        data_plate="sentences",
        local_latents=(LatentSite("a", (), constraints.nonnegative_integer),),
    )


def model(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
          idx: torch.Tensor | None = None, *, params: HMMAlignParams, num_data: int | None = None):
    """The generative story above for a padded batch: the chain of states ``a_0 … a_{T-1}`` (sites ``a_j``, the
    HMM state: real or NULL with memory) under :func:`pyro.markov`, each enumerated in parallel; the words ``f_j``.

    :param src: source words ``(batch, S)`` (``int64``, :math:`\\ge 1`, padded with 0; no NULL).
    :param src_lengths: :math:`l`, shape ``(batch,)``.
    :param tgt: target words ``(batch, T)`` (padded with 0; no ``<eos>``).
    :param tgt_lengths: :math:`m`, shape ``(batch,)``.
    :param idx: the batch's indices in the data set ``(batch,)`` (``None``: the whole data set).
    :param params: the :class:`HMMAlignParams` (registered as ``"params"``).
    :param num_data: number of sentence pairs :math:`N` (the plate's N/batch scale).
    """
    hmm = tables(params, src, src_lengths, tgt, tgt_lengths)
    pyro.module("params", params)
    B, T, K = hmm.emit.shape
    rows = torch.arange(B)
    point = torch.zeros(K, dtype=hmm.init.dtype)
    point[0] = 1.0  # padded positions: a point mass (state 0), emitting with probability 1
    state = None
    with data_plate(src, idx, num_data, name="sentences", dim=-1):
        for j in pyro.markov(range(T)):
            probs = hmm.init if state is None else Vindex(hmm.trans)[rows, state]
            probs = torch.where(hmm.tgt_mask[:, j, None], probs, point)
            state = pyro.sample(f"a_{j}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            word = Vindex(hmm.state_word)[rows, state]
            pyro.sample(f"f_{j}", TranslationCategorical(params.trans, word, hmm.tgt_mask[:, j]), obs=tgt[:, j])


def build(src_vocab_size: int = 0, tgt_vocab_size: int = 0, max_jump: int = 7, null_prob: float = 0.2,
          ibm1_iterations: int = 5, dtype: str = "float64") -> ModelParts:
    """The declared structure and the parameters (``params``: an :class:`HMMAlignParams`, uniform).

    :param src_vocab_size: :math:`V_e` including NULL = index 0 (the data set's ``model_kwargs``).
    :param tgt_vocab_size: :math:`V_f`.
    :param max_jump: :math:`D`, the widest jump with its own weight.
    :param null_prob: :math:`p_0`.
    :param ibm1_iterations: IBM Model 1 EM iterations that start the translation table.
    :param dtype: ``"float64"`` or ``"float32"``.
    """
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"model 'hmm-align': dtype must be one of {', '.join(dtypes)}, received {dtype!r}")
    params = HMMAlignParams(src_vocab_size, tgt_vocab_size, max_jump=max_jump, null_prob=null_prob,
                            ibm1_iterations=ibm1_iterations, dtype=dtypes[dtype])
    return ModelParts(spec=make_spec(), modules={"params": params})


register_model("hmm-align", model=model, build=build)
