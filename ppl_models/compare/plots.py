"""The comparison's figures in the run directory (:func:`plot_all`): gradient variance per estimator, ELBO
curves over seeds, PSIS k̂ histograms, and VI against NUTS (and the exact posterior where it is known)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from ppl_models.infer import diagnostics
from ppl_models.infer.objectives import estimator_spec

__all__ = ["plot_all", "plot_gradient_variance", "plot_elbo_bands", "plot_khat_hist", "plot_vi_vs_nuts"]


def plot_all(run_dir: Path, grad_rows: List[dict], train_results: dict, nuts_refs: dict) -> List[Path]:
    """gradient_variance.png, elbo_curves.png, khat_hist.png and (with a NUTS reference) vi_vs_nuts.png."""
    written = [plot_gradient_variance(grad_rows, run_dir / "gradient_variance.png")]
    if train_results:
        written += [plot_elbo_bands(train_results, run_dir / "elbo_curves.png"),
                    plot_khat_hist(train_results, run_dir / "khat_hist.png")]
    if "bayesian-gmm" in nuts_refs or "linear-gaussian" in nuts_refs:
        written.append(plot_vi_vs_nuts(train_results, nuts_refs, run_dir / "vi_vs_nuts.png"))
    return [w for w in written if w is not None]


def _plt():
    from ppl_models.tasks.plots import plt, save_figure  # the Agg backend is selected there

    return plt, save_figure


def _note(ax, text: str) -> None:
    from ppl_models.tasks.plots import note_in_panel

    note_in_panel(ax, text)


def plot_gradient_variance(grad_rows: List[dict], path: Path) -> Path:
    """Mean variance per guide parameter element of each estimator, one panel per problem, log scale."""
    plt, save_figure = _plt()
    problems = list(dict.fromkeys(r["problem"] for r in grad_rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        rows = [r for r in grad_rows if r["problem"] == problem]
        names = [r["estimator"] for r in rows]
        values = [r.get("guide_mean_variance") or np.nan for r in rows]
        colors = ["tab:red" if estimator_spec(n).rule == "score-function" else "tab:blue" for n in names]
        ax.bar(range(len(rows)), values, color=colors)
        for i, (r, v) in enumerate(zip(rows, values)):
            if not np.isfinite(v):
                ax.text(i, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7,
                        transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(problem, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("gradient variance per guide parameter")
    fig.suptitle("gradient variance at fixed parameters (red: score-function; missing bars: n/a)", fontsize=9)
    return save_figure(fig, path)


def plot_elbo_bands(train_results: dict, path: Path) -> Path:
    """ELBO per datapoint against steps: the mean over seeds and a band from the lowest to the highest seed."""
    plt, save_figure = _plt()
    problems = list(train_results)
    fig, axes = plt.subplots(1, len(problems), figsize=(4.6 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        lows = []
        for name, seeds_out in train_results[problem].items():
            if isinstance(seeds_out, str):
                continue
            steps = np.asarray(seeds_out[0]["train"].steps)
            traces = np.stack([np.asarray(o["train"].elbo) for o in seeds_out])
            (line,) = ax.plot(steps, traces.mean(0), label=f"{name} ({len(seeds_out)} seeds)", lw=1.2)
            ax.fill_between(steps, traces.min(0), traces.max(0), color=line.get_color(), alpha=0.2)
            lows.append(np.percentile(traces[:, len(steps) // 4:], 5))
            hi = traces.max()
        if lows:
            lo = min(lows)
            ax.set_ylim(lo - 0.05 * abs(hi - lo + 1e-9), hi + 0.05 * abs(hi - lo + 1e-9))
        ax.set_title(problem, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("ELBO per datapoint (nats)")
    return save_figure(fig, path)


def plot_khat_hist(train_results: dict, path: Path) -> Optional[Path]:
    """Per-datapoint PSIS k̂ of the final q (all seeds), per problem with local latents, per estimator; an
    estimator without a finite k̂ is named in the panel's note (PSIS found no tail to fit: too few importance
    samples, or weights all equal)."""
    plt, save_figure = _plt()
    problems = [p for p, res in train_results.items()
                if any(not isinstance(v, str) and "khat" in v[0] for v in res.values())]
    if not problems:
        return None
    fig, axes = plt.subplots(1, len(problems), figsize=(4.4 * len(problems), 3.6), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        missing = []
        for name, seeds_out in train_results[problem].items():
            if isinstance(seeds_out, str):
                continue
            k = np.concatenate([o["khat"] for o in seeds_out])
            finite = k[np.isfinite(k)]
            if finite.size:
                ax.hist(np.clip(finite, -0.5, 2.0), bins=40, range=(-0.5, 2.0), histtype="step", label=name)
            if finite.size < k.size:
                missing.append(f"{name}: {k.size - finite.size} of {k.size}")
        for v, style in ((diagnostics.KHAT_GOOD, ":"), (diagnostics.KHAT_BAD, "--")):
            ax.axvline(v, color="k", ls=style, lw=0.8)
        ax.set_xlim(-0.5, 2.0)
        if missing:
            text = "\n".join(["k̂ undetermined (no tail to fit: too few", "importance samples, or equal weights):",
                              *missing])
            if ax.get_legend_handles_labels()[0]:
                ax.text(0.98, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=6,
                        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"})
            else:
                _note(ax, "no finite k̂ to show\n" + text)
        ax.set_title(f"{problem}: PSIS k̂ per datapoint", fontsize=9)
        ax.set_xlabel("k̂ (clipped to [-0.5, 2]; dotted 0.5, dashed 0.7)")
        ax.set_ylabel("datapoints (all seeds)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.set_yticks([])
    return save_figure(fig, path)


def plot_vi_vs_nuts(train_results: dict, nuts_refs: dict, path: Path) -> Path:
    """Bayesian GMM: component locations drawn by NUTS and by each estimator's q (first seed); linear-Gaussian:
    z of the first datapoint — NUTS, VI and the exact posterior's 1- and 2-sd ellipses."""
    plt, save_figure = _plt()
    panels = [k for k in ("bayesian-gmm", "linear-gaussian") if k in nuts_refs and nuts_refs[k] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "bayesian-gmm":
            ordered, _ = nuts_refs[key]
            locs = ordered["locs"].reshape(-1, ordered["locs"].shape[-1])
            if locs.shape[-1] < 2:
                _note(ax, "one data dimension: no 2-D scatter of the locations")
                continue
            ax.scatter(locs[:, 0], locs[:, 1], s=4, c="k", alpha=0.3, label="NUTS")
            for name, seeds_out in train_results.get("bayesian-gmm", {}).items():
                if isinstance(seeds_out, str):
                    continue
                q = seeds_out[0]["q_draws"]["locs"].reshape(-1, locs.shape[-1])  # q's own draws
                ax.scatter(q[:, 0], q[:, 1], s=3, alpha=0.3, label=f"VI {name}")
            ax.set_title("Bayesian GMM: component locations μ_k (all k, every draw)", fontsize=9)
            ax.set_xlabel("μ_k, data dimension 1")
            ax.set_ylabel("μ_k, data dimension 2")
        else:
            ref = nuts_refs[key]
            zn, zv = ref["z_nuts"][:, 0], ref["z_vi"][:, 0]
            if zn.shape[-1] < 2:
                _note(ax, "z_dim = 1: no 2-D scatter of z")
                continue
            ax.scatter(zn[:, 0], zn[:, 1], s=4, c="k", alpha=0.3, label="NUTS")
            ax.scatter(zv[:, 0], zv[:, 1], s=4, alpha=0.3, label="VI (reparameterized, mean-field)")
            theta = np.linspace(0, 2 * np.pi, 200)
            circle = np.stack([np.cos(theta), np.sin(theta)])
            for r in (1, 2):
                e = ref["exact_loc"][0][:, None] + r * ref["exact_tril"][:2, :2] @ circle
                ax.plot(e[0], e[1], "r-", lw=0.8, label="exact posterior (1, 2 sd)" if r == 1 else None)
            ax.set_title("linear-Gaussian: posterior of z of datapoint 0", fontsize=9)
            ax.set_xlabel("z, dimension 1")
            ax.set_ylabel("z, dimension 2")
        ax.legend(fontsize=6, markerscale=3)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
