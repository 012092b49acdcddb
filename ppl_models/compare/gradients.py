r"""Gradient statistics at fixed parameters (:func:`gradient_statistics`).

At fixed parameters (after ``[gradients].pretrain_steps`` Adam steps), ``num_draws`` independent one-draw
gradients of the loss :math:`-\mathrm{ELBO}` on one fixed batch; per parameter element the mean, the variance
and the signal-to-noise ratio :math:`|\mathrm{mean}| / \mathrm{sd}`; the cost per gradient; where the exact
gradient is computable (:func:`exact_gradient`: discrete guides by enumerating every guide site, the
linear-Gaussian model in closed form) the z-scores of the mean against it.  Baseline estimators are warmed up for
``warmup`` draws first (the model's and guide's parameters stay fixed; the baselines keep adapting, as in
training).

References:
    Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo Gradient Estimation in Machine Learning.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import pyro
import torch

from ppl_models.compare.problems import Problem
from ppl_models.infer.estimators import Estimator

__all__ = ["GradientStats", "gradient_statistics", "exact_gradient"]


@dataclass
class GradientStats:
    """One estimator's gradients at fixed parameters: per parameter tensor (flattened) the mean, the variance
    (``ddof=1``) over ``num_draws`` draws, the exact gradient (``None`` where unknown) and the role
    (``"guide"`` or ``"model"``); the mean CPU time of one gradient (``cost_s``, one draw; with one torch thread
    the compute cost, unaffected by other processes on the machine)."""

    problem: str
    estimator: str
    target: str
    num_draws: int
    cost_s: float
    loss_mean: float
    mean: Dict[str, np.ndarray]
    var: Dict[str, np.ndarray]
    exact: Dict[str, Optional[np.ndarray]]
    role: Dict[str, str]

    def z_scores(self, name: str) -> Optional[np.ndarray]:
        """``(mean - exact) / sqrt(var / num_draws)`` per element (``None`` without an exact gradient)."""
        exact = self.exact.get(name)
        if exact is None:
            return None
        se = np.sqrt(self.var[name] / self.num_draws)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (self.mean[name] - exact) / se
        # Elements whose gradient is exactly zero in every draw and exactly: z = 0.
        return np.where((se == 0) & (self.mean[name] == exact), 0.0, z)

    def summary(self, role: str) -> dict:
        """Aggregates over the elements of the ``role``'s parameters: mean variance per element, total variance,
        mean and median SNR, the largest |z| against the exact gradient."""
        names = [n for n, r in self.role.items() if r == role]
        if not names:
            return {}
        mean = np.concatenate([self.mean[n] for n in names])
        var = np.concatenate([self.var[n] for n in names])
        sd = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(sd > 0, np.abs(mean) / sd, np.nan)
        zs = [self.z_scores(n) for n in names]
        out = {
            "numel": int(mean.size),
            "mean_variance": float(var.mean()),
            "total_variance": float(var.sum()),
            "mean_snr": float(np.nanmean(snr)) if np.isfinite(snr).any() else float("nan"),
            "median_snr": float(np.nanmedian(snr)) if np.isfinite(snr).any() else float("nan"),
            "max_abs_z": float(np.nanmax(np.abs(np.concatenate(zs)))) if all(z is not None for z in zs) else None,
        }
        return out


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g is None:
        return torch.zeros(p.numel(), dtype=torch.float64)
    if g.is_sparse:
        g = g.coalesce().to_dense()
    return g.detach().reshape(-1).double()


def _measured_params(problem: Problem, estimator: Estimator) -> Dict[str, str]:
    """Model and guide parameters by name -> role (baselines excluded)."""
    aux = set(estimator.auxiliary_param_names())
    roles = {}
    for name in pyro.get_param_store().keys():
        if name in aux:
            continue
        module = name.split("$$$", 1)[0]
        roles[name] = "guide" if module in problem.guide_modules else "model"
    return roles


def _zero_grads() -> None:
    for p in pyro.get_param_store().values():
        p.grad = None


def exact_gradient(problem: Problem, names) -> Optional[Dict[str, np.ndarray]]:
    """The exact gradient of :math:`-\\mathrm{ELBO}` on the fixed batch (``None`` where it is not computable)."""
    if problem.exact_elbo is None:
        return None
    store = pyro.get_param_store()
    _zero_grads()
    (-problem.exact_elbo(problem.grad_args, problem.grad_kwargs)).backward()
    out = {n: _dense_grad(store[n]).numpy().copy() for n in names}
    _zero_grads()
    return out


def gradient_statistics(
    problem: Problem,
    estimator: Estimator,
    *,
    num_draws: int,
    warmup: int = 0,
    baseline_lr: float = 1e-2,
    progress: bool = False,
) -> GradientStats:
    """Draw ``num_draws`` independent gradients of the loss at the current (fixed) parameters.

    Model and guide parameters are never updated; a neural baseline is trained (Adam, ``baseline_lr``) during
    ``warmup`` draws and keeps adapting while measuring, the decaying-average baseline updates itself.
    """
    store = pyro.get_param_store()
    args, kwargs = problem.grad_args, problem.grad_kwargs
    baseline_opt = None

    def one_draw():
        nonlocal baseline_opt
        _zero_grads()
        t0 = time.process_time()  # CPU time: on a shared machine wall time measures the neighbours
        loss = estimator.loss_and_grads(*args, **kwargs)
        elapsed = time.process_time() - t0
        if estimator.modules and baseline_opt is None:
            params = [p for m in estimator.modules.values() for p in m.parameters()]
            baseline_opt = torch.optim.Adam(params, lr=baseline_lr)
        if baseline_opt is not None:
            baseline_opt.step()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{problem.name}/{estimator.name}: non-finite loss {loss} while measuring gradients"
            )
        return loss, elapsed

    for _ in range(warmup):
        one_draw()
    one_draw()  # registers every parameter (and the average baseline)
    roles = _measured_params(problem, estimator)
    names = sorted(roles)
    sums = {n: torch.zeros(store[n].numel(), dtype=torch.float64) for n in names}
    sq = {n: torch.zeros(store[n].numel(), dtype=torch.float64) for n in names}
    total_time, total_loss = 0.0, 0.0
    for i in range(num_draws):
        loss, elapsed = one_draw()
        total_time += elapsed
        total_loss += loss
        for n in names:
            g = _dense_grad(store[n])
            sums[n] += g
            sq[n] += g * g
        if progress and (i + 1) % max(1, num_draws // 4) == 0:
            print(f"  {problem.name}/{estimator.name}: {i + 1}/{num_draws} draws", file=sys.stderr, flush=True)
    _zero_grads()
    mean = {n: (sums[n] / num_draws).numpy() for n in names}
    var = {
        n: ((sq[n] - num_draws * (sums[n] / num_draws) ** 2) / max(1, num_draws - 1)).clamp_min(0).numpy()
        for n in names
    }
    exact = exact_gradient(problem, names) if estimator.target == "ELBO" else None
    return GradientStats(
        problem.name, estimator.name, estimator.target, num_draws, total_time / num_draws, total_loss / num_draws,
        mean, var, {n: (exact[n] if exact is not None else None) for n in names}, roles,
    )
