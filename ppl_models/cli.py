"""The ``ppl-models`` command line.

``ppl-models fit CONFIG.toml [-o SECTION.KEY=VALUE ...] [--resume]``
    train (or resume) the experiment, evaluate it and write the run directory;
``ppl-models evaluate RUN_DIR [--num-samples K]``
    evaluate the newest checkpoint of a run;
``ppl-models list``
    the registered models, guides, data sets, ELBOs and optimizers.

Errors in the input (configuration, names, data, shapes, checkpoints) print one
line ``error: ...`` and exit with status 2; SIGINT/SIGTERM during training write
a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ppl_models.config import ConfigError, parse_override
from ppl_models.data.files import DataFileError
from ppl_models.infer import NonFiniteLossError, TrainingInterrupted
from ppl_models.infer.checkpoint import CheckpointError
from ppl_models.registry import UnknownNameError
from ppl_models.spec import ShapeError

__all__ = ["main", "build_parser"]

USER_ERRORS = (ConfigError, UnknownNameError, ShapeError, DataFileError, CheckpointError, NonFiniteLossError, TypeError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-models", description="Latent-variable models in Pyro: fit, evaluate, compare.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train an experiment from a TOML config, then evaluate it")
    fit.add_argument("config", help="experiment TOML file")
    fit.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key, e.g. -o train.lr=3e-4 (repeatable; the value is read as TOML)")
    fit.add_argument("--run-dir", help="run directory (default: [output].run_dir)")
    fit.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run directory")
    fit.add_argument("--num-epochs", type=int, help="shorthand for -o train.num_epochs=N")
    fit.add_argument("--seed", type=int, help="shorthand for -o train.seed=N")
    fit.add_argument("--num-samples", type=int, help="importance samples K for the evaluation")
    fit.add_argument("--no-evaluate", action="store_true", help="skip the evaluation after training")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = sub.add_parser("evaluate", help="evaluate the newest checkpoint of a run directory")
    ev.add_argument("run_dir")
    ev.add_argument("--num-samples", type=int, help="importance samples K (default: [evaluate].num_samples)")
    ev.add_argument("--split", help="data split to evaluate (default: [evaluate].split)")
    ev.add_argument("--batch-size", type=int, help="datapoints per evaluation batch")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("list", help="list registered models, guides, data sets, ELBOs and optimizers")
    return parser


def _overrides(args) -> dict:
    overrides = dict(parse_override(text) for text in getattr(args, "overrides", []))
    for flag, key in (("num_epochs", "train.num_epochs"), ("seed", "train.seed")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "no_progress", False):
        overrides["train.progress"] = False
    return overrides


def _print_metrics(metrics: dict) -> None:
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    print(json.dumps(summary, indent=1))
    if summary.get("log_likelihood") is not None:
        print(
            f"test NLL (IWAE, K={summary['num_samples']}): {-summary['log_likelihood']:.2f} "
            f"± {summary['log_likelihood_se']:.2f} nats over {summary['num_data']} datapoints; "
            f"ELBO {summary['elbo']:.2f} (KL {summary['kl']:.2f}); evaluation {summary['wall_time_s']:.0f} s"
        )


def run(args) -> int:
    from ppl_models.experiment import Experiment

    if args.command == "list":
        from ppl_models import registry
        from ppl_models.experiment import DATASETS
        from ppl_models.infer import ELBO_NAMES, OPTIMIZER_NAMES

        for name in registry.model_names():
            print(f"model {name}: guides {', '.join(registry.guide_names(name))}")
        print("data sets:", ", ".join(sorted(DATASETS)))
        print("ELBOs:", ", ".join(ELBO_NAMES))
        print("optimizers:", ", ".join(OPTIMIZER_NAMES))
        return 0
    if args.command == "fit":
        experiment = Experiment.from_file(args.config, _overrides(args), run_dir=args.run_dir)
        result, metrics = experiment.fit(resume=args.resume, evaluate=not args.no_evaluate, num_samples=args.num_samples)
        print(f"trained {result.step} steps, {result.epoch} epochs in {result.wall_time:.1f} s; run directory {experiment.run_dir}")
    else:
        experiment = Experiment.from_run_dir(args.run_dir, _overrides(args))
        metrics = experiment.evaluate(num_samples=args.num_samples, split=args.split, batch_size=args.batch_size)
    if metrics is not None:
        _print_metrics(metrics.to_metrics())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TrainingInterrupted as exc:
        print(f"stopped: {exc}. Continue with --resume.", file=sys.stderr)
        return 128 + exc.signum
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
