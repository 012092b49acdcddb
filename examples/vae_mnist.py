"""Train the lecture's deep generative model of MNIST as a VAE and report its test log-likelihood.

    python examples/vae_mnist.py                       # the README's main job (about 10 minutes on 2 cores)
    python examples/vae_mnist.py --num-epochs 1 --limit-train 512 --limit-test 64 --num-samples 10 --run-dir runs/vae_small
    python examples/vae_mnist.py --resume -o train.time_limit=1200   # continue the run in runs/vae_mnist, longer

Data: MNIST from --data-dir, $PPL_MODELS_DATA, the cache, or a verified download.
Writes the run directory (config.toml, checkpoints/, history.json, metrics.json, eval.nc, PNG plots).
"""

import argparse
import sys
from pathlib import Path

from ppl_models.app.cli import report_errors
from ppl_models.app.config import parse_override
from ppl_models.app.experiment import Experiment

CONFIG = Path(__file__).resolve().parent / "configs" / "vae_mnist.toml"


def main(args):
    overrides = dict(parse_override(text) for text in getattr(args, "overrides", ()))
    overrides["train.progress"] = not args.no_progress
    for flag, key in (("num_epochs", "train.num_epochs"), ("z_dim", "model.z_dim"), ("num_samples", "evaluate.num_samples"),
                      ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.guide:
        overrides["guide.name"] = args.guide
    if args.data_dir:
        overrides["data.data_dir"] = args.data_dir
    for split in ("train", "valid", "test"):
        if getattr(args, f"limit_{split}") is not None:
            overrides[f"data.limit_{split}"] = getattr(args, f"limit_{split}")
    experiment = Experiment.from_file(args.config, overrides, run_dir=args.run_dir, resume=args.resume)
    result, metrics = experiment.fit(resume=args.resume)
    summary = metrics.to_metrics()
    print(
        f"test NLL (IWAE, K={summary['num_samples']}): {-summary['log_likelihood']:.2f} nats; "
        f"test ELBO {summary['elbo']:.2f}; trained {result.epoch} epochs in {result.wall_time / 60:.1f} min; "
        f"run directory {experiment.run_dir}"
    )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="experiment TOML (default: %(default)s)")
    parser.add_argument("--num-epochs", type=int, default=None, help="default: the config's (100)")
    parser.add_argument("--z-dim", type=int, default=None, help="default: the config's (50)")
    parser.add_argument("--guide", default=None, help="guide name (default: the config's, 'amortized')")
    parser.add_argument("--num-samples", type=int, default=None, help="importance samples for the test NLL (config: 5000)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's (0)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-valid", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--run-dir", default=None, help="default: the config's [output].run_dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory with its own configuration (flags may extend it)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, as ppl-models fit -o does (the flags above take precedence)")
    sys.exit(report_errors(main)(parser.parse_args()))
