"""PNG plots of a run: ELBO curves, samples from the prior, reconstructions.

Samples and reconstructions work for any model from its declared observed
site: the model is traced (with latents drawn from the prior, or replayed from
the guide) and the observed site's distribution mean is shown — for the
Bernoulli VAE the pixel probabilities.  Observations whose size is a perfect
square are drawn as square images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import torch  # noqa: E402
from torch.distributions import constraints  # noqa: E402

from ppl_models.atomic import atomic_write_bytes  # noqa: E402
from ppl_models.spec import ModelSpec  # noqa: E402

__all__ = [
    "plot_elbo_curves",
    "plot_image_grid",
    "is_image_model",
    "note_in_panel",
    "prior_means",
    "reconstruction_means",
    "save_figure",
]


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), lambda f: f.write(buffer.getvalue()))
    return Path(path)


def note_in_panel(ax, text: str) -> None:
    """Write ``text`` in the middle of the panel ``ax`` (why it holds no data, or what part is missing)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"})


def plot_elbo_curves(history: Dict[str, list], path: Path, title: str = "") -> Path:
    """Training ELBO per datapoint (running means and epoch means) and validation ELBO per epoch."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if history.get("log_step"):
        ax.plot(history["log_step"], history["log_train_elbo"], lw=0.8, alpha=0.6, label="train (running mean)")
    if history.get("step"):
        ax.plot(history["step"], history["train_elbo"], "o-", ms=3, label="train (epoch mean)")
        valid = np.asarray(history["valid_elbo"], dtype=float)
        if np.isfinite(valid).any():
            ax.plot(history["step"], valid, "s-", ms=3, label="validation")
    if history.get("valid_step"):  # validation every valid_every steps
        ax.plot(history["valid_step"], history["valid_step_elbo"], "s-", ms=3, label="validation")
    values = [v for key in ("log_train_elbo", "train_elbo", "valid_elbo", "valid_step_elbo") for v in history.get(key, []) if np.isfinite(v)]
    if values:  # the first steps are far below: show the last 95% of the range
        lo, hi = np.percentile(values, 5), max(values)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per datapoint (nats)")
    ax.set_title(title or "ELBO")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, path)


def plot_image_grid(images: torch.Tensor, path: Path, title: str = "", ncols: int = 10) -> Path | None:
    """Images of shape ``(n, d)`` with ``d`` a perfect square, in a grid; ``None`` if ``d`` is not square."""
    images = images.detach().reshape(images.shape[0], -1).cpu().numpy()
    side = math.isqrt(images.shape[1])
    if side * side != images.shape[1]:
        return None
    nrows = math.ceil(images.shape[0] / ncols)
    grid = np.ones((nrows * (side + 1) + 1, ncols * (side + 1) + 1))
    for k, image in enumerate(images):
        r, c = divmod(k, ncols)
        grid[1 + r * (side + 1) : 1 + r * (side + 1) + side, 1 + c * (side + 1) : 1 + c * (side + 1) + side] = image.reshape(
            side, side
        )
    fig, ax = plt.subplots(figsize=(ncols * 0.6, nrows * 0.6 + 0.4))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def is_image_model(spec: ModelSpec, dataset) -> bool:
    """Whether the image grids apply: the data set's batches are one tensor (an unconditional model) and the
    observed site is a square image of values in [0, 1] (e.g. MNIST; not a real-valued vector of 16 numbers)."""
    data = dataset.batch(torch.arange(min(1, int(dataset.num_data))), torch.Generator().manual_seed(0))
    numel = math.prod(spec.observed.event_shape)
    return (
        len(data) == 1
        and spec.observed.support is constraints.unit_interval
        and numel >= 64
        and math.isqrt(numel) ** 2 == numel
    )


def _observed_mean(trace, spec: ModelSpec) -> torch.Tensor:
    fn = trace.nodes[spec.observed.name]["fn"]
    return fn.mean


@torch.no_grad()
def prior_means(model: Callable, spec: ModelSpec, num_samples: int = 100) -> torch.Tensor:
    """Means of the observed site for latents drawn from the prior, shape ``(num_samples,) + event_shape``."""
    placeholder = torch.zeros(num_samples, *spec.observed.event_shape)
    trace = poutine.trace(model).get_trace(placeholder)
    return _observed_mean(trace, spec)


@torch.no_grad()
def reconstruction_means(
    model: Callable, guide: Callable, spec: ModelSpec, x: torch.Tensor, idx: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Means of the observed site with latents drawn from the guide given ``x`` of shape ``(n,) + event_shape``
    (``idx``: the rows' indices in the training set, for per-datapoint guides)."""
    guide_trace = poutine.trace(guide).get_trace(x, idx, **kwargs)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, idx, **kwargs)
    return _observed_mean(trace, spec)
