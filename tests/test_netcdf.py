"""Every netCDF file the package writes, read back by ArviZ as ArviZ users read it.

Tiny runs of each writer — ``ppl-models fit`` (``eval.nc``: the VAE on a few MNIST images) and ``ppl-models
compare`` on the small config (``idata/*.nc``: every problem, the NUTS references) — then, for every file: no
dimension left with ArviZ's default name (``locs_dim_0``), ``az.summary`` without an all-NaN table, and
``az.loo`` on every file with a ``log_likelihood`` group (pointwise values of posterior draws, their datapoint
dimension the one ``observed_data`` has); a file without a posterior has no ``log_likelihood`` for ``az.loo`` or
``az.waic`` to misread.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

from ppl_models.app.cli import main as cli_main
from ppl_models.compare.references import mixture_pointwise_log_lik
from ppl_models.infer import diagnostics

REPO = Path(__file__).resolve().parents[1]
SMALL_COMPARE = REPO / "examples" / "configs" / "compare_small.toml"
VAE = REPO / "examples" / "configs" / "vae_mnist.toml"
TINY_FIT = ["--num-epochs", "1", "--num-samples", "4", "-o", "model.z_dim=4", "-o", "model.hidden_dims=[16]",
            "-o", "guide.hidden_dims=[16]", "-o", "data.limit_train=128", "-o", "data.limit_valid=32",
            "-o", "data.limit_test=16", "-o", "train.fast_path=false", "-o", "evaluate.fast_path=false",
            "-o", "output.plots=false", "--no-progress"]


def check_file(path: Path) -> az.InferenceData:
    """Open ``path`` with ArviZ and apply the conventions of the module docstring; return the InferenceData."""
    with az.rc_context({"data.load": "eager"}):
        idata = az.from_netcdf(path)
    for group in idata.groups():
        for dim in getattr(idata, group).dims:
            assert not re.search(r"_dim_\d+$", dim), (path.name, group, dim)  # every dimension named
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few draws: ArviZ's shape and Pareto-k warnings are expected here
        table = diagnostics.summary(idata)
        assert len(table) and not table.isna().all().all(), (path.name, table)
        if "posterior" in idata.groups():
            assert not az.summary(idata).isna().all().all(), path.name
        if "log_likelihood" in idata.groups():
            assert "posterior" in idata.groups(), path.name
            post, ll = idata.posterior, idata.log_likelihood
            assert (ll.sizes["chain"], ll.sizes["draw"]) == (post.sizes["chain"], post.sizes["draw"]), path.name
            for name, var in ll.data_vars.items():
                assert var.dims == ("chain", "draw", diagnostics.DATAPOINT_DIM), (path.name, name)
                if "observed_data" in idata.groups() and name in idata.observed_data:
                    observed = idata.observed_data[name]
                    assert observed.dims[0] == diagnostics.DATAPOINT_DIM, (path.name, observed.dims)
                    assert observed.shape[0] == var.shape[-1], path.name
            loo = az.loo(idata, pointwise=True)
            assert np.isfinite(float(loo.elpd_loo)) and loo.n_data_points == ll.sizes[diagnostics.DATAPOINT_DIM]
        else:
            for function in (az.loo, az.waic):  # nothing to misread as draws
                with pytest.raises(TypeError, match="log likelihood not found"):
                    function(idata)
    return idata


@pytest.mark.slow
def test_every_netcdf_of_a_comparison_reads_with_arviz(tmp_path):
    run_dir = tmp_path / "cmp"
    assert cli_main(["compare", str(SMALL_COMPARE), "--run-dir", str(run_dir), "-o", "compare.plots=false"]) == 0
    files = sorted((run_dir / "idata").glob("*.nc"))
    written = {name for name in json.loads((run_dir / "manifest.json").read_text())["files"] if name.endswith(".nc")}
    assert {f"idata/{f.name}" for f in files} == written
    names = {f.name for f in files}
    assert {"vae__reparameterized.nc", "gmm__score-function.nc", "linear-gaussian__nuts.nc",
            "bayesian-gmm__nuts__K1.nc", "bayesian-gmm__nuts__K2.nc", "bayesian-gmm__reparameterized.nc"} <= names
    with_loo = []
    for path in files:
        idata = check_file(path)
        if "log_likelihood" in idata.groups():
            with_loo.append(path.stem)
    # NUTS references and the Bayesian GMM's q (global latents) have posterior draws; the local-latent problems'
    # per-datapoint IWAE estimates do not.
    assert sorted(with_loo) == sorted(n[:-3] for n in names if n.startswith("bayesian-gmm") or "nuts" in n)
    # The log_likelihood is of the posterior's own draws: recomputed from them, the same values.
    for stem in [n for n in with_loo if n.startswith("bayesian-gmm")]:
        idata = diagnostics.load_netcdf(run_dir / "idata" / f"{stem}.nc")
        x = torch.as_tensor(idata.observed_data["x"].values)
        post = {k: torch.as_tensor(idata.posterior[k].values).flatten(0, 1) for k in ("weights", "locs", "scales")}
        expected = mixture_pointwise_log_lik(x, post["weights"], post["locs"], post["scales"]).double().numpy()
        np.testing.assert_allclose(idata.log_likelihood["x"].values.reshape(expected.shape), expected, rtol=1e-5,
                                   atol=1e-5, err_msg=stem)
    nuts = {K: diagnostics.load_netcdf(run_dir / "idata" / f"bayesian-gmm__nuts__K{K}.nc") for K in (1, 2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.compare(nuts)
    assert list(table.index) and np.isfinite(table["elpd_loo"]).all()


def test_eval_nc_of_a_fit_reads_with_arviz(tmp_path, shared_data):
    run_dir = tmp_path / "run"
    assert cli_main(["fit", str(VAE), "--run-dir", str(run_dir), *TINY_FIT]) == 0
    nc = sorted(p.name for p in run_dir.rglob("*.nc"))
    assert nc == ["eval.nc"]
    idata = check_file(run_dir / "eval.nc")
    assert idata.groups() == [diagnostics.VI_EVALUATION]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = idata.vi_evaluation
    assert evaluation.sizes[diagnostics.DATAPOINT_DIM] == metrics["num_data"] == 16
    assert evaluation.attrs["num_samples"] == metrics["num_samples"] == 4
    assert float(evaluation["log_likelihood"].mean()) == pytest.approx(metrics["log_likelihood"])
    table = diagnostics.summary(idata)  # over the datapoints: the means metrics.json reports
    assert table.loc["elbo", "mean"] == pytest.approx(metrics["elbo"], abs=0.01)
