"""The whole comparison (:func:`run_comparison`): for every problem the gradient statistics of every estimator,
then (``[training].num_seeds`` > 0) training over seeds with the final q's diagnostics, and the references — the
Bayesian GMM's NUTS runs and PSIS-LOO across ``K``, the linear-Gaussian model's NUTS and exact posterior; the
tables are written after every problem, the plots once at the end."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from ppl_models.compare import references, report
from ppl_models.compare.config import CompareConfig
from ppl_models.compare.gradients import gradient_statistics
from ppl_models.compare.outputs import RunOutputs
from ppl_models.compare.problems import bayesian_gmm_data, bayesian_gmm_problem, build_problem
from ppl_models.compare.training import estimator_for, pretrain, restore, snapshot, train_estimator
from ppl_models.infer import diagnostics
from ppl_models.infer.estimators import EstimatorError
from ppl_models.infer.objectives import estimator_spec

__all__ = ["run_comparison"]


def run_comparison(config: CompareConfig, run_dir=None) -> dict:
    """Run every part of the comparison for ``[compare].problems`` and write the run directory::

        report.md            the tables below, with the settings
        gradients.csv        variance, SNR, |z| against the exact gradient, cost, per problem and estimator
        gradients_params.csv the same per parameter tensor
        training.csv         final ELBO over seeds, R-hat across seeds, log-likelihood and k̂ of the final q
        training_curves.csv  the ELBO every eval_every steps, per seed
        loo.csv, loo_compare_{nuts,vi}.csv   Bayesian GMMs with K = compare_components
        idata/*.nc           InferenceData per problem and estimator, NUTS runs (ppl_models.compare.references)
        gradient_variance.png, elbo_curves.png, khat_hist.png, vi_vs_nuts.png
        summary.json
        manifest.json        the files above that this run wrote

    The files a previous comparison wrote there (its ``manifest.json``) are removed first, and those this run did
    not write again are named on stderr at the end (:mod:`ppl_models.compare.outputs`): no result of another
    configuration is left beside this run's.

    :return: the summary (also in ``summary.json``).
    """
    run_dir = Path(run_dir or config.compare.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs = RunOutputs(run_dir)
    outputs.remove_previous()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.compare.threads)
    started = time.perf_counter()
    try:
        summary = _run(config, run_dir, started, outputs)
    finally:
        torch.set_num_threads(previous_threads)
    outputs.not_rewritten()
    return summary


def _run(config: CompareConfig, run_dir: Path, started: float, outputs: RunOutputs) -> dict:
    grad_rows, param_rows, train_rows, curve_rows = [], [], [], []
    train_results, nuts_refs = {}, {}
    loo = None
    timings = {}
    for problem_name in config.compare.problems:
        t0 = time.perf_counter()
        runs = _gradients(problem_name, config)
        grad_rows += report.gradient_rows(problem_name, runs)
        param_rows += report.param_rows(problem_name, runs)
        timings[f"{problem_name}_gradients_s"] = time.perf_counter() - t0
        if config.training.num_seeds == 0:
            continue
        t0 = time.perf_counter()
        trained = _training(problem_name, config)
        results = trained["results"]
        train_results[problem_name] = results
        idatas = {}
        observed = None
        if problem_name == "bayesian-gmm":
            observed = {"x": bayesian_gmm_data(config.bayesian_gmm, config.compare.seed).numpy()}
        for name, seeds_out in results.items():
            if isinstance(seeds_out, str):
                continue
            idata = references.inference_data(problem_name, name, seeds_out, observed)
            idatas[name] = idata
            outputs.record(diagnostics.save_netcdf(idata, run_dir / "idata" / f"{problem_name}__{name}.nc"))
            curve_rows += report.curve_rows(problem_name, name, seeds_out)
        train_rows += report.training_rows(problem_name, results)
        timings[f"{problem_name}_training_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if problem_name == "bayesian-gmm":
            loo = _loo(config, run_dir, outputs)
            nuts_refs["bayesian-gmm"] = loo["nuts_main"]
            summaries = {}
            for name, idata in idatas.items():
                if "posterior" in idata.groups():
                    summaries[name] = diagnostics.summary(idata, var_names=["weights", "locs", "scales"])
            nuts_refs["bayesian-gmm-summaries"] = summaries
        elif problem_name == "linear-gaussian" and trained["reference_problem"] is not None:
            lgc = config.linear_gaussian
            ref = trained["reference_problem"]
            mcmc, z, wall = references.run_nuts_linear_gaussian(ref, lgc.nuts_datapoints, lgc.nuts_warmup,
                                                                lgc.nuts_samples, config.compare.seed,
                                                                lgc.nuts_max_tree_depth)
            x = ref.dataset.tensors[0][: lgc.nuts_datapoints]
            log_lik = references.pointwise_log_lik(ref.instance.model, {"z": torch.as_tensor(z)}, (x,))
            idata = references.nuts_inference_data("linear-gaussian", mcmc, log_lik)
            outputs.record(diagnostics.save_netcdf(idata, run_dir / "idata" / "linear-gaussian__nuts.nc"))
            nuts_refs["linear-gaussian"] = references.linear_gaussian_reference(ref, z, wall, config)
        timings[f"{problem_name}_nuts_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        # Tables after every problem (a long run shows its results as it goes); plots once at the end.
        report.write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo,
                             nuts_refs, timings, plots=False, outputs=outputs)
    timings["total_s"] = time.perf_counter() - started
    return report.write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo,
                                nuts_refs, timings, plots=config.compare.plots, outputs=outputs)


def _log(config: CompareConfig, message: str) -> None:
    if config.compare.progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)  # above the progress bar


def _gradients(problem_name: str, config: CompareConfig) -> dict:
    """Every estimator's :class:`~ppl_models.compare.gradients.GradientStats` at the same pretrained parameters
    (or the reason it cannot apply), by name."""
    g = config.gradients
    problem = build_problem(problem_name, config, config.compare.seed)
    pretrain(problem, config, config.compare.seed)
    state = snapshot(problem)
    runs = {}
    for name in config.compare.estimators:
        restore(problem, state)
        try:
            est = estimator_for(problem, name, config)
        except EstimatorError as exc:
            runs[name] = str(exc).split("\n")[0]
            _log(config, f"[{problem_name}] gradients {name}: n/a ({runs[name]})")
            continue
        with torch.random.fork_rng(devices=[]):
            pyro.set_rng_seed(config.compare.seed + 1)
            stats = gradient_statistics(problem, est, num_draws=g.num_draws,
                                        warmup=g.warmup if estimator_spec(name).baseline else 0)
        runs[name] = stats
        s = stats.summary("guide")  # empty when the guide has no parameters of its own
        _log(config, f"[{problem_name}] gradients {name}: guide variance/element "
                     f"{s.get('mean_variance', float('nan')):.4g}, mean SNR {s.get('mean_snr', float('nan')):.3g}, "
                     f"{stats.cost_s * 1e3:.2f} ms per gradient")
    restore(problem, state)
    return runs


def _training(problem_name: str, config: CompareConfig) -> dict:
    """Every estimator trained from every seed, with the final q's pointwise log-likelihood and k̂ (or the reason
    it cannot apply), and the first seed's reparameterized problem (the linear-Gaussian NUTS reference)."""
    t = config.training
    results: dict = {}
    keep = None  # the seed-0 reparameterized problem (for the NUTS reference)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(config.compare.estimators) * t.num_seeds, desc=f"[{problem_name}] training runs",
               unit="run", disable=not config.compare.progress, leave=False, dynamic_ncols=True)
    for name in config.compare.estimators:
        seeds_out = []
        for s in range(t.num_seeds):
            seed = config.compare.seed + s
            problem = build_problem(problem_name, config, seed)
            bar.update(1)
            try:
                tr = train_estimator(problem, name, config, seed)
            except EstimatorError as exc:
                seeds_out = str(exc).split("\n")[0]
                bar.update(t.num_seeds - s - 1)
                break
            out = {"train": tr}
            if problem.local:
                out["log_lik"], out["khat"] = references.local_pointwise(problem, t.num_samples, seed)
            else:
                q = references.bayesian_gmm_q_draws(problem, config.bayesian_gmm.num_draws, seed)
                out["draws"], out["q_draws"] = references.canonical_order(q["draws"]), q["q_draws"]
                out["log_lik"], out["global_khat"] = q["log_lik"], q["global_khat"]
            if s == 0 and name == "reparameterized":
                keep = problem
            seeds_out.append(out)
            _log(config, f"[{problem_name}] train {name} seed {seed}: ELBO {tr.elbo[-1]:.3f} after "
                         f"{tr.steps[-1]} steps ({tr.wall_time_s:.1f} s)")
        results[name] = seeds_out
        if isinstance(seeds_out, str):
            _log(config, f"[{problem_name}] train {name}: n/a ({seeds_out})")
    bar.close()
    return {"results": results, "reference_problem": keep}


def _loo(config: CompareConfig, run_dir: Path, outputs: RunOutputs) -> dict:
    """NUTS and VI (reparameterized, first seed) Bayesian GMMs for every K of ``compare_components``: az.compare."""
    cfg = config.bayesian_gmm
    x = bayesian_gmm_data(cfg, config.compare.seed)
    nuts, vi, rows, nuts_main = {}, {}, [], None
    for K in cfg.compare_components:
        problem = bayesian_gmm_problem(config, x, K, config.compare.seed)
        mcmc, samples, log_lik, wall = references.run_nuts_bayesian_gmm(
            problem, cfg.nuts_warmup, cfg.nuts_samples, config.compare.seed, cfg.nuts_max_tree_depth
        )
        ordered = references.canonical_order(samples)  # the canonical component order
        nuts[f"K={K}"] = references.nuts_inference_data("bayesian-gmm", mcmc, log_lik, ordered)
        outputs.record(diagnostics.save_netcdf(nuts[f"K={K}"], run_dir / "idata" / f"bayesian-gmm__nuts__K{K}.nc"))
        if K == cfg.num_components:
            nuts_main = (ordered, wall)
        problem = bayesian_gmm_problem(config, x, K, config.compare.seed)
        tr = train_estimator(problem, "reparameterized", config, config.compare.seed)
        q = references.bayesian_gmm_q_draws(problem, cfg.num_draws, config.compare.seed)
        khat = q["global_khat"]
        vi[f"K={K}"] = diagnostics.build_inference_data(  # the resampled draws and their pointwise log-likelihood
            posterior={k: v[None] for k, v in references.canonical_order(q["draws"]).items()},
            log_likelihood={"x": q["log_lik"][None]}, observed_data={"x": x.numpy()},
            dims=references.SITE_DIMS["bayesian-gmm"], attrs={"global_khat": khat})
        with warnings.catch_warnings():  # ArviZ warns about large Pareto k; the table reports the largest
            warnings.simplefilter("ignore", UserWarning)
            loo_n = diagnostics.loo(nuts[f"K={K}"], pointwise=True)
            loo_v = diagnostics.loo(vi[f"K={K}"], pointwise=True)
        rows.append({"K": K, "nuts_elpd_loo": float(loo_n.elpd_loo), "nuts_se": float(loo_n.se),
                     "nuts_khat_max": float(np.max(loo_n.pareto_k)), "nuts_wall_s": wall,
                     "vi_elpd_loo": float(loo_v.elpd_loo), "vi_se": float(loo_v.se),
                     "vi_khat_max": float(np.max(loo_v.pareto_k)), "vi_global_khat": khat,
                     "vi_final_elbo": tr.elbo[-1]})
        _log(config, f"[bayesian-gmm] K={K}: NUTS elpd_loo {rows[-1]['nuts_elpd_loo']:.2f} ({wall:.1f} s), "
                     f"VI elpd_loo {rows[-1]['vi_elpd_loo']:.2f}, VI global k̂ {khat:.2f}")
    tables = {}
    if len(cfg.compare_components) > 1:
        tables["nuts"] = diagnostics.compare(nuts)
        tables["vi"] = diagnostics.compare(vi)
    return {"rows": rows, "compare": tables, "nuts_main": nuts_main}

