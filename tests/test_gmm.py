"""The Gaussian mixture: exact quantities, EM, the guides' ELBOs, SVI with the engine, NUTS on the Bayesian variant.

Exactness checks run in float64.  The tensors are tiny, so every test runs torch single-threaded (intra-op
threads only add contention on a shared machine).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy.optimize import linear_sum_assignment

import ppl_models as pm
from ppl_models.guides.gmm import build_exact
from ppl_models import gmm
from ppl_models.data import TensorDataset
from ppl_models.infer import diagnostics
from ppl_models.infer.evaluate import evaluate, log_weights
from ppl_models.infer import Trainer
from ppl_models.infer.em import EMModel, EMResult, fit_em
from ppl_models.spec import ShapeError

F64 = torch.float64
TRUE_LOCS = [[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]]
TRUE_SCALES = [[1.0, 0.5], [0.7, 1.2], [1.0, 1.0]]
TRUE_COVS = [[[1.0, 0.5], [0.5, 1.0]], [[0.5, -0.2], [-0.2, 0.8]], [[1.5, 0.0], [0.0, 0.3]]]
TRUE_WEIGHTS = [0.5, 0.3, 0.2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def true_params(covariance="diag", weights=TRUE_WEIGHTS, learn_weights=True) -> gmm.GMMParams:
    """A well-separated 3-component mixture in 2-D (means 6 apart, scales at most 1.2), float64."""
    p = gmm.GMMParams(3, 2, covariance=covariance, learn_weights=learn_weights).double()
    p.set_locs(torch.tensor(TRUE_LOCS, dtype=F64))
    if covariance == "diag":
        p.set_scales(torch.tensor(TRUE_SCALES, dtype=F64))
    else:
        p.set_covariance(torch.tensor(TRUE_COVS, dtype=F64))
    if weights is not None:
        p.set_weights(torch.tensor(weights, dtype=F64))
    return p


def simulated(num_data, covariance="diag", seed=0, **kwargs):
    truth = true_params(covariance, **kwargs)
    x, z = gmm.simulate(truth, num_data, torch.Generator().manual_seed(seed))
    return truth, x, z


def fitted_em(x, covariance="diag", learn_weights=True, seed=1, **kwargs) -> tuple[gmm.GMMParams, EMResult]:
    p = gmm.GMMParams(3, 2, covariance=covariance, learn_weights=learn_weights).double()
    p.init_from_data(x, torch.Generator().manual_seed(seed))
    return p, fit_em(p, x, **kwargs)


def match(true_locs: torch.Tensor, est_locs: torch.Tensor) -> np.ndarray:
    """perm[j] = the estimated component matched to true component j (Hungarian assignment on squared distance)."""
    cost = torch.cdist(true_locs, est_locs).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def brute_force_log_joint(p: gmm.GMMParams, x: torch.Tensor) -> torch.Tensor:
    cols = []
    for k in range(p.num_components):
        mvn = dist.MultivariateNormal(p.locs[k], covariance_matrix=p.covariance_matrix[k])
        cols.append(math.log(float(p.weights[k])) + mvn.log_prob(x))
    return torch.stack(cols, -1)


# --- exact quantities ------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_likelihood_and_posterior_are_the_mixture_formulas(covariance):
    truth, x, z = simulated(50, covariance)
    with torch.no_grad():
        expected = brute_force_log_joint(truth, x)
        torch.testing.assert_close(gmm.log_likelihood(truth, x), torch.logsumexp(expected, -1), rtol=1e-12, atol=1e-12)
        r = gmm.posterior(truth, x)
    torch.testing.assert_close(r, expected.softmax(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.sum(-1), torch.ones(50, dtype=F64))
    assert x.shape == (50, 2) and x.dtype == F64 and z.shape == (50,) and z.dtype == torch.long


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_parameterization_round_trips(covariance):
    truth = true_params(covariance)
    if covariance == "diag":
        torch.testing.assert_close(truth.scales, torch.tensor(TRUE_SCALES, dtype=F64))
        torch.testing.assert_close(truth.covariance_matrix, torch.diag_embed(torch.tensor(TRUE_SCALES, dtype=F64) ** 2))
    else:
        torch.testing.assert_close(truth.covariance_matrix, torch.tensor(TRUE_COVS, dtype=F64))
        assert torch.equal(truth.scale_tril, truth.scale_tril.tril())
    torch.testing.assert_close(truth.weights, torch.tensor(TRUE_WEIGHTS, dtype=F64))


def test_model_marks_z_for_enumeration_only_when_asked():
    x = torch.zeros(4, 2)
    for flag in (False, True):
        p = gmm.GMMParams(3, 2, enumerate=flag)
        trace = poutine.trace(gmm.model).get_trace(x, params=p)
        assert trace.nodes["z"]["infer"] == ({"enumerate": "parallel"} if flag else {})
        assert trace.nodes["z"]["value"].shape == (4,)
        assert trace.nodes["x"]["fn"].event_shape == (2,)


def test_registry_names_and_init_from_data():
    assert {"gmm", "bayesian-gmm"} <= set(pm.model_names())
    assert {"mean-field", "enumerate", "exact"} <= set(pm.guide_names("gmm"))
    inst = pm.instantiate("gmm", "mean-field", num_data=10, model_kwargs={"num_components": 2, "covariance": "full"})
    assert inst.spec.latent("z").num_categories == 2 and inst.spec.latent("z").is_discrete
    x = torch.randn(10, 2)
    p = inst.modules["params"].init_from_data(x, torch.Generator().manual_seed(0))
    # Each location is a distinct datapoint.
    rows = [int((x == loc).all(-1).nonzero()[0]) for loc in p.locs.detach()]
    assert len(set(rows)) == 2
    p2 = gmm.GMMParams(3, 2).init_from_data(x, torch.Generator().manual_seed(0), method="random")
    assert len({tuple(r) for r in p2.locs.detach().tolist()}) == 3


# --- EM ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_recovers_the_simulating_parameters(covariance):
    N = 3000
    _, x, _ = simulated(N, covariance, seed=0)
    p, result = fitted_em(x, covariance, tol=1e-10, num_iterations=500)
    assert result.converged
    perm = match(torch.tensor(TRUE_LOCS, dtype=F64), p.locs.detach())
    locs = p.locs.detach()[perm]
    cov = p.covariance_matrix.detach()[perm]
    weights = p.weights.detach()[perm]
    true_w = torch.tensor(TRUE_WEIGHTS, dtype=F64)
    true_cov = torch.tensor(TRUE_COVS, dtype=F64) if covariance == "full" else torch.diag_embed(
        torch.tensor(TRUE_SCALES, dtype=F64) ** 2
    )
    n_k = N * true_w  # expected datapoints per component
    var = true_cov.diagonal(dim1=-2, dim2=-1)  # (K, D)
    # 4 standard errors of the maximum-likelihood estimates from n_k points:
    # mean sqrt(Σ_dd / n_k); covariance entry sqrt((Σ_dd Σ_ee + Σ_de²) / n_k); weight sqrt(π (1 - π) / N).
    se_loc = (var / n_k[:, None]).sqrt()
    se_cov = ((var[:, :, None] * var[:, None, :] + true_cov**2) / n_k[:, None, None]).sqrt()
    se_w = (true_w * (1 - true_w) / N).sqrt()
    assert ((locs - torch.tensor(TRUE_LOCS, dtype=F64)).abs() <= 4 * se_loc).all(), (locs, se_loc)
    if covariance == "diag":
        # the off-diagonals are zero by construction; compare the scales: se(σ̂) ≈ σ / sqrt(2 n_k).
        scales = p.scales.detach()[perm]
        se_scale = var.sqrt() / (2 * n_k[:, None]).sqrt()
        assert ((scales - var.sqrt()).abs() <= 4 * se_scale).all(), (scales, se_scale)
    else:
        assert ((cov - true_cov).abs() <= 4 * se_cov).all(), (cov, se_cov)
    assert ((weights - true_w).abs() <= 4 * se_w).all(), (weights, se_w)


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("learn_weights", [True, False])
def test_em_log_likelihood_never_decreases(covariance, learn_weights):
    # Overlapping components and a random start (not the data): many iterations with real progress.
    truth = true_params(covariance, learn_weights=learn_weights)
    with torch.no_grad():
        truth.locs.mul_(0.3)
    x, _ = gmm.simulate(truth, 400, torch.Generator().manual_seed(3))
    p = gmm.GMMParams(3, 2, covariance=covariance, learn_weights=learn_weights, init_scale=3.0,
                      generator=torch.Generator().manual_seed(4)).double()
    result = fit_em(p, x, num_iterations=60, tol=0.0)
    ll = np.array(result.log_likelihood)
    assert result.num_iterations == 60 and len(ll) == 61 and not result.converged
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:])), np.diff(ll).min()
    assert ll[-1] > ll[0] + 0.1
    # The reported trace is the mean exact log-likelihood per datapoint.
    with torch.no_grad():
        assert ll[-1] == pytest.approx(float(gmm.log_likelihood(p, x).mean()), rel=1e-12)
    if not learn_weights:
        torch.testing.assert_close(p.weights, torch.full((3,), 1 / 3, dtype=F64))


def test_em_protocol_and_convergence_flag():
    _, x, _ = simulated(300)
    p = gmm.GMMParams(3, 2).double().init_from_data(x, torch.Generator().manual_seed(1))
    assert isinstance(p, EMModel)
    result = fit_em(p, x, num_iterations=200, tol=1e-6, progress=True)
    assert result.converged and result.num_iterations < 200
    assert abs(result.log_likelihood[-1] - result.log_likelihood[-2]) < 1e-6
    with pytest.raises(TypeError, match=r"expected a model implementing EMModel.*received Linear without e_step"):
        fit_em(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="num_iterations must be a non-negative integer, received -1"):
        fit_em(p, x, num_iterations=-1)


# --- ELBOs against the exact log-likelihood ------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_exact_guide_elbo_equals_the_log_likelihood(covariance):
    _, x, _ = simulated(200, covariance)
    inst = pm.instantiate("gmm", "exact", num_data=None, model_kwargs={"covariance": covariance, "learn_weights": True})
    params = inst.modules["params"].double().init_from_data(x, torch.Generator().manual_seed(0))
    guide = inst.guide  # bound to the model's own params by the guide's build
    assert guide.keywords["params"] is params
    with torch.no_grad():
        exact = gmm.log_likelihood(params, x)
        loss = pyro.infer.Trace_ELBO().loss(inst.model, guide, x)
    assert loss == pytest.approx(-float(exact.sum()), rel=1e-6)
    # The importance-sampled evaluator: every weight is p(x_i), so IWAE bound = ELBO = log p(x_i).
    res = evaluate(inst.model, guide, x, spec=inst.spec, num_samples=20, batch_size=50, progress=False)
    np.testing.assert_allclose(res.elbo, exact.numpy(), rtol=1e-6)
    np.testing.assert_allclose(res.log_likelihood, exact.numpy(), rtol=1e-6)


def test_exact_guide_rejects_another_model():
    spec = pm.get_model("linear-gaussian").build().spec
    with pytest.raises(ValueError, match="guide 'exact': expected the model 'gmm', received 'linear-gaussian'"):
        build_exact(spec, model_modules={})


def test_another_q_gives_an_elbo_below_the_log_likelihood():
    _, x, _ = simulated(200)
    params = gmm.GMMParams(3, 2).double().init_from_data(x, torch.Generator().manual_seed(0))
    model = functools.partial(gmm.model, params=params)

    def uniform_guide(x, idx=None, num_data=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=x.new_zeros(3)), infer={"enumerate": "parallel"})

    with torch.no_grad():
        # TraceEnum_ELBO sums the guide's z exactly: the ELBO of q = uniform, with no Monte Carlo error.
        elbo = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, uniform_guide, x)
        log_joint = gmm.log_joint(params, x)
        expected = float((log_joint.mean(-1) + math.log(3)).sum())  # Σ_i E_q[log p(x_i, z) - log q(z)]
        exact = float(gmm.log_likelihood(params, x).sum())
    assert elbo == pytest.approx(expected, rel=1e-9)
    assert elbo < exact
    # The gap is Σ_i KL(q || p(z_i | x_i)) > 0.
    r = gmm.posterior(params, x).detach()
    kl = float((torch.full_like(r, 1 / 3) * (math.log(1 / 3) - r.log())).sum())
    assert exact - elbo == pytest.approx(kl, rel=1e-9)


def test_evaluate_with_the_per_datapoint_categorical_guide():
    # The generic mean-field guide starts at q(z_i) = uniform; the evaluator samples the discrete z from it.
    _, x, _ = simulated(60)
    inst = pm.instantiate("gmm", "mean-field", num_data=60)
    params = inst.modules.double()["params"].init_from_data(x, torch.Generator().manual_seed(0))
    n = 4000
    res = evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=n, batch_size=30, progress=False,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = gmm.log_likelihood(params, x)
        exact_elbo = gmm.log_joint(params, x).mean(-1) + math.log(3)
    # Uniform proposal over 3 categories, posterior nearly one-hot: the weights are about 3 p(x_i) a third of
    # the time and about 0 otherwise, so the IWAE estimate's relative error is sqrt(2 / n) ≈ 0.022: 4.5 of them.
    np.testing.assert_allclose(res.log_likelihood, exact.numpy(), atol=4.5 * math.sqrt(2 / n))
    # The Monte Carlo ELBO estimates the exact ELBO of q = uniform, which is below the log-likelihood:
    # within 4 Monte Carlo standard errors (std of the log weights / sqrt(n) per datapoint).
    lw = log_weights(inst.model, inst.guide, x, torch.arange(60), num_samples=n, spec=inst.spec)
    mc_se = lw.std(0) / math.sqrt(n)
    assert ((torch.from_numpy(res.elbo) - exact_elbo).abs() <= 4 * mc_se).all()
    assert (exact_elbo < exact).all()
    # The collapsed model's empty guide samples no z: the evaluator says so.
    enum = pm.instantiate("gmm", "enumerate", num_data=60)
    assert enum.modules["params"].enumerate  # the collapsed form's guide switches the model to enumerate z
    enum.modules.double()
    with pytest.raises(ValueError, match=r"model latent site 'z': expected the guide to sample it"):
        evaluate(enum.model, enum.guide, x, spec=enum.spec, num_samples=4, progress=False)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_trace_enum_with_the_enumerate_guide_is_the_exact_log_likelihood(covariance):
    _, x, _ = simulated(200, covariance)
    inst = pm.instantiate(
        "gmm",
        "enumerate",
        num_data=200,
        model_kwargs={"covariance": covariance, "learn_weights": True, "enumerate": True},
    )
    params = inst.modules["params"].double().init_from_data(x, torch.Generator().manual_seed(0))
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    with torch.no_grad():
        exact = gmm.log_likelihood(params, x)
        assert elbo.loss(inst.model, inst.guide, x) == pytest.approx(-float(exact.sum()), rel=1e-6)
        # A minibatch: scaled by N / batch.
        idx = torch.arange(10, 60)
        loss = elbo.loss(inst.model, inst.guide, x[idx], idx, num_data=200)
    assert loss == pytest.approx(-float(exact[idx].sum()) * 200 / 50, rel=1e-6)


# --- SVI with the engine -------------------------------------------------------------------------------------


def _svi_setup(guide, num_data, enumerate=False):
    truth, x, _ = simulated(num_data, seed=0, weights=None, learn_weights=False)
    em_params, _ = fitted_em(x, learn_weights=False)
    with torch.no_grad():
        em_ll = gmm.log_likelihood(em_params, x)  # (num_data,)
    inst = pm.instantiate("gmm", guide, num_data=num_data, model_kwargs={"enumerate": enumerate})
    inst.modules.double()
    params = inst.modules["params"].init_from_data(x, torch.Generator().manual_seed(1))  # as EM's start
    return inst, params, x, em_ll


def _paired_with_em(params, x, em_ll):
    """Mean over datapoints of log p(x_i | params) - log p(x_i | EM's params) and its standard error (the
    spread of the per-datapoint differences / sqrt(N)): how far apart the data can tell the two fits."""
    with torch.no_grad():
        d = gmm.log_likelihood(params, x) - em_ll
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def test_svi_collapsed_trace_enum_reaches_the_em_log_likelihood():
    inst, params, x, em_ll = _svi_setup("enumerate", 300, enumerate=True)
    start, start_se = _paired_with_em(params, x, em_ll)
    assert start < -5 * start_se  # the run had somewhere to go (measured -0.68 ± 0.055)
    trainer = Trainer(
        inst.model, inst.guide, TensorDataset(x), elbo="TraceEnum_ELBO", lr=0.05, batch_size=300,
        num_epochs=200, progress=False, seed=0,
    )
    result = trainer.fit()
    with torch.no_grad():
        svi_ll = float(gmm.log_likelihood(params, x).mean())
    # SVI on the collapsed ELBO is gradient ascent on the log-likelihood: the per-datapoint log-likelihoods of
    # its fit and EM's differ by 0 on average within 5 standard errors of the paired differences (measured
    # -7e-10 ± 2e-6).
    diff, se = _paired_with_em(params, x, em_ll)
    assert abs(diff) <= 5 * se, (diff, se)
    # The engine's training ELBO of the collapsed model is the exact log-likelihood (at the pre-step params).
    assert result.history["train_elbo"][-1] == pytest.approx(svi_ll, abs=1e-3)


@pytest.mark.slow
def test_svi_mean_field_score_function_reaches_the_em_log_likelihood():
    inst, params, x, em_ll = _svi_setup("mean-field", 300)
    # Start q at the responsibilities of the initial parameters (one E-step).  From the uniform q of the
    # generic guide the locations are first pulled to the data mean, before q can tell the clusters apart.
    with torch.no_grad():
        inst.modules["local_params"].tables["z"].weight.copy_(gmm.posterior(params, x).log())
    trainer = Trainer(
        inst.model, inst.guide, TensorDataset(x), elbo="TraceGraph_ELBO", num_particles=8, lr=0.1,
        batch_size=300, num_epochs=150, progress=False, seed=0,
    )
    trainer.fit()
    # Score-function gradients are noisy, yet the data cannot tell the fit from EM's: per-datapoint
    # log-likelihood differences average to 0 within 5 of their standard errors (measured -0.006 ± 0.007).
    diff, se = _paired_with_em(params, x, em_ll)
    assert abs(diff) <= 5 * se, (diff, se)


# --- bad inputs --------------------------------------------------------------------------------------------


def test_bad_number_of_components():
    with pytest.raises(ValueError, match=r"num_components must be a positive integer \(at least 1\), received 0"):
        gmm.GMMParams(0, 2)
    with pytest.raises(ValueError, match=r"model 'gmm': num_components must be a positive integer .* received 0"):
        pm.instantiate("gmm", "enumerate", num_data=None, model_kwargs={"num_components": 0})


def test_more_components_than_datapoints():
    p = gmm.GMMParams(3, 2)
    with pytest.raises(ValueError, match=r"expected at least num_components=3 datapoints .*received 2"):
        p.init_from_data(torch.randn(2, 2))


def test_singular_covariance_initialisation_names_the_component():
    zero_scale = (
        r"component {}: expected positive finite scales \(a non-singular covariance\), "
        r"received scale 0.0 in dimension {}"
    )
    scales = torch.ones(3, 2)
    scales[1, 0] = 0.0
    with pytest.raises(ValueError, match=zero_scale.format(1, 0)):
        gmm.GMMParams(3, 2, init_scale=scales)
    cov = torch.eye(2).repeat(3, 1, 1)
    cov[2] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    not_pd = r"component 2: expected a positive-definite covariance, received a matrix with smallest eigenvalue -1"
    with pytest.raises(ValueError, match=not_pd):
        gmm.GMMParams(3, 2, covariance="full", init_covariance=cov)
    with pytest.raises(ValueError, match=r"component 0: expected a Cholesky factor with a positive diagonal"):
        gmm.GMMParams(3, 2, covariance="full").set_scale_tril(torch.zeros(2, 2))
    # A constant dimension and no jitter: the initial covariance from the data is singular.
    x = torch.randn(20, 2)
    x[:, 1] = 5.0
    with pytest.raises(ValueError, match=zero_scale.format(0, 1)):
        gmm.GMMParams(3, 2, reg_covar=0.0).init_from_data(x)


def test_data_with_nan_names_the_site_and_index():
    x = torch.randn(5, 2)
    x[3, 1] = float("nan")
    p = gmm.GMMParams(3, 2)
    with pytest.raises(ShapeError, match=r"site 'x': expected finite values, received nan at index \(3, 1\)"):
        gmm.model(x, params=p)
    with pytest.raises(ShapeError, match=r"site 'x': expected finite values, received nan at index \(3, 1\)"):
        fit_em(p, x)
    with pytest.raises(ShapeError, match=r"site 'x': expected shape \(batch, 2\), received \(5, 3\)"):
        gmm.log_likelihood(p, torch.randn(5, 3))
    with pytest.raises(ShapeError, match=r"site 'x': expected dtype torch.float32 .*received torch.float64"):
        gmm.posterior(p, torch.randn(5, 2, dtype=F64))


def test_unknown_covariance_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"covariance must be one of diag, full, received 'spherical'"):
        gmm.GMMParams(3, 2, covariance="spherical")
    with pytest.raises(ValueError, match=r"covariance must be one of diag, full, received 'spherical'"):
        pm.instantiate("gmm", "mean-field", num_data=5, model_kwargs={"covariance": "spherical"})


# --- Bayesian variant -----------------------------------------------------------------------------------------


def test_bayesian_model_collapsed_density_is_prior_plus_exact_log_likelihood():
    _, x, _ = simulated(40)
    inst = pm.instantiate("bayesian-gmm", "mean-field", num_data=40, model_kwargs={"num_components": 3})
    inst.modules["prior"].double()
    values = {
        "weights": torch.tensor(TRUE_WEIGHTS, dtype=F64),
        "locs": torch.tensor(TRUE_LOCS, dtype=F64),
        "scales": torch.tensor(TRUE_SCALES, dtype=F64),
    }

    def point_guide(x, idx=None, num_data=None):
        pyro.sample("weights", dist.Delta(values["weights"], event_dim=1))
        with pyro.plate("components", 3, dim=-1):
            pyro.sample("locs", dist.Delta(values["locs"], event_dim=1))
            pyro.sample("scales", dist.Delta(values["scales"], event_dim=1))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no model site is left without guide or enumeration
        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(inst.model, point_guide, x)
    log_prior = (
        dist.Dirichlet(torch.ones(3, dtype=F64)).log_prob(values["weights"])
        + dist.Normal(torch.tensor(0.0, dtype=F64), 10.0).log_prob(values["locs"]).sum()
        + dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0).log_prob(values["scales"]).sum()
    )
    with torch.no_grad():
        log_lik = gmm.log_likelihood(true_params("diag"), x).sum()
    assert -loss == pytest.approx(float(log_prior + log_lik), rel=1e-9)


@pytest.mark.slow
def test_bayesian_gmm_nuts_recovers_the_means_up_to_label_switching():
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_value

    truth = gmm.GMMParams(2, 2, learn_weights=True).double()
    truth.set_locs(torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=F64)).set_scales(0.7)
    x, z = gmm.simulate(truth, 60, torch.Generator().manual_seed(0))
    inst = pm.instantiate(
        "bayesian-gmm", "mean-field", num_data=60, model_kwargs={"num_components": 2, "loc_scale": 5.0}
    )
    inst.modules.double()
    start = gmm.GMMParams(2, 2).double().init_from_data(x, torch.Generator().manual_seed(3)).locs.detach().clone()
    kernel = NUTS(inst.model, max_plate_nesting=1, init_strategy=init_to_value(values={"locs": start}))
    mcmc = MCMC(kernel, num_samples=50, warmup_steps=50, disable_progbar=True)
    mcmc.run(x)
    locs = mcmc.get_samples()["locs"]  # (50, 2, 2)
    assert locs.shape == (50, 2, 2)
    post_mean, post_sd = locs.mean(0), locs.std(0)
    true_locs = truth.locs.detach()
    perm = match(true_locs, post_mean)
    # The truth lies within a few posterior sds of the posterior mean (each sd about 0.7 / sqrt(30) ≈ 0.13; the
    # N(0, 5²) prior pulls by 0.04 / 61 of a location, negligible), and the 50 correlated draws estimate that
    # mean with ArviZ's Monte Carlo standard error (from the effective sample size): within 4 standard errors
    # of the combined error sqrt(sd² + mcse²).
    table = diagnostics.summary({"locs": locs.numpy()[None]}, stat_focus="mean")
    mcse = torch.tensor(table["mcse_mean"].to_numpy(), dtype=F64).reshape(2, 2)
    assert (torch.tensor(table["ess_bulk"].to_numpy()) > 10).all(), table  # enough draws for the MCSE to hold
    error = (post_mean[perm] - true_locs).abs()
    assert (error <= 4 * (post_sd[perm] ** 2 + mcse[perm] ** 2).sqrt()).all(), (post_mean, post_sd, mcse)
