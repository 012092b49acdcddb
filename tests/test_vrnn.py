"""Variational RNN: ELBO <= IWAE <= exact log p(x) (quadrature over z_0, z_1 with a scalar latent per step), masks
for ragged batches, KL annealing through poutine.scale on the per-step sites."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_models import registry
from ppl_models.encodings import EOS_INDEX, PAD_INDEX
from ppl_models.infer.evaluate import log_weights

V = 7  # 4 specials + 3 words


def _tiny(z_dim=1):
    return registry.instantiate(
        "vrnn", "filtering", num_data=2,
        model_kwargs={"vocab_size": V, "embed_dim": 3, "hidden_dim": 4, "z_dim": z_dim, "feature_dim": 3},
        guide_kwargs={"feature_dim": 3},
    )


def _site_terms(trace) -> torch.Tensor:
    """Sum of the sample sites' masked log-densities (scale not applied), keeping the plates' batch dims."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = torch.where(site["mask"], lp, torch.zeros(()))
        total = total + lp
    return total


def exact_log_marginal(model, tokens, half_width=8.0, num_points=301) -> float:
    """log p(x) of ONE sentence (no padding) by quadrature over (z_0, ..., z_{T-1}), T <= 2, scalar z_t."""
    T = tokens.shape[1]
    grid = torch.linspace(-half_width, half_width, num_points)
    axes = torch.meshgrid(*([grid] * T), indexing="ij")
    n = axes[0].numel()
    values = {f"z_{t}": axes[t].reshape(n, 1, 1) for t in range(T)}
    with torch.no_grad(), pyro.plate("grid", n, dim=-2):
        trace = poutine.trace(poutine.condition(model, values)).get_trace(tokens, torch.tensor([T]), None)
    log_joint = _site_terms(trace)  # (n, 1)
    return float(torch.logsumexp(log_joint.reshape(-1), 0) + T * math.log(grid[1] - grid[0]))


@pytest.mark.slow
def test_elbo_le_iwae_le_exact_on_a_ragged_batch(float64):
    inst = _tiny()
    sentences = [[5, EOS_INDEX], [EOS_INDEX]]  # lengths 2 and 1
    exact = torch.tensor([exact_log_marginal(inst.model, torch.tensor([s])) for s in sentences])
    coarse = exact_log_marginal(inst.model, torch.tensor([sentences[0]]), half_width=7.0, num_points=201)
    assert abs(coarse - exact[0]) < 1e-8
    # scored together, the second sentence padded: its masked step must not count
    tokens, lengths = torch.tensor([[5, EOS_INDEX], [EOS_INDEX, PAD_INDEX]]), torch.tensor([2, 1])
    n, k = 40000, 50
    with torch.no_grad():
        lw = log_weights(inst.model, inst.guide, (tokens, lengths), num_samples=n, spec=inst.spec, chunk_size=n)
    elbo, elbo_se = lw.mean(0), lw.std(0) / math.sqrt(n)
    blocks = torch.logsumexp(lw.reshape(n // k, k, -1), 1) - math.log(k)
    iwae, iwae_se = blocks.mean(0), blocks.std(0) / math.sqrt(n // k)
    ratio = torch.exp(lw - exact)
    ratio_mean, ratio_se = ratio.mean(0), ratio.std(0) / math.sqrt(n)
    for i in range(2):
        assert elbo[i] <= iwae[i] + 3 * math.hypot(elbo_se[i], iwae_se[i])
        assert iwae[i] <= exact[i] + 3 * iwae_se[i]
        assert exact[i] - elbo[i] > 3 * elbo_se[i]
        assert abs(ratio_mean[i] - 1) < 4 * ratio_se[i]  # unbiased estimate of p(x)


def _log_weight_at(inst, tokens, lengths, z: dict, **kwargs):
    guide_trace = poutine.trace(poutine.condition(inst.guide, z)).get_trace(tokens, lengths, None, **kwargs)
    model_trace = poutine.trace(poutine.condition(inst.model, z)).get_trace(tokens, lengths, None, **kwargs)
    return _site_terms(model_trace) - _site_terms(guide_trace), model_trace, guide_trace


def test_padding_never_changes_a_sentence_weight(float64):
    inst = _tiny(z_dim=2)
    z_alone = {f"z_{t}": torch.randn(1, 2) for t in range(3)}
    alone, _, _ = _log_weight_at(inst, torch.tensor([[4, 6, EOS_INDEX]]), torch.tensor([3]), z_alone)
    for filler in (PAD_INDEX, 5):
        tokens = torch.tensor([[4, 6, EOS_INDEX, filler, filler], [5, 5, 4, 6, EOS_INDEX]])
        z = {f"z_{t}": torch.cat([z_alone[f"z_{t}"] if t < 3 else torch.randn(1, 2), torch.randn(1, 2)])
             for t in range(5)}
        both, model_trace, _ = _log_weight_at(inst, tokens, torch.tensor([3, 5]), z)
        assert torch.allclose(both[0], alone[0], rtol=0, atol=1e-12)
        # the padded steps' latent sites are masked for the short sentence only
        assert model_trace.nodes["z_4"]["mask"].tolist() == [False, True]


def test_kl_weight_scales_every_latent_site_and_nothing_else(float64):
    inst = _tiny(z_dim=2)
    tokens, lengths = torch.tensor([[4, 6, EOS_INDEX], [5, EOS_INDEX, PAD_INDEX]]), torch.tensor([3, 2])
    pyro.set_rng_seed(1)
    trace = poutine.trace(inst.model).get_trace(tokens, lengths, None, kl_weight=0.25)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not name.startswith("_") and name != "data":
            assert site["scale"] == (0.25 if name.startswith("z_") else 1.0), name
    with pytest.raises(ValueError, match="word dropout is not supported"):
        inst.model(tokens, lengths, word_keep=0.5)
