r"""Attention as a latent variable: a latent-alignment sequence-to-sequence model (Deng et al. 2018).

Generative story, for each sentence pair :math:`(x, y)` with source :math:`x = x_0 \dots x_{S-1}` and target
:math:`y = y_1 \dots y_T` (:math:`y_T` = ``<eos>``):

1. source encodings :math:`\tilde x_0 \dots \tilde x_{S-1} = \mathrm{BiGRU}(\mathrm{emb}(x))`
   (``memory``, dimension :math:`2H`);
2. decoder states :math:`h_t = \mathrm{GRU}(h_{t-1}, [\mathrm{emb}(y_{t-1}); c_{t-1}])`, :math:`y_0` = ``<bos>``,
   fed the observed previous token and, with ``input_feed`` (Luong et al. 2015), the previous step's *soft*
   context :math:`c_{t-1} = \mathbb E_{p(z_{t-1})}[\tilde x_{z_{t-1}}]` (:math:`c_0 = 0`; without it the input is
   :math:`\mathrm{emb}(y_{t-1})` alone).  The fed context is deterministic — never a sampled :math:`z` — so the
   alignments below stay conditionally independent given :math:`x, y`, as in Deng et al.'s setup;
3. for each target step :math:`t`, the alignment prior
   :math:`p(z_t = i \mid x, y_{<t}) = \mathrm{softmax}_i(h_t^\top W \tilde x_i)` over the :math:`S` source positions;
   with a jump prior (``jump_width`` :math:`D > 0`), also the previous alignment's position:
   :math:`p(z_t = i \mid x, y_{<t}) \propto \exp(h_t^\top W \tilde x_i)\,\sum_j p(z_{t-1} = j \mid x, y_{\le t-1})\,
   k(i - j)`, a learned jump kernel :math:`k(d) = \mathrm{softmax}(\kappa)_{\min(\max(d, -D), D)}` applied to the
   previous step's *posterior* (:math:`z_0 = -1`, a virtual start).  That posterior is a function of :math:`x` and
   :math:`y_{<t}`, not of a sampled :math:`z`, so the alignments stay conditionally independent given :math:`x, y`:
   without the content term the prior is the one-step predictive of Vogel et al.'s HMM aligner (location-aware
   attention, Chorowski et al. 2015, convolves the previous step's attention weights likewise);
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
    :math:`z_t` sampled from the prior (the guide *is* the prior), score-function gradient
    (``TraceGraph_ELBO``; Xu et al. 2015's hard attention).
``variational``
    an inference network :math:`q(z_t \mid x, y)` that reads the whole target (:mod:`ppl_models.guides.alignment`),
    one :math:`z_t` per step, REINFORCE (``TraceGraph_ELBO``) with :math:`\mathrm{KL}(q(z_t) \| p(z_t))` in closed
    form.
``variational-enum``
    the same :math:`q`, the expectation over each :math:`z_t` computed exactly (``TraceEnum_ELBO`` enumerating
    the guide's :math:`z`): :math:`\sum_i q(z_t = i)[\log p(y_t \mid z_t = i) + \log p(z_t = i) - \log q(z_t = i)]`.

**The score-function baseline of the sampled variants** (``hard``, ``variational``; ``baseline``):

``"soft"`` (Deng et al.'s, the default)
    the reward of token :math:`t` is :math:`\log p(y_t \mid z_t, h_t) - \log p_{\mathrm{soft}}(y_t \mid x, y_{<t})`,
    both detached, where :math:`p_{\mathrm{soft}}` is the soft-attention prediction of the same networks (the
    ``soft`` variant's softmax, sharing the output layer).  The baseline is trained jointly: the model observes
    :math:`y` a second time through it, the factor ``y_soft`` :math:`= \sum_t \log p_{\mathrm{soft}}(y_t)`, so the
    objective is :math:`\mathrm{ELBO} + \log p_{\mathrm{soft}}(y \mid x)` (var-attn's ``xent + KL - reward
    \cdot \log q + xent_baseline``).  The factor does not depend on :math:`z`: it never enters a reward, and
    :math:`p(y \mid x)` (:func:`log_marginal`, the evaluation) is the latent model's alone.
``"learned"``
    a per-token linear baseline of detached features (Mnih & Gregor 2014), trained on the squared error to the
    reward; no ``y_soft`` factor.

Ragged batches: a plate over sentences (``dim=-2``) and a vectorized plate over target steps (``dim=-1``);
padded target steps are masked out (``poutine.mask``); padded source positions get prior logit
:data:`MASKED_LOGIT` (probability exactly 0), and the encoder runs on packed sequences, so padding never changes
a sentence's likelihood.  Every variant defines :math:`p(y \mid x)` exactly (:func:`log_marginal`): soft by its
own softmax, the latent variants by the sum over alignments.

References:
    Deng, Kim, Chiu, Guo & Rush (2018), Latent Alignment and Variational Attention. NeurIPS
    (and its code, harvardnlp/var-attn: ``onmt/Loss.py``, the soft baseline and the analytic KL).
    Bahdanau, Cho & Bengio (2015), Neural Machine Translation by Jointly Learning to Align and Translate.
    Luong, Pham & Manning (2015), Effective Approaches to Attention-based Neural Machine Translation (input feeding).
    Xu et al. (2015), Show, Attend and Tell (hard attention with REINFORCE).
    Mnih & Gregor (2014), Neural Variational Inference and Learning in Belief Networks (learned baselines).
    Vogel, Ney & Tillmann (1996), HMM-Based Word Alignment in Statistical Translation (jumps); Chorowski et al.
    (2015), Attention-Based Models for Speech Recognition (location-aware attention).
    Pyro tutorials: "Inference with Discrete Latent Variables" (TraceEnum_ELBO), "SVI Part III" (TraceGraph_ELBO).
"""

from __future__ import annotations

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

from ppl_models.distributions import TokenCategorical
from ppl_models.registry import ModelParts, register_model
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, ShapeError, check_tensor, data_plate

__all__ = [
    "VARIANTS",
    "SAMPLED_VARIANTS",
    "BASELINES",
    "MASKED_LOGIT",
    "AlignmentNet",
    "AlignedCategorical",
    "States",
    "emission_table",
    "log_marginal",
    "model",
    "build",
    "make_spec",
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
#: the variants that sample z_t and so train with a score-function baseline (``baseline``)
SAMPLED_VARIANTS = ("hard", "variational")
#: the score-function baselines of the sampled variants (module docstring)
BASELINES = ("soft", "learned")
#: prior logit of a padded source position: exp(-1e4) is exactly 0 in float32 and float64, and stays finite
#: (a q log q term at a padded position is 0 * finite = 0, never NaN).
MASKED_LOGIT = -1.0e4


@dataclass
class States:
    r"""Deterministic quantities of one batch.

    ``memory`` ``(B, S, 2H)``, ``hidden`` ``(B, T, H)``, ``src_mask`` ``(B, S)`` and ``tgt_mask`` ``(B, T)`` (bool,
    real positions), ``prior_logits`` ``(B, T, S)`` (log p(z_t | x, y_<t), normalized, padded positions at
    :data:`MASKED_LOGIT`); ``soft_log_lik`` ``(B, T)``: :math:`\log p_{\mathrm{soft}}(y_t)` once
    :meth:`AlignmentNet.soft_log_lik` computed it (shared by a guide and the model of one ELBO evaluation);
    ``log_emission`` ``(B, T, S)``: :meth:`AlignmentNet.emission_table` of the targets ``emission_value``
    ``(B, T)``, kept when the jump prior needed it.
    """

    memory: torch.Tensor
    hidden: torch.Tensor
    src_mask: torch.Tensor
    tgt_mask: torch.Tensor
    prior_logits: torch.Tensor
    soft_log_lik: Optional[torch.Tensor] = None
    log_emission: Optional[torch.Tensor] = None
    emission_value: Optional[torch.Tensor] = None


class AlignmentNet(nn.Module):
    """Encoder, decoder, alignment score and output layer of the generative story (steps 1-4).

    :param src_vocab_size: source vocabulary size (``<pad>`` = 0).
    :param tgt_vocab_size: target vocabulary size (``<pad>`` = 0, ``<bos>``/``<eos>`` as in
        :mod:`ppl_models.encodings`).
    :param emb_dim: word embedding size.
    :param hidden_dim: GRU size :math:`H` (the encoder is bidirectional: memory size :math:`2H`).
    :param variant: one of :data:`VARIANTS`.
    :param bos_index: index of ``<bos>`` in the target vocabulary.
    :param dropout: dropout on embeddings and RNN outputs while training.
    :param out_dim: dimension of the output embedding :math:`O` (``0``: ``hidden_dim``).
    :param input_feed: feed the previous step's soft context to the decoder (step 2).
    :param baseline: the score-function baseline of the sampled variants, one of :data:`BASELINES` (ignored by
        the others).
    :param jump_width: ``D > 0``: the jump prior of step 3 over jumps ``-D .. D`` (longer ones share the end
        values); ``0``: none.  Latent variants without input feeding only.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, emb_dim: int = 64, hidden_dim: int = 128,
                 variant: str = "exact", bos_index: int = 2, dropout: float = 0.0, out_dim: int = 0,
                 input_feed: bool = False, baseline: str = "soft", jump_width: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"alignment model: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        if baseline not in BASELINES:
            raise ValueError(f"alignment model: unknown baseline {baseline!r}; valid baselines: {', '.join(BASELINES)}")
        if not isinstance(input_feed, bool):
            raise ValueError(f"alignment model: input_feed must be true or false, received {input_feed!r}")
        if isinstance(jump_width, bool) or not isinstance(jump_width, int) or jump_width < 0:
            raise ValueError(f"alignment model: jump_width must be an integer >= 0, received {jump_width!r}")
        if jump_width and (variant == "soft" or input_feed):
            raise ValueError(f"alignment model: jump_width > 0 needs a latent variant without input feeding (its "
                             f"prior reads the previous step's posterior), received variant {variant!r} with "
                             f"input_feed = {str(input_feed).lower()}")
        for name, size in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
            if not isinstance(size, int) or size < 5:
                raise ValueError(f"alignment model: {name} must be an integer >= 5 (4 specials + a word), "
                                 f"received {size!r}")
        self.variant, self.bos_index = variant, bos_index
        self.input_feed, self.baseline = input_feed, baseline
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.hidden_dim, self.memory_dim = hidden_dim, 2 * hidden_dim
        self.src_embed = nn.Embedding(src_vocab_size, emb_dim, padding_idx=0)
        self.encoder = nn.GRU(emb_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, emb_dim, padding_idx=0)
        self.decoder = nn.GRU(emb_dim + (self.memory_dim if input_feed else 0), hidden_dim, batch_first=True)
        self.score = nn.Linear(hidden_dim, self.memory_dim, bias=False)  # W of h_t^T W x_i
        out_dim = out_dim or hidden_dim
        self.out_hidden = nn.Linear(hidden_dim, out_dim, bias=False)  # A h_t
        self.out_memory = nn.Linear(self.memory_dim, out_dim, bias=False)  # B x_i
        self.out = nn.Linear(out_dim, tgt_vocab_size)  # O (.) + c
        self.dropout = nn.Dropout(dropout)
        self.jump_width = jump_width
        if jump_width:
            self.jump_logits = nn.Parameter(torch.zeros(2 * jump_width + 1))  # kappa: a uniform kernel to start
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
        """Decoder states ``(B, T, H)`` without input feeding; state ``t`` has read ``<bos>, y_1 .. y_{t-1}``."""
        out, _ = self.decoder(self.dropout(self.tgt_embed(self.decode_inputs(tgt))))
        return self.dropout(out)

    def decode_fed(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor):
        """With input feeding: decoder states ``(B, T, H)`` and prior logits ``(B, T, S)``, one step at a time
        (:meth:`step`); state ``t`` has read ``<bos>, y_1 .. y_{t-1}`` and the soft contexts ``c_0 .. c_{t-1}``."""
        inputs = self.dropout(self.tgt_embed(self.decode_inputs(tgt)))  # (B, T, E)
        context = memory.new_zeros(tgt.shape[0], self.memory_dim)
        state, hidden, priors = None, [], []
        for t in range(tgt.shape[1]):
            h, state, prior, context = self._step(inputs[:, t], state, context, memory, src_mask)
            hidden.append(h)
            priors.append(prior)
        return torch.stack(hidden, 1), torch.stack(priors, 1)

    def _step(self, emb, state, context, memory, src_mask, posterior=None):
        x = torch.cat([emb, context], -1) if self.input_feed else emb
        out, state = self.decoder(x[:, None, :], state)
        h = self.dropout(out[:, 0])
        scores = self.scores(h[:, None, :], memory)[:, 0]
        if self.jump_width:
            scores = scores + self.jump_bias(posterior, self.jump_kernel(memory.shape[1]))
        prior = _normalized(scores, src_mask)
        return h, state, prior, torch.bmm(prior.exp()[:, None, :], memory)[:, 0]

    def step(self, token: torch.Tensor, state, context: Optional[torch.Tensor], memory: torch.Tensor,
             src_mask: torch.Tensor, posterior: Optional[torch.Tensor] = None):
        """One decoder step for decoding: previous tokens ``token`` ``(N,)``, GRU ``state`` (``None`` at the start),
        the previous soft ``context`` ``(N, 2H)`` (``None``: zeros), with a jump prior the previous step's log
        ``posterior`` ``(N, S)`` given its chosen token (``None`` at the start) -> ``(h_t (N, H), state,
        prior logits (N, S), soft context c_t (N, 2H))``."""
        if context is None:
            context = memory.new_zeros(token.shape[0], self.memory_dim)
        return self._step(self.dropout(self.tgt_embed(token)), state, context, memory, src_mask, posterior)

    def scores(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The content scores :math:`h_t^\top W \tilde x_i` ``(B, T, S)`` of ``hidden`` ``(B, T, H)`` and ``memory``
        ``(B, S, 2H)``."""
        return torch.bmm(self.score(hidden), memory.transpose(1, 2))

    def prior_logits(self, hidden: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """``log p(z_t = i | x, y_<t)``, shape ``(B, T, S)``, from ``hidden`` ``(B, T, H)`` and ``memory``
        ``(B, S, 2H)`` (content scores alone: no jump prior)."""
        return _normalized(self.scores(hidden, memory), src_mask[:, None, :])

    def jump_kernel(self, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``log k(i - j)`` for ``length`` = ``S`` source positions: from the virtual start ``j = -1`` ``(S,)``
        and between positions ``(S, S)`` (rows ``j``, columns ``i``)."""
        width = self.jump_width
        log_kernel = self.jump_logits.log_softmax(-1)
        positions = torch.arange(length, device=log_kernel.device)
        jumps = (positions[None, :] - positions[:, None]).clamp(-width, width) + width
        return log_kernel[(positions + 1).clamp(max=width) + width], log_kernel[jumps]

    @staticmethod
    def jump_bias(posterior: Optional[torch.Tensor], kernel: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        r"""The jump prior's log-term :math:`\log \sum_j p(z_{t-1} = j)\,k(i - j)` ``(N, S)`` from the previous
        step's log ``posterior`` ``(N, S)`` (padded positions at :data:`MASKED_LOGIT` or below), or ``(S,)`` from
        the virtual start when ``posterior`` is ``None``; ``kernel``: :meth:`jump_kernel`."""
        return kernel[0] if posterior is None else (posterior[:, :, None] + kernel[1]).logsumexp(1)

    def jump_priors(self, scores: torch.Tensor, log_emission: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Prior logits ``(B, T, S)`` with the jump prior, one step at a time from the content ``scores`` and
        ``log_emission`` ``(B, T, S)`` of the observed targets (each step's posterior feeds the next prior)."""
        kernel = self.jump_kernel(scores.shape[2])  # once per batch
        posterior, priors = None, []
        for t in range(scores.shape[1]):
            prior = _normalized(scores[:, t] + self.jump_bias(posterior, kernel), src_mask)
            priors.append(prior)
            posterior = (prior + log_emission[:, t]).log_softmax(-1)
        return torch.stack(priors, 1)

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
        log_emission = None  # kept for the jump prior's recursion
        if self.input_feed:
            hidden, prior_logits = self.decode_fed(tgt, memory, src_mask)
        elif self.jump_width:
            hidden = self.decode(tgt)
            log_emission = emission_table(self.out_hidden(hidden), self.out_memory(memory), self.out, tgt)
            prior_logits = self.jump_priors(self.scores(hidden, memory), log_emission, src_mask)
        else:
            hidden = self.decode(tgt)
            prior_logits = self.prior_logits(hidden, memory, src_mask)
        states = States(memory, hidden, src_mask, tgt_mask, prior_logits, None, log_emission, tgt)
        if keep:
            self._cache = (key, stamp, states)
        return states

    # ------------------------------------------------------------------ step 4
    def emission_table(self, states: States, value: torch.Tensor) -> torch.Tensor:
        """``log p(y_t = value_t | z_t = i)`` ``(B, T, S)`` for targets ``value`` ``(B, T)``
        (:func:`emission_table`; the one :meth:`states` kept, if any, for the targets it read)."""
        if states.log_emission is not None and value is states.emission_value:
            return states.log_emission
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

    def soft_log_lik(self, states: States, tgt: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_{\mathrm{soft}}(y_t \mid x, y_{<t})` ``(B, T)`` (the soft variant's, or the soft baseline
        of the sampled ones), computed once per :class:`States` (``states.soft_log_lik``)."""
        if states.soft_log_lik is None:
            states.soft_log_lik = TokenCategorical(self.soft_logits(states), validate_args=False).log_prob(tgt)
        return states.soft_log_lik


def _normalized(scores: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
    """Prior logits from alignment ``scores``: padded source positions (``src_mask`` False, broadcast) at
    :data:`MASKED_LOGIT`, then normalized over the last dimension."""
    return scores.masked_fill(~src_mask, MASKED_LOGIT).log_softmax(-1)


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


class AlignedCategorical(TorchDistribution):
    r""":math:`y_t \sim \mathrm{Categorical}(\mathrm{softmax}(O(u_t + v_{z_t}) + c))` for alignments ``z``.

    :param hidden_proj: ``(B, T, D)`` the decoder part :math:`u_t = A h_t`.
    :param memory_proj: ``(B, S, D)`` the source part :math:`v_i = B \tilde x_i`.
    :param out: the output layer :math:`O(\cdot) + c` (``nn.Linear(D, V)``).
    :param z: alignments, ``(B, T)`` when sampled, or any shape broadcasting with ``(B, T)`` (e.g. ``(S, 1, 1)``
        when enumerated); batch shape is their broadcast.
    :param emission: ``(value, table)``: :func:`emission_table` ``(B, T, S)`` already computed for the targets
        ``value`` (the jump prior's), used when ``log_prob`` gets that very tensor.

    ``log_prob`` of one alignment per step is one output layer and log-softmax of ``(B, T, V)`` logits, as for soft
    attention; for enumerated ``z`` it indexes :func:`emission_table` (never a ``(S, B, T, V)`` tensor).
    """

    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(self, hidden_proj: torch.Tensor, memory_proj: torch.Tensor, out: nn.Linear, z: torch.Tensor,
                 validate_args=None, emission: Optional[tuple] = None):
        self.hidden_proj, self.memory_proj, self.out, self.z = hidden_proj, memory_proj, out, z
        self.emission = emission
        batch_shape = torch.broadcast_shapes(z.shape, hidden_proj.shape[:-1])
        super().__init__(batch_shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.out.out_features - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AlignedCategorical, _instance)
        new.hidden_proj, new.memory_proj, new.out = self.hidden_proj, self.memory_proj, self.out
        new.emission = self.emission
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
            logits = self.out(self.hidden_proj + self.memory_proj[rows, self.z])
            return TokenCategorical(logits, validate_args=False).log_prob(value)  # value checked above
        if self.emission is not None and value is self.emission[0]:
            table = self.emission[1]
        else:
            table = emission_table(self.hidden_proj, self.memory_proj, self.out, value)
        return Vindex(table)[rows, steps, self.z]

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
    sentences = data_plate(tgt, idx, num_data, name="sentences", dim=-2)
    with sentences, pyro.plate("steps", steps, dim=-1), poutine.mask(mask=states.tgt_mask):
        if net.variant == "soft":
            # validate_args=False: check_batch checked tgt, and checking the (B, T, V) logits costs about as much
            # as the fused log-softmax itself
            pyro.sample("y", TokenCategorical(net.soft_logits(states), validate_args=False), obs=tgt)
            return
        if net.variant in SAMPLED_VARIANTS and net.baseline == "soft":  # the soft baseline, trained jointly
            pyro.factor("y_soft", net.soft_log_lik(states, tgt))
        infer = {"enumerate": "parallel"} if net.variant == "exact" else {}
        z = pyro.sample("z", dist.Categorical(logits=states.prior_logits), infer=infer)
        emission = None if states.log_emission is None else (states.emission_value, states.log_emission)
        pyro.sample("y", AlignedCategorical(net.out_hidden(states.hidden), net.out_memory(states.memory), net.out, z,
                                            emission=emission), obs=tgt)


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
          hidden_dim: int = 128, out_dim: int = 0, dropout: float = 0.0, bos_index: int = 2, input_feed: bool = False,
          baseline: str = "soft", jump_width: int = 0) -> ModelParts:
    """The declared structure and the network ``net`` (vocabulary sizes come from the data set)."""
    return ModelParts(make_spec(), {"net": AlignmentNet(src_vocab_size, tgt_vocab_size, emb_dim, hidden_dim, variant,
                                                        bos_index, dropout, out_dim, input_feed, baseline,
                                                        jump_width)})


register_model("alignment", model=model, build=build)
