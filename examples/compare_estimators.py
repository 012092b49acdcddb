"""Compare gradient estimators of the ELBO with ArviZ diagnostics (``ppl_models.compare``).

Reparameterized, score-function (no baseline, decaying-average baseline, neural baseline), analytic KL, IWAE
and sticking-the-landing on a VAE (binarized MNIST), a Gaussian mixture with a discrete latent, a conjugate
linear-Gaussian model and a Bayesian Gaussian mixture: gradient variance and SNR at fixed parameters, ELBO
curves over seeds, PSIS k̂ of the final q, NUTS references and PSIS-LOO across K.

    python examples/compare_estimators.py                                          # ~10 minutes, one thread
    python examples/compare_estimators.py --config examples/configs/compare_small.toml --run-dir /tmp/cmp  # seconds

Writes report.md, gradients.csv, training.csv, loo.csv, idata/*.nc and PNG plots to the run directory.
"""

import argparse
import sys
from pathlib import Path

from ppl_models.compare import load_compare_config, run_comparison
from ppl_models.app.cli import report_errors
from ppl_models.app.config import parse_override

CONFIG = Path(__file__).resolve().parent / "configs" / "compare_estimators.toml"


def main(args):
    overrides = dict(parse_override(text) for text in args.overrides)
    if args.num_seeds is not None:
        overrides["training.num_seeds"] = args.num_seeds
    if args.num_steps is not None:
        overrides["training.num_steps"] = args.num_steps
    if args.num_draws is not None:
        overrides["gradients.num_draws"] = args.num_draws
    if args.problems:
        overrides["compare.problems"] = args.problems
    if args.no_progress:
        overrides["compare.progress"] = False
    config = load_compare_config(args.config, overrides)
    run_dir = args.run_dir or config.compare.run_dir
    summary = run_comparison(config, run_dir)
    print((Path(run_dir) / "report.md").read_text())
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="comparison TOML file")
    parser.add_argument("--run-dir", help="output directory (default: [compare].run_dir)")
    parser.add_argument("--problems", nargs="+", help="subset of: vae gmm linear-gaussian bayesian-gmm")
    parser.add_argument("--num-seeds", type=int, help="training seeds per estimator")
    parser.add_argument("--num-steps", type=int, help="training steps per run")
    parser.add_argument("--num-draws", type=int, help="gradient draws per estimator")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(report_errors(main)(parse_args(sys.argv[1:])))
