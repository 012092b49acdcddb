r"""Training with an estimator, and the state the comparison resets between estimators.

:func:`train_estimator`: every estimator on the same model, data, initialisation per seed and number of steps,
through :class:`~ppl_models.infer.engine.Trainer` with the estimator as its objective (``elbo=name``, resolved by
the table of :mod:`ppl_models.infer.objectives`, as ``ppl-models fit`` resolves it); every ``eval_every`` steps
the same objective is measured for all of them (:func:`common_elbo`: the ELBO per datapoint on a fixed set with
``eval_particles`` draws, exact by enumeration for discrete guides), so IWAE's curve is comparable.  :func:`pretrain` moves the parameters away
from their initialisation before the gradient statistics; :func:`snapshot` / :func:`restore` give every
estimator the same starting point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List

import pyro
import pyro.poutine as poutine
import torch

from ppl_models.compare.config import CompareConfig
from ppl_models.compare.problems import UNSCALED, Problem
from ppl_models.infer.engine import Trainer
from ppl_models.infer.estimators import Estimator, EstimatorError
from ppl_models.infer.objectives import estimator_spec, make_estimator

__all__ = ["TrainResult", "common_elbo", "estimator_for", "pretrain", "train_estimator", "snapshot", "restore"]


def common_elbo(problem: Problem, num_particles: int, seed: int) -> float:
    """The ELBO per datapoint of the problem's current guide on its fixed evaluation set, the same objective for
    every estimator: exact where :attr:`Problem.exact_elbo` is known, else ``num_particles`` draws."""
    args = problem.eval_args
    n = args[0].shape[0]
    model, guide = problem.instance.model, problem.instance.guide
    with torch.no_grad(), torch.random.fork_rng(devices=[]), poutine.block():
        torch.manual_seed(seed)
        if problem.exact_elbo is not None:
            with torch.enable_grad():  # TraceEnum_ELBO.differentiable_loss insists; nothing is backpropagated
                value = float(problem.exact_elbo(args, UNSCALED).detach())
        else:
            if problem.enumerated:  # the Bayesian GMM indexes its global latents: no vectorized particles
                elbo = pyro.infer.TraceEnum_ELBO(
                    num_particles=num_particles, vectorize_particles=False, max_plate_nesting=1
                )
            else:
                elbo = pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=2)
            value = -float(elbo.loss(model, guide, *args, **UNSCALED))
    return value / n


@dataclass
class TrainResult:
    estimator: str
    seed: int
    steps: List[int]
    elbo: List[float]
    wall_time_s: float


def _trainer_for(problem: Problem, name: str, num_particles: int, *, num_steps: int, batch_size: int, lr: float,
                 seed: int, callback=None) -> Trainer:
    """The engine's trainer with the estimator ``name`` as its objective (``elbo=name``: the same table as
    ``ppl-models fit``), on the Pyro path for every estimator (timings comparable across estimators)."""
    N = problem.dataset.num_data
    return Trainer(
        problem.instance.model, problem.instance.guide, problem.dataset, elbo=name, num_particles=num_particles,
        lr=lr, batch_size=min(batch_size, N), num_epochs=10**9, max_steps=num_steps, seed=seed, progress=False,
        callback=callback, log_every=10**9, fast_path=False,
    )


def estimator_for(problem: Problem, name: str, config: CompareConfig) -> Estimator:
    """Estimator ``name`` for the problem's model and guide (an IWAE or Rényi bound with
    ``[gradients].iwae_particles`` particles).

    :raises EstimatorError: where the estimator cannot apply to the model and guide (naming the site and why).
    """
    x = problem.grad_args[0]
    idx = problem.grad_args[1]
    bound = estimator_spec(name).objective != "ELBO"
    return make_estimator(
        name, problem.instance.model, problem.instance.guide, (x, idx), {},
        num_particles=config.gradients.iwae_particles if bound else 1,
        data_plate=problem.instance.spec.data_plate,
    )


def pretrain(problem: Problem, config: CompareConfig, seed: int) -> None:
    """``[gradients].pretrain_steps`` Adam steps with the first estimator that applies (reparameterized, else
    score-function with a neural baseline, else plain score-function), so the gradients are measured away from
    the initialisation."""
    steps = config.gradients.pretrain_steps
    if steps <= 0:
        return
    for name in ("reparameterized", "score-function-nn-baseline", "score-function"):
        try:
            est = estimator_for(problem, name, config)
            break
        except EstimatorError:
            continue
    trainer = _trainer_for(problem, name, est.num_particles, num_steps=steps, batch_size=config.training.batch_size,
                           lr=problem.lr or config.gradients.pretrain_lr, seed=seed)
    trainer.fit()
    _drop_baselines()  # the pretraining's own baseline (if any) is not part of the measured estimators


def train_estimator(problem: Problem, name: str, config: CompareConfig, seed: int) -> TrainResult:
    """Train the problem's model and guide (fresh from ``seed``) with estimator ``name``; the common ELBO every
    ``eval_every`` steps.

    :raises EstimatorError: before training, where the estimator cannot apply (naming the site and why).
    """
    t = config.training
    est = estimator_for(problem, name, config)
    steps, values = [0], [common_elbo(problem, t.eval_particles, seed)]

    def callback(trainer, step, loss):
        if step % t.eval_every == 0 or step == t.num_steps:
            steps.append(step)
            values.append(common_elbo(problem, t.eval_particles, seed + step))

    trainer = _trainer_for(problem, name, est.num_particles, num_steps=t.num_steps, batch_size=t.batch_size,
                           lr=problem.lr or t.lr, seed=seed, callback=callback)
    start = time.perf_counter()
    trainer.fit()
    return TrainResult(name, seed, steps, values, time.perf_counter() - start)


def snapshot(problem: Problem) -> dict:
    """A copy of the problem's model and guide parameters (its ``instance.modules`` state dict)."""
    return {k: v.detach().clone() for k, v in problem.instance.modules.state_dict().items()}


def restore(problem: Problem, state: dict) -> None:
    """Put back the parameters of a :func:`snapshot` and drop every estimator's baseline from the param store."""
    with torch.no_grad():
        problem.instance.modules.load_state_dict(state)
    _drop_baselines()


def _drop_baselines() -> None:
    store = pyro.get_param_store()
    for n in [n for n in store.keys() if n.startswith("nn_baseline$$$") or n.startswith("__baseline")]:
        del store[n]
