"""The estimator comparison: its exact references, PSIS k̂ of exact and under-dispersed posteriors, the config
schema, InferenceData through netCDF, and the compare command end to end on the small config."""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import ppl_models as pm
from ppl_models import compare, gmm
from ppl_models.compare import references
from ppl_models.infer import diagnostics
from ppl_models import linear_gaussian as lg
from ppl_models.app.cli import main as cli_main
from ppl_models.app.config import ConfigError
from ppl_models.infer.evaluate import log_weights
from ppl_models.spec import data_plate

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "examples" / "configs" / "compare_small.toml"
REAL = REPO / "examples" / "configs" / "compare_estimators.toml"


# --- exact references -----------------------------------------------------------------------------------------


def test_closed_form_elbo_of_the_exact_posterior_is_the_log_evidence():
    torch.set_default_dtype(torch.float64)
    try:
        inst = pm.instantiate("linear-gaussian", "exact", num_data=None,
                              model_kwargs={"z_dim": 2, "x_dim": 4, "seed": 3})
        params = inst.modules["params"]
        x, _ = lg.simulate(params, 7, torch.Generator().manual_seed(0))
        elbo = compare.linear_gaussian_exact_elbo(params, inst.guide, x)
        assert float(elbo.detach()) == pytest.approx(float(lg.log_evidence(params, x).sum().detach()), rel=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_closed_form_elbo_of_a_mean_field_guide_matches_monte_carlo():
    torch.set_default_dtype(torch.float64)
    try:
        inst = pm.instantiate("linear-gaussian", "mean-field", num_data=5,
                              model_kwargs={"z_dim": 2, "x_dim": 3, "seed": 1},
                              guide_kwargs={"init_scale": 0.7, "init_loc_scale": 1.0})
        params = inst.modules["params"]
        x, _ = lg.simulate(params, 5, torch.Generator().manual_seed(0))
        idx = torch.arange(5)
        exact = float(compare.linear_gaussian_exact_elbo(params, inst.guide, x, idx).detach())
        lw = log_weights(inst.model, inst.guide, x, idx, num_samples=20000, spec=inst.spec)  # (S, 5)
        total = lw.sum(1)
        mc, se = float(total.mean()), float(total.std() / math.sqrt(total.shape[0]))
    finally:
        torch.set_default_dtype(torch.float32)
    assert abs(mc - exact) < 4 * se, (mc, exact, se)


def test_enumerated_elbo_of_the_exact_gmm_guide_is_the_log_likelihood():
    torch.set_default_dtype(torch.float64)
    try:
        inst = pm.instantiate("gmm", "exact", num_data=None, model_kwargs={"num_components": 3})
        params = inst.modules["params"]
        x, _ = gmm.simulate(params, 9, torch.Generator().manual_seed(0))
        elbo = compare.enumerated_exact_elbo(inst.model, inst.guide, (x, None), {}, 1)
        expected = float(gmm.log_likelihood(params, x).sum().detach())
        assert float(elbo.detach()) == pytest.approx(expected, rel=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_mixture_pointwise_log_likelihood_matches_the_gmm_module():
    p = gmm.GMMParams(3, 2, learn_weights=True)
    p.set_weights(torch.tensor([0.2, 0.3, 0.5])).set_scales(torch.rand(3, 2) + 0.5)
    x, _ = gmm.simulate(p, 11, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = compare.mixture_pointwise_log_lik(x, p.weights[None], p.locs[None], p.scales[None])
        np.testing.assert_allclose(ours[0].numpy(), gmm.log_likelihood(p, x).numpy(), rtol=1e-5)


def test_canonical_order_sorts_components_by_their_first_location_coordinate():
    draws = {"weights": np.array([[0.1, 0.9]]), "locs": np.array([[[3.0, 0.0], [-1.0, 5.0]]]),
             "scales": np.array([[[1.0, 1.0], [2.0, 2.0]]])}
    out = compare.canonical_order(draws)
    np.testing.assert_array_equal(out["weights"], [[0.9, 0.1]])
    np.testing.assert_array_equal(out["locs"], [[[-1.0, 5.0], [3.0, 0.0]]])
    np.testing.assert_array_equal(out["scales"], [[[2.0, 2.0], [1.0, 1.0]]])


# --- PSIS k̂ of the final q -----------------------------------------------------------------------------------


def scaled_posterior_guide(factor):
    """q(z | x) = the exact posterior with its covariance's Cholesky factor multiplied by ``factor``."""

    def guide(x, idx=None, *, params, num_data=None):
        z_loc, scale_tril = lg.exact_posterior(params, x)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.MultivariateNormal(z_loc, scale_tril=factor * scale_tril))

    return guide


@pytest.mark.parametrize("factor, expect", [(1.0, "good"), (1.5, "good"), (0.3, "bad")])
def test_khat_is_small_for_the_exact_posterior_and_large_for_an_under_dispersed_q(factor, expect):
    """Yao et al. (2018): k̂ < 0.5 when q is the exact posterior of the conjugate model (or wider than it), k̂ > 0.7
    for a badly under-dispersed q (sd 0.3 times the posterior's; the weights' tail index is 1 - 0.3² = 0.91).
    z_dim = 6, 20 datapoints, 4000 draws each, float64 (with q exact the weights are equal up to rounding, whose
    bounded noise gives k̂ < 0.5).  Simulating the under-dispersed case's weights over seeds 0-2 gave a smallest
    k̂ of 0.81 among 20 datapoints."""
    torch.set_default_dtype(torch.float64)
    try:
        inst = pm.instantiate("linear-gaussian", None, num_data=None, model_kwargs={"z_dim": 6, "x_dim": 8, "seed": 0})
        params = inst.modules["params"]
        x, _ = lg.simulate(params, 20, torch.Generator().manual_seed(1))
        guide = functools.partial(scaled_posterior_guide(factor), params=params)
        lw = log_weights(inst.model, guide, x, None, num_samples=4000, spec=inst.spec)
    finally:
        torch.set_default_dtype(torch.float32)
    khat = diagnostics.psis_khat(lw.T.numpy())
    if expect == "good":
        # With q exact the weights are equal up to rounding; where psislw finds no tail in that noise it returns
        # k̂ = +inf ("undetermined", documented in psis_khat) — never a finite k̂ >= 0.5.
        spread = (lw.max(0).values - lw.min(0).values).numpy()
        undetermined = np.isposinf(khat)
        assert np.all(khat[~undetermined] < diagnostics.KHAT_GOOD), khat
        if factor == 1.0:
            assert np.all(spread < 1e-10 * np.abs(lw.numpy()).max()) and undetermined.sum() <= 5, (spread, khat)
        else:
            assert not undetermined.any()
    else:
        assert np.all(np.isfinite(khat)) and np.all(khat > diagnostics.KHAT_BAD), khat


# --- configuration ------------------------------------------------------------------------------------------


def test_both_example_configs_load():
    small, real = compare.load_compare_config(SMALL), compare.load_compare_config(REAL)
    assert small.vae.data == "simulated" and real.vae.data == "mnist"
    assert real.training.num_seeds >= 4 and set(real.compare.estimators) == set(compare.GRADIENT_ESTIMATORS)


def test_config_errors_name_the_key_and_the_expected_type(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nnum_step = 3\n")
    with pytest.raises(ConfigError, match=r"\[training\] unknown key 'num_step'; valid keys: .*num_steps"):
        compare.load_compare_config(path)
    path.write_text('[training]\nnum_steps = "many"\n')
    with pytest.raises(ConfigError, match=r"\[training\]\.num_steps: expected int, received str 'many'"):
        compare.load_compare_config(path)
    path.write_text("[compare]\nestimators = 'reinforce'\n")
    with pytest.raises(ConfigError, match=r"\[compare\]\.estimators: expected a list of str"):
        compare.load_compare_config(path)
    path.write_text("[compare]\nestimators = ['reinforce']\n")
    with pytest.raises(ConfigError, match=r"unknown estimator 'reinforce'; valid estimators: IWAE, .*analytic-kl"):
        compare.load_compare_config(path)
    path.write_text("[nuts]\n")
    with pytest.raises(ConfigError, match=r"unknown section 'nuts'; valid sections: bayesian_gmm, compare"):
        compare.load_compare_config(path)
    with pytest.raises(ConfigError, match=r"override 'training': expected SECTION.KEY=VALUE"):
        compare.load_compare_config(SMALL, {"training": 1})


def test_cli_compare_reports_a_config_error_in_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[gradients]\nnum_draw = 3\n")
    assert cli_main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key 'num_draw'" in err and "Traceback" not in err


# --- InferenceData ------------------------------------------------------------------------------------------


def fake_seeds_out(local: bool, seeds=3, n=7, evals=4):
    r = np.random.default_rng(0)
    out = []
    for s in range(seeds):
        tr = compare.TrainResult("reparameterized", s, [0, 5, 10, 15][:evals], list(r.normal(size=evals)), 1.0)
        item = {"train": tr, "log_lik": r.normal(size=(n,) if local else (20, n))}
        if local:
            item["khat"] = r.uniform(size=n)
        else:
            item["draws"] = {"weights": r.dirichlet(np.ones(2), size=20), "locs": r.normal(size=(20, 2, 3)),
                             "scales": r.uniform(size=(20, 2, 3))}
            item["q_draws"] = item["draws"]
            item["global_khat"] = 0.3
        out.append(item)
    return out


@pytest.mark.parametrize("local", [True, False])
def test_inference_data_round_trips_through_netcdf(tmp_path, local):
    seeds_out = fake_seeds_out(local)
    idata = references.inference_data("p", "reparameterized", seeds_out)
    path = diagnostics.save_netcdf(idata, tmp_path / "idata.nc")
    back = diagnostics.load_netcdf(path)
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            np.testing.assert_array_equal(getattr(back, group)[name].values, var.values)
    assert back.vi_training["elbo"].dims == ("seed", "step") and back.vi_training["elbo"].shape == (3, 4)
    np.testing.assert_array_equal(back.vi_training["step"].values, [0, 5, 10, 15])
    np.testing.assert_array_equal(back.vi_training["seed"].values, [0, 1, 2])
    assert back.vi_training.attrs["estimator"] == "reparameterized"
    if local:  # per-datapoint estimates, no draws: nothing for az.loo / az.waic to misread
        assert set(back.groups()) == {"vi_evaluation", "vi_training"}
        assert back.vi_evaluation["log_likelihood"].dims == ("seed", "datapoint")
        assert back.vi_evaluation["pareto_khat"].shape == (3, 7)
    else:  # each seed's q a chain of draws, with the pointwise log-likelihood of those draws
        assert back.posterior["locs"].dims == ("chain", "draw", "component", "data_dim")
        assert back.posterior["locs"].shape == (3, 20, 2, 3)
        assert back.log_likelihood["x"].dims == ("chain", "draw", "datapoint")
        table = diagnostics.summary(back, var_names=["locs"])
        assert {"r_hat", "ess_bulk"} <= set(table.columns)
        assert np.isfinite(float(diagnostics.loo(back).elpd_loo))


# --- plots --------------------------------------------------------------------------------------------------


def test_khat_hist_notes_undetermined_khat_and_vi_vs_nuts_labels_its_axes(tmp_path, monkeypatch):
    from ppl_models.compare import plots
    from ppl_models.tasks import plots as task_plots

    figures = []
    monkeypatch.setattr(task_plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    none_finite = fake_seeds_out(True)  # 3 seeds x 7 datapoints
    for o in none_finite:
        o["khat"][:] = np.nan
    some = fake_seeds_out(True)
    some[0]["khat"][:2] = np.inf
    plots.plot_khat_hist({"vae": {"reparameterized": none_finite, "iwae": "n/a: reason"},
                          "gmm": {"score-function": some}}, tmp_path / "khat_hist.png")
    empty, partial = figures[-1].axes
    assert not empty.patches  # no histogram: the panel says why
    assert any("no finite k̂" in t.get_text() and "reparameterized: 21 of 21" in t.get_text() for t in empty.texts)
    assert partial.patches and any("score-function: 2 of 21" in t.get_text() for t in partial.texts)
    assert empty.get_xlabel() and partial.get_ylabel()

    r = np.random.default_rng(0)
    nuts_refs = {
        "bayesian-gmm": ({"locs": r.normal(size=(10, 2, 3))}, 1.0),
        "linear-gaussian": {"z_nuts": r.normal(size=(10, 2, 2)), "z_vi": r.normal(size=(10, 2, 2)),
                            "exact_loc": np.zeros((2, 2)), "exact_tril": np.eye(2)},
    }
    plots.plot_vi_vs_nuts({"bayesian-gmm": {"reparameterized": fake_seeds_out(False)}}, nuts_refs,
                          tmp_path / "vi_vs_nuts.png")
    for ax in figures[-1].axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    task_plots.plt.close("all")


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_command_runs_end_to_end_on_the_small_config(tmp_path, capsys):
    run_dir = tmp_path / "cmp"
    assert cli_main(["compare", str(SMALL), "--run-dir", str(run_dir)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name in ("report.md", "gradients.csv", "gradients_params.csv", "training.csv", "training_curves.csv",
                 "loo.csv", "summary.json", "gradient_variance.png", "elbo_curves.png", "khat_hist.png",
                 "vi_vs_nuts.png"):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "gradients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["problem"], r["estimator"]): r for r in rows}
    assert len(rows) == 4 * 4
    assert by[("gmm", "reparameterized")]["status"].startswith("n/a: estimator 'reparameterized': guide site 'z'")
    assert by[("vae", "score-function")]["status"] == "ok"
    # The linear-Gaussian gradient is known exactly: the score-function mean of num_draws draws has z-scores
    # (mean - exact) / se with Student's t(num_draws - 1) tails; none beyond the Bonferroni threshold at
    # family-wise level 0.001 over the role's elements (71 for 4 draws; the estimator's bias would exceed it).
    row = by[("linear-gaussian", "score-function")]
    with open(run_dir / "gradients_params.csv", newline="") as f:
        params = [r for r in csv.DictReader(f) if (r["problem"], r["estimator"]) == ("linear-gaussian",
                                                                                   "score-function")]
    for role in ("guide", "model"):
        numel = sum(int(r["numel"]) for r in params if r["role"] == role)
        threshold = stats.t.isf(1e-3 / (2 * numel), int(row["num_draws"]) - 1)
        assert 0 < float(row[f"{role}_max_abs_z"]) < threshold, (role, row[f"{role}_max_abs_z"], threshold)
    nc = sorted(p.name for p in (run_dir / "idata").glob("*.nc"))
    assert "vae__score-function.nc" in nc and "bayesian-gmm__nuts__K2.nc" in nc and "linear-gaussian__nuts.nc" in nc
    idata = diagnostics.load_netcdf(run_dir / "idata" / "bayesian-gmm__reparameterized.nc")
    assert idata.posterior["locs"].shape[0] == 2  # two seeds as chains
    nuts = diagnostics.load_netcdf(run_dir / "idata" / "bayesian-gmm__nuts__K2.nc")
    assert {"posterior", "log_likelihood", "sample_stats"} <= set(nuts.groups())


def test_a_reused_run_directory_keeps_no_output_of_the_previous_comparison(tmp_path, capsys):
    """Outputs a previous comparison wrote (its manifest.json) that this run does not write again are removed,
    and named on stderr; files the comparison did not write are left alone."""
    run_dir = tmp_path / "cmp"
    tiny = ["-o", "gradients.num_draws=2", "-o", "training.num_seeds=1",
            "-o", "compare.estimators=[\"score-function\"]"]
    assert cli_main(["compare", str(SMALL), "--run-dir", str(run_dir), "-o", "compare.problems=[\"gmm\",\"vae\"]",
                     *tiny]) == 0
    (run_dir / "notes.txt").write_text("mine")
    first = set(json.loads((run_dir / "manifest.json").read_text())["files"])
    assert {"idata/gmm__score-function.nc", "idata/vae__score-function.nc", "khat_hist.png"} <= first
    assert all((run_dir / name).is_file() for name in first)
    capsys.readouterr()
    assert cli_main(["compare", str(SMALL), "--run-dir", str(run_dir), "-o", "compare.problems=[\"gmm\"]",
                     "-o", "compare.plots=false", *tiny]) == 0
    err = capsys.readouterr().err
    second = set(json.loads((run_dir / "manifest.json").read_text())["files"])
    gone = sorted(first - second)
    assert "idata/vae__score-function.nc" in gone and "khat_hist.png" in gone
    assert not any((run_dir / name).exists() for name in gone)
    assert all((run_dir / name).is_file() for name in second)
    assert sorted(p.name for p in (run_dir / "idata").iterdir()) == ["gmm__score-function.nc"]
    assert f"removed the {len(first)} files of the previous comparison" in err
    assert f"{len(gone)} files of the previous comparison were not written again" in err
    assert all(name in err for name in gone)
    assert (run_dir / "notes.txt").read_text() == "mine"  # not listed in the manifest: untouched


def test_a_manifest_the_comparison_did_not_write_is_an_error(tmp_path):
    run_dir = tmp_path / "cmp"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"files": "everything"}')
    with pytest.raises(ValueError, match=r"manifest.json: not a comparison's manifest"):
        compare.run_comparison(compare.load_compare_config(SMALL, {"compare.problems": ["gmm"]}), run_dir)


@pytest.mark.slow
def test_example_script_runs_with_tiny_flags(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    import compare_estimators

    args = compare_estimators.parse_args(["--config", str(SMALL), "--run-dir", str(tmp_path / "ex"),
                                          "--problems", "gmm", "--num-seeds", "2", "--num-steps", "2",
                                          "--num-draws", "5", "--no-progress"])
    summary = compare_estimators.main(args)
    assert [r["estimator"] for r in summary["gradients"]] == compare.load_compare_config(SMALL).compare.estimators
    assert (tmp_path / "ex" / "report.md").is_file()


@pytest.mark.slow
def test_compare_runs_a_declared_model_from_its_fit_config(tmp_path, monkeypatch):
    """`ppl-models compare` on any `ppl-models fit` config: here the PPCA model declared in examples/ppca.py."""
    monkeypatch.chdir(REPO)  # the fit config names its model file relative to the repository
    run_dir = tmp_path / "cmp"
    overrides = ["compare.problems=[\"experiment\"]", f"experiment.config=\"{REPO / 'examples/configs/ppca.toml'}\"",
                 "compare.estimators=[\"reparameterized\",\"score-function\",\"analytic-kl\"]", "compare.plots=false"]
    argv = ["compare", str(SMALL), "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["-o", o]
    assert cli_main(argv) == 0
    with open(run_dir / "gradients.csv", newline="") as f:
        by = {r["estimator"]: r for r in csv.DictReader(f)}
    assert set(by) == {"reparameterized", "score-function", "analytic-kl"}
    assert all(r["problem"] == "experiment" and r["status"] == "ok" for r in by.values())
    nc = sorted(p.name for p in (run_dir / "idata").glob("*.nc"))
    assert "experiment__reparameterized.nc" in nc


def test_experiment_problem_needs_its_config():
    from ppl_models.compare import load_compare_config
    with pytest.raises(ConfigError, match=r"problem 'experiment' needs \[experiment\]\.config"):
        load_compare_config(SMALL, {"compare.problems": ["experiment"]})
