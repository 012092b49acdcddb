"""The comparison's tables: rows per problem and estimator, markdown (``report.md``), CSV files and
``summary.json`` in the run directory (:func:`write_outputs`, which also draws the plots)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import List

import numpy as np

from ppl_models.atomic import atomic_write_bytes
from ppl_models.compare.gradients import GradientStats
from ppl_models.compare.outputs import RunOutputs
from ppl_models.compare.plots import plot_all
from ppl_models.infer import diagnostics

__all__ = ["GRADIENT_COLUMNS", "TRAINING_COLUMNS", "gradient_rows", "param_rows", "training_rows", "curve_rows",
           "write_outputs"]


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _md_table(rows: List[dict], columns: List[str]) -> str:
    """A markdown table; a ``status`` "n/a: reason" is shown as "n/a (k)" with the reasons listed below."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    reasons: List[str] = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if c == "status" and isinstance(v, str) and v.startswith("n/a: "):
                reason = v[len("n/a: "):]
                if reason not in reasons:
                    reasons.append(reason)
                v = f"n/a ({reasons.index(reason) + 1})"
            cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"({i + 1}) {reason}" for i, reason in enumerate(reasons)]
    return "\n".join(lines) + "\n" + ("\n" + "\n\n".join(notes) + "\n" if notes else "")


def _write_csv(path: Path, rows: List[dict], columns: List[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue().encode()))
    return path


GRADIENT_COLUMNS = [
    "problem", "estimator", "target", "status", "cpu_ms_per_gradient", "guide_mean_variance", "guide_mean_snr",
    "guide_median_snr", "guide_max_abs_z", "variance_ratio_to_reparameterized", "model_mean_variance",
    "model_mean_snr", "model_max_abs_z", "num_draws",
]
TRAINING_COLUMNS = [
    "problem", "estimator", "status", "num_seeds", "final_elbo_mean", "final_elbo_sd", "elbo_rhat",
    "log_lik_mean", "khat_mean", "khat_frac_good", "khat_frac_bad", "khat_frac_undetermined", "global_khat",
    "wall_s_per_run",
]


def gradient_rows(problem_name: str, runs: dict) -> List[dict]:
    """One row of :data:`GRADIENT_COLUMNS` per estimator: ``runs`` maps its name to its :class:`GradientStats`, or
    to the reason it cannot apply."""
    rows = []
    ref = None
    for name, item in runs.items():
        if isinstance(item, GradientStats) and name == "reparameterized":
            ref = item.summary("guide").get("mean_variance")
    for name, item in runs.items():
        if not isinstance(item, GradientStats):
            rows.append({"problem": problem_name, "estimator": name, "status": f"n/a: {item}"})
            continue
        g, m = item.summary("guide"), item.summary("model")
        rows.append({
            "problem": problem_name, "estimator": name, "target": item.target, "status": "ok",
            "cpu_ms_per_gradient": item.cost_s * 1e3, "guide_mean_variance": g.get("mean_variance"),
            "guide_mean_snr": g.get("mean_snr"), "guide_median_snr": g.get("median_snr"),
            "guide_max_abs_z": g.get("max_abs_z"),
            "variance_ratio_to_reparameterized": (g["mean_variance"] / ref) if ref else None,
            "model_mean_variance": m.get("mean_variance"), "model_mean_snr": m.get("mean_snr"),
            "model_max_abs_z": m.get("max_abs_z"), "num_draws": item.num_draws,
        })
    return rows


def param_rows(problem_name: str, runs: dict) -> List[dict]:
    """The gradient statistics per parameter tensor (``gradients_params.csv``)."""
    rows = []
    for name, item in runs.items():
        if isinstance(item, GradientStats):
            for p in sorted(item.mean):
                z = item.z_scores(p)
                sd = np.sqrt(item.var[p])
                with np.errstate(divide="ignore", invalid="ignore"):
                    snr = np.where(sd > 0, np.abs(item.mean[p]) / sd, np.nan)
                rows.append({
                    "problem": problem_name, "estimator": name, "param": p, "role": item.role[p],
                    "numel": item.mean[p].size, "mean_variance": float(item.var[p].mean()),
                    "mean_snr": float(np.nanmean(snr)) if np.isfinite(snr).any() else None,
                    "max_abs_z": float(np.nanmax(np.abs(z))) if z is not None else None,
                })
    return rows


def training_rows(problem_name: str, results: dict) -> List[dict]:
    """One row of :data:`TRAINING_COLUMNS` per estimator: ``results`` maps its name to its seeds' outputs (see
    :func:`ppl_models.compare.references.inference_data`), or to the reason it cannot apply."""
    rows = []
    for name, seeds_out in results.items():
        if isinstance(seeds_out, str):
            rows.append({"problem": problem_name, "estimator": name, "status": f"n/a: {seeds_out}"})
            continue
        final = np.array([o["train"].elbo[-1] for o in seeds_out])
        traces = np.stack([np.asarray(o["train"].elbo) for o in seeds_out])
        half = traces[:, traces.shape[1] // 2:]
        rhat = float(diagnostics.rhat({"elbo": half})["elbo"]) if len(seeds_out) > 1 and half.shape[1] >= 4 else None
        row = {
            "problem": problem_name, "estimator": name, "status": "ok", "num_seeds": len(seeds_out),
            "final_elbo_mean": float(final.mean()),
            "final_elbo_sd": float(final.std(ddof=1)) if len(final) > 1 else None,
            "elbo_rhat": rhat, "log_lik_mean": float(np.mean([o["log_lik"].mean() for o in seeds_out])),
            "wall_s_per_run": float(np.mean([o["train"].wall_time_s for o in seeds_out])),
        }
        if "khat" in seeds_out[0]:
            k = np.concatenate([o["khat"] for o in seeds_out])
            finite = k[np.isfinite(k)]
            row["khat_mean"] = float(finite.mean()) if finite.size else None
            row["khat_frac_good"] = float(np.mean(np.isfinite(k) & (k < diagnostics.KHAT_GOOD)))
            row["khat_frac_bad"] = float(np.mean(np.isfinite(k) & (k >= diagnostics.KHAT_BAD)))
            row["khat_frac_undetermined"] = float(np.mean(~np.isfinite(k)))
        else:
            row["global_khat"] = float(np.mean([o["global_khat"] for o in seeds_out]))
        rows.append(row)
    return rows


def curve_rows(problem_name: str, name: str, seeds_out: list) -> List[dict]:
    """The training curves of estimator ``name``, one row per seed and evaluation (``training_curves.csv``)."""
    return [{"problem": problem_name, "estimator": name, "seed": o["train"].seed, "step": step, "elbo": value}
            for o in seeds_out for step, value in zip(o["train"].steps, o["train"].elbo)]


def write_outputs(config, run_dir, grad_rows, param_rows, train_rows, curve_rows, train_results, loo, nuts_refs,
                   timings, plots: bool, outputs: RunOutputs) -> dict:
    """Write the tables (CSV, ``report.md``, ``summary.json``) and, with ``plots``, the figures, each recorded in
    ``outputs`` (the run's manifest); return the summary."""
    record = outputs.record
    record(_write_csv(run_dir / "gradients.csv", grad_rows, GRADIENT_COLUMNS))
    record(_write_csv(run_dir / "gradients_params.csv", param_rows,
                      ["problem", "estimator", "param", "role", "numel", "mean_variance", "mean_snr", "max_abs_z"]))
    record(_write_csv(run_dir / "training.csv", train_rows, TRAINING_COLUMNS))
    record(_write_csv(run_dir / "training_curves.csv", curve_rows, ["problem", "estimator", "seed", "step", "elbo"]))
    g, t = config.gradients, config.training
    training_part = [
        f"## Training ({t.num_seeds} seeds x {t.num_steps} steps, batch {t.batch_size}; ELBO per datapoint on a fixed "
        f"evaluation set, {t.eval_particles} draws or exact)\n",
        "elbo_rhat: R-hat of the second half of the ELBO traces with the seeds as chains; k̂: PSIS k̂ of the final "
        f"q per datapoint ({t.num_samples} importance samples; < {diagnostics.KHAT_GOOD} good, >= "
        f"{diagnostics.KHAT_BAD} unreliable; undetermined: no tail to fit, e.g. a Categorical q whose few distinct "
        "weights leave PSIS nothing to smooth); global k̂: of q over the Bayesian GMM's global latents.\n",
        _md_table(train_rows, ["problem", "estimator", "status", "final_elbo_mean", "final_elbo_sd", "elbo_rhat",
                               "log_lik_mean", "khat_mean", "khat_frac_good", "khat_frac_bad",
                               "khat_frac_undetermined", "global_khat", "wall_s_per_run"]),
    ] if train_rows else []
    parts = [
        "# Gradient estimators compared\n",
        f"Settings: {json.dumps(config.to_dict())}\n",
        f"Torch threads: {config.compare.threads}; total wall time {timings['total_s']:.1f} s.\n",
        f"## Gradients at fixed parameters ({g.num_draws} one-draw gradients of -ELBO on a fixed batch of "
        f"{g.batch_size}, after {g.pretrain_steps} Adam steps)\n",
        "Variance and SNR (|mean| / sd) are per parameter element, averaged over the guide's (or the model's) "
        "parameters; max |z|: the largest z-score of the mean against the exact gradient (none where it is not "
        "computable or the target is not the ELBO); cpu_ms_per_gradient: CPU time of one gradient.\n",
        _md_table(grad_rows, ["problem", "estimator", "status", "guide_mean_variance",
                              "variance_ratio_to_reparameterized", "guide_mean_snr", "guide_max_abs_z",
                              "model_mean_variance", "model_max_abs_z", "cpu_ms_per_gradient"]),
        *training_part,
    ]
    summary = {"timings_s": timings, "gradients": grad_rows, "training": train_rows}
    if loo is not None:
        record(_write_csv(run_dir / "loo.csv", loo["rows"], list(loo["rows"][0])))
        parts += ["## Bayesian GMMs: PSIS-LOO across K (NUTS, and VI with the reparameterized estimator)\n",
                  "VI pointwise log-likelihood: importance sampling over the global latents' guide, resampled by "
                  "the Pareto-smoothed weights (see ppl_models/compare/).\n",
                  _md_table(loo["rows"], list(loo["rows"][0]))]
        for kind, table in loo["compare"].items():
            text = table.to_csv()
            atomic_write_bytes(run_dir / f"loo_compare_{kind}.csv", lambda f, s=text: f.write(s.encode()))
            record(run_dir / f"loo_compare_{kind}.csv")
            parts += [f"\naz.compare ({kind}):\n\n```\n{table.to_string()}\n```\n"]
        summary["loo"] = loo["rows"]
    sums = nuts_refs.get("bayesian-gmm-summaries") or {}
    for name, table in sums.items():
        parts += [f"\naz.summary of the Bayesian GMM's q, {name} (draws resampled by their Pareto-smoothed importance "
                  f"weights; chains = seeds):\n\n```\n{table.to_string()}\n```\n"]
    if "linear-gaussian" in nuts_refs:
        ref = nuts_refs["linear-gaussian"]
        parts += ["## Linear-Gaussian: posterior of z for the first datapoints — exact, NUTS, VI (reparameterized)\n",
                  f"NUTS wall time {ref['wall_s']:.1f} s.\n",
                  _md_table(ref["rows"], list(ref["rows"][0]))]
    text = "\n".join(parts)
    atomic_write_bytes(run_dir / "report.md", lambda f: f.write(text.encode()))
    record(run_dir / "report.md")
    if plots:
        for path in plot_all(run_dir, grad_rows, train_results, nuts_refs):
            record(path)
    summary_text = json.dumps(summary, indent=1, default=_json_default, allow_nan=True)
    atomic_write_bytes(run_dir / "summary.json", lambda f: f.write(summary_text.encode()))
    record(run_dir / "summary.json")
    return summary


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
