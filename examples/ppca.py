"""Probabilistic PCA / factor analysis, declared in a few lines and fitted with the package's engine.

    python examples/ppca.py                                 # config examples/configs/ppca.toml
    ppl-models fit examples/configs/ppca.toml               # the same through the CLI ([model] module = this file)
    python examples/ppca.py --num-epochs 2 --num-samples 10

Data are simulated from a factor-analysis model with known parameters; the exact marginal
log-likelihood log N(x; b, W Wᵀ + Ψ) of the fitted model is printed next to its ELBO and IWAE bound.
"""

import argparse
from pathlib import Path

import pyro.distributions as dist
import torch

from ppl_models.declarative import Latent, Observed, declare_model
from ppl_models.app.experiment import Experiment, register_dataset
from ppl_models.data import TensorDataset

# ---- the model (17 lines) and its exact marginal likelihood (5 lines) --------------------------------------
ppca = declare_model(
    "ppca",
    doc=r"""Factor analysis (isotropic=True: probabilistic PCA, Tipping & Bishop 1999), for each datapoint i:

    1. z_i ~ N(0, I_{z_dim})
    2. x_i | z_i ~ N(W z_i + b, Ψ),  Ψ = diag(noise_scale²) (one shared noise_scale if isotropic)

    Exact marginal likelihood: x_i ~ N(b, W Wᵀ + Ψ) (Bishop 2006, §12.2.4).""",
    hparams={"z_dim": 2, "x_dim": 5, "isotropic": False},
    networks={"loading": lambda z_dim, x_dim: torch.nn.Linear(z_dim, x_dim)},  # W z + b
    params={"log_noise_scale": lambda x_dim, isotropic: torch.zeros(1 if isotropic else x_dim)},
    sites=[
        Latent("z", ("z_dim",), lambda: dist.Normal(0.0, 1.0)),
        Observed("x", ("x_dim",), lambda z, loading, log_noise_scale: dist.Normal(loading(z), log_noise_scale.exp())),
    ],
)


def exact_log_likelihood(networks, x):
    """log p(x_i) = log N(x_i; b, W Wᵀ + Ψ) for x of shape (batch, x_dim); shape (batch,)."""
    loading, psi = networks.nets["loading"], networks.params["log_noise_scale"].exp().pow(2)
    covariance = loading.weight @ loading.weight.T + torch.diag(psi.expand(loading.out_features))
    return dist.MultivariateNormal(loading.bias, covariance_matrix=covariance).log_prob(x)
# ---------------------------------------------------------------------------------------------------------


def simulated_splits(num_train: int = 2000, num_test: int = 1000, z_dim: int = 2, x_dim: int = 5, seed: int = 1):
    """Train/test sets drawn from a factor-analysis model with W ~ N(0, 1), b ~ N(0, 1), noise scales in [0.2, 1]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        truth = ppca.build(z_dim=z_dim, x_dim=x_dim).modules["networks"]
        with torch.no_grad():
            truth.nets["loading"].weight.normal_(), truth.nets["loading"].bias.normal_()
            truth.params["log_noise_scale"].uniform_(0.2, 1.0).log_()
        x = ppca.simulate(truth, num_train + num_test)["x"]
    return {"train": TensorDataset(x[:num_train]), "valid": None, "test": TensorDataset(x[num_train:])}


register_dataset("ppca-simulated", simulated_splits)
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
    main(parser.parse_args())
