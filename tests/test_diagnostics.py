"""The ArviZ adapter: Pareto k̂, InferenceData with ArviZ's conventions, atomic netCDF round trips, the import
boundary."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from ppl_models.infer import diagnostics


def rng(seed=0):
    return np.random.default_rng(seed)


# --- psis_khat ------------------------------------------------------------------------------------------


def test_psis_khat_exactly_equal_weights_is_inf():
    # What az.psislw returns when there is no right tail to fit (q is the exact posterior): +inf.
    # Documented in psis_khat; evaluate() counts these as "undetermined", not as bad.
    khat = diagnostics.psis_khat(np.full((3, 1000), -7.25))
    assert khat.shape == (3,)
    assert np.all(np.isposinf(khat))


def test_psis_khat_light_and_heavy_tails():
    r = rng(1)
    # Bounded weights (q wider than p) -> k̂ well below 0.5.
    light = np.log(r.uniform(0.5, 1.0, size=(4, 4000)))
    # Weights with a Pareto(alpha=1) tail: k = 1/alpha = 1; 40 independent rows give k̂'s standard error.
    heavy = np.log(r.pareto(1.0, size=(40, 4000)) + 1.0)
    assert np.all(diagnostics.psis_khat(light) < diagnostics.KHAT_GOOD)
    k_heavy = diagnostics.psis_khat(heavy)
    assert np.all(k_heavy[:4] > diagnostics.KHAT_BAD), k_heavy  # flagged (some of 40 rows fall below 0.7)
    # PSIS fits the M = 3 sqrt(4000) = 190 largest weights and pulls k̂ towards 0.5 with weight 10 / (M + 10)
    # (ArviZ's prior): expected k̂ = (190 k + 5) / 200.  Every row within 5 standard errors of it (the spread of
    # one row's k̂ over the 40 rows, about 0.12), and their mean within 5 standard errors of the mean.
    expected, sd = (190 * 1.0 + 5) / 200, k_heavy.std(ddof=1)
    assert np.all(np.abs(k_heavy - expected) <= 5 * sd), (k_heavy, sd)
    assert abs(k_heavy.mean() - expected) <= 5 * sd / np.sqrt(len(k_heavy)), (k_heavy.mean(), sd)


def test_psis_khat_samples_axis_batch_shape_and_float32():
    lw = rng(2).standard_normal((2, 3, 500))
    k = diagnostics.psis_khat(lw)
    assert k.shape == (2, 3) and k.dtype == np.float64
    np.testing.assert_array_equal(diagnostics.psis_khat(np.moveaxis(lw, -1, 0), samples_axis=0), k)
    k32 = diagnostics.psis_khat(lw.astype(np.float32))
    np.testing.assert_allclose(k32, k, atol=1e-3)


def test_psis_khat_chunking_gives_the_same_values(monkeypatch):
    lw = rng(3).standard_normal((37, 300))
    whole = diagnostics.psis_khat(lw)
    monkeypatch.setattr(diagnostics, "_PSIS_CHUNK_BYTES", 300 * 8 * 5)  # 5 rows a chunk
    np.testing.assert_array_equal(diagnostics.psis_khat(lw), whole)


def test_psis_khat_nan_rows_are_nan_and_others_unaffected():
    lw = rng(4).standard_normal((3, 400))
    lw[1, 7] = np.nan
    lw[2, :] = -np.inf
    k = diagnostics.psis_khat(lw)
    assert np.isfinite(k[0]) and np.isnan(k[1]) and np.isnan(k[2])
    assert k[0] == diagnostics.psis_khat(lw[:1])[0]


def test_psis_khat_rejects_bad_input():
    with pytest.raises(ValueError, match="samples axis"):
        diagnostics.psis_khat(np.float64(1.0))
    with pytest.raises(ValueError, match="at least 2 samples"):
        diagnostics.psis_khat(np.zeros((4, 1)))


# --- InferenceData ---------------------------------------------------------------------------------------


def test_vi_evaluation_is_a_group_arviz_does_not_read_as_draws():
    n = 6
    ll = rng(5).standard_normal(n)
    idata = diagnostics.build_inference_data(
        vi_evaluation={"log_likelihood": ll, "elbo": ll - 1.0, "pareto_khat": np.full(n, np.inf)},
        dims={k: ["datapoint"] for k in ("log_likelihood", "elbo", "pareto_khat")},
        attrs={"num_samples": 10}, descriptions={"log_likelihood": "IWAE"},
    )
    assert idata.groups() == ["vi_evaluation"]
    x = idata.vi_evaluation["log_likelihood"]
    assert x.dims == ("datapoint",) and x.attrs["description"] == "IWAE"
    np.testing.assert_array_equal(x.values, ll)
    np.testing.assert_array_equal(idata.vi_evaluation["datapoint"].values, np.arange(n))
    assert idata.vi_evaluation.attrs["num_samples"] == 10
    with pytest.raises(TypeError, match="log likelihood not found"):
        diagnostics.loo(idata)  # nothing for az.loo to misread
    # summary: over the datapoints (kind="stats"), finite values only; k̂ without a finite value is left out
    table = diagnostics.summary(idata)
    assert list(table.index) == ["log_likelihood", "elbo"]
    assert table.loc["elbo", "mean"] == pytest.approx(ll.mean() - 1.0, abs=1e-3)
    assert table.loc["elbo", "sd"] == pytest.approx(ll.std(ddof=1), rel=0.2) and table.loc["elbo", "n_finite"] == n
    assert "r_hat" not in table.columns


def test_posterior_log_likelihood_and_observed_data_share_the_datapoint_dim_and_loo_works():
    r = rng(6)
    n, chains, draws = 8, 2, 50
    mu = r.normal(size=(chains, draws))
    x = r.normal(size=(n, 1))
    log_lik = -0.5 * (x[None, None, :, 0] - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)
    idata = diagnostics.build_inference_data(
        posterior={"mu": mu, "locs": r.normal(size=(chains, draws, 3, 1))}, log_likelihood={"x": log_lik},
        observed_data={"x": x}, dims={"locs": ["component", "data_dim"], "x": ["datapoint", "data_dim"]},
    )
    assert idata.posterior["locs"].dims == ("chain", "draw", "component", "data_dim")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "datapoint")
    assert idata.observed_data["x"].dims == ("datapoint", "data_dim")
    result = diagnostics.loo(idata)
    assert np.isfinite(float(result.elpd_loo)) and result.n_data_points == n
    assert not diagnostics.summary(idata, var_names=["mu"]).isna().all().all()


def test_build_inference_data_errors_name_the_group_and_variable():
    with pytest.raises(ValueError, match=r"log_likelihood 'x': pointwise log-likelihoods are of posterior draws"):
        diagnostics.build_inference_data(log_likelihood={"x": np.zeros((1, 1, 5))})
    with pytest.raises(ValueError, match=r"log_likelihood 'x': expected shape \(chain, draw, n\) with the posterior"):
        diagnostics.build_inference_data(posterior={"mu": np.zeros((2, 4))}, log_likelihood={"x": np.zeros((2, 3, 5))})
    with pytest.raises(ValueError, match=r"vi_evaluation 'elbo': name its 1 dimensions"):
        diagnostics.build_inference_data(vi_evaluation={"elbo": np.zeros(5)})
    with pytest.raises(ValueError, match=r"vi_training 'elbo': shape \(2, 4\) needs 2 dimension names"):
        diagnostics.build_inference_data(vi_training={"elbo": np.zeros((2, 4))}, dims={"elbo": ["step"]})
    with pytest.raises(ValueError, match=r"observed_data 'x': the first dimension is 'datapoint'"):
        diagnostics.build_inference_data(observed_data={"x": np.zeros((5, 2))}, dims={"x": ["obs", "d"]})
    with pytest.raises(ValueError, match=r"log_likelihood 'x': 4 datapoints, the other groups have 5"):
        diagnostics.build_inference_data(posterior={"mu": np.zeros((1, 3))}, log_likelihood={"x": np.zeros((1, 3, 4))},
                                         observed_data={"x": np.zeros((5, 2))}, dims={"x": ["datapoint", "d"]})


def test_netcdf_round_trip_is_atomic_and_overwrites(tmp_path):
    n = 5
    ll = rng(8).standard_normal(n)
    path = tmp_path / "sub" / "eval.nc"

    def evaluation(values):
        return diagnostics.build_inference_data(vi_evaluation={"log_likelihood": values, "kl": ll**2},
                                                dims={"log_likelihood": ["datapoint"], "kl": ["datapoint"]})

    diagnostics.save_netcdf(evaluation(ll), path)
    diagnostics.save_netcdf(evaluation(ll + 1), path)
    assert sorted(os.listdir(path.parent)) == ["eval.nc"]  # no temporary file left behind
    loaded = diagnostics.load_netcdf(path)
    np.testing.assert_array_equal(loaded.vi_evaluation["log_likelihood"].values, ll + 1)
    np.testing.assert_array_equal(loaded.vi_evaluation["kl"].values, ll**2)
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        diagnostics.load_netcdf(tmp_path / "missing.nc")


def test_wrappers_pass_through():
    r = rng(9)
    draws = {"mu": r.standard_normal((2, 200))}
    table = diagnostics.summary(draws)
    assert "mu" in table.index and "r_hat" in table.columns
    assert float(diagnostics.ess(draws)["mu"]) > 50
    assert float(diagnostics.rhat(draws)["mu"]) < 1.1


# --- the import boundary -------------------------------------------------------------------------------


def test_only_diagnostics_imports_arviz():
    root = pathlib.Path(__file__).resolve().parents[1]
    importers = sorted(
        str(p.relative_to(root))
        for folder in ("ppl_models", "guides")
        for p in (root / folder).rglob("*.py")
        if re.search(r"^\s*(import arviz|from arviz)", p.read_text(), flags=re.M)
    )
    assert importers == [os.path.join("ppl_models", "infer", "diagnostics.py")]


def _import_with_fresh_arviz_cache(tmp_path, statement):
    """Run ``statement`` in a fresh interpreter where any FutureWarning is an error and ArviZ has not yet
    shown today's refactor warning (its stamp lives in the user cache dir)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONWARNINGS="error::FutureWarning")
    return subprocess.run([sys.executable, "-c", statement], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_refactor_warning_is_filtered_by_its_text_only(tmp_path):
    control = _import_with_fresh_arviz_cache(tmp_path / "a", "import arviz")
    assert control.returncode != 0 and "major refactor" in control.stderr  # the warning does fire
    ours = _import_with_fresh_arviz_cache(
        tmp_path / "b",
        "import ppl_models.infer.diagnostics, warnings\n"
        "try:\n    warnings.warn('another', FutureWarning)\nexcept FutureWarning:\n    print('others still raise')",
    )
    assert ours.returncode == 0, ours.stderr
    assert "others still raise" in ours.stdout  # only that one warning is silenced
