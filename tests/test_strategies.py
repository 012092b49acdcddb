"""Inference strategies: svi-local, svi-inner (K inner steps), amortized, semi-amortized."""

import functools

import pyro
import pytest
import torch

import ppl_models as pm
from ppl_models import linear_gaussian as lg
from ppl_models.data import TensorDataset
from ppl_models.evaluate import evaluate, log_weights
from ppl_models.infer import Trainer
from ppl_models.infer.strategies import (
    RefiningGuide,
    explicit_guide,
    guide_for_strategy,
    initial_lambda,
    make_strategy,
    refine,
)
from ppl_models.registry import UnknownNameError


def conjugate_problem(num_data=8, z_dim=2, x_dim=4, seed=0):
    inst = pm.instantiate("linear-gaussian", None, num_data=None, model_kwargs={"z_dim": z_dim, "x_dim": x_dim})
    params = inst.modules["params"]
    with torch.no_grad():
        params.W.copy_(torch.randn(x_dim, z_dim, generator=torch.Generator().manual_seed(seed)))
    x, _ = lg.simulate(params, num_data, torch.Generator().manual_seed(seed + 1))
    return inst, params, x


def test_inner_steps_reach_the_closed_form_optimal_mean_field_lambda():
    """For a Gaussian posterior N(m, S) the optimal diagonal-Gaussian q has loc m and scales diag(S^-1)^-1/2."""
    inst, params, x = conjugate_problem()
    with torch.no_grad():
        m, _ = lg.exact_posterior(params, x)
        precision = torch.eye(2) + params.W.T @ params.W / params.sigma**2
        optimal_scale = precision.diagonal().rsqrt()
    elbo = pyro.infer.Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    lam0 = initial_lambda(inst.spec, x.shape[0])
    lam = refine(inst.model, inst.spec, lam0, (x,), None, num_steps=1500, lr=0.02, elbo=elbo)
    z_loc, z_scale_raw = lam["z"].split(2, dim=-1)
    # Tolerances: the stationary noise of SGD with 64-sample gradients at this step size, measured ~0.01.
    torch.testing.assert_close(z_loc, m, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.nn.functional.softplus(z_scale_raw), optimal_scale.expand(8, 2), atol=0.05, rtol=0)


def test_refinement_changes_no_parameter_gradient():
    inst, params, x = conjugate_problem()
    params.W.grad = None
    refine(inst.model, inst.spec, initial_lambda(inst.spec, 8), (x,), None, num_steps=3, lr=0.1)
    assert params.W.grad is None


def small_vae(num_data=64):
    pyro.set_rng_seed(0)
    inst = pm.instantiate("vae", "amortized-mlp", num_data=num_data,
                          model_kwargs={"z_dim": 3, "hidden_dims": [16], "x_dim": 20}, guide_kwargs={"hidden_dims": [16]})
    x = torch.rand(num_data, 20).bernoulli(generator=torch.Generator().manual_seed(1))
    return inst, x


def test_zero_refinement_steps_is_the_amortized_guide():
    inst, x = small_vae()
    refining = RefiningGuide(inst.model, inst.spec, num_steps=0, lr=0.1, encoder=inst.modules["encoder"])
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a = log_weights(inst.model, inst.guide, x, num_samples=16, spec=inst.spec)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        b = log_weights(inst.model, refining, x, num_samples=16, spec=inst.spec)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adam", 0.05)])
def test_semi_amortized_elbo_exceeds_amortized_at_the_same_parameters(optimizer, lr):
    inst, x = small_vae()
    data = TensorDataset(x)
    amortized = evaluate(inst.model, inst.guide, data, spec=inst.spec, num_samples=200, progress=False,
                         generator=torch.Generator().manual_seed(0))
    refining = RefiningGuide(inst.model, inst.spec, num_steps=20, lr=lr, encoder=inst.modules["encoder"],
                             optimizer=optimizer)
    semi = evaluate(inst.model, refining, data, spec=inst.spec, num_samples=200, progress=False,
                    generator=torch.Generator().manual_seed(0))
    gain = semi.elbo - amortized.elbo
    se = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 5 * se  # an untrained encoder leaves a large amortization gap
    # and both stay below the IWAE estimate of log p(x), which does not depend on q
    assert semi.elbo.mean() <= semi.log_likelihood.mean()


def _trainer(inst, x, strategy, **kwargs):
    guide, step = make_strategy(strategy, inst.model, inst.guide, inst.spec, dict(inst.modules), num_steps=5, lr=0.1, **kwargs)
    return Trainer(inst.model, guide, TensorDataset(x), step_fn=step, batch_size=16, num_epochs=1, lr=1e-2, progress=False)


@pytest.mark.parametrize("strategy, refine_grad", [("svi-inner", "stop"), ("semi-amortized", "stop"), ("semi-amortized", "end-to-end")])
def test_strategies_train_the_decoder(strategy, refine_grad):
    inst, x = small_vae()
    if strategy == "svi-inner":
        inst.guide = None
    trainer = _trainer(inst, x, strategy, refine_grad=refine_grad)
    decoder_before = inst.modules["decoder"].net[0].weight.detach().clone()
    encoder_before = inst.modules["encoder"].heads["z"].weight.detach().clone()
    result = trainer.fit()
    assert result.step == 4
    assert not torch.equal(inst.modules["decoder"].net[0].weight, decoder_before)
    moved = not torch.equal(inst.modules["encoder"].heads["z"].weight, encoder_before)
    assert moved == (strategy == "semi-amortized")
    names = set(pyro.get_param_store().keys())
    assert not any("local_params" in n for n in names)  # nothing stored per datapoint


def test_semi_amortized_stop_gradient_trains_the_encoder_on_its_own_elbo():
    """With refine_grad='stop' the encoder's gradient is that of the amortized ELBO at λ0 = enc(x)."""
    inst, x = small_vae()
    trainer = _trainer(inst, x, "semi-amortized", refine_grad="stop")
    trainer._setup()
    encoder = inst.modules["encoder"]
    idx = torch.arange(16)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        trainer._optim.step = lambda: None  # keep the gradients
        trainer.train_step((x[:16],), idx)
        got = encoder.heads["z"].weight.grad.clone()
    # The same draws: λ_K's refinement draws first, then the θ loss, then the λ0 loss.
    with torch.random.fork_rng():
        torch.manual_seed(5)
        lam0 = encoder(x[:16])
        with pyro.poutine.block():
            refine(inst.model, inst.spec, lam0, (x[:16],), idx, num_steps=5, lr=0.1)
        pyro.infer.Trace_ELBO().differentiable_loss(
            inst.model, functools.partial(explicit_guide, spec=inst.spec, lam={k: v.detach() for k, v in lam0.items()}),
            x[:16], idx, num_data=64)
        loss0 = pyro.infer.Trace_ELBO().differentiable_loss(
            inst.model, functools.partial(explicit_guide, spec=inst.spec, lam=lam0), x[:16], idx, num_data=64)
        (want,) = torch.autograd.grad(loss0, [encoder.heads["z"].weight])
    torch.testing.assert_close(got, want)


def test_strategy_names():
    assert guide_for_strategy("svi-local") == "mean-field"
    assert guide_for_strategy("svi-inner") is None
    with pytest.raises(UnknownNameError, match="unknown strategy 'svi-innr'; valid strategies: amortized, semi-amortized, svi-inner, svi-local"):
        guide_for_strategy("svi-innr")
    inst, _ = small_vae()
    with pytest.raises(UnknownNameError, match="unknown refine_grad 'both'"):
        make_strategy("semi-amortized", inst.model, inst.guide, inst.spec, dict(inst.modules), refine_grad="both")
    with pytest.raises(UnknownNameError, match="unknown inner optimizer 'rmsprop'; valid inner optimizers: adam, sgd"):
        make_strategy("svi-inner", inst.model, None, inst.spec, {}, optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner optimizer 'adam' is not differentiable"):
        refine(inst.model, inst.spec, initial_lambda(inst.spec, 4), (torch.zeros(4, 20),), None, num_steps=1, lr=0.1,
               create_graph=True, optimizer="adam")
    with pytest.raises(ValueError, match="needs an amortized guide with an 'encoder'"):
        make_strategy("semi-amortized", inst.model, inst.guide, inst.spec, {"decoder": inst.modules["decoder"]})
