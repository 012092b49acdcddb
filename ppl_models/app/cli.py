"""The ``ppl-models`` command line.

``ppl-models fit CONFIG.toml [-o SECTION.KEY=VALUE ...] [--resume]``
    train (or resume) the experiment, evaluate it and write the run directory;
``ppl-models fit CONFIG.toml --nproc N [--device cuda]``, ``torchrun --nproc-per-node N -m ppl_models fit CONFIG.toml``
    the same with N data-parallel processes (:mod:`ppl_models.infer.distributed`);
``ppl-models evaluate RUN_DIR [--num-samples K]``
    evaluate the newest checkpoint of a run;
``ppl-models list``
    the registered models, guides, data sets, ELBOs and optimizers;
``ppl-models compare CONFIG.toml [-o SECTION.KEY=VALUE ...] [--run-dir DIR]``
    compare gradient estimators (:mod:`ppl_models.compare`): tables, netCDF and plots in the run directory;
``ppl-models align RUN_DIR SRC_FILE TGT_FILE [-o OUT]``
    Pharaoh alignments (``i-j`` source-target pairs, 0-based) of a trained latent-alignment run, one line per pair.

Errors in the input (configuration, names, data, shapes, checkpoints) print one
line ``error: ...`` and exit with status 2; SIGINT/SIGTERM during training write
a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ppl_models.app.config import ConfigError, parse_override
from ppl_models.data.files import DataFileError
from ppl_models.infer import NonFiniteLossError, TrainingInterrupted
from ppl_models.infer.checkpoint import CheckpointError
from ppl_models.infer.distributed import DEVICE_HELP, DistributedJobError, in_torchrun
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
    fit.add_argument("--nproc", type=int, metavar="N",
                     help="train with N data-parallel processes on this machine (torch's launcher, as "
                          "torchrun --standalone --nproc-per-node N -m ppl_models fit ...)")
    fit.add_argument("--device", help=f"shorthand for -o train.device=DEVICE: {DEVICE_HELP}")

    ev = sub.add_parser("evaluate", help="evaluate the newest checkpoint of a run directory")
    ev.add_argument("run_dir")
    ev.add_argument("--num-samples", type=int, help="importance samples K (default: [evaluate].num_samples)")
    ev.add_argument("--split", help="data split to evaluate (default: [evaluate].split)")
    ev.add_argument("--batch-size", type=int, help="datapoints per evaluation batch")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("list", help="list registered models, guides, data sets, ELBOs and optimizers")

    al = sub.add_parser("align", help="Pharaoh alignments (i-j, 0-based source-target) of a trained alignment run")
    al.add_argument("run_dir", help="run directory of a trained 'alignment' model")
    al.add_argument("src_file", help="tokenized source sentences, one per line")
    al.add_argument("tgt_file", help="tokenized target sentences, one per line (same line count)")
    al.add_argument("-o", "--output", help="write the alignments here (atomically) instead of to stdout")
    al.add_argument("--posterior", default="auto", choices=("auto", "posterior", "prior", "guide"),
                    help="auto: exact posterior p(z|x,y) (soft: its attention weights); guide: q(z|x,y)")
    al.add_argument("--max-len", type=int, default=200, help="longest sentence accepted (tokens)")

    cmp = sub.add_parser("compare", help="compare gradient estimators (variance, SNR, training over seeds, ArviZ)")
    cmp.add_argument("config", help="comparison TOML file (see ppl_models/compare/)")
    cmp.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key, e.g. -o training.num_steps=100 (repeatable; read as TOML)")
    cmp.add_argument("--run-dir", help="output directory (default: [compare].run_dir)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def _overrides(args) -> dict:
    overrides = dict(parse_override(text) for text in getattr(args, "overrides", []))
    for flag, key in (("num_epochs", "train.num_epochs"), ("seed", "train.seed"), ("device", "train.device")):
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
    from ppl_models.app.experiment import Experiment

    if args.command == "list":
        from ppl_models import registry
        from ppl_models.app.experiment import DATASETS
        from ppl_models.infer import ELBO_NAMES, OPTIMIZER_NAMES

        for name in registry.model_names():
            print(f"model {name}: guides {', '.join(registry.guide_names(name))}")
        print("data sets:", ", ".join(sorted(DATASETS)))
        print("ELBOs:", ", ".join(ELBO_NAMES))
        print("optimizers:", ", ".join(OPTIMIZER_NAMES))
        return 0
    if args.command == "align":
        from ppl_models.alignment import align_files

        lines = align_files(args.run_dir, args.src_file, args.tgt_file, args.output, source=args.posterior,
                            max_len=args.max_len)
        if args.output is None:
            sys.stdout.write("".join(line + "\n" for line in lines))
        else:
            print(f"wrote {len(lines)} alignment lines to {args.output}", file=sys.stderr)
        return 0
    if args.command == "compare":
        from ppl_models.compare import load_compare_config, run_comparison

        overrides = dict(parse_override(text) for text in args.overrides)
        if args.no_progress:
            overrides["compare.progress"] = False
        config = load_compare_config(args.config, overrides)
        run_dir = args.run_dir or config.compare.run_dir
        summary = run_comparison(config, run_dir)
        print(f"compared {len(config.compare.estimators)} estimators on {', '.join(config.compare.problems)} in "
              f"{summary['timings_s']['total_s']:.1f} s; tables, netCDF and plots in {run_dir} (report.md)")
        return 0
    if args.command == "fit":
        if args.nproc is not None and args.nproc < 1:
            raise ValueError(f"--nproc: expected a positive integer, received {args.nproc}")
        experiment = Experiment.from_file(args.config, _overrides(args), run_dir=args.run_dir)
        if args.nproc is not None and args.nproc > 1 and not in_torchrun():
            return _launch_fit(args, experiment)
        result, metrics = experiment.fit(resume=args.resume, evaluate=not args.no_evaluate, num_samples=args.num_samples)
        if in_torchrun() and os.environ.get("RANK", "0") != "0":
            return 0
        print(f"trained {result.step} steps, {result.epoch} epochs in {result.wall_time:.1f} s; run directory {experiment.run_dir}")
    else:
        experiment = Experiment.from_run_dir(args.run_dir, _overrides(args))
        metrics = experiment.evaluate(num_samples=args.num_samples, split=args.split, batch_size=args.batch_size)
    if metrics is not None:
        _print_metrics(metrics.to_metrics())
    return 0


def _launch_fit(args, experiment) -> int:
    """``fit --nproc N``: this process becomes the job's agent and starts N processes of ``python -m ppl_models
    fit`` (the same arguments, without ``--nproc``); the configuration was checked once, above."""
    from ppl_models.infer.distributed import launch
    from ppl_models.infer.checkpoint import latest_checkpoint

    argv = _strip_nproc(getattr(args, "argv", sys.argv[1:]))
    try:
        launch(args.nproc, argv, module="ppl_models")
    except DistributedJobError as exc:
        kept = latest_checkpoint(experiment.run_dir / "checkpoints")
        where = f"last checkpoint {kept}; continue with --resume" if kept else "no checkpoint was written"
        if exc.exitcode in (130, 143):
            print(f"stopped: the training processes were interrupted ({exc}); {where}", file=sys.stderr)
        else:
            print(f"error: {exc}; {where}", file=sys.stderr)
        return exc.exitcode or 1
    return 0


def _strip_nproc(argv: List[str]) -> List[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    where = f"[rank {os.environ['RANK']}] " if in_torchrun() and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        return run(args)
    except TrainingInterrupted as exc:
        print(f"{where}stopped: {exc}. Continue with --resume.", file=sys.stderr)
        return 128 + exc.signum
    except USER_ERRORS as exc:
        print(f"{where}error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    if in_torchrun():  # one of a job's processes: an unexpected error is recorded for the launcher's report
        from ppl_models.infer.distributed import record_errors

        return record_errors(_main)(argv)
    return _main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
