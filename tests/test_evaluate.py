"""Importance-sampled evaluation, checked against the exactly solvable linear-Gaussian model."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_models.guides.linear_gaussian import exact_guide
from ppl_models import instantiate
from ppl_models.infer import diagnostics
from ppl_models import linear_gaussian as lg
from ppl_models.distributions import binary_bernoulli_log_prob
from ppl_models.infer.evaluate import (
    EvalResult,
    _site_log_prob,
    default_chunk_size,
    evaluate,
    log_weights,
)
from ppl_models.spec import LatentSite, ModelSpec, ObservedSite, data_plate


def linear_gaussian(num_data, *, dtype=torch.float64, seed=7, guide="mean-field"):
    """A linear-Gaussian model with random parameters (seed 7: posterior correlation 0.58), data simulated
    from it, and a guide."""
    inst = instantiate(
        "linear-gaussian",
        guide,
        num_data=num_data,
        model_kwargs=dict(z_dim=2, x_dim=5, init_sigma=0.7, bias_scale=1.0, seed=seed),
    )
    inst.modules.to(dtype)
    params = inst.modules["params"]
    x, _ = lg.simulate(params, num_data, torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        log_px = lg.log_evidence(params, x)
    return inst, params, x, log_px


def set_optimal_mean_field(inst, params, x):
    r"""The mean-field :math:`q` closest to the posterior in KL(q || p): the exact posterior's mean and
    :math:`z\_scale_j = \Lambda_{jj}^{-1/2}` (narrower than the marginals when the posterior is correlated)."""
    with torch.no_grad():
        z_loc, _ = lg.exact_posterior(params, x)
        precision = torch.eye(params.z_dim, dtype=x.dtype) + params.W.T @ params.W / params.sigma**2
        z_scale = precision.diagonal().rsqrt()
        table = inst.modules["local_params"].tables["z"].weight
        table[:, :2] = z_loc
        table[:, 2:] = torch.log(torch.expm1(z_scale)).expand(x.shape[0], 2)  # softplus^{-1}


def scaled_exact_guide(x, idx=None, *, params, num_data=None, factor):
    """The exact posterior with its covariance's scale multiplied by ``factor``."""
    z_loc, scale_tril = lg.exact_posterior(params, x)
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.MultivariateNormal(z_loc, scale_tril=scale_tril * factor))


# --- exactness on the conjugate model ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_guide_every_log_weight_is_the_log_evidence(dtype):
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(40, dtype=dtype, guide="exact")
    assert inst.guide.keywords["params"] is params  # the guide shares the model's params
    lw = log_weights(inst.model, inst.guide, x, num_samples=50, spec=inst.spec, chunk_size=16)
    assert lw.shape == (50, 40) and lw.dtype == dtype
    torch.testing.assert_close(lw, log_px.expand(50, 40), rtol=1e-5, atol=0)


def test_exact_guide_elbo_iwae_and_log_evidence_coincide():
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(64, guide="exact")
    result = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=200, batch_size=25, progress=False)
    expected = log_px.numpy()
    np.testing.assert_allclose(result.elbo, expected, rtol=1e-5)
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-5)
    np.testing.assert_allclose(result.recon - result.kl, result.elbo, rtol=1e-12, atol=1e-12)
    # Constant weights: az.psislw finds no tail and returns +inf (rounding can leave two values, then
    # k̂ < 0): never a finite k̂ that flags the exact posterior as a bad proposal.
    k = result.pareto_khat
    assert not np.any(np.isfinite(k) & (k >= diagnostics.KHAT_GOOD)), k
    metrics = result.to_metrics()
    assert metrics["pareto_khat_frac_bad"] == 0.0
    assert metrics["pareto_khat_frac_good"] + metrics["pareto_khat_frac_undetermined"] == 1.0


def test_mean_field_elbo_and_iwae_against_their_exact_values():
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(50)
    set_optimal_mean_field(inst, params, x)
    result = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=300, batch_size=20, progress=False)
    from ppl_models.compare.problems import linear_gaussian_exact_elbo

    with torch.no_grad():
        exact_elbo = float(linear_gaussian_exact_elbo(params, inst.guide, x, torch.arange(50)))
        lw = log_weights(inst.model, inst.guide, x, torch.arange(50), num_samples=300, spec=inst.spec)
    # The ELBO estimates q's closed-form ELBO, log p(x) - KL(q || posterior) = log p(x) - 0.2 nats per datapoint
    # here: the sum over datapoints within 5 standard errors (the log weights' spread over 300 fresh draws).
    se = math.sqrt(float((lw.var(0) / 300).sum()))
    assert abs(result.elbo.sum() - exact_elbo) <= 5 * se, (result.elbo.sum(), exact_elbo, se)
    assert exact_elbo < float(log_px.sum()) - 5 * se  # a mean-field q is not the posterior
    # The IWAE-300 gap log p(x) - IWAE is the delta-method bias Var(w / p(x)) / 2K (0.004 here, not the ELBO's
    # 0.2): their per-datapoint difference averages to 0 within 5 standard errors.
    d = log_px.numpy() - result.log_likelihood - (torch.exp(lw - log_px).var(0) / (2 * 300)).numpy()
    assert abs(d.mean()) <= 5 * d.std(ddof=1) / math.sqrt(50), d.mean()


def test_iwae_approaches_the_log_evidence_as_num_samples_grows():
    r"""Gap :math:`\log p(x) - \mathrm{IWAE}_K` for K = 1, 10, 100, 1000.

    The 1000 draws of each datapoint are split into 1000/K disjoint groups of K; averaging IWAE_K over the
    groups estimates E[IWAE_K] (monotone in K, Burda et al. 2016).  For nested groups the average is even
    monotone draw by draw (Jensen), so the comparison between K is exact; the K=1000 gap is compared with
    its standard error over datapoints and the delta-method bias Var(w / p) / (2K).
    """
    torch.manual_seed(0)
    num_data, K = 400, 1000
    inst, params, x, log_px = linear_gaussian(num_data)
    set_optimal_mean_field(inst, params, x)
    lw = log_weights(inst.model, inst.guide, x, torch.arange(num_data), num_samples=K, spec=inst.spec)
    assert lw.shape == (K, num_data)
    gaps = {}
    for k in (1, 10, 100, 1000):
        groups = lw.reshape(K // k, k, num_data)
        iwae_k = (torch.logsumexp(groups, dim=1) - math.log(k)).mean(0)  # (num_data,)
        gaps[k] = log_px - iwae_k
    means = [float(gaps[k].mean()) for k in (1, 10, 100, 1000)]
    assert means[0] > means[1] > means[2] > means[3], means
    assert means[0] > 0.05  # the mean-field q is visibly worse than the posterior
    gap = gaps[1000]
    se = float(gap.std() / math.sqrt(num_data))
    normalized = torch.exp(lw - log_px)  # w / p(x): mean 1
    bias = float((normalized.var(dim=0) / (2 * K)).mean())
    assert -4 * se <= means[3] <= bias + 4 * se, (means[3], se, bias)


# --- Pareto k̂ -------------------------------------------------------------------------------------------


def test_khat_is_low_for_the_exact_posterior_of_a_nearby_model():
    # The exact posterior of the same model with 1.3 x the noise scale: slightly wider than the true
    # posterior and shifted towards 0, so the weights are bounded.
    torch.manual_seed(0)
    inst, params, x, _ = linear_gaussian(30)
    nearby = lg.LinearGaussianParams(2, 5).to(torch.float64)
    nearby.load_state_dict(params.state_dict())
    with torch.no_grad():
        nearby.log_sigma += math.log(1.3)
    result = evaluate(
        inst.model,
        functools.partial(exact_guide, params=nearby),
        x,
        spec=inst.spec,
        num_samples=2000,
        batch_size=30,
        progress=False,
    )
    assert np.all(result.pareto_khat < diagnostics.KHAT_GOOD), result.pareto_khat


def test_khat_flags_an_under_dispersed_proposal():
    # q = the exact posterior with scale x 0.2: the weights' tail index is 1 - 0.2^2 = 0.96.
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(30)
    guide = functools.partial(scaled_exact_guide, params=params, factor=0.2)
    result = evaluate(inst.model, guide, x, spec=inst.spec, num_samples=2000, batch_size=30, progress=False)
    k = result.pareto_khat
    assert np.mean(k) > diagnostics.KHAT_BAD and np.mean(k > diagnostics.KHAT_BAD) >= 0.7, k
    assert np.mean(log_px.numpy() - result.log_likelihood) > 0.1  # the IWAE bound is far from tight here


# --- the VAE: a model with a neural decoder ------------------------------------------------------------


def small_vae(seed=0):
    torch.manual_seed(seed)
    return instantiate(
        "vae",
        "amortized",
        num_data=None,
        model_kwargs=dict(z_dim=3, hidden_dims=(16,), x_dim=20),
        guide_kwargs=dict(hidden_dims=(16,)),
    )


def vae_reference(inst, x, num_draws=4000, seed=9):
    """Independent Monte Carlo references for the evaluator's per-datapoint terms, from the encoder's q(z | x)
    and the decoder directly (no Pyro): the mean and variance over draws of log p(x | z) (torch's Bernoulli
    log-density, also for grey levels), and the closed-form KL(q || N(0, I)) with the variance of
    log q(z) - log p(z).  Each ``(n,)``."""
    with torch.no_grad(), pyro.poutine.block():
        q = pyro.poutine.trace(inst.guide).get_trace(x).nodes["z"]["fn"]  # Normal(loc, scale).to_event(1)
        prior = dist.Normal(torch.zeros_like(q.mean), 1.0).to_event(1)
        z = q.mean + q.stddev * torch.randn((num_draws,) + q.mean.shape, generator=torch.Generator().manual_seed(seed))
        recon = dist.Bernoulli(logits=inst.modules["decoder"](z), validate_args=False).log_prob(x).sum(-1).double()
        kl_draws = (q.log_prob(z) - prior.log_prob(z)).double()
        return recon.mean(0), recon.var(0), torch.distributions.kl_divergence(q, prior).double(), kl_draws.var(0)


class Rows:
    """A data set in the engine's protocol (num_data, batch(idx, generator))."""

    def __init__(self, x):
        self.x, self.num_data = x, x.shape[0]

    def batch(self, idx, generator):
        return (self.x[idx],)


def test_evaluate_vae_shapes_identities_and_files(tmp_path):
    inst = small_vae()
    x = (torch.rand(30, 20, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    result = evaluate(
        inst.model,
        inst.guide,
        Rows(x),
        spec=inst.spec,
        num_samples=150,
        batch_size=8,  # 30 = 8 + 8 + 8 + 6
        chunk_size=64,  # 150 = 64 + 64 + 22
        generator=torch.Generator().manual_seed(2),
        progress=False,
    )
    assert isinstance(result, EvalResult) and result.num_data == 30 and result.num_samples == 150
    for name in ("log_likelihood", "elbo", "recon", "kl", "pareto_khat"):
        values = getattr(result, name)
        assert values.shape == (30,) and values.dtype == np.float64, name
    np.testing.assert_allclose(result.recon - result.kl, result.elbo, rtol=1e-5, atol=1e-5)
    # The terms against independent references, summed over the 30 datapoints, within 5 standard errors (the
    # evaluator's 150 draws and the reference's 4000, variances from the reference's draws): the KL in closed
    # form, the reconstruction term from the decoder's Bernoulli.
    recon, recon_var, kl, kl_var = (v.numpy() for v in vae_reference(inst, x))
    se = math.sqrt(kl_var.sum() / 150)
    assert abs(result.kl.sum() - kl.sum()) <= 5 * se, (result.kl.sum(), kl.sum(), se)
    se = math.sqrt(recon_var.sum() / 150 + recon_var.sum() / 4000)
    assert abs(result.recon.sum() - recon.sum()) <= 5 * se, (result.recon.sum(), recon.sum(), se)
    # E[IWAE-150] <= E[IWAE-4000] (Burda et al. 2016): the evaluator's bound is not above 4000 fresh draws' by
    # more than 5 standard errors of the per-datapoint differences.
    lw = log_weights(inst.model, inst.guide, x, num_samples=4000, spec=inst.spec).double()
    d = result.log_likelihood - (torch.logsumexp(lw, 0) - math.log(4000)).numpy()
    assert d.mean() <= 5 * d.std(ddof=1) / math.sqrt(30), (d.mean(), d.std())

    paths = result.save(tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_data"] == 30 and metrics["num_samples"] == 150 and metrics["observed"] == "x"
    mean, se = result.mean_and_se("log_likelihood")
    assert metrics["log_likelihood"] == pytest.approx(mean) and metrics["log_likelihood_se"] == pytest.approx(se)
    assert se == pytest.approx(result.log_likelihood.std(ddof=1) / math.sqrt(30))
    assert metrics["elbo"] == pytest.approx(result.elbo.mean()) and isinstance(metrics["wall_time_s"], float)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["eval.nc", "metrics.json"]

    loaded = diagnostics.load_netcdf(paths["inference_data"])
    # Per-datapoint estimates, not posterior draws: in the vi_evaluation group along "datapoint", no group that
    # az.loo / az.waic would read as draws.
    assert loaded.groups() == ["vi_evaluation"]
    for name in ("log_likelihood", "elbo", "recon", "kl", "pareto_khat"):
        assert loaded.vi_evaluation[name].dims == ("datapoint",), name
        np.testing.assert_array_equal(loaded.vi_evaluation[name].values, getattr(result, name))
    assert loaded.vi_evaluation.attrs["num_samples"] == 150 and loaded.vi_evaluation.attrs["observed"] == "x"


def test_evaluate_is_reproducible_and_leaves_the_global_rng_alone():
    inst = small_vae()
    x = (torch.rand(12, 20, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [
        evaluate(
            inst.model,
            inst.guide,
            data,
            spec=inst.spec,
            num_samples=40,
            batch_size=5,
            generator=torch.Generator().manual_seed(7),
            progress=False,
        )
        for data in (x, Rows(x))  # a plain tensor and the data set protocol
    ]
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("log_likelihood", "elbo", "recon", "kl"):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))


def test_grey_level_pixels_use_torchs_bernoulli_and_agree():
    inst = small_vae()
    x = torch.rand(6, 20, generator=torch.Generator().manual_seed(3))  # grey levels in [0, 1]
    result = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=30, progress=False)
    np.testing.assert_allclose(result.recon - result.kl, result.elbo, rtol=1e-5, atol=1e-5)
    # x log σ(l) + (1 - x) log(1 - σ(l)) at grey levels: the reconstruction term against torch's Bernoulli
    # density on 4000 independent draws, summed over the 6 rows, within 5 standard errors.
    recon, recon_var, _, _ = (v.numpy() for v in vae_reference(inst, x))
    se = math.sqrt(recon_var.sum() / 30 + recon_var.sum() / 4000)
    assert abs(result.recon.sum() - recon.sum()) <= 5 * se, (result.recon.sum(), recon.sum(), se)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_binary_bernoulli_fast_path_matches_torch(dtype, rtol, grouped):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(7, 5, 30, generator=g) * 15).to(dtype)
    logits[0, 0, :4] = torch.tensor([-80.0, 80.0, 25.0, -25.0], dtype=dtype)  # far tails
    value = (torch.rand(5, 30, generator=g) < 0.5).to(dtype)
    expected = dist.Bernoulli(logits=logits).to_event(1).log_prob(value)
    got = binary_bernoulli_log_prob(logits, value, 1, grouped)
    assert got.shape == (7, 5) and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
    # Through a site, and falling back to torch for non-binary values.
    site = {"fn": dist.Bernoulli(logits=logits, validate_args=False).to_event(1), "value": value, "mask": None}
    torch.testing.assert_close(_site_log_prob(site, grouped), expected, rtol=rtol, atol=0)
    grey = dict(site, value=value * 0.5 + 0.25)
    assert torch.equal(_site_log_prob(grey), site["fn"].log_prob(grey["value"]))
    # Two event dims.
    fn2 = dist.Bernoulli(logits=logits.reshape(7, 5, 6, 5)).to_event(2)
    torch.testing.assert_close(
        _site_log_prob({"fn": fn2, "value": value.reshape(5, 6, 5), "mask": None}, grouped), expected, rtol=rtol,
        atol=0
    )


@pytest.mark.parametrize("dtype, ulp", [(torch.float32, 2.0**-24), (torch.float64, 2.0**-53)])
@pytest.mark.parametrize("size", [16, 784, 37])
def test_binary_bernoulli_error_is_bounded_per_pixel(dtype, ulp, size):
    """The compiled form's products of 16 factors 1 + e^{-|y|} round a factor whose e is below half an ulp
    to 1: the error stays within float rounding plus two ulps of 1 per pixel, also where every pixel is
    predicted confidently (a log-density near 0, where a relative tolerance would say nothing)."""
    g = torch.Generator().manual_seed(5)
    value = (torch.rand(3, size, generator=g) < 0.5).to(dtype)
    for logits in (torch.randn(4, 3, size, generator=g, dtype=dtype) * 6,  # any
                   (2 * value - 1) * (10 + 25 * torch.rand(4, 3, size, generator=g, dtype=dtype))):  # confident
        y = (logits * (1 - 2 * value)).double()  # log σ(±l) = -softplus(y), each term to an ulp of itself:
        expected = -(y.clamp_min(0) + torch.log1p(torch.exp(-y.abs()))).sum(-1)
        got = binary_bernoulli_log_prob(logits, value, 1, grouped=True).double()
        bound = 2 * size * ulp + 8 * torch.finfo(dtype).eps * expected.abs()  # 1 + e and the product each round
        assert ((got - expected).abs() <= bound).all(), ((got - expected).abs().max(), bound.min())


def test_default_chunk_size_respects_the_memory_budget():
    spec = small_vae().spec  # largest site: x with 20 entries
    assert default_chunk_size(spec, 10, itemsize=4, budget_bytes=8000) == 10
    assert default_chunk_size(spec, 10_000, itemsize=4, budget_bytes=8000) == 1
    vae784 = ModelSpec("vae", ObservedSite("x", (784,)), "data", (LatentSite("z", (20,)),))
    chunk = default_chunk_size(vae784, 100)
    assert chunk * 100 * 784 * 4 <= 32 * 2**20  # below glibc's largest mmap threshold (no page faults)


# --- structure: plates, global latents, mismatched sites ----------------------------------------------

TOY_SPEC = ModelSpec("toy", ObservedSite("x", (3,)), "data", (LatentSite("z", (2,)),))
OFFSETS = torch.tensor([0.0, 1.0, -1.0])


def toy_guide(x, idx=None, *, num_data=None):
    with data_plate(x, idx, num_data):
        pyro.sample("z", dist.Normal(0.1 * x[:, :2], 0.8).to_event(1))


def toy_model(x, idx=None, *, num_data=None):
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = z.sum(-1, keepdim=True) + OFFSETS  # (..., batch, 3)
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def toy_model_nested_plate(x, idx=None, *, num_data=None):
    """The same density with the features as a plate nested in the data plate (dim -2)."""
    with data_plate(x, idx, num_data):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = z.sum(-1) + OFFSETS[:, None]  # (..., 3, batch)
        with pyro.plate("features", 3, dim=-2):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x.T)


def test_plates_nested_in_the_data_plate_are_summed_per_datapoint():
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    flat = log_weights(toy_model, toy_guide, x, num_samples=20, spec=TOY_SPEC, chunk_size=7)
    torch.manual_seed(0)
    nested = log_weights(toy_model_nested_plate, toy_guide, x, num_samples=20, spec=TOY_SPEC, chunk_size=7)
    assert nested.shape == (20, 9)
    torch.testing.assert_close(nested, flat)


def test_a_global_latent_raises_not_implemented_naming_the_site():
    def model(x, idx=None, *, num_data=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with data_plate(x, idx, num_data):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=x)

    def guide(x, idx=None, *, num_data=None):
        pyro.sample("mu", dist.Normal(0.2, 0.5))

    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match=r"latent site 'mu' lies outside the data plate 'data'"):
        log_weights(model, guide, x, num_samples=5, spec=ModelSpec("global", ObservedSite("x", (3,))))
    with pytest.raises(NotImplementedError, match="'mu'"):
        evaluate(model, guide, x, spec=ModelSpec("global", ObservedSite("x", (3,))), num_samples=5, progress=False)


def test_mismatched_sites_are_named():
    x = torch.randn(4, 3)

    def empty_guide(x, idx=None, *, num_data=None):
        pass

    with pytest.raises(ValueError, match=r"model latent site 'z'.*guide samples only \(none\)"):
        log_weights(toy_model, empty_guide, x, num_samples=3, spec=TOY_SPEC)

    def extra_guide(x, idx=None, *, num_data=None):
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(0.1 * x[:, :2], 0.8).to_event(1))
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"guide site 'w'"):
        log_weights(toy_model, extra_guide, x, num_samples=3, spec=TOY_SPEC)

    renamed = ModelSpec("toy", ObservedSite("pixels", (3,)), "data", (LatentSite("z", (2,)),))
    with pytest.raises(ValueError, match=r"observed site 'pixels'.*found observed sites \['x'\]"):
        log_weights(toy_model, toy_guide, x, num_samples=3, spec=renamed)


def test_arguments_are_checked():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="num_samples"):
        log_weights(toy_model, toy_guide, x, num_samples=0, spec=TOY_SPEC)
    with pytest.raises(ValueError, match="chunk_size"):
        log_weights(toy_model, toy_guide, x, num_samples=3, spec=TOY_SPEC, chunk_size=0)
    with pytest.raises(ValueError, match="num_data"):
        log_weights(toy_model, toy_guide, x, num_samples=3, spec=TOY_SPEC, num_data=10)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(toy_model, toy_guide, x, spec=TOY_SPEC, num_samples=3, batch_size=0, progress=False)


def test_per_datapoint_guides_get_their_rows():
    # The mean-field guide reads rows idx of its table: evaluation in batches must hand it the right rows.
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(24)
    with torch.no_grad():
        z_loc, scale_tril = lg.exact_posterior(params, x)
        table = inst.modules["local_params"].tables["z"].weight
        table[:, :2] = z_loc
        table[:, 2:] = -30.0  # z_scale ≈ 1e-13: q is (nearly) a point mass at the posterior mean
    result = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=4, batch_size=5, progress=False)
    with torch.no_grad():
        z_dist = dist.MultivariateNormal(z_loc, scale_tril=scale_tril)
        log_joint = log_px + z_dist.log_prob(z_loc)
    # recon ≈ log p(x | z_loc), and log p(x | z_loc) + log p(z_loc) = log p(x) + log p(z_loc | x).
    np.testing.assert_allclose(
        result.recon + dist.Normal(0.0, 1.0).log_prob(z_loc).sum(-1).numpy(), log_joint.numpy(), rtol=1e-6
    )


@pytest.mark.parametrize("guide_name", ["mean-field", "amortized-mlp"])
def test_generic_guides_evaluate_on_the_linear_gaussian_model(guide_name):
    torch.manual_seed(0)
    inst, params, x, log_px = linear_gaussian(20, guide=guide_name)
    result = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=100, batch_size=8, progress=False)
    assert result.log_likelihood.shape == (20,)
    # The Monte Carlo ELBO against the guide's closed-form ELBO (Gaussian q, linear-Gaussian model): within 5
    # standard errors, from the spread of 100 fresh log weights per datapoint (the sum over datapoints).
    from ppl_models.compare.problems import linear_gaussian_exact_elbo

    with torch.no_grad():
        exact = float(linear_gaussian_exact_elbo(params, inst.guide, x, torch.arange(20)))
        lw = log_weights(inst.model, inst.guide, x, torch.arange(20), num_samples=100, spec=inst.spec)
    se = math.sqrt(float((lw.var(0) / 100).sum()))
    assert abs(result.elbo.sum() - exact) <= 5 * se, (result.elbo.sum(), exact, se)
    assert np.mean(result.log_likelihood) < np.mean(log_px.numpy())  # an untrained guide: a loose bound
