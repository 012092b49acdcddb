"""An experiment from a :class:`~ppl_models.app.config.Config`: data -> model + guide -> engine -> evaluation.

Used by the command line (``ppl-models fit``, ``ppl-models evaluate``) and the
example scripts.  A run directory holds::

    config.toml        the resolved configuration
    checkpoints/       atomic checkpoints (step-<step>.pt)
    history.json       ELBO per epoch and running means
    metrics.json       evaluation: test log-likelihood (IWAE-K), ELBO, KL, Pareto k-hat
    eval.nc            ArviZ InferenceData with the pointwise log-likelihood
    elbo.png, prior_samples.png, reconstructions.png
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import pyro
import torch

from ppl_models import registry
from ppl_models.app.config import Config, ConfigError, load_config, to_toml
from ppl_models.data import mnist_splits
from ppl_models.data.parallel import multi30k_splits, parallel_splits, synthetic_splits
from ppl_models.data.quadrants import quadrant_splits
from ppl_models.infer import Trainer
from ppl_models.atomic import atomic_write_bytes
from ppl_models.infer.checkpoint import CheckpointError
from ppl_models.infer.strategies import guide_for_strategy, inference_guide, inner_loop, make_strategy
from ppl_models.registry import UnknownNameError

__all__ = ["DATASETS", "MODEL_HOOKS", "Experiment", "register_dataset", "register_model_hooks"]

#: Data loaders by name: ``loader(**options) -> {"train": Dataset, "valid": Dataset, "test": Dataset}``.
DATASETS: Dict[str, Callable[..., dict]] = {"mnist": mnist_splits, "mnist-quadrants": quadrant_splits}

DATASETS.update({"multi30k": multi30k_splits, "parallel": parallel_splits, "synthetic-alignment": synthetic_splits})

#: Per-model hooks, registered by a model's module (:func:`register_model_hooks`):
#: ``resolve(config) -> config`` fills in or checks settings the model fixes (e.g. the ELBO and guide of a variant),
#: before the run directory's config.toml is written; ``evaluate(experiment, instance, dataset, split) -> result``
#: replaces the importance-sampling evaluation (``result.save(run_dir)``, ``result.to_metrics()``).
MODEL_HOOKS: Dict[str, Dict[str, Callable]] = {}

_LIMITS = ("limit_train", "limit_valid", "limit_test")


def register_dataset(name: str, loader: Callable[..., dict]) -> None:
    DATASETS[name] = loader


def register_model_hooks(model_name: str, **hooks: Callable) -> None:
    """Register ``resolve`` and/or ``evaluate`` hooks for a model (see :data:`MODEL_HOOKS`)."""
    unknown = set(hooks) - {"resolve", "evaluate"}
    if unknown:
        raise UnknownNameError("model hook", sorted(unknown)[0], ("resolve", "evaluate"))
    MODEL_HOOKS.setdefault(model_name, {}).update(hooks)


def _data_model_kwargs(splits: dict) -> dict:
    """Model hyperparameters a training set fixes (e.g. vocabulary sizes), from its ``model_kwargs`` attribute."""
    train = splits["train"]
    return dict(getattr(getattr(train, "base", train), "model_kwargs", {}) or {})


class Head:
    """The first ``n`` rows of a data set (for smoke tests and quick runs)."""

    def __init__(self, base, n: int):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"data limit: expected a positive integer, received {n!r}")
        self.base, self.num_data = base, min(n, int(base.num_data))

    def batch(self, idx, generator):
        return self.base.batch(idx, generator)


@dataclass
class Experiment:
    """One configured experiment and its run directory."""

    config: Config
    run_dir: Path

    @classmethod
    def from_file(cls, path, overrides=None, run_dir=None) -> "Experiment":
        config = load_config(path, overrides)
        return cls(config, Path(run_dir or config.output.run_dir))

    @classmethod
    def from_run_dir(cls, run_dir, overrides=None) -> "Experiment":
        run_dir = Path(run_dir)
        path = run_dir / "config.toml"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a run directory: {path} does not exist")
        return cls(load_config(path, overrides), run_dir)

    # ----------------------------------------------------------------- parts
    def model_hparams(self) -> dict:
        """``[model]`` hyperparameters; a ``module`` key (a ``.py`` file or dotted module declaring the model,
        and maybe its data set) is imported instead of being passed on."""
        hparams = dict(self.config.model.hparams)
        source = hparams.pop("module", None)
        if source is not None:
            registry.load_source(source)
        return hparams

    def load_data(self) -> dict:
        self.model_hparams()  # a user's model file may register its data set
        self.resolve_model_hooks()  # idempotent; also for callers that build without Experiment.fit
        options = dict(self.config.data.hparams)
        limits = {k: options.pop(k) for k in _LIMITS if k in options}
        name = self.config.data.name
        if name not in DATASETS:
            raise UnknownNameError("data set", name, DATASETS)
        loader = DATASETS[name]
        registry.check_kwargs(f"data {name!r}", loader, options)
        splits = loader(**options)
        for key, n in limits.items():
            split = key.split("_", 1)[1]
            if splits.get(split) is not None:
                splits[split] = Head(splits[split], n)
        self._data_kwargs = _data_model_kwargs(splits)  # what build() uses when not given data_kwargs
        return splits

    def resolve_model_hooks(self) -> None:
        """Let the model's ``resolve`` hook fill in or check the configuration (see :data:`MODEL_HOOKS`)."""
        registry.model_names()  # imports the built-in models, which register their hooks
        resolve = MODEL_HOOKS.get(self.config.model.name, {}).get("resolve")
        if resolve is not None:
            self.config = resolve(self.config)

    def build(self, num_data: int, data_kwargs: Optional[dict] = None) -> registry.Instance:
        """Model and guide with fresh networks, initialised from the run's seed; with a ``[train] strategy``
        its guide (and step rule) replace the plain guide.  ``data_kwargs``: model hyperparameters the data
        fix (vocabulary sizes), used where the config does not set them."""
        pyro.clear_param_store()
        pyro.set_rng_seed(self.config.train.seed)
        t = self.config.train
        guide_name = self.config.guide.name
        if t.strategy is not None:
            implied = guide_for_strategy(t.strategy)
            if implied is None and guide_name is not None:
                raise ConfigError(f"strategy {t.strategy!r} makes its own guide; remove [guide].name = {guide_name!r}")
            guide_name = guide_name or implied
        elif guide_name is None:
            guide_name = "amortized"
        instance = registry.instantiate(
            self.config.model.name,
            guide_name,
            num_data=num_data,
            model_kwargs={**(data_kwargs or getattr(self, "_data_kwargs", None) or {}), **self.model_hparams()},
            guide_kwargs=self.config.guide.hparams,
        )
        if t.strategy is not None:
            instance.guide, instance.step = make_strategy(
                t.strategy, instance.model, instance.guide, instance.spec, dict(instance.modules),
                num_steps=t.inner_steps, lr=t.inner_lr, refine_grad=t.refine_grad, optimizer=t.inner_optimizer,
                lr_decay=t.inner_lr_decay, local_lr=t.local_lr,
            )
            instance.guide_name = f"{t.strategy} ({guide_name})" if guide_name else t.strategy
        return instance

    def is_per_datapoint(self, instance: registry.Instance) -> bool:
        """Whether the guide holds parameters per training datapoint (it cannot score new data)."""
        return any("local_params" in name for name in instance.modules.keys())

    def trainer(self, splits: dict, instance: registry.Instance, **overrides) -> Trainer:
        t = self.config.train
        valid = splits.get("valid") if t.validate and not self.is_per_datapoint(instance) else None
        kwargs = dict(
            valid=valid,
            elbo=t.elbo,
            num_particles=t.num_particles,
            optimizer=t.optimizer,
            lr=t.lr,
            batch_size=t.batch_size,
            num_epochs=t.num_epochs,
            max_steps=t.max_steps,
            time_limit=t.time_limit,
            fast_path=t.fast_path,
            seed=t.seed,
            run_dir=self.run_dir,
            keep_last=t.keep_last,
            progress=t.progress,
        )
        kwargs.update(overrides)
        return Trainer(instance.model, instance.guide, splits["train"], step_fn=instance.step, **kwargs)

    # ---------------------------------------------------------------- fit
    def fit(self, resume: bool = False, evaluate: bool = True, num_samples: Optional[int] = None):
        """Train (or resume), write the ELBO plot, then evaluate on the configured split.

        In a process started by torchrun, or with ``[train] device`` other than ``"cpu"``, the engine trains
        data-parallel (:class:`ppl_models.infer.distributed.DataParallel`; every process of the job runs this):
        rank 0 alone writes the run directory and, after training, evaluates the newest checkpoint.  Returns
        ``(FitResult, metrics or None)``; ``metrics`` is ``None`` on other ranks."""
        from contextlib import nullcontext

        from ppl_models.infer.distributed import DataParallel, in_torchrun, process_group, rank_and_world

        device = self.config.train.device
        parallel = in_torchrun() or device != "cpu"
        self.resolve_model_hooks()
        with process_group(device) if parallel else nullcontext() as dev:
            main = rank_and_world()[0] == 0
            if main:
                self._write_config(resume)
            splits = self.load_data()
            instance = self.build(splits["train"].num_data, _data_model_kwargs(splits))
            if main and self.is_per_datapoint(instance) and self.config.train.validate:
                print(
                    "note: the per-datapoint guide has no parameters for validation data; validation ELBO skipped",
                    file=sys.stderr,
                )
            if main and parallel and self.config.train.fast_path:
                print("note: the fast path is not used with several processes or a GPU; Pyro's ELBO runs",
                      file=sys.stderr)
            options = {"parallel": DataParallel(instance.modules, device=dev)} if parallel else {}
            trainer = self.trainer(splits, instance, **options)
            if main and parallel and trainer.parallel.world_size > 1:
                print(trainer.parallel.describe(trainer.batch_size), file=sys.stderr)
            result = trainer.fit(resume=resume)
            if main and self.config.output.plots:
                from ppl_models.tasks.plots import plot_elbo_curves

                plot_elbo_curves(result.history, self.run_dir / "elbo.png", title=f"{instance.model_name} / {instance.guide_name}")
        if not (evaluate and main):
            return result, None
        # after data-parallel training this process's networks hold its rows only: evaluate from the checkpoint
        metrics = self.evaluate(num_samples=num_samples) if parallel else self._evaluate(splits, instance, num_samples)
        return result, metrics

    def _write_config(self, resume: bool) -> None:
        path = self.run_dir / "config.toml"
        text = to_toml(self.config)
        if path.exists() and not resume:
            existing = path.read_text()
            if existing != text and any((self.run_dir / "checkpoints").glob("step-*.pt")):
                raise ConfigError(
                    f"{self.run_dir} already holds a run with another configuration; "
                    "pass --resume to continue it, or choose another run directory"
                )
        atomic_write_bytes(path, lambda f: f.write(text.encode()))

    # ----------------------------------------------------------- evaluate
    def evaluate(self, num_samples: Optional[int] = None, split: Optional[str] = None, batch_size: Optional[int] = None):
        """Evaluate the newest checkpoint of the run directory."""
        self.resolve_model_hooks()
        splits = self.load_data()
        instance = self.build(splits["train"].num_data, _data_model_kwargs(splits))
        return self._evaluate(splits, instance, num_samples, split, batch_size, load=True)

    def _evaluate(self, splits, instance, num_samples=None, split=None, batch_size=None, load=False):
        from ppl_models.infer.evaluate import evaluate

        cfg = self.config.evaluate
        split = split or cfg.split
        if split not in splits or splits[split] is None:
            raise UnknownNameError("split", split, [k for k, v in splits.items() if v is not None])
        if load:
            trainer = self.trainer(splits, instance, progress=False)
            if trainer.resume() is None:
                raise CheckpointError(f"{self.run_dir / 'checkpoints'} holds no readable checkpoint to evaluate")
        guide, strategy = instance.guide, self.config.train.strategy
        fast_path = cfg.fast_path
        if strategy in ("svi-local", "svi-inner") and not (strategy == "svi-local" and split == "train"):
            fast_path = False
            # λ of data the training did not store: fitted per batch from the prior (300 Adam steps by default)
            guide = inference_guide(strategy, instance.model, instance.spec, guide,
                                    loop=inner_loop("test", num_steps=cfg.refine_steps))
        elif self.is_per_datapoint(instance) and split != "train":
            raise ConfigError(
                f"guide {instance.guide_name!r} holds parameters per training datapoint and cannot score "
                f"the {split!r} split; evaluate split 'train', or use an amortized guide"
            )
        hook = MODEL_HOOKS.get(instance.model_name, {}).get("evaluate")
        if hook is not None:
            result = hook(self, instance, splits[split], split)
            result.save(self.run_dir)
            return result
        dataset = splits[split]
        result = evaluate(
            instance.model,
            guide,
            dataset,
            spec=instance.spec,
            num_samples=num_samples or cfg.num_samples,
            batch_size=batch_size or cfg.batch_size,
            progress=self.config.train.progress,
            fast_path=fast_path,
        )
        result.save(self.run_dir)
        if self.config.output.plots:
            self._plot_samples(instance, dataset, guide)
        return result

    @torch.no_grad()
    def _plot_samples(self, instance, dataset, guide=None) -> None:
        from ppl_models.tasks.plots import is_image_model, plot_image_grid, prior_means, reconstruction_means

        if not is_image_model(instance.spec, dataset):
            return  # prior samples and reconstructions are drawn for unconditional models of images only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            prior = prior_means(instance.model, instance.spec, 100)
            plot_image_grid(prior, self.run_dir / "prior_samples.png", "samples from the prior (pixel means)")
            n = min(10, int(dataset.num_data))
            idx = torch.arange(n)
            (x,) = dataset.batch(idx, torch.Generator().manual_seed(0))[:1]
            recon = reconstruction_means(instance.model, guide or instance.guide, instance.spec, x)
            both = torch.cat([x.reshape(n, -1), recon.reshape(n, -1)])
            title = "data (top) and reconstructions (bottom)"
            plot_image_grid(both, self.run_dir / "reconstructions.png", title, ncols=n)
