"""Objectives and estimators by name (ppl_models.infer.objectives): one vocabulary for fit and compare, and the
IWAE objective with the data plate's N/B scale outside the log-sum-exp.

IWAE, exact: with the linear-Gaussian model's exact posterior as the guide every log weight is log p(x_i), so the
loss is -(N/B) Σ_i log p(x_i) for any K.  Statistical: the minibatch loss and its gradient are unbiased for the
full-data bound (z-tests against full-data draws), and Pyro's RenyiELBO — the scale inside the log-sum-exp —
is rejected by the same tests.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import ppl_models as pm
from ppl_models import linear_gaussian as lg
from ppl_models.app.config import Config, ConfigError
from ppl_models.data import TensorDataset
from ppl_models.infer import Trainer
from ppl_models.infer.estimators import EstimatorError
from ppl_models.infer.objectives import ESTIMATOR_NAMES, ESTIMATORS, IWAE_ELBO, EstimatorELBO, make_elbo
from ppl_models.registry import UnknownNameError


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def linear_gaussian(guide: str, num_data: int, seed: int = 1, data_seed: int = 1, **guide_kwargs):
    """The model (z_dim 2, x_dim 3, parameters from ``seed``) and ``num_data`` rows simulated from the model with
    the parameters of ``data_seed``."""
    inst = pm.instantiate("linear-gaussian", guide, num_data=num_data, guide_kwargs=guide_kwargs,
                          model_kwargs={"z_dim": 2, "x_dim": 3, "seed": seed, "bias_scale": 1.0})
    truth = lg.LinearGaussianParams(2, 3, bias_scale=1.0, generator=torch.Generator().manual_seed(data_seed))
    x, _ = lg.simulate(truth, num_data, torch.Generator().manual_seed(data_seed))
    return inst, x


# --- IWAE, exact -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("K", [1, 4, 50])
@pytest.mark.parametrize("N, start", [(8, 0), (32, 3)])  # rows start..start+7 of N: N/B = 1 or 4
def test_iwae_loss_of_the_exact_posterior_is_minus_the_scaled_log_evidence(float64, K, N, start, vectorize):
    inst, x = linear_gaussian("exact", N)
    idx = torch.arange(start, start + 8)
    elbo = make_elbo("IWAE", num_particles=K, vectorize_particles=vectorize)
    assert type(elbo) is IWAE_ELBO
    loss = elbo.loss(inst.model, inst.guide, x[idx], idx, num_data=N)
    log_evidence = lg.log_evidence(inst.modules["params"], x[idx]).sum().item()
    assert loss == pytest.approx(-(N / 8) * log_evidence, rel=1e-12)


def test_iwae_on_a_data_plate_at_dim_minus_two_sums_the_inner_plate_inside_each_weight(float64):
    """z_i ~ N(0, 1), x_ij ~ N(z_i, 1) for j < J in an inner plate at dim -1, datapoints at dim -2; the guide is the
    exact posterior N(Σ_j x_ij / (1 + J), 1 / (1 + J)), so the loss is -(N/B) Σ_i log N(x_i; 0, I + 11ᵀ)."""
    N, J = 20, 3
    x = torch.randn(N, J, generator=torch.Generator().manual_seed(0)) * 1.5

    def plates(x, idx):
        return pyro.plate("data", N, subsample=idx, dim=-2)

    def model(x, idx):
        with plates(x, idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 1]))
            with pyro.plate("features", J, dim=-1):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, idx):
        with plates(x, idx):
            pyro.sample("z", dist.Normal(x.sum(-1, keepdim=True) / (1 + J), (1 / (1 + J)) ** 0.5))

    idx = torch.tensor([1, 4, 7, 9, 15])
    evidence = dist.MultivariateNormal(torch.zeros(J), torch.eye(J) + torch.ones(J, J)).log_prob(x[idx]).sum()
    for K in (1, 6):
        loss = IWAE_ELBO(num_particles=K, max_plate_nesting=2).loss(model, guide, x[idx], idx)
        assert loss == pytest.approx(-(N / 5) * evidence.item(), rel=1e-12)


def test_renyi_elbo_scales_each_log_weight_inside_the_log_sum_exp_and_iwae_outside(float64):
    """Same traces (same seed): with log w_ik from IWAE_ELBO.log_weights, the IWAE loss is
    -(N/B) Σ_i [logsumexp_k log w_ik - log K] and Pyro's RenyiELBO(alpha=0) is -Σ_i [logsumexp_k (N/B) log w_ik - log K]
    — different numbers under subsampling, the same without."""
    N, K = 40, 16
    inst, x = linear_gaussian("mean-field", N, init_scale=1.0)
    idx = torch.arange(10)
    args, kwargs = (x[idx], idx), {"num_data": N}
    iwae = IWAE_ELBO(num_particles=K, max_plate_nesting=1)  # no guessing run: the same draws for both
    renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(5)
    (traces,) = list(iwae._get_traces(inst.model, inst.guide, args, kwargs))
    log_w, scale = iwae.log_weights(*traces)
    assert log_w.shape == (K, 10) and scale == 4.0 and float(log_w.detach().std(0).min()) > 0.1  # the weights vary with k
    torch.manual_seed(5)
    iwae_loss = iwae.loss(inst.model, inst.guide, *args, **kwargs)
    torch.manual_seed(5)
    renyi_loss = renyi.loss(inst.model, inst.guide, *args, **kwargs)
    log_k = math.log(K)
    assert iwae_loss == pytest.approx(-(4.0 * (torch.logsumexp(log_w, 0) - log_k)).sum().item(), rel=1e-12)
    assert renyi_loss == pytest.approx(-(torch.logsumexp(4.0 * log_w, 0) - log_k).sum().item(), rel=1e-12)
    assert abs(renyi_loss - iwae_loss) > 5.0  # by Jensen renyi < iwae here: the bug
    torch.manual_seed(5)
    unscaled = iwae.loss(inst.model, inst.guide, *args, num_data=None)  # the bound model's default is N
    torch.manual_seed(5)
    assert renyi.loss(inst.model, inst.guide, *args, num_data=None) == pytest.approx(unscaled, rel=1e-12)
    assert iwae_loss == pytest.approx(4.0 * unscaled, rel=1e-12)


def test_a_scale_common_to_every_site_weighs_the_bound_outside_as_a_data_parallel_rank_needs(float64):
    """A data-parallel rank's loss is its rows' loss under poutine.scale(its share of the batch) (or masked to
    nothing, ppl_models.infer.distributed.ELBOLoss): for IWAE the share multiplies the bound, outside the
    log-sum-exp, so the ranks' losses add up to the global batch's."""
    from torch import nn

    from ppl_models.infer.distributed import ELBOLoss

    N = 40
    inst, x = linear_gaussian("mean-field", N, init_scale=1.0)
    idx = torch.arange(10)
    iwae = IWAE_ELBO(num_particles=8, max_plate_nesting=1)
    torch.manual_seed(2)
    whole = iwae.loss(inst.model, inst.guide, x[idx], idx, num_data=N)
    rank_loss = ELBOLoss(iwae, inst.model, inst.guide, nn.ModuleDict())
    torch.manual_seed(2)
    share = rank_loss(x[idx], idx=idx, share=0.25, num_data=N).item()
    assert share == pytest.approx(0.25 * whole, rel=1e-12)
    assert rank_loss(x[idx], idx=idx, share=1.0, masked=True, num_data=N).item() == 0.0


# --- IWAE, statistical ---------------------------------------------------------------------------------------


def minibatch_and_full_draws(objective, num_draws, N=24, B=6, K=5, grads=False):
    """``num_draws`` minibatch losses (a uniformly drawn batch of B rows, scale N/B, fresh particles) and as many
    full-data losses (all N rows, fresh particles), of the linear-Gaussian model with a mean-field guide away
    from the posterior; with ``grads`` the gradients of the model's parameters instead."""
    inst, x = linear_gaussian("mean-field", N, init_scale=1.0)
    full_objective = IWAE_ELBO(num_particles=K)
    gen = torch.Generator().manual_seed(11)
    store = pyro.get_param_store()
    out = {"minibatch": [], "full": []}
    for _ in range(num_draws):
        for kind in out:
            idx = torch.randperm(N, generator=gen)[:B] if kind == "minibatch" else torch.arange(N)
            elbo = objective if kind == "minibatch" else full_objective
            if not grads:
                out[kind].append(elbo.loss(inst.model, inst.guide, x[idx], idx, num_data=N))
                continue
            for p in store.values():
                p.grad = None
            elbo.loss_and_grads(inst.model, inst.guide, x[idx], idx, num_data=N)
            model_params = [store[n] for n in sorted(store.keys()) if n.startswith("params$$$")]
            out[kind].append(torch.cat([p.grad.reshape(-1) for p in model_params]).numpy().copy())
    return {k: np.array(v) for k, v in out.items()}


def z_scores(draws):
    a, b = draws["minibatch"], draws["full"]
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return (a.mean(0) - b.mean(0)) / se


def test_the_minibatch_iwae_loss_is_unbiased_for_the_full_data_bound_and_renyis_is_not(float64):
    """1500 minibatch losses (B = 6 of N = 24, K = 5) against 1500 full-data losses: IWAE's means agree within
    4 standard errors; RenyiELBO's minibatch mean is more than 10 standard errors off (measured, seed 0: the
    full-data loss 120.6, IWAE's minibatch mean 120.8, |z| 0.5; RenyiELBO's 110.1, |z| 27.5)."""
    z_iwae = z_scores(minibatch_and_full_draws(IWAE_ELBO(num_particles=5), 1500))
    assert abs(z_iwae) < 4.0, z_iwae
    renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=5, vectorize_particles=True)
    z_renyi = z_scores(minibatch_and_full_draws(renyi, 1500))
    assert abs(z_renyi) > 10.0, z_renyi


@pytest.mark.slow
def test_the_minibatch_iwae_gradient_is_unbiased_for_the_full_data_gradient(float64):
    """The gradient of W, b, log σ: 1500 minibatch draws against 1500 full-data draws, every element z-tested at
    family-wise level 0.001 (Bonferroni); the test has power: RenyiELBO's minibatch gradient is rejected
    (measured, seed 0: IWAE max |z| 0.9, RenyiELBO 21.5; the threshold is 3.9)."""
    threshold = float(stats.norm.isf(1e-3 / (2 * 10)))  # W (3 x 2) + b (3) + log σ
    z = z_scores(minibatch_and_full_draws(IWAE_ELBO(num_particles=5), 1500, grads=True))
    assert z.size == 10 and np.abs(z).max() < threshold, z
    pyro.clear_param_store()
    renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=5, vectorize_particles=True)
    z = z_scores(minibatch_and_full_draws(renyi, 1500, grads=True))
    assert np.abs(z).max() > 3 * threshold, np.abs(z).max()


# --- what IWAE refuses -----------------------------------------------------------------------------------------


def global_model(x, idx=None, num_data=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", num_data or x.shape[0], subsample=idx):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def global_guide(x, idx=None, num_data=None):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.3))


def test_iwae_refuses_a_global_latent_under_subsampling_and_takes_the_joint_bound_without():
    x = torch.randn(10) + 2.0
    elbo = make_elbo("IWAE", num_particles=7, max_plate_nesting=1)
    with pytest.raises(EstimatorError, match=r"IWAE_ELBO: latent site 'mu' lies outside the subsampled data plate "
                                             r"'data' \(a global site\)"):
        elbo.loss(global_model, global_guide, x[:5], torch.arange(5), num_data=10)
    # the whole data set as one batch: the joint bound log (1/K) Σ_k p(x, mu_k) / q(mu_k), as Pyro's RenyiELBO
    torch.manual_seed(0)
    joint = elbo.loss(global_model, global_guide, x)
    torch.manual_seed(0)
    renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    assert joint == pytest.approx(renyi.loss(global_model, global_guide, x), rel=1e-6)


def test_iwae_refuses_a_discrete_guide_site_naming_it():
    inst = pm.instantiate("gmm", "mean-field", num_data=10, model_kwargs={"num_components": 2})
    x, idx = torch.randn(10, 2), torch.arange(10)
    with pytest.raises(EstimatorError, match=r"IWAE_ELBO: guide site 'z' \(Categorical\) has no reparameterized "
                                             r"sampler"):
        make_elbo("IWAE", num_particles=3).loss(inst.model, inst.guide, x, idx)


# --- one vocabulary --------------------------------------------------------------------------------------------


def test_one_table_resolves_every_name_for_fit_and_compare():
    assert set(ESTIMATOR_NAMES) == {"Trace_ELBO", "TraceGraph_ELBO", "TraceMeanField_ELBO", "TraceEnum_ELBO",
                                    "RenyiELBO", "IWAE", "reparameterized", "score-function",
                                    "score-function-avg-baseline", "score-function-nn-baseline", "analytic-kl",
                                    "iwae", "sticking-the-landing"}
    assert ESTIMATORS["IWAE"].elbo is ESTIMATORS["iwae"].elbo is IWAE_ELBO
    assert type(make_elbo("RenyiELBO")) is pyro.infer.RenyiELBO
    assert type(make_elbo("Trace_ELBO")) is pyro.infer.Trace_ELBO
    assert isinstance(make_elbo("score-function"), EstimatorELBO)
    assert not hasattr(type(make_elbo("score-function")), "differentiable_loss")  # TraceGraph_ELBO has none
    assert hasattr(type(make_elbo("sticking-the-landing")), "differentiable_loss")
    with pytest.raises(ValueError, match="alpha applies only to RenyiELBO, not to IWAE"):
        make_elbo("IWAE", alpha=0.5)


def test_an_unknown_name_is_one_error_listing_every_name_in_fit_config_and_compare(tmp_path):
    message = r"unknown estimator 'IWEA'; valid estimators: IWAE, RenyiELBO, .*, Trace_ELBO, analytic-kl, iwae, .*"
    with pytest.raises(UnknownNameError, match=message):
        make_elbo("IWEA")
    with pytest.raises(UnknownNameError, match=message):
        Trainer(global_model, global_guide, TensorDataset(torch.randn(8)), elbo="IWEA")
    with pytest.raises(ConfigError, match=r"\[train\] elbo: " + message):
        Config.from_dict({"train": {"elbo": "IWEA"}})
    from ppl_models import compare

    with pytest.raises(ConfigError, match=r"\[compare\]\.estimators: " + message):
        compare.CompareConfig.from_dict({"compare": {"estimators": ["iwae", "IWEA"]}})
    assert Config.from_dict({"train": {"elbo": "score-function-avg-baseline"}}).train.elbo


def fit_gmm(elbo: str, **kwargs):
    inst = pm.instantiate("gmm", "mean-field", num_data=12, model_kwargs={"num_components": 2})
    x = torch.randn(12, 2)
    return Trainer(inst.model, inst.guide, TensorDataset(x), elbo=elbo, batch_size=4, num_epochs=2, lr=0.05,
                   progress=False, **kwargs).fit()


@pytest.mark.parametrize("name", ["score-function", "score-function-avg-baseline", "score-function-nn-baseline"])
def test_fit_trains_with_compares_score_function_estimators(name):
    losses, initial = [], {}

    def record(trainer, step, loss):
        if not initial:  # after the first step every parameter exists; compare with the end of training
            initial.update({n: p.detach().clone() for n, p in pyro.get_param_store().items()})
        losses.append(loss)

    result = fit_gmm(name, callback=record)
    assert result.step == 6 and len(losses) == 6
    # the epoch's train ELBO is exactly the mean of its steps' N/B-scaled losses, per datapoint
    assert result.history["train_elbo"] == pytest.approx([-sum(losses[:3]) / 36, -sum(losses[3:]) / 36], rel=1e-12)
    # the estimator's gradient reached every parameter: each moved in the five steps after the first
    # (the guide's table rows through the score-function surrogate, the model's through the pathwise term)
    moved = {n: not torch.equal(p.detach(), initial[n]) for n, p in pyro.get_param_store().items() if n in initial}
    assert moved and all(moved.values()), moved
    if name == "score-function-nn-baseline":  # the baseline's network is trained with the model and guide
        assert any(n.startswith("nn_baseline$$$") for n in moved)


def test_fit_refuses_a_pathwise_estimator_on_a_discrete_latent_naming_the_site():
    with pytest.raises(EstimatorError, match=r"estimator 'reparameterized': guide site 'z' \(Categorical\) has no "
                                             r"reparameterized sampler \(a discrete latent\)"):
        fit_gmm("reparameterized")


def test_fit_refuses_an_average_baseline_whose_batches_change_size():
    inst = pm.instantiate("gmm", "mean-field", num_data=10, model_kwargs={"num_components": 2})
    with pytest.raises(EstimatorError, match=r"num_data=10 is not a multiple of batch_size=4"):
        Trainer(inst.model, inst.guide, TensorDataset(torch.randn(10, 2)), elbo="score-function-avg-baseline",
                batch_size=4, num_epochs=1, progress=False).fit()


def test_fit_with_iwae_optimizes_the_iwae_objective(float64):
    """``[train] elbo = "IWAE"``: the engine's step loss is IWAE_ELBO's (N/B-scaled outside), here with the exact
    guide -(N/B) Σ log p(x_i) on the batch; training raises the bound."""
    inst, x = linear_gaussian("exact", 32, seed=1, data_seed=2)
    losses = []
    trainer = Trainer(inst.model, inst.guide, TensorDataset(x), elbo="IWAE", num_particles=5, batch_size=8,
                      num_epochs=3, lr=0.05, progress=False, fast_path=False,
                      callback=lambda trainer, step, loss: losses.append(loss))
    assert type(trainer.objective) is IWAE_ELBO
    params = inst.modules["params"]
    with torch.no_grad():
        start = -lg.log_evidence(params, x).sum().item()
    trainer.fit()
    with torch.no_grad():
        end = -lg.log_evidence(params, x).sum().item()
    assert end < start - 1.0
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
