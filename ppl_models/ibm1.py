r"""IBM Model 1 (Brown et al. 1993): the latent alignment with a NULL source word, fitted by exact EM.

Generative story (``"ibm1"``), for each sentence pair: a source sentence :math:`e = e_1 \dots e_l` (given) with
the NULL word :math:`e_0` in front, and a target sentence :math:`f = f_1 \dots f_m`:

1. the target length :math:`m` (given: Brown et al.'s :math:`\epsilon(m \mid l)` is a constant, dropped);
2. for each target position :math:`j = 1 \dots m`: the alignment :math:`a_j \sim \mathrm{Uniform}\{0, \dots, l\}`,
   with :math:`a_j = 0` meaning NULL (the target word is unaligned);
3. the target word :math:`f_j \mid a_j \sim \mathrm{Categorical}(t(\cdot \mid e_{a_j}))`.

So :math:`p(f \mid e) = \prod_j \frac{1}{l + 1} \sum_{i=0}^{l} t(f_j \mid e_i)` and the posterior of each alignment
is :math:`p(a_j = i \mid e, f) = t(f_j \mid e_i) / \sum_{i'} t(f_j \mid e_{i'})`, independently over :math:`j`.

**Indices.**  Words are vocabulary indices (:class:`ppl_models.data.text.Vocab` or any other); source index
:data:`NULL_INDEX` = 0 is the NULL word (the data layer's ``<pad>``, never a real word), so real source words
must be :math:`\ge 1`.  Padded batches (:func:`model`, :func:`log_likelihood`, :func:`posterior`) are
``src`` ``(batch, S)`` / ``tgt`` ``(batch, T)`` ``int64`` without NULL and without ``<eos>``, padded with 0, and
their lengths ``(batch,)``; column 0 of the ``(batch, T, S + 1)`` alignment tables is NULL, column ``i`` is
source word ``i`` (1-based, as in Brown et al.; the Pharaoh ``i-j`` of it is ``i - 1``).

**Sparse translation table.**  :math:`t(f \mid e)` is stored only for pairs :math:`(e, f)` that co-occur in a
training pair (NULL with every target word): with vocabularies of 20k words a dense table would be 1.6 GB in
float32, while the co-occurring pairs of Multi30k + Hansards are under 1 % of it (0.97 M entries).  The table
(:class:`IBM1Params`) holds the sorted codes :math:`e \cdot V_f + f` and their probabilities;
:meth:`IBM1Params.prob` looks pairs up by binary search.  Before the first M-step every pair has
:math:`t = 1/V_f` (uniform rows, stored or not); after it, a pair not in the table has :math:`t = 0`, exactly what
EM gives a pair that never co-occurs.

**EM** (:func:`ppl_models.infer.em.fit_em`, through :meth:`IBM1Params.e_step` / :meth:`~IBM1Params.m_step` /
:meth:`~IBM1Params.log_likelihood` on an :class:`IBM1Corpus`, the whole corpus as flat ``(P,)`` arrays of its
:math:`P = \sum_n m_n (l_n + 1)` (target word, source position) pairs):

* E-step: expected counts :math:`c(e, f) = \sum_{n, j, i: e_i = e, f_j = f} p(a_j = i \mid e^{(n)}, f^{(n)})`,
  one ``index_add`` over the pairs (the sufficient statistics);
* M-step: :math:`t(f \mid e) = c(e, f) / \sum_{f'} c(e, f')`, normalized counts.

Each iteration is exact, so the log-likelihood never decreases.

**Enumeration.**  In :func:`model` the site ``a`` is marked ``infer={"enumerate": "parallel"}`` inside the sentence
plate (``dim=-2``) and the target-position plate (``dim=-1``): ``TraceEnum_ELBO(max_plate_nesting=2)`` with the
empty ``"enumerate"`` guide (:mod:`ppl_models.guides.ibm1`) sums every :math:`a_j` out and returns exactly
:math:`-\log p(f \mid e)` (:func:`log_likelihood`).  Padded target positions contribute exactly 0 (their
alignment is a point mass on NULL and their word's log-probability is 0), padded source positions have prior
probability 0.

References:
    Brown, Della Pietra, Della Pietra & Mercer (1993), The Mathematics of Statistical Machine Translation:
    Parameter Estimation. Computational Linguistics 19(2).
    Koehn (2010), Statistical Machine Translation, §4.4 (EM for IBM Model 1).
    Och & Ney (2003), A Systematic Comparison of Various Statistical Alignment Models.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.ops.indexing import Vindex
from torch import nn
from torch.distributions import constraints

from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate

__all__ = [
    "NULL_INDEX",
    "IBM1Corpus",
    "IBM1Params",
    "TranslationCategorical",
    "make_spec",
    "model",
    "log_joint",
    "log_likelihood",
    "posterior",
    "build",
    "check_batch",
]

#: The source index of the NULL word (the data layer's ``<pad>``, which never occurs as a real word).
NULL_INDEX = 0


def _check_vocab_size(what: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{what}: {name} must be an integer >= 2 (index 0 is reserved), received {value!r}")


# ---------------------------------------------------------------------------------------------------------
# The corpus, flat
# ---------------------------------------------------------------------------------------------------------


class IBM1Corpus:
    r"""A corpus of sentence pairs as flat index arrays, for vectorized EM.

    For sentence :math:`n` (source length :math:`l_n`, target length :math:`m_n`) the pairs of target word
    :math:`j` (0-based) with source position :math:`i = 0 \dots l_n` (0 = NULL) are stored in order, at flat
    index ``pair_offsets[n] + j * (l_n + 1) + i``.

    :ivar src_lengths: :math:`l_n`, shape ``(N,)``.
    :ivar tgt_lengths: :math:`m_n`, shape ``(N,)``.
    :ivar tgt_sentence: the sentence of every target word, shape ``(M,)``, :math:`M = \sum_n m_n`.
    :ivar pair_word: the flat target word (``0..M-1``) of every pair, shape ``(P,)``.
    :ivar codes: the distinct co-occurring pairs' codes :math:`e \cdot V_f + f`, sorted, shape ``(K,)``.
    :ivar pair_key: the entry of ``codes`` of every pair, shape ``(P,)``.
    :ivar pair_offsets: where each sentence's pairs start, shape ``(N,)``.
    """

    def __init__(self, src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], src_vocab_size: int,
                 tgt_vocab_size: int):
        _check_vocab_size("IBM1Corpus", "src_vocab_size", src_vocab_size)
        _check_vocab_size("IBM1Corpus", "tgt_vocab_size", tgt_vocab_size)
        if len(src) != len(tgt):
            raise ValueError(f"IBM1Corpus: expected as many source as target sentences, received {len(src)} and "
                             f"{len(tgt)}")
        if len(src) == 0:
            raise ValueError("IBM1Corpus: expected at least one sentence pair, received none")
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.src_lengths = torch.tensor([len(s) for s in src], dtype=torch.long)
        self.tgt_lengths = torch.tensor([len(t) for t in tgt], dtype=torch.long)
        for name, lengths in (("source", self.src_lengths), ("target", self.tgt_lengths)):
            if int(lengths.min()) < 1:
                n = int((lengths < 1).nonzero()[0])
                raise ValueError(f"IBM1Corpus: sentence pair {n}: expected a non-empty {name} sentence, received "
                                 "an empty one")
        src_flat = torch.tensor([w for s in src for w in s], dtype=torch.long)
        tgt_flat = torch.tensor([w for t in tgt for w in t], dtype=torch.long)
        _check_range("source word", src_flat, 1, src_vocab_size - 1, "(0 is NULL)")
        _check_range("target word", tgt_flat, 0, tgt_vocab_size - 1)
        N = len(src)
        # the source sentences with NULL in front, flat
        ext_lengths = self.src_lengths + 1
        ext_offsets = torch.cumsum(ext_lengths, 0) - ext_lengths
        src_ext = torch.zeros(int(ext_lengths.sum()), dtype=torch.long)  # NULL_INDEX = 0 at each sentence start
        not_null = torch.ones(len(src_ext), dtype=torch.bool)
        not_null[ext_offsets] = False
        src_ext[not_null] = src_flat
        self.tgt_sentence = torch.repeat_interleave(torch.arange(N), self.tgt_lengths)  # (M,)
        per_word = ext_lengths[self.tgt_sentence]  # (M,) pairs of each target word
        self.pair_word = torch.repeat_interleave(torch.arange(len(tgt_flat)), per_word)  # (P,)
        word_offsets = torch.cumsum(per_word, 0) - per_word
        pos = torch.arange(len(self.pair_word)) - word_offsets[self.pair_word]  # (P,) source position 0..l
        e = src_ext[ext_offsets[self.tgt_sentence[self.pair_word]] + pos]
        f = tgt_flat[self.pair_word]
        self.codes, self.pair_key = torch.unique(e * tgt_vocab_size + f, sorted=True, return_inverse=True)
        sizes = self.tgt_lengths * ext_lengths
        self.pair_offsets = torch.cumsum(sizes, 0) - sizes

    @property
    def num_data(self) -> int:
        return len(self.src_lengths)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_word)

    def split_pairs(self, values: torch.Tensor) -> List[torch.Tensor]:
        r"""Per-pair values ``(P,)`` as one ``(m_n, l_n + 1)`` tensor per sentence (column 0: NULL)."""
        if values.shape != (self.num_pairs,):
            raise ShapeError(f"IBM1Corpus.split_pairs: expected shape ({self.num_pairs},), received "
                             f"{tuple(values.shape)}")
        sizes = (self.tgt_lengths * (self.src_lengths + 1)).tolist()
        return [block.view(m, l + 1) for block, m, l in
                zip(torch.split(values, sizes), self.tgt_lengths.tolist(), self.src_lengths.tolist())]


def _check_range(what: str, values: torch.Tensor, lo: int, hi: int, note: str = "") -> None:
    bad = (values < lo) | (values > hi)
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise ShapeError(f"IBM1: {what}: expected indices in [{lo}, {hi}] {note}".rstrip()
                         + f", received {int(values[at])} at index {at}")


# ---------------------------------------------------------------------------------------------------------
# The parameters: a sparse translation table
# ---------------------------------------------------------------------------------------------------------


class IBM1Params(nn.Module):
    r"""The translation table :math:`t(f \mid e)` over co-occurring pairs (see the module docstring).

    Buffers: ``codes`` ``(K,)`` sorted :math:`e \cdot V_f + f`, ``t`` ``(K,)`` their probabilities, ``t_default``
    (scalar) the probability of a pair not stored (:math:`1/V_f` before the first M-step, 0 after).  It
    implements :class:`ppl_models.infer.em.EMModel` on an :class:`IBM1Corpus`.

    :param src_vocab_size: :math:`V_e` (index 0 = NULL).
    :param tgt_vocab_size: :math:`V_f`.
    :param dtype: dtype of the probabilities (float64 keeps EM's monotonicity exact to rounding).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, dtype: torch.dtype = torch.float64):
        super().__init__()
        _check_vocab_size("IBM1Params", "src_vocab_size", src_vocab_size)
        _check_vocab_size("IBM1Params", "tgt_vocab_size", tgt_vocab_size)
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.register_buffer("codes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("t", torch.zeros(0, dtype=dtype))
        self.register_buffer("t_default", torch.tensor(1.0 / tgt_vocab_size, dtype=dtype))

    @property
    def num_entries(self) -> int:
        return len(self.codes)

    @property
    def is_uniform(self) -> bool:
        """Every row is uniform (the state before the first M-step)."""
        return bool(self.t_default > 0)

    @torch.no_grad()
    def init_from_corpus(self, corpus: IBM1Corpus) -> "IBM1Params":
        r"""Store the corpus's co-occurring pairs, every one (and every other pair) with :math:`t = 1/V_f`."""
        self._check_corpus(corpus)
        self.codes = corpus.codes
        self.t = torch.full((len(corpus.codes),), 1.0 / self.tgt_vocab_size, dtype=self.t.dtype)
        self.t_default = torch.tensor(1.0 / self.tgt_vocab_size, dtype=self.t.dtype)
        return self

    def _check_corpus(self, corpus: IBM1Corpus) -> None:
        if not isinstance(corpus, IBM1Corpus):
            raise TypeError(f"IBM1Params: expected an IBM1Corpus, received {type(corpus).__name__}")
        if (corpus.src_vocab_size, corpus.tgt_vocab_size) != (self.src_vocab_size, self.tgt_vocab_size):
            raise ShapeError(
                f"IBM1Params: the corpus has vocabulary sizes (source {corpus.src_vocab_size}, target "
                f"{corpus.tgt_vocab_size}), the table (source {self.src_vocab_size}, target {self.tgt_vocab_size})")

    def prob_of_codes(self, codes: torch.Tensor) -> torch.Tensor:
        r""":math:`t(f \mid e)` of codes :math:`e \cdot V_f + f` of any shape (``t_default`` for pairs not stored)."""
        if codes is self.codes:
            return self.t
        if self.num_entries == 0:
            return self.t_default.expand(codes.shape).clone()
        pos = torch.searchsorted(self.codes, codes).clamp_(max=self.num_entries - 1)
        found = self.codes[pos] == codes
        return torch.where(found, self.t[pos], self.t_default)

    def prob(self, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        r""":math:`t(f \mid e)` for broadcastable index tensors ``e``, ``f``."""
        return self.prob_of_codes(e * self.tgt_vocab_size + f)

    # ------------------------------------------------------------------ EM (ppl_models.infer.em.EMModel)
    def _pair_probs(self, corpus: IBM1Corpus) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(p, z)``: :math:`t(f_j \\mid e_i)` of every pair ``(P,)`` and :math:`\\sum_i t(f_j \\mid e_i)` of every
        target word ``(M,)``."""
        self._check_corpus(corpus)
        p = self.prob_of_codes(corpus.codes)[corpus.pair_key]
        z = torch.zeros(len(corpus.tgt_sentence), dtype=p.dtype).index_add_(0, corpus.pair_word, p)
        return p, z

    @torch.no_grad()
    def pair_posteriors(self, corpus: IBM1Corpus) -> torch.Tensor:
        r""":math:`p(a_j = i \mid e, f)` of every pair, shape ``(P,)`` (:meth:`IBM1Corpus.split_pairs` gives the
        per-sentence ``(m, l + 1)`` tables); a target word whose every pair has :math:`t = 0` gets all zeros."""
        p, z = self._pair_probs(corpus)
        zp = z[corpus.pair_word]
        return torch.where(zp > 0, p / zp.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))

    @torch.no_grad()
    def e_step(self, corpus: IBM1Corpus) -> torch.Tensor:
        r"""Expected counts :math:`c(e, f)` of the corpus's co-occurring pairs (``corpus.codes``), shape ``(K,)``."""
        post = self.pair_posteriors(corpus)
        return torch.zeros(len(corpus.codes), dtype=post.dtype).index_add_(0, corpus.pair_key, post)

    @torch.no_grad()
    def m_step(self, corpus: IBM1Corpus, stats: torch.Tensor) -> None:
        r""":math:`t(f \mid e) = c(e, f) / \sum_{f'} c(e, f')` over the corpus's co-occurring pairs; every other
        pair gets 0 (the table's support becomes ``corpus.codes``)."""
        self._check_corpus(corpus)
        check_tensor("expected counts", stats, event_shape=())
        if stats.shape != corpus.codes.shape:
            raise ShapeError(f"IBM1Params.m_step: expected counts for the corpus's {len(corpus.codes)} co-occurring "
                             f"pairs, received shape {tuple(stats.shape)}")
        stats = stats.to(self.t.dtype)
        e = corpus.codes // self.tgt_vocab_size
        totals = torch.zeros(self.src_vocab_size, dtype=stats.dtype).index_add_(0, e, stats)[e]
        self.codes = corpus.codes
        self.t = torch.where(totals > 0, stats / totals.clamp_min(torch.finfo(stats.dtype).tiny),
                             torch.zeros_like(stats))
        self.t_default = torch.zeros((), dtype=self.t.dtype)

    @torch.no_grad()
    def log_likelihood(self, corpus: IBM1Corpus) -> torch.Tensor:
        r"""Exact :math:`\log p(f^{(n)} \mid e^{(n)}) = \sum_j \log \sum_i t(f_j \mid e_i) - m_n \log(l_n + 1)` of
        every sentence pair, shape ``(N,)``."""
        _, z = self._pair_probs(corpus)
        per_sentence = torch.zeros(corpus.num_data, dtype=z.dtype).index_add_(0, corpus.tgt_sentence, z.log())
        return per_sentence - corpus.tgt_lengths * (corpus.src_lengths + 1).to(z.dtype).log()

    # ------------------------------------------------------------------ a table of any size loads
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("codes", "t"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"src_vocab_size={self.src_vocab_size}, tgt_vocab_size={self.tgt_vocab_size}, "
                f"entries={self.num_entries}, uniform={self.is_uniform}")


# ---------------------------------------------------------------------------------------------------------
# The emission distribution and the Pyro model
# ---------------------------------------------------------------------------------------------------------


class TranslationCategorical(TorchDistribution):
    r""":math:`\mathrm{Categorical}(t(\cdot \mid e))` for a tensor of source words ``e`` (the batch shape), over the
    target vocabulary, read from the sparse table of an :class:`IBM1Params`.

    ``pad_mask`` (optional, broadcastable to the batch shape): where it is false the distribution is a point mass
    whose log-probability is 0 for any value (padded target positions).
    """

    arg_constraints = {}
    has_enumerate_support = False

    def __init__(self, params: IBM1Params, e: torch.Tensor, pad_mask: torch.Tensor | None = None,
                 validate_args=None):
        self.params, self.e, self.pad_mask = params, e, pad_mask
        super().__init__(e.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.params.tgt_vocab_size - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        mask = None if self.pad_mask is None else self.pad_mask.expand(batch_shape)
        return TranslationCategorical(self.params, self.e.expand(batch_shape), mask)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        e, f = torch.broadcast_tensors(self.e, value)
        lp = self.params.prob(e, f).log()
        if self.pad_mask is not None:
            lp = torch.where(self.pad_mask, lp, torch.zeros_like(lp))
        return lp

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draws by inverting each row's cumulative distribution (uniform rows before the first M-step)."""
        params, shape = self.params, torch.Size(sample_shape) + self.batch_shape
        e = self.e.expand(shape)
        if params.is_uniform:
            return torch.randint(params.tgt_vocab_size, shape)
        cum = torch.cumsum(params.t, 0)
        row = params.codes // params.tgt_vocab_size
        starts = torch.searchsorted(row, e.reshape(-1))
        ends = torch.searchsorted(row, e.reshape(-1), right=True)
        if bool((ends == starts).any()):
            bad = int(e.reshape(-1)[(ends == starts).nonzero()[0]])
            raise ValueError(f"TranslationCategorical.sample: source word {bad} has no translation in the table")
        before = torch.where(starts > 0, cum[(starts - 1).clamp_min(0)], torch.zeros((), dtype=cum.dtype))
        u = torch.rand(len(starts), dtype=cum.dtype)
        pick = torch.searchsorted(cum, before + u * (cum[ends - 1] - before), right=True)
        pick = torch.minimum(torch.maximum(pick, starts), ends - 1)
        return (params.codes[pick] % params.tgt_vocab_size).view(shape)


def make_spec(name: str = "ibm1") -> ModelSpec:
    return ModelSpec(
        name=name,
        observed=ObservedSite("f", (), constraints.nonnegative_integer),
        data_plate="sentences",
        local_latents=(LatentSite("a", (), constraints.nonnegative_integer),),
    )


def check_batch(params: IBM1Params, src, src_lengths, tgt, tgt_lengths) -> None:
    for site, x in (("src", src), ("tgt", tgt)):
        check_tensor(site, x, dtype_kind="int")
        if x.dim() != 2:
            raise ShapeError(f"site {site!r}: expected shape (batch, length), received {tuple(x.shape)}")
    for site, lengths, x in (("src_lengths", src_lengths, src), ("tgt_lengths", tgt_lengths, tgt)):
        check_tensor(site, lengths, event_shape=(), dtype_kind="int")
        if lengths.shape[0] != x.shape[0]:
            raise ShapeError(f"site {site!r}: expected shape ({x.shape[0]},) (the batch), received "
                             f"{tuple(lengths.shape)}")
        if bool(((lengths < 1) | (lengths > x.shape[1])).any()):
            raise ShapeError(f"site {site!r}: expected lengths in [1, {x.shape[1]}], received {lengths.tolist()}")
    src_mask = torch.arange(src.shape[1]) < src_lengths[:, None]
    _check_range("source word (src)", src[src_mask], 1, params.src_vocab_size - 1, "(0 is NULL)")
    _check_range("target word (tgt)", tgt, 0, params.tgt_vocab_size - 1)


def _tables(params: IBM1Params, src, src_lengths, tgt, tgt_lengths):
    """``(src_null (B, S+1), prior_logits (B, T, S+1), tgt_mask (B, T))``: NULL prepended; the alignment prior
    :math:`\\log 1/(l+1)` on positions ``0..l``, :math:`-\\infty` beyond; padded target steps: a point mass on 0."""
    batch, S = src.shape
    src_null = torch.cat([torch.full((batch, 1), NULL_INDEX, dtype=src.dtype), src], 1)
    tgt_mask = torch.arange(tgt.shape[1]) < tgt_lengths[:, None]
    valid = torch.arange(S + 1) <= src_lengths[:, None]  # (B, S+1)
    dtype = params.t.dtype
    logits = torch.where(valid, -(src_lengths[:, None] + 1).to(dtype).log(), torch.tensor(-math.inf, dtype=dtype))
    point = torch.full((S + 1,), -math.inf, dtype=dtype)
    point[0] = 0.0
    prior = torch.where(tgt_mask[:, :, None], logits[:, None, :], point)
    return src_null, prior, tgt_mask


def model(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
          idx: torch.Tensor | None = None, *, params: IBM1Params, num_data: int | None = None):
    """The generative story above, for a padded batch; ``a`` enumerated in parallel.

    :param src: source words ``(batch, S)`` (``int64``, :math:`\\ge 1`, padded with 0; no NULL).
    :param src_lengths: :math:`l`, shape ``(batch,)``.
    :param tgt: target words ``(batch, T)`` (padded with 0; no ``<eos>``).
    :param tgt_lengths: :math:`m`, shape ``(batch,)``.
    :param idx: the batch's indices in the data set ``(batch,)`` (``None``: the whole data set).
    :param params: the :class:`IBM1Params` (registered as ``"params"``).
    :param num_data: number of sentence pairs :math:`N` (the plate's N/batch scale).
    """
    check_batch(params, src, src_lengths, tgt, tgt_lengths)
    pyro.module("params", params)
    src_null, prior, tgt_mask = _tables(params, src, src_lengths, tgt, tgt_lengths)
    T = tgt.shape[1]
    with data_plate(src, idx, num_data, name="sentences", dim=-2), pyro.plate("positions", T, dim=-1):
        a = pyro.sample("a", dist.Categorical(logits=prior), infer={"enumerate": "parallel"})  # a_j, 0 = NULL
        e = Vindex(src_null[:, None, :].expand(-1, T, -1))[..., a]  # e_{a_j}: (batch, T) or (S+1, batch, T)
        pyro.sample("f", TranslationCategorical(params, e, tgt_mask), obs=tgt)


# ---------------------------------------------------------------------------------------------------------
# Exact quantities of a padded batch
# ---------------------------------------------------------------------------------------------------------


def log_joint(params: IBM1Params, src, src_lengths, tgt, tgt_lengths) -> torch.Tensor:
    r""":math:`\log p(a_j = i, f_j \mid e) = -\log(l + 1) + \log t(f_j \mid e_i)`, shape ``(batch, T, S + 1)``
    (column 0: NULL; :math:`-\infty` at padded source columns; 0 at column 0 of padded target rows)."""
    check_batch(params, src, src_lengths, tgt, tgt_lengths)
    src_null, prior, tgt_mask = _tables(params, src, src_lengths, tgt, tgt_lengths)
    lt = params.prob(src_null[:, None, :], tgt[:, :, None]).log()  # (B, T, S+1)
    return prior + torch.where(tgt_mask[:, :, None], lt, torch.zeros_like(lt))


def log_likelihood(params: IBM1Params, src, src_lengths, tgt, tgt_lengths) -> torch.Tensor:
    r"""Exact :math:`\log p(f \mid e) = \sum_j \log \frac{1}{l+1} \sum_i t(f_j \mid e_i)`, shape ``(batch,)``."""
    return torch.logsumexp(log_joint(params, src, src_lengths, tgt, tgt_lengths), -1).sum(-1)


def posterior(params: IBM1Params, src, src_lengths, tgt, tgt_lengths) -> torch.Tensor:
    r""":math:`p(a_j = i \mid e, f)`, shape ``(batch, T, S + 1)`` (column 0: NULL; padded target rows are 0)."""
    lj = log_joint(params, src, src_lengths, tgt, tgt_lengths)
    post = lj.softmax(-1).nan_to_num(0.0)
    return post * (torch.arange(tgt.shape[1]) < tgt_lengths[:, None])[:, :, None]


def build(src_vocab_size: int = 0, tgt_vocab_size: int = 0, dtype: str = "float64") -> ModelParts:
    """The declared structure and the parameters (``params``: an :class:`IBM1Params` with uniform rows; give it a
    corpus's co-occurring pairs with ``params.init_from_corpus(corpus)`` and fit it with
    :func:`ppl_models.infer.em.fit_em`).

    :param src_vocab_size: :math:`V_e` including NULL = index 0 (the data set's ``model_kwargs``).
    :param tgt_vocab_size: :math:`V_f`.
    :param dtype: ``"float64"`` or ``"float32"``.
    """
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"model 'ibm1': dtype must be one of {', '.join(dtypes)}, received {dtype!r}")
    params = IBM1Params(src_vocab_size, tgt_vocab_size, dtype=dtypes[dtype])
    return ModelParts(spec=make_spec(), modules={"params": params})


register_model("ibm1", model=model, build=build)
