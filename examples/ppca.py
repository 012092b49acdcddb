"""Probabilistic PCA / factor analysis, declared in a few lines (``ppl_models/ppca.py``) and fitted with the
package's engine; prints the exact marginal log-likelihood next to the ELBO and the IWAE bound.

    python examples/ppca.py                                 # config examples/configs/ppca.toml
    ppl-models fit examples/configs/ppca.toml               # the same through the CLI
    python examples/ppca.py --num-epochs 2 --num-samples 10 --run-dir runs/ppca_small

Data are simulated from a factor-analysis model with known parameters (data set ``ppca-simulated``); the exact
marginal log-likelihood log N(x; b, W Wᵀ + Ψ) of the fitted model is printed next to its ELBO and IWAE bound.
"""

import argparse
import sys
from pathlib import Path

import torch

from ppl_models.app.cli import report_errors
from ppl_models.app.experiment import Experiment
from ppl_models.ppca import exact_log_likelihood

CONFIG = Path(__file__).resolve().parent / "configs" / "ppca.toml"


def main(args):
    overrides = {"train.progress": not args.no_progress, "train.seed": args.seed}
    flags = (("num_epochs", "train.num_epochs"), ("num_samples", "evaluate.num_samples"), ("guide", "guide.name"))
    for flag, key in flags:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    experiment = Experiment.from_file(args.config, overrides, run_dir=args.run_dir)
    _, metrics = experiment.fit()
    splits, instance = experiment.load_data(), experiment.build(1)
    experiment.trainer(splits, instance, progress=False).resume()  # the fitted parameters
    x = splits["test"].batch(torch.arange(splits["test"].num_data), None)[0]
    with torch.no_grad():
        exact = exact_log_likelihood(instance.modules["networks"], x)
    summary = {**metrics.to_metrics(), "exact_log_likelihood": exact.mean().item(),
               "exact_log_likelihood_se": (exact.std() / len(exact) ** 0.5).item()}
    print(f"test log-likelihood per datapoint: ELBO {summary['elbo']:.3f} <= IWAE-{summary['num_samples']} "
          f"{summary['log_likelihood']:.3f} <= exact {summary['exact_log_likelihood']:.3f}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--num-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--num-samples", type=int, default=None, help="importance samples K (default: the config's)")
    parser.add_argument("--guide", default=None, help="amortized-mlp (the config's) or mean-field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=None, help="default: the config's [output].run_dir")
    parser.add_argument("--no-progress", action="store_true")
    sys.exit(report_errors(main)(parser.parse_args()))
