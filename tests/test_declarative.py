"""Declarative models: the PPCA / factor-analysis example built from a description, its auto-built guides,
exact and statistical checks of its ELBO and IWAE against the exact marginal likelihood, plain Pyro SVI,
the CLI end to end, and the error messages of declarations and configs."""

import json
import math
from argparse import Namespace
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_models import registry
from ppl_models.app.cli import main as cli_main
from ppl_models.app.config import ConfigError, load_config
from ppl_models.declarative import DeclarationError, Latent, Observed, declare_model
from ppl_models.infer import diagnostics
from ppl_models.infer.evaluate import evaluate
from ppl_models.app.experiment import Experiment
from ppl_models.infer import fit
from ppl_models.linear_gaussian import LinearGaussianParams, log_evidence
from ppl_models.ppca import exact_log_likelihood, ppca
from ppl_models.spec import LatentSite, ShapeError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "ppca.toml"
ppca_example = registry.load_source(str(REPO / "examples" / "ppca.py"))  # the example script (its main)


def truth(z_dim, x_dim, seed=0):
    """Networks of a factor-analysis model with clearly non-isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    nets = ppca.build(z_dim=z_dim, x_dim=x_dim).modules["networks"]
    with torch.no_grad():
        nets.nets["loading"].weight.copy_(torch.randn(x_dim, z_dim, generator=g))
        nets.nets["loading"].bias.copy_(torch.randn(x_dim, generator=g))
        nets.params["log_noise_scale"].copy_(torch.linspace(0.3, 1.0, x_dim).log())
    return nets


def factor_analysis_elbo(nets, guide, x):
    """The closed-form ELBO of each row of ``x`` ``(n, x_dim)`` for a Gaussian guide q(z_i) = N(m_i, diag(v_i)):
    E_q log N(x_i; W z + b, Ψ) + E_q log N(z; 0, I) + H[q_i], with
    E_q log N(x; W z + b, Ψ) = -½ Σ_d [log 2πψ_d + ((x - W m - b)_d² + Σ_j W_dj² v_j) / ψ_d]."""
    with torch.no_grad(), pyro.poutine.block():
        fn = pyro.poutine.trace(guide).get_trace(x, torch.arange(x.shape[0])).nodes["z"]["fn"]
        m, v = fn.base_dist.loc, fn.base_dist.scale**2  # Normal(...).to_event(1): (n, z_dim) each
        loading = nets.nets["loading"]
        W, b = loading.weight, loading.bias
        psi = nets.params["log_noise_scale"].exp().pow(2).expand(W.shape[0])
        resid = x - m @ W.T - b
        e_lik = -0.5 * (torch.log(2 * math.pi * psi).sum() + ((resid**2 + v @ (W**2).T) / psi).sum(-1))
        e_prior = -0.5 * (m.shape[-1] * math.log(2 * math.pi) + (m**2 + v).sum(-1))
        return (e_lik + e_prior + fn.entropy()).double().numpy()


def mean_and_se(values):
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def copy_networks(target, source):
    with torch.no_grad():
        for p, q in zip(target.parameters(), source.parameters()):
            p.copy_(q)


def test_spec_and_auto_built_guides_have_the_declared_sites_and_shapes():
    n, batch = 40, 7
    x = torch.randn(batch, 6)
    idx = torch.arange(batch)
    mf = registry.instantiate("ppca", "mean-field", num_data=n, model_kwargs={"z_dim": 3, "x_dim": 6})
    assert mf.spec.local_latents == (LatentSite("z", (3,)),)
    assert mf.spec.observed.name == "x" and mf.spec.observed.event_shape == (6,)
    assert mf.modules["local_params"].tables["z"].weight.shape == (n, 2 * 3)
    am = registry.instantiate("ppca", "amortized-mlp", num_data=n, model_kwargs={"z_dim": 3, "x_dim": 6},
                              guide_kwargs={"hidden_dims": [16]})
    encoder = am.modules["encoder"]
    assert encoder.body[0].in_features == 6 and encoder.heads["z"].out_features == 2 * 3
    for instance in (mf, am):
        trace = pyro.poutine.trace(instance.guide).get_trace(x, idx, num_data=n)
        sites = {k: s for k, s in trace.nodes.items() if s["type"] == "sample" and not k.startswith("data")}
        assert sorted(sites) == ["z"]
        assert sites["z"]["value"].shape == (batch, 3) and sites["z"]["fn"].event_shape == (3,)
        model_trace = pyro.poutine.trace(pyro.poutine.replay(instance.model, trace=trace)).get_trace(x, idx, num_data=n)
        assert model_trace.nodes["x"]["is_observed"] and model_trace.nodes["x"]["fn"].event_shape == (6,)
        assert model_trace.nodes["z"]["fn"].batch_shape == (batch,)
    assert registry.get_guide("ppca", "amortized").build is registry.get_guide("ppca", "amortized-mlp").build


def test_declared_joint_density_is_the_factor_analysis_density():
    """log p(x, z) of the built model equals the hand-written Gaussian densities (exact)."""
    nets = truth(2, 4)
    x, z = torch.randn(5, 4), torch.randn(5, 2)
    conditioned = pyro.poutine.condition(ppca.model, data={"z": z})
    trace = pyro.poutine.trace(conditioned).get_trace(x, networks=nets)
    trace.compute_log_prob()
    loading = nets.nets["loading"]
    scale = nets.params["log_noise_scale"].exp()
    expected = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    expected = expected + dist.Normal(z @ loading.weight.T + loading.bias, scale).log_prob(x).sum(-1)
    got = trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]
    torch.testing.assert_close(got, expected)


def test_exact_log_likelihood_agrees_with_the_linear_gaussian_model():
    """The example's closed form, isotropic case, equals the package's conjugate model's evidence."""
    nets = ppca.build(z_dim=2, x_dim=5, isotropic=True).modules["networks"]
    lg = LinearGaussianParams(2, 5, init_sigma=0.7)
    with torch.no_grad():
        nets.nets["loading"].weight.copy_(lg.W), nets.nets["loading"].bias.copy_(torch.arange(5.0))
        lg.b.copy_(torch.arange(5.0)), nets.params["log_noise_scale"].fill_(math.log(0.7))
    x = torch.randn(9, 5)
    torch.testing.assert_close(exact_log_likelihood(nets, x), log_evidence(lg, x))


def test_guide_equal_to_the_exact_posterior_gives_elbo_equal_to_the_log_evidence():
    """z_dim = 1: the exact posterior is one Gaussian per datapoint, which the mean-field guide can hold."""
    n = 30
    instance = registry.instantiate("ppca", "mean-field", num_data=n, model_kwargs={"z_dim": 1, "x_dim": 4})
    nets = instance.modules["networks"]
    copy_networks(nets, truth(1, 4))
    x = ppca.simulate(nets, n)["x"]
    W, b = nets.nets["loading"].weight.detach(), nets.nets["loading"].bias.detach()
    psi = nets.params["log_noise_scale"].detach().exp().pow(2)
    precision = 1.0 + (W[:, 0] ** 2 / psi).sum()
    z_loc = ((x - b) @ (W[:, 0] / psi)) / precision
    z_scale = precision.rsqrt()
    with torch.no_grad():
        table = instance.modules["local_params"].tables["z"].weight
        table[:, 0] = z_loc
        table[:, 1] = z_scale.expm1().log()  # inverse softplus
    result = evaluate(instance.model, instance.guide, x, spec=instance.spec, num_samples=64, progress=False)
    exact = exact_log_likelihood(nets, x).detach().double().numpy()
    assert abs(result.elbo - exact).max() < 1e-4
    assert abs(result.log_likelihood - exact).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["amortized-mlp", "mean-field"])
def test_fitted_elbo_and_iwae_bracket_the_exact_log_likelihood(guide):
    """ELBO <= IWAE-K <= log p(x): the first per datapoint for the same draws, the second in expectation;
    tolerances are 3 standard errors of the mean over datapoints of the per-datapoint differences."""
    n, z_dim, x_dim = 400, 2, 6
    data_nets = truth(z_dim, x_dim, seed=3)
    x = ppca.simulate(data_nets, n)["x"]
    pyro.set_rng_seed(0)
    instance = registry.instantiate("ppca", guide, num_data=n, model_kwargs={"z_dim": z_dim, "x_dim": x_dim})
    from ppl_models.data import TensorDataset

    fit(instance.model, instance.guide, TensorDataset(x), elbo="Trace_ELBO", lr=0.02, batch_size=100,
        num_epochs=60, progress=False)
    result = evaluate(instance.model, instance.guide, x, spec=instance.spec, num_samples=500, progress=False,
                      generator=torch.Generator().manual_seed(1))
    exact = exact_log_likelihood(instance.modules["networks"], x).detach().double().numpy()
    # The Monte Carlo ELBO estimates the fitted guide's closed-form ELBO: within 5 standard errors.
    error, se = mean_and_se(result.elbo - factor_analysis_elbo(instance.modules["networks"], instance.guide, x))
    assert abs(error) <= 5 * se, (error, se)

    gap_iwae, se_iwae = mean_and_se(result.log_likelihood - exact)
    gap_elbo, se_elbo = mean_and_se(result.elbo - exact)
    assert gap_iwae <= 3 * se_iwae, (gap_iwae, se_iwae)
    assert gap_elbo <= 3 * se_elbo, (gap_elbo, se_elbo)
    # the bracket is not empty: a diagonal Gaussian guide cannot match the correlated posterior
    assert gap_elbo < gap_iwae - 3 * mean_and_se(result.log_likelihood - result.elbo)[1]


def test_declared_model_runs_under_plain_pyro_svi():
    n = 50
    instance = registry.instantiate("ppca", "amortized-mlp", num_data=n, model_kwargs={"z_dim": 2, "x_dim": 5})
    x = torch.randn(n, 5)
    svi = pyro.infer.SVI(instance.model, instance.guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    before = instance.modules["networks"].nets["loading"].weight.detach().clone()
    # SVI's step reports the -ELBO of its draws before its update: Trace_ELBO's loss of the same draws, exactly.
    pyro.set_rng_seed(4)
    expected = pyro.infer.Trace_ELBO().loss(instance.model, instance.guide, x)
    pyro.set_rng_seed(4)
    assert svi.step(x) == pytest.approx(expected, rel=1e-6)
    names = set(pyro.get_param_store().keys())
    assert {"networks$$$nets.loading.weight", "networks$$$params.log_noise_scale", "encoder$$$heads.z.weight"} <= names
    assert not torch.equal(before, instance.modules["networks"].nets["loading"].weight)
    # and with a Pyro autoguide instead of the package's guides
    pyro.clear_param_store()
    model = instance.model
    auto = pyro.infer.autoguide.AutoNormal(model)
    svi = pyro.infer.SVI(model, auto, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    auto(x)  # builds the autoguide's parameters
    pyro.set_rng_seed(4)
    expected = pyro.infer.Trace_ELBO().loss(model, auto, x)
    pyro.set_rng_seed(4)
    assert svi.step(x) == pytest.approx(expected, rel=1e-6)
    assert "AutoNormal.locs.z" in pyro.get_param_store()


def test_a_second_declaration_with_two_latents_trains_end_to_end(tmp_path):
    """A hierarchy z1 -> z2 -> x declared here, trained by the engine with both generic guides."""
    declare_model(
        "two-layer-test",
        hparams={"z1_dim": 2, "z2_dim": 3, "x_dim": 4},
        networks={"up": lambda z1_dim, z2_dim: torch.nn.Linear(z1_dim, z2_dim),
                  "out": lambda z2_dim, x_dim: torch.nn.Linear(z2_dim, x_dim)},
        sites=[
            Latent("z1", ("z1_dim",), lambda: dist.Normal(0.0, 1.0)),
            Latent("z2", ("z2_dim",), lambda z1, up: dist.Normal(up(z1), 0.5)),
            Observed("x", ("x_dim",), lambda z2, out: dist.Normal(out(z2), 1.0)),
        ],
    )
    from ppl_models.data import TensorDataset

    x = torch.randn(64, 4)
    for guide in ("mean-field", "amortized-mlp"):
        pyro.clear_param_store()
        instance = registry.instantiate("two-layer-test", guide, num_data=64)
        assert [s.name for s in instance.spec.local_latents] == ["z1", "z2"]
        result = fit(instance.model, instance.guide, TensorDataset(x), batch_size=16, num_epochs=2, progress=False,
                     run_dir=tmp_path / guide)
        assert result.step == 8 and (tmp_path / guide / "history.json").is_file()
        ev = evaluate(instance.model, instance.guide, x, spec=instance.spec, num_samples=8, progress=False)
        assert ev.num_data == 64
        # The hierarchy is linear-Gaussian: x ~ N(A b_up + b_out, A (W_up W_upᵀ + 0.25 I) Aᵀ + I), A = W_out.
        # E[IWAE-8] <= log p(x): the mean over datapoints of the estimate minus the exact value is not above 0
        # by more than 5 standard errors.
        up, out = instance.modules["networks"].nets["up"], instance.modules["networks"].nets["out"]
        with torch.no_grad():
            cov = out.weight @ (up.weight @ up.weight.T + 0.25 * torch.eye(3)) @ out.weight.T + torch.eye(4)
            exact = dist.MultivariateNormal(out.weight @ up.bias + out.bias, cov).log_prob(x).double().numpy()
        gap, se = mean_and_se(ev.log_likelihood - exact)
        assert gap <= 5 * se, (guide, gap, se)


@pytest.mark.slow
def test_cli_fit_and_evaluate_a_declared_model_from_its_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["fit", str(CONFIG), "--run-dir", str(run_dir), "--num-epochs", "2", "--num-samples", "16",
                     "-o", "data.num_train=200", "-o", "data.num_test=100", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "ppca" and metrics["num_data"] == 100 and metrics["num_samples"] == 16
    assert (run_dir / "elbo.png").is_file() and (run_dir / "eval.nc").is_file()
    assert not (run_dir / "prior_samples.png").exists()  # not an image model
    assert cli_main(["evaluate", str(run_dir), "--num-samples", "32", "--no-progress"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["num_samples"] == 32


@pytest.mark.slow
def test_ppca_example_runs_with_tiny_flags(tmp_path):
    args = Namespace(config=str(CONFIG), num_epochs=2, num_samples=8, guide=None, seed=0,
                     run_dir=str(tmp_path / "run"), no_progress=True)
    summary = ppca_example.main(args)
    assert summary["num_samples"] == 8 and summary["num_data"] == 1000
    # Against the saved run, recomputed here: the exact log-likelihood the example reports is that of the
    # checkpoint's parameters; per test point the reported ELBO estimates the guide's closed-form ELBO (within
    # 5 standard errors of the mean difference) and the IWAE-8 estimate is below log p(x) in expectation (not
    # above by more than 5 standard errors).
    run_dir = tmp_path / "run"
    experiment = Experiment.from_run_dir(run_dir)
    splits, instance = experiment.load_data(), experiment.build(1)
    assert experiment.trainer(splits, instance, progress=False).resume() is not None
    nets = instance.modules["networks"]
    x = splits["test"].batch(torch.arange(1000), None)[0]
    with torch.no_grad():
        exact = exact_log_likelihood(nets, x).double().numpy()
    assert summary["exact_log_likelihood"] == pytest.approx(exact.mean(), rel=1e-6)
    idata = diagnostics.load_netcdf(run_dir / "eval.nc")
    elbo, iwae = idata.vi_evaluation["elbo"].values, idata.vi_evaluation["log_likelihood"].values
    assert summary["elbo"] == pytest.approx(elbo.mean()) and summary["log_likelihood"] == pytest.approx(iwae.mean())
    error, se = mean_and_se(elbo - factor_analysis_elbo(nets, instance.guide, x))
    assert abs(error) <= 5 * se, (error, se)
    gap, se = mean_and_se(iwae - exact)
    assert gap <= 5 * se, (gap, se)


# ------------------------------------------------------------------------------------------ errors


def test_config_errors_name_the_key_and_list_the_valid_ones_or_the_expected_type(tmp_path):
    experiment = Experiment(load_config(CONFIG, {"model.zdim": 3}), tmp_path)
    with pytest.raises(registry.UnknownNameError) as info:
        experiment.build(10)
    message = str(info.value)
    assert "unknown model 'ppca' hyperparameter 'zdim'" in message
    assert "isotropic" in message and "x_dim" in message and "z_dim" in message
    experiment = Experiment(load_config(CONFIG, {"model.z_dim": "two"}), tmp_path)
    with pytest.raises(TypeError, match=r"hyperparameter 'z_dim': expected int .*received str 'two'"):
        experiment.build(10)
    with pytest.raises(ConfigError, match=r"\[train\] unknown key 'learning_rate'; valid keys: .*\blr\b"):
        load_config(CONFIG, {"train.learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"\[train\].time_limit: expected float, received str"):
        load_config(CONFIG, {"train.time_limit": "soon"})


def test_cli_reports_a_config_typo_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.read_text().replace("z_dim = 2\nx_dim = 5\nisotropic", "z_dmi = 2\nx_dim = 5\nisotropic", 1))
    assert cli_main(["fit", str(bad), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'ppca' hyperparameter 'z_dmi'; valid") and "z_dim" in err
    missing = tmp_path / "missing.toml"
    missing.write_text(CONFIG.read_text().replace('[model]\n', '[model]\nmodule = "examples/nope.py"\n', 1))
    assert cli_main(["fit", str(missing), "--run-dir", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "model module 'examples/nope.py'" in capsys.readouterr().err


def test_declaration_errors_name_the_site_and_the_valid_names():
    normal = lambda: dist.Normal(0.0, 1.0)  # noqa: E731
    with pytest.raises(DeclarationError, match=r"site 'x': unknown argument 'w'; valid names at this point: .*z"):
        declare_model("bad", [Latent("z", (2,), normal), Observed("x", (3,), lambda z, w: dist.Normal(z, 1.0))],
                      register=False)
    with pytest.raises(DeclarationError, match=r"site 'z': shape entry 'k' is neither"):
        declare_model("bad", [Latent("z", ("k",), normal), Observed("x", (3,), normal)], register=False)
    with pytest.raises(DeclarationError, match="exactly one Observed site, last"):
        declare_model("bad", [Observed("x", (3,), normal), Latent("z", (2,), normal)], register=False)
    with pytest.raises(DeclarationError, match=r"network 'net': unknown argument 'width'"):
        declare_model("bad", [Observed("x", (3,), normal)], networks={"net": lambda width: torch.nn.Linear(2, width)},
                      register=False)


def test_a_distribution_of_the_wrong_shape_names_the_site():
    declared = declare_model(
        "wrong-shape-test",
        [Latent("z", (2,), lambda: dist.Normal(torch.zeros(3), 1.0)),
         Observed("x", (3,), lambda z: dist.Normal(0.0, 1.0))],
        register=False,
    )
    nets = declared.build().modules["networks"]
    with pytest.raises(ShapeError, match=r"site 'z': expected a distribution whose batch shape ends in .*\(2,\)"):
        declared.model(torch.zeros(4, 3), networks=nets)
    with pytest.raises(ShapeError, match=r"site 'x': expected shape \(batch, 3\), received \(4, 2\)"):
        declared.model(torch.zeros(4, 2), networks=nets)
