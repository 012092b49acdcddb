"""The conditional VAE and its baseline: Pyro's quadrant protocol, exact and statistical checks of the
importance-sampled conditional log-likelihood, input errors, the example end to end."""

import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from torch.nn import functional as F

from ppl_models import registry
from ppl_models.app.config import load_config, to_toml
from ppl_models.cvae import complete_images
from ppl_models.data import TensorDataset
from ppl_models.data.quadrants import QuadrantDataset, split_quadrants
from ppl_models.encodings import missing_mask
from ppl_models.app.experiment import Experiment
from ppl_models.infer import diagnostics
from ppl_models.infer.evaluate import evaluate, log_weights
from ppl_models.infer import fit
from ppl_models.infer.checkpoint import CheckpointError
from ppl_models.spec import ShapeError
from ppl_models.tasks.cvae import build_kwargs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
SIDE = 4  # 16-pixel images: four 2x2 quadrants


def pyro_mask_images(image: torch.Tensor, num: int):
    """Pyro's examples/cvae/mnist.py MaskImages.__call__, verbatim in effect: returns (input, output)."""
    out = image.clone()
    h, w = image.shape
    out[h // 2 :, : w // 2] = -1
    if num == 2:
        out[:, : w // 2] = -1
    if num == 3:
        out[: h // 2, :] = -1
    inp = image.clone()
    inp[out != -1] = -1
    return inp, out


@pytest.mark.parametrize("num", [1, 2, 3])
def test_quadrants_are_pyros(num):
    images = torch.rand(3, 28, 28) * 0.9 + 0.05
    x_obs, y = split_quadrants(images.reshape(3, -1), missing_mask(num))
    assert y.shape == (3, {1: 588, 2: 392, 3: 196}[num])
    for k in range(3):
        inp, out = pyro_mask_images(images[k], num)
        assert torch.equal(x_obs[k], inp.reshape(-1))
        assert torch.equal(y[k], out.reshape(-1)[out.reshape(-1) != -1])  # Pyro's ys[xs == -1], same order


def tiny(name, guide, num=1, **model_kwargs):
    """A tiny instance; ``baseline_run`` loads the baseline as a run does (the task module's ``build_kwargs``)."""
    kwargs = build_kwargs({"num_quadrant_inputs": num, "hidden_dims": [8], "side": SIDE, **model_kwargs})
    guide_kwargs = {"hidden_dims": [8]} if guide == "recognition" else {}
    return registry.instantiate(name, guide, num_data=None, model_kwargs=kwargs, guide_kwargs=guide_kwargs)


def simulate(instance, n, num=1, seed=0):
    """Inputs from random grey images, outputs drawn from the model itself (0/1 pixels)."""
    g = torch.Generator().manual_seed(seed)
    x_obs, _ = split_quadrants(torch.rand(n, SIDE * SIDE, generator=g), missing_mask(num, SIDE))
    with torch.no_grad():
        trace = pyro.poutine.trace(instance.model).get_trace(x_obs, None)
    return x_obs, trace.nodes["y"]["value"]


def test_baseline_cll_is_the_masked_binary_cross_entropy():
    """No latent variable: the evaluator's estimate is exact and equals Pyro's MaskedBCELoss per image."""
    base = tiny("cvae-baseline", "none", num=2)
    images = torch.rand(6, SIDE * SIDE)
    x_obs, y = split_quadrants(images, missing_mask(2, SIDE))
    result = evaluate(base.model, base.guide, TensorDataset(x_obs, y), spec=base.spec, num_samples=2, progress=False)
    with torch.no_grad():
        probs = torch.sigmoid(base.modules["baseline_net"](x_obs))
        full_probs = images.clone()
        full_probs[:, missing_mask(2, SIDE)] = probs
        target = images.masked_fill(~missing_mask(2, SIDE), -1.0)  # Pyro's output: -1 at the input pixels
        bce = F.binary_cross_entropy(full_probs, target.clamp(min=0), reduction="none")
        bce[target == -1] = 0
    np.testing.assert_allclose(-result.log_likelihood, bce.sum(-1).double().numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.kl, 0.0)


def test_cvae_cll_estimate_is_at_least_its_elbo_and_at_most_the_exact_cll():
    """z_dim = 1: log p(y | x) and the guide's ELBO by quadrature over z.  The Monte Carlo ELBO estimates the
    quadrature ELBO (within 5 standard errors); E[IWAE] <= log p(y | x): the mean difference is within 3 standard
    errors above 0, and at most the delta-method bias Var(w / p) / 2K plus 5 standard errors below it."""
    cvae = tiny("cvae", "recognition", z_dim=1)
    x_obs, y = simulate(cvae, 60)
    K = 400
    result = evaluate(cvae.model, cvae.guide, TensorDataset(x_obs, y), spec=cvae.spec, num_samples=K,
                      progress=False, generator=torch.Generator().manual_seed(1))
    prior_net, generation_net = cvae.modules["prior_net"], cvae.modules["generation_net"]
    normal = torch.distributions.Normal(0.0, 1.0)
    u = torch.linspace(-9, 9, 4001, dtype=torch.float64)
    du = u[1] - u[0]

    def on_grid(loc, scale):  # z = loc + scale * u for every datapoint: (grid, n, 1), and log p(y | x, z), log p(z | x)
        z = (loc.double().T + scale.double().T * u[:, None]).unsqueeze(-1)
        logits = generation_net(z.float(), x_obs).double()
        log_lik = -F.binary_cross_entropy_with_logits(logits, y.double().expand_as(logits), reduction="none").sum(-1)
        return log_lik, torch.distributions.Normal(z_loc.double().T, z_scale.double().T).log_prob(z[..., 0])

    with torch.no_grad():
        z_loc, z_scale = prior_net(x_obs)  # no baseline: the prior reads x_obs
        log_lik, log_prior = on_grid(z_loc, z_scale)
        exact = (torch.logsumexp(log_lik + log_prior, 0) + (du * z_scale.double().T[0]).log()).numpy()
        q = pyro.poutine.trace(cvae.guide).get_trace(x_obs, y).nodes["z"]["fn"].base_dist  # Normal, (n, 1)
        log_lik, log_prior = on_grid(q.loc, q.scale)
        log_q = normal.log_prob(u)[:, None] - q.scale.double().T.log()
        elbo = ((normal.log_prob(u).exp() * du)[:, None] * (log_lik + log_prior - log_q)).sum(0).numpy()
        lw = log_weights(cvae.model, cvae.guide, (x_obs, y), num_samples=K, spec=cvae.spec).double()
    diff = result.elbo - elbo
    assert abs(diff.mean()) <= 5 * diff.std(ddof=1) / math.sqrt(len(diff)), diff.mean()
    for estimate in (result.log_likelihood, result.elbo):
        diff = estimate - exact
        assert diff.mean() <= 3 * diff.std(ddof=1) / math.sqrt(len(diff)), diff.mean()
    # The bound is not loose for nothing: the IWAE-400 gap is the delta-method bias of its proposal.
    bias = float((torch.exp(lw - torch.from_numpy(exact)).var(0) / (2 * K)).mean())
    gap = exact - result.log_likelihood
    assert gap.mean() <= bias + 5 * gap.std(ddof=1) / math.sqrt(len(gap)), (gap.mean(), bias)


def test_recognition_guide_is_built_from_the_model_and_reads_y():
    cvae = tiny("cvae", "recognition", num=3, z_dim=5)
    assert cvae.modules["recognition_net"].z_dim == 5 and cvae.spec.observed.event_shape == (4,)
    x_obs, y = simulate(cvae, 7, num=3)
    trace = pyro.poutine.trace(cvae.guide).get_trace(x_obs, y)
    assert trace.nodes["z"]["value"].shape == (7, 5)
    with pytest.raises(ValueError, match="recognition guide: expected the missing pixels y"):
        cvae.guide(x_obs, None)
    completions = complete_images(x_obs, dict(cvae.modules), num_samples=3)
    assert completions.shape == (3, 7, 16)
    assert torch.equal(completions[:, :, ~missing_mask(3, SIDE)], x_obs[:, ~missing_mask(3, SIDE)].expand(3, 7, 12))


def test_inputs_that_do_not_fit_the_quadrants_name_the_site():
    cvae = tiny("cvae", "recognition", num=1, z_dim=2)
    x_obs, y = simulate(cvae, 4)
    with pytest.raises(ShapeError, match=r"site 'x_obs': expected -1.0 at the 12 missing pixels of 1 observed"):
        cvae.model(x_obs.clamp(min=0), y)
    with pytest.raises(ShapeError, match=r"site 'y': expected shape \(batch, 12\), received \(4, 16\)"):
        cvae.model(x_obs, torch.zeros(4, 16))
    with pytest.raises(ShapeError, match=r"site 'y': expected values in \[0, 1\]"):
        cvae.model(x_obs, y + 2)
    with pytest.raises(ValueError, match="num_quadrant_inputs: expected 1, 2 or 3, received 4"):
        missing_mask(4)


def test_residual_cvae_starts_from_the_trained_baseline_and_checks_its_layout(tmp_path):
    base = tiny("cvae-baseline", "none", num=2)
    images = torch.rand(32, SIDE * SIDE)
    data = QuadrantDataset(images, 2)
    fit(base.model, base.guide, data, batch_size=16, num_epochs=1, run_dir=tmp_path / "base", progress=False)
    pyro.clear_param_store()
    cvae = tiny("cvae", "recognition", num=2, z_dim=2, baseline_run=str(tmp_path / "base"), baseline_hidden_dims=[8])
    x_obs, y = data.batch(torch.arange(5))
    with torch.no_grad():
        trace = pyro.poutine.trace(cvae.model).get_trace(x_obs, y)
        expected = base.modules["baseline_net"](x_obs)
    torch.testing.assert_close(trace.nodes["y"]["fn"].base_dist.logits, expected)
    assert not any(name.startswith("baseline_net") for name in pyro.get_param_store().keys())  # held fixed
    with pytest.raises(CheckpointError, match=r"expected a baseline for 1 observed quadrant\(s\)"):
        tiny("cvae", "recognition", num=1, z_dim=2, baseline_run=str(tmp_path / "base"), baseline_hidden_dims=[8])
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        tiny("cvae", "recognition", num=2, baseline_run=str(tmp_path / "nothing"))


def test_configs_load_and_round_trip(tmp_path):
    for name in ("cvae_mnist.toml", "cvae_mnist_baseline.toml"):
        config = load_config(REPO / "examples" / "configs" / name)
        (tmp_path / name).write_text(to_toml(config))
        assert load_config(tmp_path / name) == config
    assert config.data.name == "mnist-quadrants" and config.guide.name == "none"


@pytest.mark.slow
def test_cvae_example_runs_with_tiny_flags(tmp_path, shared_data):
    import cvae_mnist

    args = Namespace(num_quadrant_inputs=[3], config=str(cvae_mnist.CONFIG),
                     baseline_config=str(cvae_mnist.BASELINE_CONFIG),
                     baseline_time=None, cvae_time=None, num_epochs=1, num_samples=4, z_dim=2, hidden_dims=[16], seed=0,
                     data_dir=None, limit_train=256, limit_test=32, run_root=str(tmp_path), no_progress=True)
    (row,) = cvae_mnist.main(args)  # no wall-time budget: one epoch whatever the machine's speed
    assert row["num_test"] == 32 and row["num_samples"] == 4 and row["cvae_epochs"] == 1
    # The reported CLL belongs to the saved CVAE: evaluating its checkpoint again with fresh draws gives per image
    # estimates of the same expectations (-ELBO, IWAE-4), equal within 5 standard errors of the paired differences.
    run_dir = tmp_path / "q3" / "cvae"
    reported = diagnostics.load_netcdf(run_dir / "eval.nc")
    assert reported.vi_evaluation.attrs["observed"] == json.loads((run_dir / "metrics.json").read_text())["observed"]
    before = {"elbo": reported.vi_evaluation["elbo"].values.reshape(-1),
              "log_likelihood": reported.vi_evaluation["log_likelihood"].values.reshape(-1)}
    assert row["cvae_nll_iwae"] == pytest.approx(-before["log_likelihood"].mean())
    assert row["cvae_neg_elbo"] == pytest.approx(-before["elbo"].mean())
    torch.manual_seed(1)
    again = Experiment.from_run_dir(run_dir).evaluate(num_samples=4)
    for name, values in before.items():
        d = getattr(again, name) - values
        assert abs(d.mean()) <= 5 * d.std(ddof=1) / math.sqrt(len(d)), (name, d.mean())
    assert json.loads((tmp_path / "results_q3.json").read_text())[0]["num_quadrant_inputs"] == 3
    assert (tmp_path / "q3" / "completions.png").is_file() and (tmp_path / "q3" / "cvae" / "metrics.json").is_file()
    # no generic image plots (prior samples, reconstructions) for a conditional model
    assert not (tmp_path / "q3" / "cvae" / "prior_samples.png").exists()
