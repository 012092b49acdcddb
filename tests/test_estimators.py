"""Gradient estimators by name: unbiasedness (z-tests against the exact gradient), variance on the VAE, an exact
zero-variance property of sticking-the-landing, and one clear error for every estimator that cannot apply."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import ppl_models as pm
from ppl_models import compare
from ppl_models.compare import problems, training
from ppl_models.infer.estimators import EstimatorError
from ppl_models.infer.objectives import ESTIMATOR_NAMES, ESTIMATORS, make_estimator
from ppl_models.registry import UnknownNameError


def small_config(**sections):
    raw = {
        "vae": {"data": "simulated", "num_data": 64, "z_dim": 4, "hidden_dims": [32], "x_dim": 64},
        "linear_gaussian": {"num_data": 8, "z_dim": 2, "x_dim": 3},
        "gmm": {"num_data": 12, "num_components": 3},
        "gradients": {"batch_size": 8, "pretrain_steps": 0},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return compare.CompareConfig.from_dict(raw)


def bonferroni_threshold(num_tests: int, alpha: float = 1e-3) -> float:
    """|z| above which a family of ``num_tests`` z-tests rejects at family-wise level ``alpha``."""
    return float(stats.norm.isf(alpha / (2 * num_tests)))


def all_z(st: compare.GradientStats, exact=None):
    zs = []
    for name in sorted(st.mean):
        e = st.exact[name] if exact is None else exact[name]
        se = np.sqrt(st.var[name] / st.num_draws)
        keep = se > 0
        zs.append((st.mean[name][keep] - e[keep]) / se[keep])
    return np.concatenate(zs)


# --- unbiasedness on a Gaussian model -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reparameterized", "score-function", "sticking-the-landing", "analytic-kl",
                                  "score-function-avg-baseline"])
def test_mean_gradient_matches_the_exact_gradient_on_the_linear_gaussian_model(name):
    """z-test of the mean of each estimator against the closed-form ELBO gradient, every parameter element
    (model and guide), Bonferroni-corrected at family-wise level 0.001.  Each of the 100 draws averages 40
    vectorized particles (an unbiased estimate with variance / 40), so the test has power; a baseline is per
    draw, so that estimator takes 200 one-particle draws after 30 warm-up draws."""
    torch.set_default_dtype(torch.float64)
    try:
        problem = compare.build_problem("linear-gaussian", small_config(), seed=0)
        x, idx = problem.grad_args
        baseline = "baseline" in name
        est = make_estimator(name, problem.instance.model, problem.instance.guide, (x, idx), {},
                             num_particles=1 if baseline else 40)
        st = compare.gradient_statistics(problem, est, num_draws=200 if baseline else 100,
                                         warmup=30 if baseline else 0)
    finally:
        torch.set_default_dtype(torch.float32)
    z = all_z(st)
    assert z.size == 8 * 4 + 3 * 2 + 3 + 1  # guide λ (8 datapoints x 4) + W + b + log σ
    assert np.abs(z).max() < bonferroni_threshold(z.size), np.abs(z).max()


@pytest.mark.slow
def test_the_z_test_has_power_it_rejects_the_iwae_gradient_as_an_elbo_gradient():
    """The IWAE-5 gradient is unbiased for a different objective: the same z-test against the ELBO's exact
    gradient must reject it (the test above can fail).  The batch is a subsample (num_data = 3 x batch), so the
    ELBO's gradient is 3 x the batch's; tests/test_objectives.py z-tests the minibatch IWAE gradient against the
    full-data one."""
    import dataclasses

    torch.set_default_dtype(torch.float64)
    try:
        problem = compare.build_problem("linear-gaussian", small_config(), seed=0)
        x, idx = problem.grad_args
        num_data = 3 * x.shape[0]
        problem = dataclasses.replace(problem, grad_kwargs={"num_data": num_data})
        est = make_estimator("iwae", problem.instance.model, problem.instance.guide, (x, idx), {"num_data": num_data},
                             num_particles=5)
        st = compare.gradient_statistics(problem, est, num_draws=150)
        exact = {k: 3 * v for k, v in compare.exact_gradient(problem, sorted(st.mean)).items()}
    finally:
        torch.set_default_dtype(torch.float32)
    z = all_z(st, exact)
    assert np.abs(z).max() > 3 * bonferroni_threshold(z.size)


# --- variance on the VAE ------------------------------------------------------------------------------------


def vae_guide_variances(num_draws=30):
    config = small_config(gradients={"pretrain_steps": 20, "batch_size": 16}, training={"batch_size": 32})
    problem = compare.build_problem("vae", config, seed=0)
    compare.pretrain(problem, config, 0)
    state = training.snapshot(problem)
    variance = {}
    for name in ("reparameterized", "score-function", "score-function-avg-baseline", "score-function-nn-baseline"):
        training.restore(problem, state)
        est = training.estimator_for(problem, name, config)
        pyro.set_rng_seed(1)
        st = compare.gradient_statistics(problem, est, num_draws=num_draws, warmup=15 if "baseline" in name else 0)
        variance[name] = np.concatenate([st.var[n] for n in sorted(st.var) if st.role[n] == "guide"])
    return variance


@pytest.mark.slow
def test_vae_score_function_variance_dwarfs_the_reparameterized_variance_and_baselines_reduce_it():
    """VAE 64-32-4 on data simulated from the model, batch 16, 30 one-draw gradients at the parameters after 20
    Adam steps; mean variance per encoder parameter element.  Measured here (seed 0, one thread): reparameterized
    0.47, score-function 1.3e3 (2.8e3 times larger), average baseline 8.7 (150 times smaller than without),
    neural baseline 42 (31 times smaller).
    Each comparison is over the encoder's parameter elements: the mean of log(variance A / variance B) per element
    is above 0 by more than 5 standard errors (their spread over the elements / sqrt(count))."""
    variance = vae_guide_variances()
    for larger, smaller in (("score-function", "reparameterized"), ("score-function", "score-function-avg-baseline"),
                            ("score-function", "score-function-nn-baseline")):
        a, b = variance[larger], variance[smaller]
        keep = (a > 0) & (b > 0)  # elements with a gradient (a ReLU unit dead on the batch has none)
        log_ratio = np.log(a[keep] / b[keep])
        se = log_ratio.std(ddof=1) / math.sqrt(log_ratio.size)
        assert log_ratio.mean() > 5 * se, (larger, smaller, log_ratio.mean(), se)


# --- sticking the landing: exactly zero guide gradient at the exact posterior ---------------------------------


def test_sticking_the_landing_gives_zero_guide_gradient_at_the_exact_posterior():
    """With z_dim = 1 the per-datapoint Gaussian guide can equal the posterior; then every single-draw STL
    gradient of the guide's parameters is zero (Roeder et al. 2017), while the reparameterized one is not."""
    from ppl_models import linear_gaussian as lg

    torch.set_default_dtype(torch.float64)
    try:
        inst = pm.instantiate("linear-gaussian", "mean-field", num_data=6,
                              model_kwargs={"z_dim": 1, "x_dim": 3, "seed": 2})
        params = inst.modules["params"]
        x, _ = lg.simulate(params, 6, torch.Generator().manual_seed(1))
        z_loc, scale_tril = lg.exact_posterior(params, x)
        table = inst.modules["local_params"].tables["z"]
        with torch.no_grad():
            table.weight[:, 0] = z_loc[:, 0]
            table.weight[:, 1] = torch.log(torch.expm1(scale_tril[0, 0]))
        idx = torch.arange(6)
        norms = {}
        for name in ("sticking-the-landing", "reparameterized"):
            est = make_estimator(name, inst.model, inst.guide, (x, idx), {})
            worst = 0.0
            for _ in range(5):
                for p in pyro.get_param_store().values():
                    p.grad = None
                est.loss_and_grads(x, idx)
                g = pyro.get_param_store()["local_params$$$tables.z.weight"].grad
                worst = max(worst, float(g.coalesce().to_dense().abs().max()))
            norms[name] = worst
    finally:
        torch.set_default_dtype(torch.float32)
    assert norms["sticking-the-landing"] < 1e-10, norms
    assert norms["reparameterized"] > 1e-3, norms


# --- one clear error per estimator that cannot apply --------------------------------------------------------


def gmm_instance(n=10):
    inst = pm.instantiate("gmm", "mean-field", num_data=n, model_kwargs={"num_components": 2})
    x = torch.randn(n, 2)
    return inst, x, torch.arange(n)


@pytest.mark.parametrize("name", ["reparameterized", "analytic-kl", "iwae", "sticking-the-landing"])
def test_pathwise_estimators_on_a_discrete_latent_name_the_site(name):
    inst, x, idx = gmm_instance()
    with pytest.raises(EstimatorError, match=rf"estimator '{name}': guide site 'z' \(Categorical\) has no "
                                             r"reparameterized sampler \(a discrete latent\)"):
        make_estimator(name, inst.model, inst.guide, (x, idx), {})


@pytest.mark.parametrize("name", ["score-function", "score-function-avg-baseline", "score-function-nn-baseline"])
def test_score_function_estimators_apply_to_a_discrete_latent(name):
    """On the GMM with a Categorical q(z_i) the exact gradient sums over the guide's values: the z-test of the
    mean of 100 draws against it, every element of the model's and guide's parameters, Bonferroni-corrected at
    family-wise level 0.001 (as for the Gaussian model above)."""
    torch.set_default_dtype(torch.float64)
    try:
        problem = compare.build_problem("gmm", small_config(), seed=0)
        x, idx = problem.grad_args
        est = make_estimator(name, problem.instance.model, problem.instance.guide, (x, idx), {})
        st = compare.gradient_statistics(problem, est, num_draws=100, warmup=30 if "baseline" in name else 0)
    finally:
        torch.set_default_dtype(torch.float32)
    z = all_z(st)
    assert z.size == 8 * 3 + 6 + 6  # q's logits of the batch's 8 datapoints x 3 + locs + log-scales
    assert np.abs(z).max() < bonferroni_threshold(z.size), np.abs(z).max()


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_iwae_with_fewer_than_one_particle_is_an_error(k):
    inst = pm.instantiate("linear-gaussian", "mean-field", num_data=4)
    x = torch.randn(4, 5)
    with pytest.raises(EstimatorError, match=r"estimator 'iwae': num_particles \(K, the number of importance "
                                             rf"samples\) must be an integer >= 1, received {k}"):
        make_estimator("iwae", inst.model, inst.guide, (x, torch.arange(4)), {}, num_particles=k)


def test_analytic_kl_without_a_known_kl_names_the_site():
    def model(x):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, s), obs=x)

    def guide(x):
        pyro.sample("s", dist.Gamma(pyro.param("a", torch.tensor(2.0)), 1.0))

    with pytest.raises(EstimatorError, match=r"estimator 'analytic-kl': guide site 's' \(Gamma\): no closed-form KL"):
        make_estimator("analytic-kl", model, guide, (torch.randn(5),), {})
    assert make_estimator("reparameterized", model, guide, (torch.randn(5),), {}).name == "reparameterized"


def test_sticking_the_landing_names_a_site_it_cannot_detach():
    def model(x):
        s = pyro.sample("s", dist.Uniform(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    def guide(x):
        pyro.sample("s", dist.Uniform(0.0, torch.sigmoid(pyro.param("b", torch.tensor(1.0)))))

    message = r"'sticking-the-landing': guide site 's': cannot stop the gradient .*Uniform"
    with pytest.raises(EstimatorError, match=message):
        make_estimator("sticking-the-landing", model, guide, (torch.randn(3),), {})


@pytest.mark.parametrize("name", ["score-function-avg-baseline", "score-function-nn-baseline", "analytic-kl", "iwae"])
def test_estimators_that_cannot_sum_out_an_enumerated_site_say_so(name):
    x = torch.randn(10, 2)
    problem = problems.bayesian_gmm_problem(small_config(bayesian_gmm={"num_data": 10}), x, 2, seed=0)
    with pytest.raises(EstimatorError, match=rf"estimator '{name}': the model enumerates site 'z'"):
        make_estimator(name, problem.instance.model, problem.instance.guide, (x, None), {})


@pytest.mark.parametrize("name", ["reparameterized", "score-function", "sticking-the-landing"])
def test_enumerated_models_run_on_trace_enum_elbo(name):
    x = torch.randn(10, 2)
    problem = problems.bayesian_gmm_problem(small_config(bayesian_gmm={"num_data": 10}), x, 2, seed=0)
    est = make_estimator(name, problem.instance.model, problem.instance.guide, (x, None), {})
    assert type(est.elbo).__name__ == "TraceEnum_ELBO"
    # The estimator changes only the gradient: its loss is TraceEnum_ELBO's -ELBO of the same draws, exactly.
    pyro.set_rng_seed(3)
    loss = est.loss_and_grads(x, None)
    pyro.set_rng_seed(3)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    expected = elbo.loss(problem.instance.model, problem.instance.guide, x, None)
    assert loss == pytest.approx(expected, rel=1e-6)


def test_unknown_estimator_lists_the_valid_ones():
    inst, x, idx = gmm_instance()
    with pytest.raises(UnknownNameError, match=r"unknown estimator 'reinforce'; valid estimators: IWAE, RenyiELBO, "
                                               r"TraceEnum_ELBO, .*, analytic-kl, iwae, reparameterized, score-function"):
        make_estimator("reinforce", inst.model, inst.guide, (x, idx), {})


def test_every_estimator_runs_on_the_vae_and_baselines_are_auxiliary_parameters():
    """Every name of the one vocabulary (Pyro's ELBOs, IWAE and the package's estimators) as an estimator."""
    inst = pm.instantiate("vae", "amortized", num_data=None, model_kwargs={"z_dim": 2, "hidden_dims": [8], "x_dim": 16},
                          guide_kwargs={"hidden_dims": [8]})
    x = torch.bernoulli(torch.full((4, 16), 0.4))
    targets = {"ELBO": "ELBO", "IWAE": "IWAE-3", "RenyiELBO": "RenyiELBO(alpha=0)-3"}
    for name in ESTIMATOR_NAMES:
        pyro.clear_param_store()
        bound = ESTIMATORS[name].objective != "ELBO"
        est = make_estimator(name, inst.model, inst.guide, (x,), {}, num_particles=3 if bound else 1)
        # Only the gradient differs between estimators: the loss is the objective's value on the same draws with
        # the unchanged guide (-ELBO, -IWAE-3, ...; with the closed-form KL for analytic-kl), exactly.
        pyro.set_rng_seed(3)
        loss = est.loss_and_grads(x)
        pyro.set_rng_seed(3)
        assert loss == pytest.approx(est.elbo.loss(inst.model, inst.guide, x), rel=1e-6), name
        assert est.target == targets[ESTIMATORS[name].objective]
        aux = est.auxiliary_param_names()
        if name == "score-function-nn-baseline":
            assert aux and all(n.startswith("nn_baseline$$$") for n in aux)
        elif name == "score-function-avg-baseline":
            assert aux == ["__baseline_avg_downstream_cost_z"]
        else:
            assert aux == []
