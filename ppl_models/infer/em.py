r"""Expectation-maximization: coordinate ascent with analytic updates, as an inference strategy.

For a model with local latents :math:`z_i` and parameters :math:`\theta`, each iteration

1. **E-step**: :math:`q(z_i) \leftarrow p_{\theta}(z_i \mid x_i)`, the exact posterior (for the Gaussian mixture
   the responsibilities :math:`r_{ik}`), summarized by sufficient statistics;
2. **M-step**: :math:`\theta \leftarrow \arg\max_\theta \sum_i \mathbb{E}_{q(z_i)}[\log p_\theta(x_i, z_i)]`, in
   closed form for conjugate-exponential models.

Both steps maximize the ELBO :math:`\mathcal{L}(q, \theta) \le \log p_\theta(x)` coordinate-wise and the E-step
makes the bound tight, so the log-likelihood :math:`\sum_i \log p_\theta(x_i)` never decreases from one
iteration to the next (Dempster, Laird & Rubin 1977; Neal & Hinton 1998) — up to rounding and to any
regularization an M-step adds (the Gaussian mixture's ``reg_covar`` jitter).

Any model implementing :class:`EMModel` plugs in: :class:`ppl_models.gmm.GMMParams` does.

References:
    Dempster, Laird & Rubin (1977), Maximum Likelihood from Incomplete Data via the EM Algorithm.
    Neal & Hinton (1998), A View of the EM Algorithm that Justifies Incremental, Sparse, and Other Variants.
    Bishop (2006), Pattern Recognition and Machine Learning, §9.2-9.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Protocol, runtime_checkable

import torch

__all__ = ["EMModel", "EMResult", "fit_em"]


@runtime_checkable
class EMModel(Protocol):
    """What :func:`fit_em` needs of a model: exact E-step, closed-form M-step, exact log-likelihood.

    The model holds its parameters and updates them in place in :meth:`m_step`.
    """

    def e_step(self, x: torch.Tensor) -> Any:
        """Statistics of the exact posterior of every datapoint's latents (e.g. responsibilities ``(N, K)``)."""
        ...

    def m_step(self, x: torch.Tensor, stats: Any) -> None:
        """Set the parameters to the maximizer of the expected complete-data log-likelihood under ``stats``."""
        ...

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\log p(x_i)` of every datapoint, shape ``(N,)``."""
        ...


@dataclass
class EMResult:
    r"""What :func:`fit_em` returns.

    :ivar log_likelihood: mean log-likelihood per datapoint :math:`\frac1N \sum_i \log p_\theta(x_i)`, at the
        initial parameters (entry 0) and after each iteration (entry ``t``): ``num_iterations + 1`` numbers.
    :ivar num_iterations: E/M iterations run.
    :ivar converged: the last iteration changed the mean log-likelihood by less than ``tol``.
    """

    log_likelihood: List[float] = field(default_factory=list)
    num_iterations: int = 0
    converged: bool = False


def _mean_log_likelihood(model: EMModel, x: torch.Tensor, iteration: int) -> float:
    value = float(model.log_likelihood(x).mean())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"fit_em: the mean log-likelihood is {value} after {iteration} iteration(s); expected a finite number "
            "(check the data and the initial parameters)"
        )
    return value


@torch.no_grad()
def fit_em(
    model: EMModel, x: torch.Tensor, *, num_iterations: int = 100, tol: float = 1e-6, progress: bool = False
) -> EMResult:
    r"""Run EM on ``model`` (updated in place) with the data ``x`` until the mean log-likelihood per datapoint
    changes by less than ``tol`` or ``num_iterations`` iterations have run.

    :param model: an :class:`EMModel`, e.g. :class:`ppl_models.gmm.GMMParams` (start it with
        ``init_from_data``).
    :param x: the data, shape ``(N,) + event_shape`` (use float64 where exactness matters).
    :param num_iterations: the most E/M iterations (0 only evaluates the initial log-likelihood).
    :param tol: convergence threshold on the absolute change of the mean log-likelihood per datapoint.
    :param progress: show a progress bar with the current mean log-likelihood.
    :return: an :class:`EMResult` with the log-likelihood trace.
    """
    if not isinstance(model, EMModel):
        missing = [m for m in ("e_step", "m_step", "log_likelihood") if not callable(getattr(model, m, None))]
        raise TypeError(
            f"fit_em: expected a model implementing EMModel (e_step, m_step, log_likelihood), received "
            f"{type(model).__name__} without {', '.join(missing)}"
        )
    if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 0:
        raise ValueError(f"fit_em: num_iterations must be a non-negative integer, received {num_iterations!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"fit_em: tol must be a number >= 0, received {tol!r}")
    result = EMResult(log_likelihood=[_mean_log_likelihood(model, x, 0)])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_iterations, desc="EM", leave=False)
    try:
        for it in range(1, num_iterations + 1):
            stats = model.e_step(x)
            model.m_step(x, stats)
            value = _mean_log_likelihood(model, x, it)
            result.log_likelihood.append(value)
            result.num_iterations = it
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"log-lik/N {value:.6f}", refresh=False)
            if abs(value - result.log_likelihood[-2]) < tol:
                result.converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    return result
