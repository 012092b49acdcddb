"""Text VAE: ELBO <= IWAE <= exact log p(x) (quadrature over a 1-d latent), padding, KL annealing through
poutine.scale, word dropout inside the model, decoding."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_models import registry
from ppl_models.encodings import BOS_INDEX, EOS_INDEX, PAD_INDEX, UNK_INDEX
from ppl_models.infer.evaluate import log_weights
from ppl_models.infer.objectives import make_elbo
from ppl_models.lstm_lm import shift_inputs
from ppl_models.spec import ShapeError
from ppl_models.text_vae import generate

V = 7  # 4 specials + 3 words: a tiny vocabulary


def _tiny(z_dim=1, z_inputs=True):
    return registry.instantiate(
        "text-vae", "lstm-encoder", num_data=3,
        model_kwargs={"vocab_size": V, "embed_dim": 3, "hidden_dim": 4, "z_dim": z_dim, "z_inputs": z_inputs},
        guide_kwargs={"embed_dim": 3, "hidden_dim": 4},
    )


def _site_terms(trace) -> torch.Tensor:
    """Sum of the sample sites' masked log-densities, keeping the batch dims (plates) of the trace."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site["name"].startswith("_"):
            continue
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = torch.where(site["mask"], lp, torch.zeros(()))
        total = total + lp
    return total


def exact_log_marginal(model, tokens, lengths, half_width=10.0, num_points=4001) -> torch.Tensor:
    """log p(x) per sentence by quadrature over a scalar z: log sum_g p(x, z_g) dz on a uniform grid."""
    grid = torch.linspace(-half_width, half_width, num_points)
    z = grid.reshape(-1, 1, 1).expand(num_points, tokens.shape[0], 1)
    with torch.no_grad(), pyro.plate("grid", num_points, dim=-2):
        trace = poutine.trace(poutine.condition(model, {"z": z})).get_trace(tokens, lengths, None)
    log_joint = _site_terms(trace)  # (num_points, batch)
    return torch.logsumexp(log_joint, 0) + math.log(grid[1] - grid[0])


TOKENS = torch.tensor([[4, EOS_INDEX, 0], [5, 6, EOS_INDEX], [6, 4, EOS_INDEX]])
LENGTHS = torch.tensor([2, 3, 3])


@pytest.mark.slow
def test_elbo_le_iwae_le_exact(float64):
    inst = _tiny()
    exact = exact_log_marginal(inst.model, TOKENS, LENGTHS)
    # the quadrature is converged: a coarser grid gives the same number
    coarse = exact_log_marginal(inst.model, TOKENS, LENGTHS, half_width=9.0, num_points=1501)
    assert torch.allclose(exact, coarse, atol=1e-9)

    n, k = 40000, 50
    with torch.no_grad():
        lw = log_weights(inst.model, inst.guide, (TOKENS, LENGTHS), num_samples=n, spec=inst.spec, chunk_size=n)
    elbo, elbo_se = lw.mean(0), lw.std(0) / math.sqrt(n)
    blocks = torch.logsumexp(lw.reshape(n // k, k, -1), 1) - math.log(k)  # IWAE-50 estimates
    iwae, iwae_se = blocks.mean(0), blocks.std(0) / math.sqrt(n // k)
    # the importance-sampling estimate of p(x) itself, mean of w / p(x), is unbiased: 1 within its standard error
    ratio = torch.exp(lw - exact.detach())
    ratio_mean, ratio_se = ratio.mean(0), ratio.std(0) / math.sqrt(n)
    for i in range(TOKENS.shape[0]):
        assert elbo[i] <= iwae[i] + 3 * math.hypot(elbo_se[i], iwae_se[i])
        assert iwae[i] <= exact[i] + 3 * iwae_se[i]
        # the bounds are strict for this (untrained) guide, and the estimator targets the exact value
        assert exact[i] - elbo[i] > 3 * elbo_se[i]
        assert abs(ratio_mean[i] - 1) < 4 * ratio_se[i]


def _log_weight_at(inst, tokens, lengths, z):
    """Per-sentence log p(x, z) - log q(z | x) at a given z, shape (batch,)."""
    guide_trace = poutine.trace(poutine.condition(inst.guide, {"z": z})).get_trace(tokens, lengths, None)
    model_trace = poutine.trace(poutine.condition(inst.model, {"z": z})).get_trace(tokens, lengths, None)
    return _site_terms(model_trace) - _site_terms(guide_trace)


def test_padding_never_changes_the_likelihood_or_the_posterior(float64):
    inst = _tiny(z_dim=2)
    z = torch.tensor([[0.3, -1.2]])
    alone = _log_weight_at(inst, torch.tensor([[5, 6, EOS_INDEX]]), torch.tensor([3]), z)
    for filler in (PAD_INDEX, 4):
        tokens = torch.tensor([[5, 6, EOS_INDEX, filler, filler], [4, 4, 5, 6, EOS_INDEX]])
        both = _log_weight_at(inst, tokens, torch.tensor([3, 5]), torch.tensor([[0.3, -1.2], [1.0, 1.0]]))
        assert torch.allclose(both[0], alone[0], rtol=0, atol=1e-12)


def test_kl_annealing_scales_exactly_the_kl_term(float64):
    """With TraceMeanField_ELBO: loss(beta) = -E_q log p(x|z) + beta KL(q || p), so the difference of two losses on
    the same draw is (beta1 - beta2) times the analytic KL computed from the encoder's outputs."""
    inst = _tiny(z_dim=3)
    elbo = make_elbo("TraceMeanField_ELBO", max_plate_nesting=1)  # no extra guessing run drawing from the RNG
    losses = {}
    for beta in (0.1, 0.7, 1.0):
        pyro.set_rng_seed(3)
        losses[beta] = elbo.loss(inst.model, inst.guide, TOKENS, LENGTHS, None, kl_weight=beta)
    z_loc, z_scale = inst.modules["encoder"](TOKENS, LENGTHS)
    kl = float((0.5 * (z_scale**2 + z_loc**2 - 1) - torch.log(z_scale)).sum().detach())
    assert kl > 0
    assert math.isclose(losses[1.0] - losses[0.1], 0.9 * kl, rel_tol=1e-9)
    assert math.isclose(losses[0.7] - losses[0.1], 0.6 * kl, rel_tol=1e-9)
    with pytest.raises(ValueError, match="scale > 0"):
        elbo.loss(inst.model, inst.guide, TOKENS, LENGTHS, None, kl_weight=0.0)


def test_word_dropout_acts_on_the_decoder_inputs_only(float64):
    inst = _tiny(z_dim=2)
    z = torch.tensor([[0.5, -0.5], [0.1, 0.2], [-1.0, 0.3]])
    model = poutine.condition(inst.model, {"z": z})
    x_site = poutine.trace(model).get_trace(TOKENS, LENGTHS, None, word_keep=0.0).nodes["x"]
    inputs, targets, mask = shift_inputs(TOKENS, LENGTHS)
    all_unk = torch.where(torch.arange(3) == 0, torch.tensor(BOS_INDEX), torch.tensor(UNK_INDEX)).expand(3, 3)
    logits = inst.modules["decoder"](all_unk, z)
    expected = (torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * mask).sum(-1)
    assert torch.equal(x_site["value"], targets)
    assert torch.allclose(x_site["fn"].log_prob(x_site["value"]), expected, atol=1e-12)


def test_encoder_uses_log_variance_and_rejects_bad_input():
    inst = _tiny(z_dim=2)
    encoder = inst.modules["encoder"]
    z_loc, z_scale = encoder(TOKENS, LENGTHS)
    hidden, _ = encoder.lstm(encoder.embedding(TOKENS))
    last = hidden[torch.arange(3), LENGTHS - 1]
    assert torch.allclose(z_scale, torch.exp(0.5 * encoder.z_logvar(last)))
    with pytest.raises(ShapeError, match=r"'x'.*received 7"):
        inst.guide(torch.tensor([[4, 7]]), torch.tensor([2]))


def test_generate_decodes_words():
    inst = _tiny(z_dim=2)
    out = generate(inst.modules["decoder"], torch.randn(4, 2), max_len=6)
    assert len(out) == 4
    assert all(len(s) <= 6 and all(3 < t < V or t == UNK_INDEX for t in s) for s in out)
    sampled = generate(inst.modules["decoder"], torch.randn(4, 2), max_len=6, greedy=False,
                       generator=torch.Generator().manual_seed(0))
    assert all(PAD_INDEX not in s and BOS_INDEX not in s for s in sampled)
    with pytest.raises(ValueError, match=r"z of shape \(n, 2\)"):
        generate(inst.modules["decoder"], torch.randn(4, 3))
