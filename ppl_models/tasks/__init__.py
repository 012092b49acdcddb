"""Tasks: what a task needs beyond its model and the inference engine — decoding, alignment output,
baselines, plots.

The task interface.  A model registered as ``X`` may have a task module ``ppl_models.tasks.X`` (``-`` in the
name written ``_``: the model ``cvae-baseline`` would have ``ppl_models.tasks.cvae_baseline``).  The experiment
(:class:`ppl_models.app.experiment.Experiment`) imports it when it runs model ``X``; a model without one is run
by the generic path.  It may define any of these functions, each optional:

``resolve_config(config) -> config``
    fill in or check the settings the model fixes (e.g. the ELBO and guide of the alignment model's variant),
    before the run directory's ``config.toml`` is written; a configuration the model cannot run raises
    :class:`ValueError` naming the key (the experiment reports it as a ``ConfigError``).
``build_kwargs(model_kwargs) -> model_kwargs``
    turn the ``[model]`` hyperparameters (and those the data fix) into the keywords of the model's ``build``,
    e.g. a run directory into the trained network it holds (the CVAE's ``baseline_run``).
``evaluate(experiment, instance, dataset, split) -> result``
    evaluate the trained ``instance`` (:class:`ppl_models.registry.Instance`) on ``dataset``, the split named
    ``split``, instead of the importance-sampling evaluation; ``result`` has ``save(run_dir)`` and
    ``to_metrics() -> dict``.  ``experiment`` gives the configuration (``experiment.config``) and the run
    directory (``experiment.run_dir``) for further outputs.
``validation_loss(instance) -> valid_loss``
    the engine's validation score instead of the validation ELBO (:class:`ppl_models.infer.engine.Trainer`'s
    ``valid_loss``: ``valid_loss(*data, None)`` returns the negative score summed over the batch), e.g. the
    alignment model's exact negative log-likelihood; what ``lr_schedule = "plateau"`` and ``early_stopping``
    follow.
``write_run_files(run_dir, splits)``
    files the task needs beside the checkpoints, written when ``fit`` commits the run directory (e.g. the
    alignment models' vocabularies and text normalization, read by ``ppl-models align``).
``make_trainer(experiment, splits, instance, **overrides) -> trainer``
    a trainer of the task's own instead of the SVI engine's (e.g. exact EM for IBM Model 1), with the engine
    trainer's ``fit(resume) -> FitResult``, ``resume()``, ``load_state_dict(state)``, ``use_best()`` (the
    parameters early stopping selected, or ``None``), ``_setup()`` (checks the
    data against the model before the run directory is written) and ``parallel = None``.

Nothing registers: the module is found by its name (an import of exactly ``ppl_models.tasks.X`` that fails with
:class:`ModuleNotFoundError` means "no task module"; any other import error is raised).  Like every module of
this layer, a task module may import the models, guides, data and inference layers, never the application
(:mod:`ppl_models.app`).

Modules: :mod:`~ppl_models.tasks.alignment` (evaluation, alignment output, translation and BLEU of the
latent-alignment model), :mod:`~ppl_models.tasks.ibm1` (IBM Model 1 fitted by EM, and as an aligner),
:mod:`~ppl_models.tasks.hmm_align` (the HMM alignment model, likewise),
:mod:`~ppl_models.tasks.aer` (AER against sure/possible gold, symmetrization), :mod:`~ppl_models.tasks.cvae`
(the CVAE's trained baseline), :mod:`~ppl_models.tasks.plots` (ELBO curves, prior samples, reconstructions).
"""
