"""The ``ppl-models`` command line.

``ppl-models fit CONFIG.toml [-o SECTION.KEY=VALUE ...] [--resume]``
    train (or resume) the experiment, evaluate it and write the run directory;
``ppl-models fit CONFIG.toml --nproc N [--device cuda]``, ``torchrun --nproc-per-node N -m ppl_models fit CONFIG.toml``
    the same with N data-parallel processes (:mod:`ppl_models.infer.distributed`);
``ppl-models evaluate RUN_DIR [--num-samples K] [--checkpoint PATH]``
    evaluate the newest checkpoint of a run (or the one named: a damaged newest checkpoint is refused);
``ppl-models list``
    the registered models, guides, data sets, strategies, objectives and estimators, and optimizers;
``ppl-models compare CONFIG.toml [-o SECTION.KEY=VALUE ...] [--run-dir DIR]``
    compare gradient estimators (:mod:`ppl_models.compare`): tables, netCDF and plots in the run directory;
``ppl-models align RUN_DIR SRC_FILE TGT_FILE [-o OUT] [--links M] [--threshold P] [--reverse RUN_DIR] [--gold FILE]``
    Pharaoh alignments (``i-j`` source-target pairs, 0-based) of a trained ``alignment``, ``ibm1`` or ``hmm-align``
    run, one line per pair; with ``--reverse`` both directions symmetrized, with ``--gold`` AER/precision/recall on
    stderr (:func:`ppl_models.tasks.alignment.align_text`).

Errors in the input (configuration, names, data, shapes, checkpoints, the run
directory and the file system) print one line ``error: ...`` and exit with
status 2; SIGINT/SIGTERM during training write a checkpoint and exit with 128 +
the signal number.  Run directories are guarded (:mod:`ppl_models.app.rundir`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Callable, List, Optional

from ppl_models.runtime import DEVICE_HELP, in_torchrun

# Nothing above imports torch or Pyro: ``--help`` and argument errors answer at once.  Each command imports
# what it needs.

__all__ = ["main", "build_parser", "report_errors", "user_errors"]


def user_errors() -> tuple:
    """The exceptions that are the user's input errors: one line ``error: ...``, exit status 2."""
    from ppl_models.app.config import ConfigError
    from ppl_models.app.rundir import RunDirError
    from ppl_models.data.files import DataFileError
    from ppl_models.infer import NonFiniteLossError
    from ppl_models.infer.checkpoint import CheckpointError
    from ppl_models.registry import UnknownNameError
    from ppl_models.spec import ShapeError

    return (ConfigError, UnknownNameError, ShapeError, DataFileError, CheckpointError, RunDirError,
            NonFiniteLossError, TypeError, ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-models", description="Latent-variable models in Pyro: fit, evaluate, compare.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train an experiment from a TOML config, then evaluate it")
    fit.add_argument("config", help="experiment TOML file")
    fit.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key, e.g. -o train.lr=3e-4 (repeatable; the value is read as TOML)")
    fit.add_argument("--run-dir", help="run directory (default: [output].run_dir)")
    fit.add_argument("--resume", action="store_true",
                     help="continue from the newest readable checkpoint of the run directory, training what the run "
                          "trains (its config.toml, the overrides it was started with included) with the budgets of "
                          "CONFIG; -o may change budgets, display or hardware settings; a change to what is trained "
                          "is refused, naming the key and both values")
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
    ev.add_argument("--checkpoint", metavar="PATH",
                    help="evaluate this checkpoint (a path, or a file name in RUN_DIR/checkpoints) instead of the newest")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("list", help="list registered models, guides, data sets, ELBOs and optimizers")

    al = sub.add_parser("align", help="Pharaoh alignments (i-j, 0-based source-target) of a trained 'alignment', "
                                      "'ibm1' or 'hmm-align' run; both directions symmetrized; AER against gold")
    al.add_argument("run_dir", help="run directory of a trained 'alignment', 'ibm1' or 'hmm-align' model "
                                    "(SRC_FILE -> TGT_FILE)")
    al.add_argument("src_file", help="tokenized source sentences, one per line (normalized as the run's text was)")
    al.add_argument("tgt_file", help="tokenized target sentences, one per line (same line count)")
    al.add_argument("-o", "--output", help="write the alignments here (atomically) instead of to stdout")
    al.add_argument("--links", default="posterior", choices=("posterior", "q", "prior", "threshold"),
                    help="posterior: argmax of p(z|x,y) (ibm1, hmm-align: NULL = unaligned); q: argmax of the inference "
                         "network; prior: argmax of p(z|x,y<t) (soft: its attention); threshold: every source word "
                         "with posterior > --threshold")
    al.add_argument("--threshold", type=float, default=None,
                    help="with --links threshold: the posterior cut (default 0.5); with an argmax: a target word whose "
                         "best link is not above it stays unaligned (NULL)")
    al.add_argument("--reverse", metavar="RUN_DIR",
                    help="a run of the other direction (TGT_FILE -> SRC_FILE): align both and symmetrize")
    al.add_argument("--symmetrize", default="intersection", choices=("intersection", "union", "grow-diag-final"),
                    help="how --reverse combines the directions (default: %(default)s)")
    al.add_argument("--gold", metavar="FILE", help="score against gold links 'sentence i j [S|P]' (1-based, SRC_FILE "
                                                   "position first): AER, precision, recall on stderr")
    al.add_argument("--gold-reversed", action="store_true", help="the gold file lists TGT_FILE positions first")
    al.add_argument("--max-len", type=int, default=200, help="longest sentence accepted (tokens)")
    al.add_argument("--no-progress", action="store_true")

    cmp = sub.add_parser("compare", help="compare gradient estimators (variance, SNR, training over seeds, ArviZ)")
    cmp.add_argument("config", help="comparison TOML file (see ppl_models/compare/)")
    cmp.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config key, e.g. -o training.num_steps=100 (repeatable; read as TOML)")
    cmp.add_argument("--run-dir", help="output directory (default: [compare].run_dir)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def _overrides(args) -> dict:
    from ppl_models.app.config import parse_override

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
        from ppl_models.data import DATASETS
        from ppl_models.infer import ESTIMATOR_NAMES, OPTIMIZER_NAMES
        from ppl_models.infer.objectives import GRADIENT_ESTIMATORS
        from ppl_models.infer.strategies import STRATEGIES

        for name in registry.model_names():
            print(f"model {name}: guides {', '.join(registry.guide_names(name))}")
        print("data sets:", ", ".join(sorted(DATASETS)))
        print("strategies ([train] strategy):", ", ".join(STRATEGIES))
        print("objectives and estimators ([train] elbo, [compare] estimators):", ", ".join(ESTIMATOR_NAMES))
        print("gradient estimators ([compare] estimators by default):", ", ".join(GRADIENT_ESTIMATORS))
        print("optimizers:", ", ".join(OPTIMIZER_NAMES))
        return 0
    if args.command == "align":
        return _align(args)
    if args.command == "compare":
        from ppl_models.app.config import parse_override
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
        experiment = Experiment.from_file(args.config, _overrides(args), run_dir=args.run_dir, resume=args.resume)
        if args.nproc is not None and args.nproc > 1 and not in_torchrun():
            experiment.check_parallel()  # one error here, not one per process
            return _launch_fit(args, experiment)
        result, metrics = experiment.fit(resume=args.resume, evaluate=not args.no_evaluate, num_samples=args.num_samples)
        if in_torchrun() and os.environ.get("RANK", "0") != "0":
            return 0
        print(f"trained {result.step} steps, {result.epoch} epochs: set-up {result.setup_seconds:.1f} s "
              f"(compile {result.compile_seconds:.1f} s), training {result.train_seconds:.1f} s (validation "
              f"{result.valid_seconds:.1f} s); fast path: {result.fast_path}; run directory {experiment.run_dir}")
    else:
        experiment = Experiment.from_run_dir(args.run_dir, _overrides(args))
        metrics = experiment.evaluate(num_samples=args.num_samples, split=args.split, batch_size=args.batch_size,
                                      checkpoint=args.checkpoint)
    if metrics is not None:
        _print_metrics(metrics.to_metrics())
    return 0


def _align(args) -> int:
    """``ppl-models align``: load the run(s) as aligners (their task module's ``load_aligner``), align, write the
    Pharaoh lines (each line's links by target position), report unknown tokens and, with ``--gold``, the scores."""
    from ppl_models.app.experiment import Experiment, task_module
    from ppl_models.atomic import atomic_write_bytes
    from ppl_models.data.text import read_parallel
    from ppl_models.tasks import aer
    from ppl_models.tasks.alignment import align_text

    def load(run_dir):
        experiment = Experiment.from_run_dir(run_dir, {"train.progress": False})
        loader = getattr(task_module(experiment.config.model.name), "load_aligner", None)
        if loader is None:
            raise ValueError(f"{run_dir}: model {experiment.config.model.name!r} is not an aligner; ppl-models align "
                             "takes runs of 'alignment', 'ibm1' and 'hmm-align'")
        return loader(experiment, max_len=args.max_len)

    forward = load(args.run_dir)
    reverse = load(args.reverse) if args.reverse else None
    src, tgt = read_parallel(args.src_file, args.tgt_file)
    gold = aer.read_gold(args.gold, num_sentences=len(src)) if args.gold else None  # checked before the work
    result = align_text(forward, src, tgt, reverse=reverse, links=args.links, threshold=args.threshold,
                        symmetrize=args.symmetrize, progress=not args.no_progress)
    text = "".join(" ".join(f"{i}-{j}" for i, j in sorted(links, key=lambda x: (x[1], x[0]))) + "\n"
                   for links in result.links)
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.output, lambda f: f.write(text.encode()))
        print(f"wrote {len(result.links)} alignment lines to {args.output}", file=sys.stderr)
    for name, c in result.unknown.items():
        print(f"unknown tokens (<unk>), {name}: source {c['src_unknown']}/{c['src_tokens']} "
              f"({100 * c['src_unknown'] / max(1, c['src_tokens']):.1f} %), target {c['tgt_unknown']}/{c['tgt_tokens']} "
              f"({100 * c['tgt_unknown'] / max(1, c['tgt_tokens']):.1f} %)", file=sys.stderr)
    if gold is not None:
        if args.gold_reversed:
            gold = [aer.GoldLinks(frozenset(aer.transpose(g.sure)), frozenset(aer.transpose(g.possible))) for g in gold]
        print(f"{'links':<24} {'AER':>6} {'precision':>9} {'recall':>6} {'|A|':>6}", file=sys.stderr)
        for name, s in result.scores(gold, args.symmetrize).items():
            print(f"{name:<24} {s.aer:6.3f} {s.precision:9.3f} {s.recall:6.3f} {s.num_predicted:6d}", file=sys.stderr)
    return 0


def _launch_fit(args, experiment) -> int:
    """``fit --nproc N``: this process becomes the job's agent and starts N processes of ``python -m ppl_models
    fit`` (the same arguments, without ``--nproc``); the configuration was checked once, above."""
    from ppl_models.infer.checkpoint import latest_checkpoint
    from ppl_models.infer.distributed import DistributedJobError, launch

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


def report_errors(fn: Callable[..., object]) -> Callable[..., int]:
    """``fn`` (a command: ``ppl-models``' own, or an example script's ``main``) as an entry point returning an exit
    status, with the command line's error handling: an input error of the package (:func:`user_errors`) prints one
    line ``error: ...`` on stderr and returns 2; SIGINT/SIGTERM during training (the engine's checkpoint is written)
    print where it stopped and return 128 + the signal number; a successful ``fn`` returns its own status (an
    ``int``) or 0.  Anything else (a bug) propagates with its traceback.  An example script ends with
    ``sys.exit(report_errors(main)(parser.parse_args()))``."""

    @functools.wraps(fn)
    def entry_point(*args, **kwargs) -> int:
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, user_errors()):
                raise
            message = str(exc).split("\nTrace Shapes:")[0]  # Pyro appends its table of site shapes to model errors
            print(f"{_where()}error: {' '.join(message.split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            from ppl_models.infer import TrainingInterrupted

            if not isinstance(exc, TrainingInterrupted):
                raise
            print(f"{_where()}stopped: {exc}. Continue with --resume.", file=sys.stderr)
            return 128 + exc.signum
        return out if isinstance(out, int) and not isinstance(out, bool) else 0

    return entry_point


def _where() -> str:
    """``"[rank R] "`` in a process of a data-parallel job of several processes, else ``""``."""
    return f"[rank {os.environ['RANK']}] " if in_torchrun() and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return report_errors(run)(args)


def main(argv: Optional[List[str]] = None) -> int:
    if in_torchrun():  # one of a job's processes: an unexpected error is recorded for the launcher's report
        from ppl_models.infer.distributed import record_errors

        return record_errors(_main)(argv)
    return _main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
