"""The comparison's configuration (``ppl-models compare CONFIG.toml``): eight TOML sections, one dataclass each,
read and checked by :func:`load_compare_config`; unknown keys and wrong types are errors that name the section
and key.

``[compare]`` problems, estimators, seed, run directory, plots, progress, torch threads; ``[gradients]`` the
gradient statistics at fixed parameters; ``[training]`` training over seeds and the final q's diagnostics;
``[vae]``, ``[gmm]``, ``[linear_gaussian]``, ``[bayesian_gmm]``, ``[experiment]`` the problems' data and sizes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from ppl_models.app.config import ConfigError, parse_sections, read_toml
from ppl_models.infer.objectives import GRADIENT_ESTIMATORS, estimator_spec
from ppl_models.registry import UnknownNameError

__all__ = ["BUILTIN_PROBLEMS", "PROBLEMS", "CompareConfig", "load_compare_config"]

#: The built-in problems; ``"experiment"`` compares the model, guide and data of any ``ppl-models fit`` config
#: (``[experiment] config``), e.g. a model declared with :mod:`ppl_models.declarative`.
BUILTIN_PROBLEMS = ("vae", "gmm", "linear-gaussian", "bayesian-gmm")
PROBLEMS = BUILTIN_PROBLEMS + ("experiment",)


@dataclass
class CompareSection:
    problems: List[str] = field(default_factory=lambda: list(BUILTIN_PROBLEMS))
    # any name of ppl_models.infer.objectives.ESTIMATORS; by default the package's gradient estimators
    estimators: List[str] = field(default_factory=lambda: list(GRADIENT_ESTIMATORS))
    seed: int = 0
    run_dir: str = "runs/compare"
    plots: bool = True
    progress: bool = True
    threads: int = 1  # torch threads (the comparison's timings are per thread)


@dataclass
class GradientsSection:
    num_draws: int = 1000  # one-draw gradients per estimator
    batch_size: int = 64  # datapoints of the fixed batch
    iwae_particles: int = 5  # K of the iwae estimator
    warmup: int = 200  # baseline warm-up draws
    pretrain_steps: int = 200  # Adam steps before measuring (0: at initialisation)
    pretrain_lr: float = 1e-3


@dataclass
class TrainingSection:
    num_seeds: int = 4  # 0: the gradient statistics only (no training, ArviZ or NUTS part)
    num_steps: int = 500
    batch_size: int = 100
    lr: float = 1e-3
    eval_every: int = 50
    eval_particles: int = 16
    eval_size: int = 500  # datapoints of the fixed evaluation set
    num_samples: int = 500  # importance samples for the pointwise log-likelihood and k̂ of the final q


@dataclass
class VAESection:
    data: str = "mnist"  # "mnist" (binarized MNIST, needs the data files) or "simulated"
    num_data: int = 2000
    z_dim: int = 10
    hidden_dims: List[int] = field(default_factory=lambda: [200])
    x_dim: int = 784  # simulated data only


@dataclass
class GMMSection:
    num_data: int = 200
    num_components: int = 3
    data_dim: int = 2
    separation: float = 4.0  # distance scale of the true locations


@dataclass
class LinearGaussianSection:
    num_data: int = 200
    z_dim: int = 2
    x_dim: int = 5
    nuts_datapoints: int = 10  # NUTS reference over the latents of the first datapoints
    nuts_warmup: int = 200
    nuts_samples: int = 300
    nuts_max_tree_depth: int = 10


@dataclass
class BayesianGMMSection:
    num_data: int = 100
    true_components: int = 3
    num_components: int = 3  # K of the estimator comparison
    compare_components: List[int] = field(default_factory=lambda: [2, 3, 4, 5])  # K of az.compare
    data_dim: int = 2
    separation: float = 4.0
    num_draws: int = 500  # draws from each seed's q
    nuts_warmup: int = 200
    nuts_samples: int = 300
    nuts_max_tree_depth: int = 10
    lr: float = 0.02  # Adam step size of the guide of the global latents


@dataclass
class ExperimentSection:
    config: str = ""  # a `ppl-models fit` TOML whose model, guide and data the "experiment" problem compares


_COMPARE_SECTIONS = {
    "compare": CompareSection,
    "gradients": GradientsSection,
    "training": TrainingSection,
    "vae": VAESection,
    "gmm": GMMSection,
    "linear_gaussian": LinearGaussianSection,
    "bayesian_gmm": BayesianGMMSection,
    "experiment": ExperimentSection,
}


@dataclass
class CompareConfig:
    """The comparison's configuration (``ppl-models compare CONFIG.toml``); sections as the dataclasses above."""

    compare: CompareSection = field(default_factory=CompareSection)
    gradients: GradientsSection = field(default_factory=GradientsSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    vae: VAESection = field(default_factory=VAESection)
    gmm: GMMSection = field(default_factory=GMMSection)
    linear_gaussian: LinearGaussianSection = field(default_factory=LinearGaussianSection)
    bayesian_gmm: BayesianGMMSection = field(default_factory=BayesianGMMSection)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)

    @classmethod
    def from_dict(cls, raw, source: str = "config") -> "CompareConfig":
        config = cls(**parse_sections(raw, _COMPARE_SECTIONS, source))
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        c = self.compare
        for p in c.problems:
            if p not in PROBLEMS:
                raise ConfigError(f"{source}: [compare].problems: {UnknownNameError('problem', p, PROBLEMS)}")
        if "experiment" in c.problems and not self.experiment.config:
            raise ConfigError(f"{source}: problem 'experiment' needs [experiment].config, the path of a "
                              "`ppl-models fit` config (its model, guide and data are compared)")
        for e in c.estimators:
            try:
                estimator_spec(e)
            except UnknownNameError as unknown:
                raise ConfigError(f"{source}: [compare].estimators: {unknown}") from None
        positive = [
            ("gradients", "num_draws"), ("gradients", "batch_size"),
            ("training", "batch_size"), ("training", "eval_every"), ("training", "eval_particles"),
            ("training", "eval_size"), ("training", "num_samples"), ("compare", "threads"),
        ]
        for section, key in positive:
            if getattr(getattr(self, section), key) < 1:
                value = getattr(getattr(self, section), key)
                raise ConfigError(f"{source}: [{section}].{key}: expected an integer >= 1, received {value}")
        if self.training.num_seeds < 0:
            raise ConfigError(f"{source}: [training].num_seeds: expected an integer >= 0 (0: gradients only), "
                              f"received {self.training.num_seeds}")
        if self.training.num_samples < 2:
            raise ConfigError(f"{source}: [training].num_samples: k̂ needs at least 2 importance samples")
        if self.vae.data not in ("mnist", "simulated"):
            raise ConfigError(f"{source}: [vae].data: expected 'mnist' or 'simulated', received {self.vae.data!r}")
        for k in self.bayesian_gmm.compare_components:
            if not isinstance(k, int) or k < 1:
                raise ConfigError(
                    f"{source}: [bayesian_gmm].compare_components: expected integers >= 1, received {k!r}"
                )

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _COMPARE_SECTIONS}


def load_compare_config(path, overrides: typing.Mapping | None = None) -> CompareConfig:
    """Read a comparison TOML file; ``overrides`` are dotted keys, e.g. ``{"training.num_steps": 100}``."""
    path = Path(path)
    raw = read_toml(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r}: expected SECTION.KEY=VALUE, e.g. training.num_steps=100")
        if section not in _COMPARE_SECTIONS:
            raise ConfigError(f"override {dotted!r}: {UnknownNameError('section', section, _COMPARE_SECTIONS)}")
        raw.setdefault(section, {})[key] = value
    return CompareConfig.from_dict(raw, source=str(path))
