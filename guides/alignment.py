r"""Guides for the latent-alignment model :mod:`ppl_models.alignment`; all share the model's signature.

``none``
    no latent site: the ``soft`` variant has none, and ``exact`` enumerates :math:`z` in the model.
``prior``
    :math:`q(z_t) = p(z_t \mid x, y_{<t})`, the model's own prior (``hard`` attention): the ELBO is
    :math:`\mathbb E_p[\log p(y \mid x, z)]` and ``TraceGraph_ELBO``'s score-function term is REINFORCE with
    reward :math:`\log p(y_t \mid x_{z_t}, h_t)`.
``inference-network``
    :math:`q(z_t = i \mid x, y) = \mathrm{softmax}_i(g_t^\top W_q \tilde x_i)` with
    :math:`g = \mathrm{BiGRU}_q(\mathrm{emb}_q(y))` reading the whole target and :math:`\tilde x` the model's
    source encodings (Deng et al. 2018, Sec. 4).  ``variational``: :math:`z_t` sampled, REINFORCE;
    ``variational-enum``: :math:`z_t` enumerated, the expectation computed exactly.
``exact-posterior``
    :math:`q(z_t \mid x, y) = p(z_t \mid x, y)`, the model's exact posterior (no parameters of its own): with it
    the ELBO equals :math:`\log p(y \mid x)` (a test of the bound; and the best possible ``q``).

Baselines (``prior`` and ``inference-network`` when sampling): a learned per-token baseline
:math:`b_t = w^\top [\text{features}_t] + c` (Mnih & Gregor 2014), trained by ``TraceGraph_ELBO`` on the squared
error to the downstream cost; its inputs are detached.  Features: the decoder state :math:`h_t` and
:math:`\mathrm{emb}(y_t)` (``prior``), the inference network's :math:`g_t` (``inference-network``).  It is
multiplied by the plate's ``num_data / batch`` scale (Pyro's downstream costs are scaled) and by the target mask
(padded steps cost nothing).  Deng et al. use the soft-attention log-likelihood as the baseline instead; a learned
one costs no second output-layer pass.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppl_models.alignment import MASKED_LOGIT, AlignmentNet, check_batch, sentence_plate
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec

__all__ = ["RewardBaseline", "InferenceNetwork", "guide_none", "guide_prior", "guide_inference", "guide_posterior",
           "build_none", "build_prior", "build_inference", "build_posterior"]


class RewardBaseline(nn.Module):
    """Per-token baseline ``(B, T)`` from inputs ``(B, T, features + 1)`` whose last column is ``mask * scale``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs[..., :-1]).squeeze(-1) * inputs[..., -1]


def _baseline_input(features: torch.Tensor, mask: torch.Tensor, batch: int, num_data: int | None) -> torch.Tensor:
    scale = 1.0 if num_data is None else num_data / batch
    return torch.cat([features, (mask.to(features.dtype) * scale)[..., None]], dim=-1)


class InferenceNetwork(nn.Module):
    """``q(z_t | x, y)`` logits ``(B, T, S)`` and features ``g`` ``(B, T, 2 H_q)`` from the target and the model's
    source encodings.

    :param tgt_vocab_size: target vocabulary size.
    :param memory_dim: size of the model's source encodings (``2 H``).
    :param emb_dim: the inference network's target embedding size.
    :param hidden_dim: its bidirectional GRU size :math:`H_q`.
    """

    def __init__(self, tgt_vocab_size: int, memory_dim: int, emb_dim: int = 64, hidden_dim: int = 64):
        super().__init__()
        self.tgt_embed = nn.Embedding(tgt_vocab_size, emb_dim, padding_idx=0)
        self.encoder = nn.GRU(emb_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.query = nn.Linear(2 * hidden_dim, memory_dim, bias=False)

    def forward(self, memory, src_mask, tgt, tgt_lengths):
        packed = pack_padded_sequence(self.tgt_embed(tgt), tgt_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        features, _ = pad_packed_sequence(out, batch_first=True, total_length=tgt.shape[1])
        scores = torch.bmm(self.query(features), memory.transpose(1, 2))
        return scores.masked_fill(~src_mask[:, None, :], MASKED_LOGIT).log_softmax(-1), features


def _plates(tgt, idx, num_data, mask):
    batch, steps = tgt.shape
    return sentence_plate(batch, idx, num_data), pyro.plate("steps", steps, dim=-1), poutine.mask(mask=mask)


def guide_none(src, src_lengths, tgt, tgt_lengths, idx=None, *, num_data=None):
    """No latent site to guide (``soft``; ``exact`` enumerates :math:`z` in the model)."""


def guide_prior(src, src_lengths, tgt, tgt_lengths, idx=None, *, net: AlignmentNet, baseline: RewardBaseline,
                num_data=None):
    r""":math:`z_t \sim p(z_t \mid x, y_{<t})`, the model's prior (hard attention), with a learned baseline.

    Arguments as :func:`ppl_models.alignment.model`; ``baseline`` is registered as ``"baseline"``.
    """
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    pyro.module("baseline", baseline)
    states = net.states(src, src_lengths, tgt, tgt_lengths, keep=True)
    features = torch.cat([states.hidden, net.tgt_embed(tgt)], dim=-1)
    b_input = _baseline_input(features, states.tgt_mask, tgt.shape[0], num_data)
    sentences, steps, mask = _plates(tgt, idx, num_data, states.tgt_mask)
    with sentences, steps, mask:
        pyro.sample("z", dist.Categorical(logits=states.prior_logits),
                    infer={"baseline": {"nn_baseline": baseline, "nn_baseline_input": b_input}})


def guide_inference(src, src_lengths, tgt, tgt_lengths, idx=None, *, net: AlignmentNet, inference: InferenceNetwork,
                    baseline: RewardBaseline, num_data=None):
    r""":math:`q(z_t \mid x, y)` from the inference network; enumerated for ``variational-enum``, else sampled
    with a learned baseline.  Arguments as :func:`ppl_models.alignment.model`."""
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    pyro.module("inference", inference)
    states = net.states(src, src_lengths, tgt, tgt_lengths, keep=True)
    q_logits, features = inference(states.memory, states.src_mask, tgt, tgt_lengths)
    if net.variant == "variational-enum":
        infer = {"enumerate": "parallel"}
    else:
        pyro.module("baseline", baseline)
        b_input = _baseline_input(features, states.tgt_mask, tgt.shape[0], num_data)
        infer = {"baseline": {"nn_baseline": baseline, "nn_baseline_input": b_input}}
    sentences, steps, mask = _plates(tgt, idx, num_data, states.tgt_mask)
    with sentences, steps, mask:
        pyro.sample("z", dist.Categorical(logits=q_logits), infer=infer)


def guide_posterior(src, src_lengths, tgt, tgt_lengths, idx=None, *, net: AlignmentNet, num_data=None):
    r""":math:`q(z_t \mid x, y) = p(z_t \mid x, y) \propto p(z_t \mid x, y_{<t})\, p(y_t \mid x_{z_t}, h_t)`,
    enumerated.  Arguments as :func:`ppl_models.alignment.model`."""
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    states = net.states(src, src_lengths, tgt, tgt_lengths, keep=True)
    posterior_logits = states.prior_logits + net.emission_table(states, tgt)
    sentences, steps, mask = _plates(tgt, idx, num_data, states.tgt_mask)
    with sentences, steps, mask:
        pyro.sample("z", dist.Categorical(logits=posterior_logits), infer={"enumerate": "parallel"})


def build_none(spec: ModelSpec, num_data: int | None = None):
    """No networks."""
    return {}


def build_prior(spec: ModelSpec, num_data: int | None = None, model_modules=None):
    """The model's ``net`` and a baseline on ``[h_t; emb(y_t)]``."""
    net = model_modules["net"]
    return {"net": net, "baseline": RewardBaseline(net.hidden_dim + net.tgt_embed.embedding_dim)}


def build_inference(spec: ModelSpec, num_data: int | None = None, emb_dim: int = 64, hidden_dim: int = 64,
                    model_modules=None):
    """The model's ``net``, an :class:`InferenceNetwork` and a baseline on its features."""
    net = model_modules["net"]
    if net.variant in ("soft", "exact", "hard"):
        raise ValueError(f"guide 'inference-network' is for the variational variants; the model's variant is "
                         f"{net.variant!r}")
    return {"net": net, "inference": InferenceNetwork(net.tgt_vocab_size, net.memory_dim, emb_dim, hidden_dim),
            "baseline": RewardBaseline(2 * hidden_dim)}


def build_posterior(spec: ModelSpec, num_data: int | None = None, model_modules=None):
    """The model's ``net`` only."""
    return {"net": model_modules["net"]}


register_guide("none", model="alignment", guide=guide_none, build=build_none)
register_guide("prior", model="alignment", guide=guide_prior, build=build_prior)
register_guide("inference-network", model="alignment", guide=guide_inference, build=build_inference)
register_guide("exact-posterior", model="alignment", guide=guide_posterior, build=build_posterior)
