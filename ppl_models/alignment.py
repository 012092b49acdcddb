r"""Attention as a latent variable: a latent-alignment sequence-to-sequence model (Deng et al. 2018).

Generative story, for each sentence pair :math:`(x, y)` with source :math:`x = x_0 \dots x_{S-1}` and target
:math:`y = y_1 \dots y_T` (:math:`y_T` = ``<eos>``):

1. source encodings :math:`\tilde x_0 \dots \tilde x_{S-1} = \mathrm{BiGRU}(\mathrm{emb}(x))`
   (``memory``, dimension :math:`2H`);
2. decoder states :math:`h_t = \mathrm{GRU}(h_{t-1}, \mathrm{emb}(y_{t-1}))`, :math:`y_0` = ``<bos>``, fed the
   observed previous token (no input feeding, so the alignments below are conditionally independent given
   :math:`x, y`, as in Deng et al.'s setup);
3. for each target step :math:`t`, the alignment prior
   :math:`p(z_t = i \mid x, y_{<t}) = \mathrm{softmax}_i(h_t^\top W \tilde x_i)` over the :math:`S` source positions;
4. the target token :math:`y_t \sim \mathrm{Categorical}(\mathrm{softmax}(O(A h_t + B \tilde x_{z_t}) + c))`,
   with an output embedding :math:`O` of dimension ``out_dim`` shared by both parts.

The output logits are linear in :math:`[h_t; \tilde x_{z_t}]` (Deng et al.'s :math:`\mathrm{softmax}(W[h_t; x_z])`,
with :math:`W = O[A, B]` of rank ``out_dim``),
so :math:`\log p(y_t \mid x_{z_t}, h_t)` for *every* source position costs two exponentials of shape
``(batch, T, vocab)`` and ``(batch, S, vocab)`` and one batched matrix product (:func:`emission_table`),
not a ``(batch, T, S, vocab)`` tensor.

Variants (``variant``; each with the objective and guide it trains with, :data:`VARIANTS`):

``soft``
    no latent: :math:`y_t \sim \mathrm{softmax}(O(A h_t + B\,\mathbb E_{p(z_t)}[\tilde x_{z_t}]) + c)`
    (deterministic soft attention; Bahdanau et al. 2015, Luong et al. 2015). ``Trace_ELBO`` = the log-likelihood.
``exact``
    the marginal likelihood :math:`\prod_t \sum_i p(z_t = i)\,p(y_t \mid z_t = i)`: ``TraceEnum_ELBO`` with
    parallel enumeration of every :math:`z_t`, empty guide.
``hard``
    :math:`z_t` sampled from the prior (the guide *is* the prior), score-function gradient with a learned
    per-token baseline (``TraceGraph_ELBO``; Xu et al. 2015's hard attention).
``variational``
    an inference network :math:`q(z_t \mid x, y)` that reads the whole target (:mod:`ppl_models.guides.alignment`), ELBO
    with REINFORCE (``TraceGraph_ELBO``) and a learned per-token baseline.
``variational-enum``
    the same :math:`q`, the expectation over each :math:`z_t` computed exactly (``TraceEnum_ELBO`` enumerating
    the guide's :math:`z`): :math:`\sum_i q(z_t = i)[\log p(y_t \mid z_t = i) + \log p(z_t = i) - \log q(z_t = i)]`.

Ragged batches: a plate over sentences (``dim=-2``) and a vectorized plate over target steps (``dim=-1``);
padded target steps are masked out (``poutine.mask``); padded source positions get prior logit
:data:`MASKED_LOGIT` (probability exactly 0), and the encoder runs on packed sequences, so padding never changes
a sentence's likelihood.  Every variant defines :math:`p(y \mid x)` exactly (:func:`log_marginal`): soft by its
own softmax, the latent variants by the sum over alignments.

References:
    Deng, Kim, Chiu, Guo & Rush (2018), Latent Alignment and Variational Attention. NeurIPS.
    Bahdanau, Cho & Bengio (2015), Neural Machine Translation by Jointly Learning to Align and Translate.
    Xu et al. (2015), Show, Attend and Tell (hard attention with REINFORCE).
    Mnih & Gregor (2014), Neural Variational Inference and Learning in Belief Networks (learned baselines).
    Pyro tutorials: "Inference with Discrete Latent Variables" (TraceEnum_ELBO), "SVI Part III" (TraceGraph_ELBO).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.ops.indexing import Vindex
from torch import nn
from torch.distributions import constraints
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor

__all__ = [
    "VARIANTS",
    "MASKED_LOGIT",
    "AlignmentNet",
    "AlignedCategorical",
    "TokenCategorical",
    "States",
    "emission_table",
    "log_marginal",
    "model",
    "build",
    "make_spec",
    "sentence_plate",
    "check_batch",
]

#: variant -> (the ELBO it trains with, its guide in :mod:`ppl_models.guides.alignment`)
VARIANTS: Dict[str, Tuple[str, str]] = {
    "soft": ("Trace_ELBO", "none"),
    "exact": ("TraceEnum_ELBO", "none"),
    "hard": ("TraceGraph_ELBO", "prior"),
    "variational": ("TraceGraph_ELBO", "inference-network"),
    "variational-enum": ("TraceEnum_ELBO", "inference-network"),
}
#: prior logit of a padded source position: exp(-1e4) is exactly 0 in float32 and float64, and stays finite
#: (a q log q term at a padded position is 0 * finite = 0, never NaN).
MASKED_LOGIT = -1.0e4


@dataclass
class States:
    """Deterministic quantities of one batch.

    ``memory`` ``(B, S, 2H)``, ``hidden`` ``(B, T, H)``, ``src_mask`` ``(B, S)`` and ``tgt_mask`` ``(B, T)`` (bool,
    real positions), ``prior_logits`` ``(B, T, S)`` (log p(z_t | x, y_<t), normalized, padded positions at
    :data:`MASKED_LOGIT`).
    """

    memory: torch.Tensor
    hidden: torch.Tensor
    src_mask: torch.Tensor
    tgt_mask: torch.Tensor
    prior_logits: torch.Tensor


class AlignmentNet(nn.Module):
    """Encoder, decoder, alignment score and output layer of the generative story (steps 1-4).

    :param src_vocab_size: source vocabulary size (``<pad>`` = 0).
    :param tgt_vocab_size: target vocabulary size (``<pad>`` = 0, ``<bos>``/``<eos>`` as in
        :mod:`ppl_models.data.text`).
    :param emb_dim: word embedding size.
    :param hidden_dim: GRU size :math:`H` (the encoder is bidirectional: memory size :math:`2H`).
    :param variant: one of :data:`VARIANTS`.
    :param bos_index: index of ``<bos>`` in the target vocabulary.
    :param dropout: dropout on embeddings and RNN outputs while training.
    :param out_dim: dimension of the output embedding :math:`O` (``0``: ``hidden_dim``).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, emb_dim: int = 64, hidden_dim: int = 128,
                 variant: str = "exact", bos_index: int = 2, dropout: float = 0.0, out_dim: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"alignment model: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        for name, size in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
            if not isinstance(size, int) or size < 5:
                raise ValueError(f"alignment model: {name} must be an integer >= 5 (4 specials + a word), "
                                 f"received {size!r}")
        self.variant, self.bos_index = variant, bos_index
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.hidden_dim, self.memory_dim = hidden_dim, 2 * hidden_dim
        self.src_embed = nn.Embedding(src_vocab_size, emb_dim, padding_idx=0)
        self.encoder = nn.GRU(emb_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, emb_dim, padding_idx=0)
        self.decoder = nn.GRU(emb_dim, hidden_dim, batch_first=True)
        self.score = nn.Linear(hidden_dim, self.memory_dim, bias=False)  # W of h_t^T W x_i
        out_dim = out_dim or hidden_dim
        self.out_hidden = nn.Linear(hidden_dim, out_dim, bias=False)  # A h_t
        self.out_memory = nn.Linear(self.memory_dim, out_dim, bias=False)  # B x_i
        self.out = nn.Linear(out_dim, tgt_vocab_size)  # O (.) + c
        self.dropout = nn.Dropout(dropout)
        self._cache: Optional[tuple] = None

    # ------------------------------------------------------------------ steps 1-3
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
        """``src`` ``(B, S)``, ``src_lengths`` ``(B,)`` -> memory ``(B, S, 2H)`` (zeros at padded positions)."""
        emb = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return self.dropout(memory)

    def decode_inputs(self, tgt: torch.Tensor) -> torch.Tensor:
        """``<bos>, y_1 .. y_{T-1}`` of shape ``(B, T)`` from the targets ``tgt`` ``(B, T)``."""
        bos = tgt.new_full((tgt.shape[0], 1), self.bos_index)
        return torch.cat([bos, tgt[:, :-1]], dim=1)

    def decode(self, tgt: torch.Tensor) -> torch.Tensor:
        """Decoder states ``(B, T, H)``; state ``t`` has read ``<bos>, y_1 .. y_{t-1}``."""
        out, _ = self.decoder(self.dropout(self.tgt_embed(self.decode_inputs(tgt))))
        return self.dropout(out)

    def prior_logits(self, hidden: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """``log p(z_t = i | x, y_<t)``, shape ``(B, T, S)``, from ``hidden`` ``(B, T, H)`` and ``memory``
        ``(B, S, 2H)``."""
        scores = torch.bmm(self.score(hidden), memory.transpose(1, 2))
        scores = scores.masked_fill(~src_mask[:, None, :], MASKED_LOGIT)
        return scores.log_softmax(-1)

    def states(self, src, src_lengths, tgt, tgt_lengths, *, keep: bool = False) -> States:
        """Steps 1-3 for a batch.  ``keep=True`` (a guide) leaves the result for the model's next call on the same
        tensors and parameters, so guide and model of one ELBO evaluation share one forward pass."""
        # The cache holds the tensors themselves (compared by identity, so no id is reused while it lives) and
        # the parameters' versions (an optimizer step in between invalidates it); any call consumes it.
        key = (src, src_lengths, tgt, tgt_lengths)
        stamp = (torch.is_grad_enabled(), self.training, tuple(p._version for p in self.parameters()))
        cached, self._cache = self._cache, None
        if cached is not None and all(u is v for u, v in zip(cached[0], key)) and cached[1] == stamp:
            return cached[2]
        src_mask = torch.arange(src.shape[1]) < src_lengths[:, None]
        tgt_mask = torch.arange(tgt.shape[1]) < tgt_lengths[:, None]
        memory = self.encode(src, src_lengths)
        hidden = self.decode(tgt)
        states = States(memory, hidden, src_mask, tgt_mask, self.prior_logits(hidden, memory, src_mask))
        if keep:
            self._cache = (key, stamp, states)
        return states

    # ------------------------------------------------------------------ step 4
    def emission_table(self, states: States, value: torch.Tensor) -> torch.Tensor:
        """``log p(y_t = value_t | z_t = i)`` ``(B, T, S)`` for targets ``value`` ``(B, T)``
        (:func:`emission_table`)."""
        return emission_table(self.out_hidden(states.hidden), self.out_memory(states.memory), self.out, value)

    def logits_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``O A h + c``: ``(..., H)`` -> ``(..., V)``."""
        return self.out(self.out_hidden(hidden))

    def logits_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """``O B x``: ``(..., 2H)`` -> ``(..., V)``."""
        return nn.functional.linear(self.out_memory(memory), self.out.weight)

    def soft_logits(self, states: States) -> torch.Tensor:
        """The soft variant's logits ``(B, T, V)``: ``O(A h_t + B E_p[x_z]) + c``."""
        context = torch.bmm(states.prior_logits.exp(), states.memory)
        return self.out(self.out_hidden(states.hidden) + self.out_memory(context))


def emission_table(hidden_proj: torch.Tensor, memory_proj: torch.Tensor, out: nn.Linear,
                   value: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p(y_t = \text{value}_t \mid z_t = i)` for every source position, shape ``(B, T, S)``.

    :param hidden_proj: ``(B, T, D)`` the decoder part :math:`u_t = A h_t`.
    :param memory_proj: ``(B, S, D)`` the source part :math:`v_i = B \tilde x_i`.
    :param out: the output layer :math:`O(\cdot) + c`, ``nn.Linear(D, V)``.
    :param value: ``(B, T)`` target indices.

    The observed tokens' logits :math:`o_{y_t}^\top (u_t + v_i) + c_{y_t}` are products in the ``D``-dimensional
    space; the normalizer :math:`\log \sum_v \exp(a_{tv} + b_{iv})` (:func:`log_normalizer`) needs the full
    :math:`a = O u + c` ``(B, T, V)`` and :math:`b = O v` ``(B, S, V)``.
    """
    weight, bias = out.weight, out.bias
    gold_rows = weight[value]  # (B, T, D)
    gold_hidden = (gold_rows * hidden_proj).sum(-1) + bias[value]  # (B, T)
    gold_memory = torch.bmm(gold_rows, memory_proj.transpose(1, 2))  # (B, T, S)
    a = nn.functional.linear(hidden_proj, weight, bias)
    b = nn.functional.linear(memory_proj, weight)
    return gold_hidden[..., None] + gold_memory - log_normalizer(a, b)


def log_normalizer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log sum_v exp(a[:, t, v] + b[:, i, v])`` of shape ``(B, T, S)`` for ``a`` ``(B, T, V)`` and
    ``b`` ``(B, S, V)``: ``log(exp(a - max a) @ exp(b - max b)^T) + max a + max b`` (:class:`_LogNormalizer`)."""
    return _LogNormalizer.apply(a, b)


class _LogNormalizer(torch.autograd.Function):
    r""":func:`log_normalizer` with a fused backward.

    Forward: :math:`E_a = e^{a - \max a}`, :math:`E_b = e^{b - \max b}`, :math:`Z = E_a E_b^\top`; a batch whose
    ``Z`` underflows somewhere in the input's dtype is recomputed in float64, and by a direct log-sum-exp if even
    that underflows.  Backward, with :math:`W = G / Z` for the incoming gradient :math:`G`:
    :math:`\partial a = E_a \odot (W E_b)` and :math:`\partial b = E_b \odot (W^\top E_a)` (softmax weights of each
    ``(t, i)`` pair, never materialized as a ``(B, T, S, V)`` tensor).
    """

    @staticmethod
    def forward(ctx, a, b):
        a_max = a.amax(-1, keepdim=True)
        b_max = b.amax(-1, keepdim=True)
        for dtype in (a.dtype, torch.float64):
            exp_a = torch.sub(a, a_max).to(dtype).exp_()
            exp_b = torch.sub(b, b_max).to(dtype).exp_()
            total = torch.bmm(exp_a, exp_b.transpose(1, 2))
            if bool((total > 0).all()):
                ctx.save_for_backward(exp_a, exp_b, total)
                ctx.dtype = a.dtype
                return (total.log() + a_max + b_max.transpose(1, 2)).to(a.dtype)
        ctx.save_for_backward(a, b, None)
        ctx.dtype = None
        return torch.logsumexp(a[:, :, None, :] + b[:, None, :, :], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.dtype is None:  # the direct log-sum-exp: its softmax weights
            a, b, _ = ctx.saved_tensors
            weights = torch.softmax(a[:, :, None, :] + b[:, None, :, :], dim=-1) * grad[..., None]
            return weights.sum(2), weights.sum(1)
        exp_a, exp_b, total = ctx.saved_tensors
        scaled = grad.to(total.dtype) / total  # (B, T, S)
        grad_a = torch.bmm(scaled, exp_b).mul_(exp_a)
        grad_b = torch.bmm(scaled.transpose(1, 2), exp_a).mul_(exp_b)
        return grad_a.to(ctx.dtype), grad_b.to(ctx.dtype)


class TokenCategorical(TorchDistribution):
    """``Categorical(logits=logits)`` over a large vocabulary whose ``log_prob`` is one fused log-softmax and gather
    (``cross_entropy``), without normalizing the whole ``(..., V)`` logits at construction as torch's does.

    :param logits: unnormalized logits, ``batch_shape + (V,)``.
    """

    arg_constraints: dict = {}

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def expand(self, batch_shape, _instance=None):
        return TokenCategorical(self.logits.expand(*batch_shape, self.logits.shape[-1]))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.shape != logits.shape[:-1]:
            shape = torch.broadcast_shapes(value.shape, logits.shape[:-1])
            logits, value = logits.expand(*shape, logits.shape[-1]), value.expand(shape)
        flat = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), value.reshape(-1), reduction="none")
        return -flat.reshape(value.shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return dist.Categorical(logits=self.logits).sample(sample_shape)


class AlignedCategorical(TorchDistribution):
    r""":math:`y_t \sim \mathrm{Categorical}(\mathrm{softmax}(O(u_t + v_{z_t}) + c))` for alignments ``z``.

    :param hidden_proj: ``(B, T, D)`` the decoder part :math:`u_t = A h_t`.
    :param memory_proj: ``(B, S, D)`` the source part :math:`v_i = B \tilde x_i`.
    :param out: the output layer :math:`O(\cdot) + c` (``nn.Linear(D, V)``).
    :param z: alignments, ``(B, T)`` when sampled, or any shape broadcasting with ``(B, T)`` (e.g. ``(S, 1, 1)``
        when enumerated); batch shape is their broadcast.

    ``log_prob`` of one alignment per step is one output layer and log-softmax of ``(B, T, V)`` logits, as for soft
    attention; for enumerated ``z`` it indexes :func:`emission_table` (never a ``(S, B, T, V)`` tensor).
    """

    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(self, hidden_proj: torch.Tensor, memory_proj: torch.Tensor, out: nn.Linear, z: torch.Tensor,
                 validate_args=None):
        self.hidden_proj, self.memory_proj, self.out, self.z = hidden_proj, memory_proj, out, z
        batch_shape = torch.broadcast_shapes(z.shape, hidden_proj.shape[:-1])
        super().__init__(batch_shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.out.out_features - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AlignedCategorical, _instance)
        new.hidden_proj, new.memory_proj, new.out = self.hidden_proj, self.memory_proj, self.out
        new.z = self.z.expand(batch_shape)
        super(AlignedCategorical, new).__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)
        return new

    def _indices(self):
        batch, steps = self.hidden_proj.shape[:2]
        return torch.arange(batch)[:, None], torch.arange(steps)

    def logits(self) -> torch.Tensor:
        """Logits ``batch_shape + (V,)`` (materialized: for sampling and tests)."""
        rows, _ = self._indices()
        return self.out(self.hidden_proj + Vindex(self.memory_proj)[rows, self.z, :])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        rows, steps = self._indices()
        if self.z.shape == self.hidden_proj.shape[:-1] and value.shape == self.z.shape:
            return TokenCategorical(self.out(self.hidden_proj + self.memory_proj[rows, self.z])).log_prob(value)
        return Vindex(emission_table(self.hidden_proj, self.memory_proj, self.out, value))[rows, steps, self.z]

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return dist.Categorical(logits=self.logits()).sample(sample_shape)


def make_spec() -> ModelSpec:
    return ModelSpec(
        name="alignment",
        observed=ObservedSite("y", (), constraints.nonnegative_integer),
        data_plate="sentences",
        local_latents=(LatentSite("z", (), constraints.nonnegative_integer),),
    )


def sentence_plate(batch: int, idx: torch.Tensor | None, num_data: int | None):
    """The plate over sentence pairs (``dim=-2``; the target steps' plate is ``dim=-1``); with ``idx`` the batch is
    a subsample of ``num_data`` pairs and log-densities are scaled by ``num_data / batch``."""
    if idx is None:
        if num_data is not None and num_data != batch:
            raise ValueError(f"plate 'sentences': num_data={num_data} differs from the batch size {batch}, "
                             "so the batch's indices idx are required")
        return pyro.plate("sentences", batch, dim=-2)
    check_tensor("idx", idx, event_shape=(), dtype_kind="int")
    if idx.shape[0] != batch:
        raise ValueError(f"plate 'sentences': idx has {idx.shape[0]} entries but the batch has {batch} sentences")
    return pyro.plate("sentences", batch if num_data is None else num_data, subsample=idx, dim=-2)


def check_batch(net: AlignmentNet, src, src_lengths, tgt, tgt_lengths) -> None:
    """One :class:`~ppl_models.spec.ShapeError` naming the argument if a batch does not fit the model."""
    for name, tokens in (("src", src), ("tgt", tgt)):
        if not torch.is_tensor(tokens) or tokens.dim() != 2:
            got = f"shape {tuple(tokens.shape)}" if torch.is_tensor(tokens) else type(tokens).__name__
            raise ShapeError(f"site {name!r}: expected a tensor of token indices of shape (batch, length), "
                             f"received {got}")
        check_tensor(name, tokens, event_shape=(tokens.shape[1],), dtype_kind="int")
    batch = src.shape[0]
    for name, lengths, tokens in (("src_lengths", src_lengths, src), ("tgt_lengths", tgt_lengths, tgt)):
        check_tensor(name, lengths, event_shape=(), dtype_kind="int")
        if lengths.shape[0] != batch or tokens.shape[0] != batch:
            raise ShapeError(f"site {name!r}: expected {batch} entries (the batch size of 'src'), received "
                             f"{lengths.shape[0]} lengths for {tokens.shape[0]} sequences")
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]):
            raise ShapeError(f"site {name!r}: expected lengths in [1, {tokens.shape[1]}], received "
                             f"{int(lengths.min())}..{int(lengths.max())}")
    for name, tokens, size in (("src", src, net.src_vocab_size), ("tgt", tgt, net.tgt_vocab_size)):
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= size):
            raise ShapeError(f"site {name!r}: expected token indices in [0, {size - 1}] (the vocabulary), received "
                             f"{int(tokens.min())}..{int(tokens.max())}")


def model(src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, tgt_lengths: torch.Tensor,
          idx: torch.Tensor | None = None, *, net: AlignmentNet, num_data: int | None = None):
    """The generative story above, for one batch of sentence pairs.

    :param src: source token indices, shape ``(batch, S)``, padded with 0.
    :param src_lengths: source lengths, shape ``(batch,)``.
    :param tgt: target token indices ending in ``<eos>``, shape ``(batch, T)``, padded with 0.
    :param tgt_lengths: target lengths (with ``<eos>``), shape ``(batch,)``.
    :param idx: indices of the batch in the data set, shape ``(batch,)`` (``None``: the whole data set).
    :param net: the :class:`AlignmentNet`, registered as ``"net"``.
    :param num_data: number of sentence pairs :math:`N` in the data set (the plate's N/batch scale).
    """
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    states = net.states(src, src_lengths, tgt, tgt_lengths)
    batch, steps = tgt.shape
    with sentence_plate(batch, idx, num_data), pyro.plate("steps", steps, dim=-1), poutine.mask(mask=states.tgt_mask):
        if net.variant == "soft":
            pyro.sample("y", TokenCategorical(net.soft_logits(states)), obs=tgt)
            return
        infer = {"enumerate": "parallel"} if net.variant == "exact" else {}
        z = pyro.sample("z", dist.Categorical(logits=states.prior_logits), infer=infer)
        pyro.sample("y", AlignedCategorical(net.out_hidden(states.hidden), net.out_memory(states.memory), net.out, z),
                    obs=tgt)


def log_marginal(net: AlignmentNet, src, src_lengths, tgt, tgt_lengths) -> Dict[str, torch.Tensor]:
    r"""Exact per-step quantities of a batch (no sampling), each ``(B, T)`` unless stated, zero at padded steps.

    * ``log_lik`` — :math:`\log p(y_t \mid x, y_{<t})`: the soft model's softmax, or
      :math:`\log \sum_i p(z_t = i)\, p(y_t \mid z_t = i)` for the latent variants;
    * ``log_prior`` ``(B, T, S)`` — :math:`\log p(z_t \mid x, y_{<t})`;
    * ``log_emission`` ``(B, T, S)`` — :math:`\log p(y_t \mid x_{z_t}, h_t)` for every position (also for soft:
      what the same networks give as a latent-alignment model);
    * ``log_posterior`` ``(B, T, S)`` — :math:`\log p(z_t \mid x, y)` (prior times emission, normalized);
    * ``mask`` — real target steps.
    """
    states = net.states(src, src_lengths, tgt, tgt_lengths)
    log_emission = net.emission_table(states, tgt)
    joint = states.prior_logits + log_emission
    marginal = joint.logsumexp(-1)
    if net.variant == "soft":
        log_lik = net.soft_logits(states).log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
    else:
        log_lik = marginal
    mask = states.tgt_mask
    return {
        "log_lik": log_lik.masked_fill(~mask, 0.0),
        "log_prior": states.prior_logits,
        "log_emission": log_emission,
        "log_posterior": joint - marginal[..., None],
        "mask": mask,
        "src_mask": states.src_mask,
        "states": states,
    }


def build(src_vocab_size: int = 0, tgt_vocab_size: int = 0, variant: str = "exact", emb_dim: int = 64,
          hidden_dim: int = 128, out_dim: int = 0, dropout: float = 0.0, bos_index: int = 2) -> ModelParts:
    """The declared structure and the network ``net`` (vocabulary sizes come from the data set)."""
    return ModelParts(make_spec(), {"net": AlignmentNet(src_vocab_size, tgt_vocab_size, emb_dim, hidden_dim, variant,
                                                        bos_index, dropout, out_dim)})


register_model("alignment", model=model, build=build)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, decoding, alignment output
# ---------------------------------------------------------------------------------------------------------------
#: Which alignment distribution :func:`alignment_argmax` reads: ``auto`` is the exact posterior p(z_t | x, y) for the
#: latent variants and the attention weights p(z_t | x, y_<t) for ``soft`` (which has no latent alignment).
ALIGN_SOURCES = ("auto", "posterior", "prior", "guide")


def _eval_batches(dataset, batch_size: int):
    """Index batches of similar lengths, in a fixed order (evaluation needs no shuffling)."""
    order = sorted(range(dataset.num_data), key=lambda i: (len(dataset.src[i]), len(dataset.tgt[i])))
    for start in range(0, len(order), batch_size):
        yield torch.tensor(order[start : start + batch_size])


def _guide_q_logits(guide_modules: dict, states: States, tgt, tgt_lengths):
    inference = guide_modules.get("inference") if guide_modules else None
    if inference is None:
        return None
    return inference(states.memory, states.src_mask, tgt, tgt_lengths)[0]


@dataclass
class AlignmentEval:
    """Evaluation of a latent-alignment model on one split (see :func:`evaluate_alignment`)."""

    metrics: dict

    def to_metrics(self) -> dict:
        return dict(self.metrics)

    def save(self, run_dir) -> None:
        import json
        from pathlib import Path

        from ppl_models.atomic import atomic_write_bytes

        text = json.dumps(self.metrics, indent=1).encode()
        atomic_write_bytes(Path(run_dir) / "metrics.json", lambda f: f.write(text))


@torch.no_grad()
def evaluate_alignment(net: AlignmentNet, dataset, *, guide_modules: Optional[dict] = None, batch_size: int = 64,
                       split: str = "test") -> AlignmentEval:
    r"""Exact evaluation on a :class:`~ppl_models.data.parallel.ParallelText` (no sampling anywhere).

    * ``nll_per_token`` and ``perplexity`` :math:`= \exp(-\sum \log p(y \mid x) / \#\text{tokens})`, tokens
      including one ``<eos>`` per sentence, with the exact :math:`p(y \mid x)` of the variant (:func:`log_marginal`);
    * ``elbo_per_token`` — the variant's own training objective computed exactly: soft and exact: the
      log-likelihood; hard: :math:`\sum_t \mathbb E_{p(z_t)}[\log p(y_t \mid z_t)]`; variational*:
      :math:`\sum_t \mathbb E_{q}[\log p(y_t, z_t) - \log q(z_t)]`;
    * with gold alignments (``dataset.alignments``): ``align_accuracy_posterior`` (argmax of
      :math:`p(z_t \mid x, y)`), ``align_accuracy_prior`` (argmax of :math:`p(z_t \mid x, y_{<t})`) and, with an
      inference network, ``align_accuracy_guide`` (argmax of :math:`q`), over target tokens (``<eos>`` excluded).
    """
    was_training = net.training
    net.eval()
    if guide_modules:
        for m in guide_modules.values():
            m.eval()
    start = time.perf_counter()
    total_ll, total_elbo, tokens = 0.0, 0.0, 0
    ll_sent = []
    correct = {"posterior": 0, "prior": 0, "guide": 0}
    gold_total = 0
    for idx in _eval_batches(dataset, batch_size):
        src, src_lengths, tgt, tgt_lengths = dataset.batch(idx)
        out = log_marginal(net, src, src_lengths, tgt, tgt_lengths)
        mask = out["mask"]
        ll = out["log_lik"].sum(-1)
        ll_sent += ll.tolist()
        total_ll += float(ll.sum())
        tokens += int(mask.sum())
        q_logits = _guide_q_logits(guide_modules, out["states"], tgt, tgt_lengths)
        prior, emission = out["log_prior"], out["log_emission"]
        if net.variant in ("soft", "exact"):
            elbo = out["log_lik"]
        elif net.variant == "hard":
            elbo = (prior.exp() * emission).sum(-1)
        elif q_logits is not None:
            elbo = (q_logits.exp() * (prior + emission - q_logits)).sum(-1)
        else:
            elbo = torch.full_like(out["log_lik"], float("nan"))
        total_elbo += float(elbo.masked_fill(~mask, 0.0).sum())
        if getattr(dataset, "alignments", None) is not None:
            guesses = {"posterior": out["log_posterior"].argmax(-1), "prior": prior.argmax(-1)}
            if q_logits is not None:
                guesses["guide"] = q_logits.argmax(-1)
            for row, i in enumerate(idx.tolist()):
                for src_pos, tgt_pos in dataset.alignments[i]:
                    gold_total += 1
                    for name, guess in guesses.items():
                        correct[name] += int(guess[row, tgt_pos]) == src_pos
    net.train(was_training)
    nll = -total_ll / tokens
    metrics = {
        "model": "alignment",
        "variant": net.variant,
        "split": split,
        "num_data": dataset.num_data,
        "num_tokens": tokens,
        "nll_per_token": nll,
        "perplexity": math.exp(nll),
        "nll_per_sentence": -total_ll / dataset.num_data,
        "elbo_per_token": total_elbo / tokens,
        "likelihood": "exact: soft's own softmax" if net.variant == "soft" else "exact: sum over alignments",
        "wall_time_s": time.perf_counter() - start,
    }
    if gold_total:
        for name, count in correct.items():
            if name != "guide" or _has_inference(guide_modules):
                metrics[f"align_accuracy_{name}"] = count / gold_total
    return AlignmentEval(metrics)


def _has_inference(guide_modules) -> bool:
    return bool(guide_modules) and guide_modules.get("inference") is not None


@torch.no_grad()
def alignment_argmax(net: AlignmentNet, src, src_lengths, tgt, tgt_lengths, *, source: str = "auto",
                     guide_modules: Optional[dict] = None) -> torch.Tensor:
    """The most probable source position for each target step, ``(B, T)`` (see :data:`ALIGN_SOURCES`)."""
    if source not in ALIGN_SOURCES:
        raise ValueError(f"alignment source: expected one of {ALIGN_SOURCES}, received {source!r}")
    out = log_marginal(net, src, src_lengths, tgt, tgt_lengths)
    if source == "auto":
        source = "prior" if net.variant == "soft" else "posterior"
    if source == "guide":
        q_logits = _guide_q_logits(guide_modules, out["states"], tgt, tgt_lengths)
        if q_logits is None:
            raise ValueError(f"alignment source 'guide': variant {net.variant!r} has no inference network q(z | x, y)")
        return q_logits.argmax(-1)
    return out[f"log_{source}"].argmax(-1)


def pharaoh_lines(net: AlignmentNet, dataset, *, source: str = "auto", guide_modules: Optional[dict] = None,
                  batch_size: int = 64):
    """One Pharaoh line per sentence pair, in file order: ``i-j`` pairs (0-based source position ``i`` aligned to
    target token ``j``), one per target token (``<eos>`` excluded), space-separated."""
    was_training = net.training
    net.eval()
    lines = [""] * dataset.num_data
    for idx in _eval_batches(dataset, batch_size):
        batch = dataset.batch(idx)
        best = alignment_argmax(net, *batch, source=source, guide_modules=guide_modules)
        for row, i in enumerate(idx.tolist()):
            n = len(dataset.tgt[i]) - 1
            lines[i] = " ".join(f"{int(best[row, j])}-{j}" for j in range(n))
    net.train(was_training)
    return lines


# ----------------------------------------------------------------------------------------------------- decoding
def _step_log_probs(net: AlignmentNet, memory, src_mask, hidden):
    """``log p(y_t | x, y_<t)`` ``(N, V)`` and the attention ``(N, S)`` for decoder outputs ``hidden`` ``(N, H)``."""
    prior = net.prior_logits(hidden[:, None, :], memory, src_mask)[:, 0]  # (N, S)
    if net.variant == "soft":
        context = torch.bmm(prior.exp()[:, None, :], memory)[:, 0]
        return net.out(net.out_hidden(hidden) + net.out_memory(context)).log_softmax(-1), prior
    a = net.logits_hidden(hidden)[:, None, :]  # (N, 1, V)
    b = net.logits_memory(memory)  # (N, S, V)
    return (prior[..., None] + (a + b).log_softmax(-1)).logsumexp(1), prior


@torch.no_grad()
def greedy_decode(net: AlignmentNet, src, src_lengths, max_len: int = 60, eos_index: int = 3):
    """Greedy translations: a list of index lists (``<eos>`` removed), one per source sentence; at most
    ``min(max_len, 2 S + 10)`` tokens for the batch's longest source length ``S``."""
    net.eval()
    max_len = min(max_len, 2 * int(src_lengths.max()) + 10)
    memory = net.encode(src, src_lengths)
    src_mask = torch.arange(src.shape[1]) < src_lengths[:, None]
    batch = src.shape[0]
    token = torch.full((batch,), net.bos_index, dtype=torch.long)
    state = None
    out = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_len):
        hidden, state = net.decoder(net.tgt_embed(token)[:, None, :], state)
        log_probs, _ = _step_log_probs(net, memory, src_mask, hidden[:, 0])
        token = log_probs.argmax(-1)
        for i in range(batch):
            if not done[i]:
                if int(token[i]) == eos_index:
                    done[i] = True
                else:
                    out[i].append(int(token[i]))
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def beam_decode(net: AlignmentNet, src, src_length: int, beam_size: int = 5, max_len: int = 60, eos_index: int = 3):
    """Beam search for one source sentence ``src`` ``(S,)``: the finished hypothesis of highest log-probability
    (``<eos>`` removed), at most ``min(max_len, 2 S + 10)`` tokens.  Search stops when no live hypothesis scores above
    the best finished one (scores only fall)."""
    net.eval()
    max_len = min(max_len, 2 * src_length + 10)
    src = src[None, :src_length]
    memory = net.encode(src, torch.tensor([src_length]))
    src_mask = torch.ones(1, src_length, dtype=torch.bool)
    beams = [([], 0.0, None, net.bos_index)]  # (tokens, score, decoder state, last token)
    best = None  # (tokens, score) of the best finished hypothesis
    for _ in range(max_len):
        tokens = torch.tensor([b[3] for b in beams])
        states = None if beams[0][2] is None else torch.cat([b[2] for b in beams], dim=1)
        hidden, new_state = net.decoder(net.tgt_embed(tokens)[:, None, :], states)
        k = len(beams)
        log_probs, _ = _step_log_probs(net, memory.expand(k, -1, -1), src_mask.expand(k, -1), hidden[:, 0])
        scores = torch.tensor([b[1] for b in beams])[:, None] + log_probs
        top, flat = scores.flatten().topk(min(beam_size + 1, scores.numel()))
        candidates = []
        for score, f in zip(top.tolist(), flat.tolist()):
            b, v = divmod(f, log_probs.shape[1])
            if v == eos_index:
                if best is None or score > best[1]:
                    best = (beams[b][0], score)
            elif len(candidates) < beam_size:
                candidates.append((beams[b][0] + [v], score, new_state[:, b : b + 1], v))
        if not candidates or (best is not None and candidates[0][1] <= best[1]):
            break
        beams = candidates
    if best is None:
        best = max(((b[0], b[1]) for b in beams), key=lambda h: h[1])
    return best[0]


def corpus_bleu(hypotheses, references, max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in percent, one reference per sentence, no smoothing, on token lists."""
    from collections import Counter

    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = min(0.0, 1.0 - ref_len / hyp_len)
    return 100.0 * math.exp(log_precision + brevity)


# ----------------------------------------------------------------------------------------------------- heatmaps
@torch.no_grad()
def plot_alignments(net: AlignmentNet, dataset, path, *, guide_modules: Optional[dict] = None, rows=(0, 1, 2),
                    title: str = ""):
    """PNG: for each sentence pair in ``rows``, the prior p(z_t | x, y_<t), the posterior p(z_t | x, y) and, with an
    inference network, q(z_t | x, y), side by side (target steps down, source positions across; grey scale from 0 to
    each panel's largest probability)."""
    from ppl_models.tasks.plots import plt, save_figure

    rows = [r for r in rows if r < dataset.num_data]
    idx = torch.tensor(rows)
    src, src_lengths, tgt, tgt_lengths = dataset.batch(idx)
    net.eval()
    out = log_marginal(net, src, src_lengths, tgt, tgt_lengths)
    panels = [("prior p(z | x, y<t)", out["log_prior"]), ("posterior p(z | x, y)", out["log_posterior"])]
    q_logits = _guide_q_logits(guide_modules, out["states"], tgt, tgt_lengths)
    if q_logits is not None:
        panels.append(("inference network q(z | x, y)", q_logits))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.6 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        s_tok = dataset.src_vocab.decode(dataset.src[i], strip_specials=False)
        t_tok = dataset.tgt_vocab.decode(dataset.tgt[i], strip_specials=False)
        for c, (name, logits) in enumerate(panels):
            ax = axes[r][c]
            probs = logits[r, : len(t_tok), : len(s_tok)].exp().numpy()
            image = ax.imshow(probs, vmin=0, vmax=max(float(probs.max()), 1e-12), cmap="Greys", aspect="auto")
            ax.set_xticks(range(len(s_tok)), s_tok, rotation=90, fontsize=7)
            ax.set_yticks(range(len(t_tok)), t_tok, fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle(title or f"alignments ({net.variant})")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------- runs
def resolve_config(config):
    """``resolve`` hook: the variant fixes ``[train].elbo`` and the guide (:data:`VARIANTS`).

    Left at their defaults (``Trace_ELBO``, no guide name) they are filled in; set to anything else they are an
    error naming the right ones (``variational-enum`` also accepts the ``exact-posterior`` guide).  ``[guide]``
    ``emb_dim`` and ``hidden_dim`` size the inference network and are dropped for the variants without one, so one
    configuration serves all five.
    """
    import dataclasses

    from ppl_models.app.config import ConfigError

    variant = config.model.hparams.get("variant", "exact")
    if variant not in VARIANTS:
        raise ConfigError(f"[model].variant: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    elbo, guide = VARIANTS[variant]
    guides = (guide, "exact-posterior") if variant == "variational-enum" else (guide,)
    if config.train.elbo not in ("Trace_ELBO", elbo):
        raise ConfigError(f"variant {variant!r} trains with [train].elbo = {elbo!r}, received {config.train.elbo!r}")
    if config.guide.name not in (None, *guides):
        raise ConfigError(f"variant {variant!r} trains with [guide].name = {guide!r}, received {config.guide.name!r}")
    if config.train.strategy is not None:
        raise ConfigError(f"the alignment model takes no [train].strategy, received {config.train.strategy!r}")
    train = dataclasses.replace(config.train, elbo=elbo)
    name = config.guide.name or guide
    hparams = dict(config.guide.hparams)
    if name != "inference-network":  # [guide] emb_dim / hidden_dim size the inference network only
        for key in ("emb_dim", "hidden_dim"):
            hparams.pop(key, None)
    guide_cfg = dataclasses.replace(config.guide, name=name, hparams=hparams)
    return dataclasses.replace(config, train=train, guide=guide_cfg)


def _guide_modules(instance) -> dict:
    return {k: m for k, m in instance.modules.items() if k != "net"}


def evaluate_hook(experiment, instance, dataset, split: str) -> AlignmentEval:
    """``evaluate`` hook: :func:`evaluate_alignment`, plus the heatmap PNG and greedy translations with BLEU."""
    net = instance.modules["net"]
    guide_modules = _guide_modules(instance)
    if hasattr(dataset, "base") and not hasattr(dataset, "src"):  # [data] limit_<split>: the first rows
        dataset = dataset.base.head(dataset.num_data)
    result = evaluate_alignment(net, dataset, guide_modules=guide_modules, split=split,
                                batch_size=experiment.config.evaluate.batch_size)
    run_dir = experiment.run_dir
    if experiment.config.output.plots:
        plot_alignments(net, dataset, run_dir / "alignments.png", guide_modules=guide_modules,
                        title=f"{net.variant}: {split} sentences 0-2")
    result.metrics.update(translate_split(net, dataset, run_dir / "translations.txt"))
    return result


@torch.no_grad()
def translate_split(net: AlignmentNet, dataset, path=None, *, beam_size: int = 5, num_beam: int = 100,
                    batch_size: int = 64) -> dict:
    """Greedy translations of the whole split and beam search on its first ``num_beam`` sentences; corpus BLEU of
    both (against the one reference, on tokens, ``<unk>`` counted as a token); the first 20 written to ``path``."""
    start = time.perf_counter()
    vocab = dataset.tgt_vocab
    greedy = [None] * dataset.num_data
    for idx in _eval_batches(dataset, batch_size):
        src, src_lengths, _, _ = dataset.batch(idx)
        for i, hyp in zip(idx.tolist(), greedy_decode(net, src, src_lengths, eos_index=vocab.eos_index)):
            greedy[i] = hyp
    n_beam = min(num_beam, dataset.num_data)
    beam = [beam_decode(net, torch.tensor(dataset.src[i]), len(dataset.src[i]), beam_size, eos_index=vocab.eos_index)
            for i in range(n_beam)]
    refs = [t[:-1] for t in dataset.tgt]
    out = {
        "bleu_greedy": corpus_bleu(greedy, refs),
        "bleu_beam": corpus_bleu(beam, refs[:n_beam]),
        "bleu_greedy_same_sentences": corpus_bleu(greedy[:n_beam], refs[:n_beam]),
        "beam_size": beam_size,
        "num_beam_sentences": n_beam,
        "decode_wall_time_s": time.perf_counter() - start,
    }
    if path is not None:
        from pathlib import Path

        from ppl_models.atomic import atomic_write_bytes

        lines = []
        for i in range(min(20, n_beam)):
            lines += [f"src:    {' '.join(dataset.src_vocab.decode(dataset.src[i]))}",
                      f"ref:    {' '.join(vocab.decode(dataset.tgt[i]))}",
                      f"greedy: {' '.join(vocab.decode(greedy[i]))}",
                      f"beam{beam_size}:  {' '.join(vocab.decode(beam[i]))}", ""]
        text = "\n".join(lines).encode()
        atomic_write_bytes(Path(path), lambda f: f.write(text))
    return out


def load_trained(run_dir):
    """``(experiment, splits, instance)`` of a run directory, its newest checkpoint loaded."""
    from ppl_models.app.experiment import Experiment, _data_model_kwargs
    from ppl_models.infer.checkpoint import CheckpointError

    experiment = Experiment.from_run_dir(run_dir, {"train.progress": False})
    if experiment.config.model.name != "alignment":
        raise ValueError(f"{run_dir} holds a {experiment.config.model.name!r} run, not an alignment model")
    experiment.resolve_model_hooks()
    splits = experiment.load_data()
    instance = experiment.build(splits["train"].num_data, _data_model_kwargs(splits))
    trainer = experiment.trainer(splits, instance, progress=False)
    if trainer.resume() is None:
        raise CheckpointError(f"{experiment.run_dir / 'checkpoints'} holds no readable checkpoint")
    return experiment, splits, instance


def align_files(run_dir, src_path, tgt_path, out_path=None, *, source: str = "auto", max_len: int = 200) -> list:
    """Pharaoh alignments of the pairs in ``src_path``/``tgt_path`` by the trained run in ``run_dir``
    (:func:`pharaoh_lines`); written atomically to ``out_path`` when given.  Unknown tokens become ``<unk>``;
    an empty line, a line-count mismatch or a sentence over ``max_len`` tokens is an error naming the line."""
    from ppl_models.data.parallel import encode_pairs
    from ppl_models.data.text import read_parallel

    _, splits, instance = load_trained(run_dir)
    train = splits["train"]
    train = getattr(train, "base", train)
    s_tok, t_tok = read_parallel(src_path, tgt_path)
    data = encode_pairs(s_tok, t_tok, train.src_vocab, train.tgt_vocab, max_len=max_len,
                        where=(str(src_path), str(tgt_path)))
    lines = pharaoh_lines(instance.modules["net"], data, source=source, guide_modules=_guide_modules(instance))
    if out_path is not None:
        from pathlib import Path

        from ppl_models.atomic import atomic_write_bytes

        text = "".join(line + "\n" for line in lines).encode()
        atomic_write_bytes(Path(out_path), lambda f: f.write(text))
    return lines


def _register_hooks() -> None:
    from ppl_models.app.experiment import register_model_hooks

    register_model_hooks("alignment", resolve=resolve_config, evaluate=evaluate_hook)


_register_hooks()
