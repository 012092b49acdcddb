r"""Guides for the latent-alignment model :mod:`ppl_models.alignment`; all share the model's signature.

``none``
    no latent site: the ``soft`` variant has none, and ``exact`` enumerates :math:`z` in the model.
``prior``
    :math:`q(z_t) = p(z_t \mid x, y_{<t})`, the model's own prior (``hard`` attention): the ELBO is
    :math:`\mathbb E_p[\log p(y \mid x, z)]` and ``TraceGraph_ELBO``'s score-function term is REINFORCE with
    reward :math:`\log p(y_t \mid x_{z_t}, h_t)` minus the baseline.
``inference-network``
    :math:`q(z_t = i \mid x, y) = \mathrm{softmax}_i(g_t^\top W_q \tilde x_i)` with
    :math:`g = \mathrm{BiGRU}_q(\mathrm{emb}_q(y))` reading the whole target and :math:`\tilde x` the model's
    source encodings (Deng et al. 2018, Sec. 4).  ``variational``: :math:`z_t` sampled, REINFORCE;
    ``variational-enum``: :math:`z_t` enumerated, the expectation computed exactly.
``exact-posterior``
    :math:`q(z_t \mid x, y) = p(z_t \mid x, y)`, the model's exact posterior (no parameters of its own): with it
    the ELBO equals :math:`\log p(y \mid x)` (a test of the bound; and the best possible ``q``).

**The sampled variants** (``prior``, and ``inference-network`` for ``variational``) as Deng et al. train them,
inside ``TraceGraph_ELBO``, one :math:`z_t` per target step:

* *Analytic KL.*  The guide's site is an :class:`AnalyticKLCategorical`: it samples :math:`z_t \sim q` and its
  score function is :math:`\nabla \log q(z_t)`, but the term it contributes to the ELBO is
  :math:`\log p(z_t) + \mathrm{KL}(q(z_t) \| p(z_t))` instead of :math:`\log q(z_t)` — the sample's
  :math:`\log q(z_t) - \log p(z_t)` replaced by its expectation under :math:`q`, the closed form.  With the model's
  :math:`\log p(z_t)` the per-token ELBO is :math:`\log p(y_t \mid z_t) - \mathrm{KL}_t`, the same in
  expectation; the pathwise gradient of the KL is exact (weight 1, no annealing), and the reward of each token is
  :math:`\log p(y_t \mid z_t) - \mathrm{KL}_t` (a constant in :math:`z_t` beside the likelihood).  For ``prior``
  :math:`q = p` and the KL is 0: pure REINFORCE.
* *Baseline* (the model's ``baseline``, :data:`ppl_models.alignment.BASELINES`).  ``"soft"``: the detached
  ``baseline_value`` :math:`b_t = \log p_{\mathrm{soft}}(y_t) - \mathrm{KL}_t`, so the reward minus the baseline is
  Deng et al.'s :math:`\log p(y_t \mid z_t) - \log p_{\mathrm{soft}}(y_t)`; the soft path is trained by the
  model's ``y_soft`` factor.  ``"learned"``: :math:`b_t = w^\top [\text{features}_t] + c` (:class:`RewardBaseline`,
  Mnih & Gregor 2014) of detached features, trained by ``TraceGraph_ELBO`` on the squared error to the reward —
  the decoder state :math:`h_t` and :math:`\mathrm{emb}(y_t)` (``prior``), the inference network's :math:`g_t`
  (``inference-network``).  Either is multiplied by the plate's ``num_data / batch`` scale (Pyro's downstream
  costs are scaled) and by the target mask (padded steps cost nothing).
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ppl_models.alignment import MASKED_LOGIT, AlignmentNet, States, check_batch
from ppl_models.registry import register_guide
from ppl_models.spec import ModelSpec, data_plate

__all__ = ["AnalyticKLCategorical", "RewardBaseline", "InferenceNetwork", "guide_none", "guide_prior",
           "guide_inference", "guide_posterior", "build_none", "build_prior", "build_inference", "build_posterior"]


class AnalyticKLCategorical(dist.Categorical):
    r""":math:`z \sim q = \mathrm{Categorical}(\text{logits})` whose ELBO term is
    :math:`\log p(z) + \mathrm{KL}(q \| p)` for the prior ``prior_logits`` (module docstring).

    ``sample`` and the score function are :math:`q`'s; ``log_prob`` is **not** :math:`\log q(z)` but
    :math:`\log p(z) + \mathrm{KL}(q \| p)` (its expectation under :math:`q` is :math:`\mathbb E_q[\log q]`), and it
    is also the pathwise (entropy) term of :meth:`score_parts`, so ``TraceGraph_ELBO``'s surrogate holds
    :math:`-\nabla \mathrm{KL}` exactly and no pathwise :math:`\nabla \log p(z)` of the sample.  For sampling only:
    not to be enumerated (``TraceEnum_ELBO`` would weight the values by this ``log_prob``).

    :param logits: :math:`\log q` ``(..., S)``, normalized.
    :param prior_logits: :math:`\log p` ``(..., S)``, normalized, same shape.
    """

    def __init__(self, logits: torch.Tensor, prior_logits: torch.Tensor, validate_args=None):
        if logits.shape != prior_logits.shape:
            raise ValueError(f"AnalyticKLCategorical: expected logits and prior_logits of one shape, received "
                             f"{tuple(logits.shape)} and {tuple(prior_logits.shape)}")
        super().__init__(logits=logits, validate_args=validate_args)
        self.prior_logits = prior_logits
        self.kl = (logits.exp() * (logits - prior_logits)).sum(-1)  # 0 * finite at padded positions

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.logits.shape[-1:]
        return AnalyticKLCategorical(self.logits.expand(shape), self.prior_logits.expand(shape), validate_args=False)

    def log_prob(self, value):
        prior = self.prior_logits.expand(value.shape + self.prior_logits.shape[-1:])
        return prior.gather(-1, value.long()[..., None]).squeeze(-1) + self.kl

    def score_parts(self, value, *args, **kwargs):
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob=log_prob, score_function=super().log_prob(value), entropy_term=log_prob)


class RewardBaseline(nn.Module):
    """Per-token baseline ``(B, T)`` from inputs ``(B, T, features + 1)`` whose last column is ``mask * scale``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs[..., :-1]).squeeze(-1) * inputs[..., -1]


def _scale(batch: int, num_data: int | None) -> float:
    return 1.0 if num_data is None else num_data / batch


def _baseline_input(features: torch.Tensor, mask: torch.Tensor, batch: int, num_data: int | None) -> torch.Tensor:
    return torch.cat([features, (mask.to(features.dtype) * _scale(batch, num_data))[..., None]], dim=-1)


def _sampled_site(net: AlignmentNet, states: States, q_logits: torch.Tensor, tgt, num_data,
                  baseline: Optional[RewardBaseline], features: Optional[torch.Tensor]):
    """The distribution and ``infer`` of a sampled variant's site ``z`` (module docstring)."""
    fn = AnalyticKLCategorical(q_logits, states.prior_logits)
    if net.baseline == "learned":
        if baseline is None:
            raise ValueError("alignment guide: baseline 'learned' needs the guide's 'baseline' network")
        pyro.module("baseline", baseline)
        b_input = _baseline_input(features.detach(), states.tgt_mask, tgt.shape[0], num_data)
        return fn, {"baseline": {"nn_baseline": baseline, "nn_baseline_input": b_input}}
    value = (net.soft_log_lik(states, tgt) - fn.kl).detach() * states.tgt_mask * _scale(tgt.shape[0], num_data)
    return fn, {"baseline": {"baseline_value": value}}


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
    """The model's plates: sentences (``dim=-2``), target steps (``dim=-1``), padded steps masked out."""
    sentences = data_plate(tgt, idx, num_data, name="sentences", dim=-2)
    return sentences, pyro.plate("steps", tgt.shape[1], dim=-1), poutine.mask(mask=mask)


def guide_none(src, src_lengths, tgt, tgt_lengths, idx=None, *, num_data=None):
    """No latent site to guide (``soft``; ``exact`` enumerates :math:`z` in the model)."""


def guide_prior(src, src_lengths, tgt, tgt_lengths, idx=None, *, net: AlignmentNet,
                baseline: Optional[RewardBaseline] = None, num_data=None):
    r""":math:`z_t \sim p(z_t \mid x, y_{<t})`, the model's prior (hard attention), with the model's baseline.

    Arguments as :func:`ppl_models.alignment.model`; ``baseline`` (``"learned"`` only) is registered as
    ``"baseline"``.
    """
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    states = net.states(src, src_lengths, tgt, tgt_lengths, keep=True)
    features = None
    if net.baseline == "learned":
        features = torch.cat([states.hidden, net.tgt_embed(tgt)], dim=-1)
    fn, infer = _sampled_site(net, states, states.prior_logits, tgt, num_data, baseline, features)
    sentences, steps, mask = _plates(tgt, idx, num_data, states.tgt_mask)
    with sentences, steps, mask:
        pyro.sample("z", fn, infer=infer)


def guide_inference(src, src_lengths, tgt, tgt_lengths, idx=None, *, net: AlignmentNet, inference: InferenceNetwork,
                    baseline: Optional[RewardBaseline] = None, num_data=None):
    r""":math:`q(z_t \mid x, y)` from the inference network; enumerated for ``variational-enum``, else sampled
    with the analytic KL and the model's baseline.  Arguments as :func:`ppl_models.alignment.model`."""
    check_batch(net, src, src_lengths, tgt, tgt_lengths)
    pyro.module("net", net)
    pyro.module("inference", inference)
    states = net.states(src, src_lengths, tgt, tgt_lengths, keep=True)
    q_logits, features = inference(states.memory, states.src_mask, tgt, tgt_lengths)
    if net.variant == "variational-enum":
        fn, infer = dist.Categorical(logits=q_logits), {"enumerate": "parallel"}
    else:
        fn, infer = _sampled_site(net, states, q_logits, tgt, num_data, baseline, features)
    sentences, steps, mask = _plates(tgt, idx, num_data, states.tgt_mask)
    with sentences, steps, mask:
        pyro.sample("z", fn, infer=infer)


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
    """The model's ``net`` and, for the ``"learned"`` baseline, a baseline on ``[h_t; emb(y_t)]``."""
    net = model_modules["net"]
    if net.baseline != "learned":
        return {"net": net}
    return {"net": net, "baseline": RewardBaseline(net.hidden_dim + net.tgt_embed.embedding_dim)}


def build_inference(spec: ModelSpec, num_data: int | None = None, emb_dim: int = 64, hidden_dim: int = 64,
                    model_modules=None):
    """The model's ``net``, an :class:`InferenceNetwork` and a baseline on its features."""
    net = model_modules["net"]
    if net.variant in ("soft", "exact", "hard"):
        raise ValueError(f"guide 'inference-network' is for the variational variants; the model's variant is "
                         f"{net.variant!r}")
    modules = {"net": net, "inference": InferenceNetwork(net.tgt_vocab_size, net.memory_dim, emb_dim, hidden_dim)}
    if net.variant == "variational" and net.baseline == "learned":
        modules["baseline"] = RewardBaseline(2 * hidden_dim)
    return modules


def build_posterior(spec: ModelSpec, num_data: int | None = None, model_modules=None):
    """The model's ``net`` only."""
    return {"net": model_modules["net"]}


register_guide("none", model="alignment", guide=guide_none, build=build_none)
register_guide("prior", model="alignment", guide=guide_prior, build=build_prior)
register_guide("inference-network", model="alignment", guide=guide_inference, build=build_inference)
register_guide("exact-posterior", model="alignment", guide=guide_posterior, build=build_posterior)
