"""An experiment from a :class:`~ppl_models.app.config.Config`: data -> model + guide -> engine -> evaluation.

Used by the command line (``ppl-models fit``, ``ppl-models evaluate``) and the
example scripts.  A run directory holds::

    config.toml        the resolved configuration
    checkpoints/       atomic checkpoints (step-<step>.pt)
    history.json       ELBO per epoch and running means (and the learning rate)
    train.json         steps, seconds of set-up / compile / training / validation, the path the steps took
    metrics.json       evaluation: test log-likelihood (IWAE-K), ELBO, KL, Pareto k-hat
    eval.nc            ArviZ InferenceData: per-datapoint IWAE estimate, ELBO, KL, k̂ (group vi_evaluation)
    elbo.png, prior_samples.png, reconstructions.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import pyro
import torch

from ppl_models import registry
from ppl_models.app.config import Config, ConfigError, load_config, read_toml, to_toml
from ppl_models.data import dataset_loader
from ppl_models.app.rundir import IDENTITY_SECTIONS, NOT_IDENTITY, RunDir, identity
from ppl_models.infer import Trainer
from ppl_models.infer.checkpoint import CheckpointError, missing_checkpoint_reason
from ppl_models.infer.strategies import (
    INNER_LOOP_STRATEGIES,
    guide_for_strategy,
    inference_guide,
    inner_loop,
    make_strategy,
    step_rule,
)
from ppl_models.registry import UnknownNameError

__all__ = ["Experiment", "NothingTrainedError", "task_module"]

_LIMITS = ("limit_train", "limit_valid", "limit_test")


def task_module(model_name: str) -> Optional[ModuleType]:
    """The task module ``ppl_models.tasks.<model_name>`` (``-`` written ``_``) of a model, or ``None`` if it has
    none; its optional ``resolve_config``, ``build_kwargs`` and ``evaluate`` are the interface documented in
    :mod:`ppl_models.tasks`."""
    name = model_name.replace("-", "_")
    if not name.isidentifier():
        return None
    module_name = f"ppl_models.tasks.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


@contextlib.contextmanager
def slow_phase(what: str, after: float = 5.0):
    """A phase without a progress bar of its own: if it still runs after ``after`` seconds, say ``what ...`` on
    stderr, and at its end how long it took (a quick phase prints nothing)."""
    from tqdm.auto import tqdm

    start, said = time.perf_counter(), threading.Event()

    def say():
        said.set()
        tqdm.write(f"{what} ...", file=sys.stderr)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            tqdm.write(f"{what}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def _task_function(model_name: str, function: str) -> Optional[Callable]:
    return getattr(task_module(model_name), function, None)


def _data_model_kwargs(splits: dict) -> dict:
    """Model hyperparameters a training set fixes (e.g. vocabulary sizes), from its ``model_kwargs`` attribute."""
    train = splits["train"]
    return dict(getattr(getattr(train, "base", train), "model_kwargs", {}) or {})


def _resume_config(path, saved, overrides: dict) -> Config:
    """``fit --resume``'s configuration (:meth:`Experiment.from_file`): the identity of the run that ``saved`` (its
    ``config.toml``) records, the rest from the file ``path``, then ``overrides``."""
    given, ran = load_config(path).to_dict(), load_config(saved).to_dict()
    explicit, unused = read_toml(path), []
    for section in IDENTITY_SECTIONS:
        defining = {k: v for k, v in ran[section].items() if section != "train" or k not in NOT_IDENTITY}
        for key in explicit.get(section, {}):
            if key in defining and f"{section}.{key}" not in overrides and given[section][key] != defining[key]:
                unused.append(f"{section}.{key} = {given[section][key]!r} (the run: {defining[key]!r})")
        given[section] = {**given[section], **defining} if section == "train" else defining
    if unused and os.environ.get("RANK", "0") == "0":
        print(f"note: resuming the run recorded in {saved}; not used from {path}: " + "; ".join(unused),
              file=sys.stderr)
    config = Config.from_dict(given, source=f"{saved} (resumed with {path})")
    return config.with_overrides(overrides) if overrides else config


class NothingTrainedError(ValueError):
    """A fit that trained no step (its budget was spent before the first): nothing is evaluated."""


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
    def from_file(cls, path, overrides=None, run_dir=None, resume: bool = False) -> "Experiment":
        """The experiment of the TOML file ``path`` with dotted-key ``overrides``, in ``run_dir`` (default: the
        file's ``[output].run_dir``).

        With ``resume`` (``fit --resume``), what the run trains (its identity, :func:`~ppl_models.app.rundir.identity`:
        ``[model]``, ``[guide]``, ``[data]`` and the ``[train]`` settings that are not budgets, display, validation
        or hardware) comes from the run directory's own ``config.toml``, overrides it was started with included, so
        they need not be repeated; budgets and the other sections come from ``path``.  ``overrides`` apply on top;
        one that changes the run's identity makes :meth:`fit` refuse, naming each key and both values.  The file's
        own settings of the identity that differ from the run's are named in a note (they are not used)."""
        config = load_config(path, overrides)
        run_dir = Path(run_dir or config.output.run_dir)
        saved = run_dir / "config.toml"
        if resume and RunDir(run_dir).is_run() and saved.is_file():
            config = _resume_config(path, saved, dict(overrides or {}))
        return cls(config, run_dir)

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
        loader = dataset_loader(name)  # the data layer's table (ppl_models.data.DATASETS)
        registry.check_kwargs(f"data {name!r}", loader, options)
        with slow_phase(f"loading data set {name!r}"):
            splits = loader(**options)
        for key, n in limits.items():
            split = key.split("_", 1)[1]
            if splits.get(split) is not None:
                splits[split] = Head(splits[split], n)
        self._data_kwargs = _data_model_kwargs(splits)  # what build() uses when not given data_kwargs
        return splits

    def resolve_model_hooks(self) -> None:
        """Let the model's task module fill in or check the configuration (its ``resolve_config``, see
        :mod:`ppl_models.tasks`); a configuration it rejects is a :class:`ConfigError`."""
        resolve = _task_function(self.config.model.name, "resolve_config")
        if resolve is not None:
            try:
                self.config = resolve(self.config)
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

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
        model_kwargs = {**(data_kwargs or getattr(self, "_data_kwargs", None) or {}), **self.model_hparams()}
        build_kwargs = _task_function(self.config.model.name, "build_kwargs")
        if build_kwargs is not None:  # the task module turns hyperparameters into build()'s keywords
            model_kwargs = build_kwargs(model_kwargs)
        instance = registry.instantiate(
            self.config.model.name,
            guide_name,
            num_data=num_data,
            model_kwargs=model_kwargs,
            guide_kwargs=self.config.guide.hparams,
        )
        if t.strategy is not None:
            instance.guide, step = make_strategy(
                t.strategy, instance.model, instance.guide, instance.spec, dict(instance.modules),
                num_steps=t.inner_steps, lr=t.inner_lr, refine_grad=t.refine_grad, optimizer=t.inner_optimizer,
                lr_decay=t.inner_lr_decay, local_lr=t.local_lr,
            )
            instance.step = step_rule(instance.guide, step)  # svi-inner's inner loop too: no fast path, one process
            instance.guide_name = f"{t.strategy} ({guide_name})" if guide_name else t.strategy
        return instance

    def check_parallel(self) -> None:
        """Before a data-parallel job (``--nproc``, torchrun, a GPU) starts: a strategy whose step optimizes λ inside
        it (:data:`~ppl_models.infer.strategies.INNER_LOOP_STRATEGIES`) cannot run there, one :class:`ConfigError`."""
        strategy = self.config.train.strategy
        if strategy in INNER_LOOP_STRATEGIES:
            raise ConfigError(f"[train] strategy {strategy!r} cannot run in several processes or on a GPU yet (its "
                              "step optimizes λ in an inner loop); use the strategies svi-local or amortized, or one "
                              "CPU process")

    def is_per_datapoint(self, instance: registry.Instance) -> bool:
        """Whether the guide holds parameters per training datapoint (it cannot score new data)."""
        return any("local_params" in name for name in instance.modules.keys())

    def trainer(self, splits: dict, instance: registry.Instance, **overrides) -> Trainer:
        """The engine's :class:`Trainer` for this configuration, or the task module's own trainer (its
        ``make_trainer``, e.g. exact EM for IBM Model 1); the task's ``validation_loss`` replaces the validation
        ELBO (:mod:`ppl_models.tasks`)."""
        make_trainer = _task_function(self.config.model.name, "make_trainer")
        if make_trainer is not None:
            return make_trainer(self, splits, instance, **overrides)
        t = self.config.train
        valid = splits.get("valid") if t.validate and not self.is_per_datapoint(instance) else None
        validation_loss = _task_function(self.config.model.name, "validation_loss")
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
            budget_clock=t.budget_clock,
            lr_schedule=t.lr_schedule,
            warmup=t.warmup,
            lr_final=t.lr_final,
            valid_subset=t.valid_subset,
            valid_every=t.valid_every,
            early_stopping=t.early_stopping,
            valid_loss=None if validation_loss is None or valid is None else validation_loss(instance),
            fast_path=t.fast_path,
            threads=t.threads,
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
        ``(FitResult, metrics or None)``; ``metrics`` is ``None`` on other ranks.  The FitResult's ``setup_seconds``
        count from here (data loading and building included); the training clock starts at the first step.

        The run directory (:mod:`ppl_models.app.rundir`) is checked and locked first; a refusal (a directory that
        is not a run, a run that holds checkpoints without ``resume``, a ``resume`` whose configuration differs or
        that finds no readable checkpoint) writes nothing; the marker and ``config.toml`` are written only once the
        data, model, guide and checkpoint are loaded.  Every config value was checked when the config was read."""
        import time

        from ppl_models.runtime import in_torchrun

        setup_start = time.perf_counter()
        device = self.config.train.device
        parallel = in_torchrun() or device != "cpu"
        self.resolve_model_hooks()
        self.evaluate_options(num_samples)  # checked before anything is written or trained
        if parallel:
            self.check_parallel()
        main = not in_torchrun() or os.environ.get("RANK", "0") == "0"  # rank 0 writes the run directory
        run, ident = RunDir(self.run_dir), identity(self.config)
        try:
            if main:
                run.open_for_fit(ident, resume)
            return self._fit(run, ident, main, parallel, resume, evaluate, num_samples, setup_start)
        finally:
            run.close()

    def _fit(self, run, ident, main, parallel, resume, evaluate, num_samples, setup_start):
        from contextlib import nullcontext

        from ppl_models.infer.distributed import DataParallel, process_group

        with process_group(self.config.train.device) if parallel else nullcontext() as dev:
            splits = self.load_data()
            instance = self.build(splits["train"].num_data, _data_model_kwargs(splits))
            if main and self.is_per_datapoint(instance) and self.config.train.validate:
                print(
                    "note: the per-datapoint guide has no parameters for validation data; validation ELBO skipped",
                    file=sys.stderr,
                )
            if main and parallel and self.config.train.fast_path not in (False, "auto"):
                print("note: the fast path is not used with several processes or a GPU; Pyro's ELBO runs",
                      file=sys.stderr)
            options = {"parallel": DataParallel(instance.modules, device=dev)} if parallel else {}
            options["setup_start"] = setup_start
            trainer = self.trainer(splits, instance, **options)
            if main and parallel and trainer.parallel.world_size > 1:
                print(trainer.parallel.describe(trainer.batch_size), file=sys.stderr)
            if resume and trainer.resume() is None:  # loaded before the run directory is written
                raise CheckpointError(f"cannot resume {self.run_dir}: no readable checkpoint: "
                                      f"{missing_checkpoint_reason(self.run_dir / 'checkpoints')}")
            trainer._setup()  # one loss on the first rows (no generator touched): data/model mismatches fail here
            if main:
                run.commit(ident, to_toml(self.config))
                write_run_files = _task_function(self.config.model.name, "write_run_files")
                if write_run_files is not None:  # e.g. the vocabularies, for ppl-models align
                    write_run_files(self.run_dir, splits)
            result = trainer.fit(resume=resume)
            if result.step == 0:  # nothing to evaluate: an untrained model's metrics.json would look like a result
                limit = self.config.train.time_limit
                budget = f"time_limit {limit:g} s" if limit is not None else "the budget"
                raise NothingTrainedError(
                    f"{self.run_dir}: trained 0 steps ({budget} spent before the first step; set-up "
                    f"{result.setup_seconds:.1f} s): nothing was evaluated and no metrics.json written; raise "
                    "[train] time_limit or max_steps and fit again")
            if main and self.config.output.plots:
                from ppl_models.tasks.plots import plot_elbo_curves

                plot_elbo_curves(result.history, self.run_dir / "elbo.png", title=f"{instance.model_name} / {instance.guide_name}")
        if not (evaluate and main):
            return result, None
        # after data-parallel training this process's networks hold its rows only: evaluate from the checkpoint
        if parallel:
            return result, self._evaluate_checkpoint(run, num_samples)
        step = result.step if result.best_step is None else result.best_step  # the parameters the trainer holds
        evaluated = None if result.checkpoint is None else (run.relative(result.checkpoint), step)
        return result, self._evaluate(splits, instance, num_samples, checkpoint=evaluated)

    # ----------------------------------------------------------- evaluate
    def evaluate(self, num_samples: Optional[int] = None, split: Optional[str] = None, batch_size: Optional[int] = None,
                 checkpoint=None):
        """Evaluate the newest checkpoint of the run directory, or ``checkpoint`` (a path, or a file name in its
        ``checkpoints/``); metrics.json records the checkpoint and its step.  The newest checkpoint must be
        readable: a damaged one is refused (name an older one with ``checkpoint``), never silently replaced.  The
        options are checked, and the run directory locked and found writable, before any work."""
        self.resolve_model_hooks()
        self.evaluate_options(num_samples, split, batch_size)
        run = RunDir(self.run_dir)
        try:
            run.open_for_evaluate()
            return self._evaluate_checkpoint(run, num_samples, split, batch_size, checkpoint)
        finally:
            run.close()

    def evaluate_options(self, num_samples=None, split=None, batch_size=None):
        """``[evaluate]`` with the given values in place of the configured ones, checked (a :class:`ConfigError`
        names the bad value)."""
        given = {k: v for k, v in (("num_samples", num_samples), ("split", split), ("batch_size", batch_size))
                 if v is not None}
        return dataclasses.replace(self.config.evaluate, **given)

    def _evaluate_checkpoint(self, run: RunDir, num_samples=None, split=None, batch_size=None, checkpoint=None):
        path, state = run.checkpoint_to_evaluate(checkpoint)
        run.claim()  # from here on this process writes the run directory
        splits = self.load_data()
        instance = self.build(splits["train"].num_data, _data_model_kwargs(splits))
        trainer = self.trainer(splits, instance, progress=False)
        trainer.load_state_dict(state)
        best_step = trainer.use_best()  # early stopping: the parameters of the best validation
        step = int(state["step"]) if best_step is None else best_step
        return self._evaluate(splits, instance, num_samples, split, batch_size, checkpoint=(run.relative(path), step))

    def _evaluate(self, splits, instance, num_samples=None, split=None, batch_size=None, checkpoint=None):
        """Evaluate ``instance`` as it is; ``checkpoint``: ``(name, step)`` of the parameters, for metrics.json."""
        from ppl_models.infer.evaluate import EvalResult, evaluate

        cfg = self.evaluate_options(num_samples, split, batch_size)
        split = cfg.split
        if split not in splits or splits[split] is None:
            raise UnknownNameError("split", split, [k for k, v in splits.items() if v is not None])
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
        task_evaluate = _task_function(instance.model_name, "evaluate")
        if task_evaluate is not None:  # the model's task module evaluates it (ppl_models.tasks)
            result = task_evaluate(self, instance, splits[split], split)
            result.save(self.run_dir)
            if checkpoint is not None:
                RunDir(self.run_dir).record_evaluated(self.run_dir / checkpoint[0], checkpoint[1])
            return result
        dataset = splits[split]
        result = evaluate(
            instance.model,
            guide,
            dataset,
            spec=instance.spec,
            num_samples=cfg.num_samples,
            batch_size=cfg.batch_size,
            progress=self.config.train.progress,
            fast_path=fast_path,
        )
        if isinstance(result, EvalResult) and checkpoint is not None:
            result.checkpoint, result.checkpoint_step = checkpoint
        for note in getattr(result, "notes", ()):
            print(f"note: {note}", file=sys.stderr)
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
