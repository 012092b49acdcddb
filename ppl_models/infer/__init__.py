"""Inference: objectives and their estimators, and optimizers, by name; the training engine, checkpoints."""

from ppl_models.infer.em import EMModel, EMResult, fit_em
from ppl_models.infer.engine import FitResult, NonFiniteLossError, Trainer, TrainingInterrupted, fit
from ppl_models.infer.fastpath import FAST_PATH_MODES, FastPathUnsupported
from ppl_models.infer.objectives import ESTIMATOR_NAMES, make_elbo, make_estimator
from ppl_models.infer.optim import OPTIMIZER_NAMES, make_optimizer

__all__ = [
    "EMModel",
    "EMResult",
    "ESTIMATOR_NAMES",
    "OPTIMIZER_NAMES",
    "FAST_PATH_MODES",
    "FastPathUnsupported",
    "FitResult",
    "NonFiniteLossError",
    "Trainer",
    "TrainingInterrupted",
    "fit",
    "fit_em",
    "make_elbo",
    "make_estimator",
    "make_optimizer",
]
