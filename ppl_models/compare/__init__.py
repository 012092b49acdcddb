r"""Compare gradient estimators of the ELBO: variance and SNR at fixed parameters, training curves over seeds,
ArviZ diagnostics (R-hat/ESS across seeds, PSIS k̂, LOO), and a NUTS reference for the small models.

The lecture's point: the score-function (REINFORCE) and the reparameterized estimators are both unbiased, but
their variances differ by orders of magnitude.  This package measures it; ``ppl-models compare CONFIG.toml`` and
``examples/compare_estimators.py`` run it from a TOML file.  Estimators are named as ``[train] elbo`` names them,
through the one table of :mod:`ppl_models.infer.objectives` (:data:`ESTIMATOR_NAMES`: Pyro's ELBOs, ``IWAE``
and the package's estimators); by default the package's gradient estimators (:data:`GRADIENT_ESTIMATORS`).
One module per job:

* :mod:`~ppl_models.compare.config` — the TOML schema (:class:`CompareConfig`, :func:`load_compare_config`);
* :mod:`~ppl_models.compare.problems` — the problems, a model + guide + data each (``vae``, ``gmm``,
  ``linear-gaussian``, ``bayesian-gmm``, ``experiment``), and their exact ELBOs where known;
* :mod:`~ppl_models.compare.gradients` — gradient statistics at fixed parameters (:func:`gradient_statistics`);
* :mod:`~ppl_models.compare.training` — training with an estimator, the common ELBO curve
  (:func:`train_estimator`);
* :mod:`~ppl_models.compare.references` — pointwise log-likelihoods and k̂ of the final q, NUTS runs, ArviZ
  InferenceData (posterior draws with their ``log_likelihood`` where there are draws, ``vi_evaluation`` where
  there are per-datapoint estimates only);
* :mod:`~ppl_models.compare.outputs` — the run directory's ``manifest.json``: a reused directory keeps nothing of
  the previous comparison;
* :mod:`~ppl_models.compare.report` — tables: CSV, markdown, JSON;
* :mod:`~ppl_models.compare.plots` — the figures;
* :mod:`~ppl_models.compare.run` — the whole comparison (:func:`run_comparison`).

References:
    Roeder, Wu & Duvenaud (2017), Sticking the Landing.
    Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational Inference.
    Vehtari, Gelman & Gabry (2017), Practical Bayesian model evaluation using leave-one-out cross-validation.
    Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo Gradient Estimation in Machine Learning.
"""

from ppl_models.compare.config import BUILTIN_PROBLEMS, PROBLEMS, CompareConfig, load_compare_config
from ppl_models.compare.gradients import GradientStats, exact_gradient, gradient_statistics
from ppl_models.compare.problems import Problem, build_problem, enumerated_exact_elbo, linear_gaussian_exact_elbo
from ppl_models.compare.references import canonical_order, mixture_pointwise_log_lik
from ppl_models.compare.run import run_comparison
from ppl_models.compare.training import TrainResult, pretrain, train_estimator
from ppl_models.infer.objectives import ESTIMATOR_NAMES, GRADIENT_ESTIMATORS

__all__ = [
    "BUILTIN_PROBLEMS",
    "PROBLEMS",
    "ESTIMATOR_NAMES",
    "GRADIENT_ESTIMATORS",
    "CompareConfig",
    "load_compare_config",
    "Problem",
    "build_problem",
    "linear_gaussian_exact_elbo",
    "enumerated_exact_elbo",
    "GradientStats",
    "gradient_statistics",
    "exact_gradient",
    "TrainResult",
    "pretrain",
    "train_estimator",
    "canonical_order",
    "mixture_pointwise_log_lik",
    "run_comparison",
]
