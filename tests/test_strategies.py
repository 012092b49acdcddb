"""Inference strategies: svi-local, svi-inner (K inner steps), amortized, semi-amortized."""

import functools
import json
from dataclasses import replace
from pathlib import Path

import pyro
import pytest
import torch

import ppl_models as pm
from ppl_models import linear_gaussian as lg
from ppl_models.data import TensorDataset
from ppl_models.infer.evaluate import evaluate, log_weights
from ppl_models.infer import Trainer
from ppl_models.app.cli import main as cli_main
from ppl_models.app.experiment import Experiment
from ppl_models.infer import diagnostics
from ppl_models.infer.strategies import (
    INNER_LOOPS,
    LOCAL_LR,
    InnerLoop,
    LocalStep,
    RefiningGuide,
    explicit_guide,
    guide_for_strategy,
    inference_guide,
    initial_lambda,
    inner_loop,
    make_strategy,
    refine,
)
from ppl_models.registry import UnknownNameError
from torch.distributions import MultivariateNormal, kl_divergence

REPO = Path(__file__).resolve().parents[1]


#: a budget in seconds of an injected fake clock (callbacks move it; no wall time is read)
FAKE_BUDGET = 40.0

def conjugate_problem(num_data=8, z_dim=2, x_dim=4, seed=0):
    inst = pm.instantiate("linear-gaussian", None, num_data=None, model_kwargs={"z_dim": z_dim, "x_dim": x_dim})
    params = inst.modules["params"]
    with torch.no_grad():
        params.W.copy_(torch.randn(x_dim, z_dim, generator=torch.Generator().manual_seed(seed)))
    x, _ = lg.simulate(params, num_data, torch.Generator().manual_seed(seed + 1))
    return inst, params, x


REPLICAS = 16  # independent copies of the 8 datapoints: each copy's λ_i gets its own gradient noise


def replicated_lambda_error(lam, target):
    """λ = (z_loc, softplus(z_scale_raw)) of the REPLICAS copies against the closed-form optimum ``target``
    ``(8, 4)``: the deviations ``(REPLICAS, 8, 4)`` and their spread over the copies ``(8, 4)``, the standard error
    of one run's λ as an estimate of the optimum."""
    z_loc, z_scale_raw = lam["z"].split(2, dim=-1)
    est = torch.cat([z_loc, torch.nn.functional.softplus(z_scale_raw)], -1).reshape(REPLICAS, 8, 4)
    return est - target, est.std(0)


@pytest.mark.slow
def test_inner_steps_reach_the_closed_form_optimal_mean_field_lambda():
    """For a Gaussian posterior N(m, S) the optimal diagonal-Gaussian q has loc m and scales diag(S^-1)^-1/2."""
    inst, params, x = conjugate_problem()
    with torch.no_grad():
        m, _ = lg.exact_posterior(params, x)
        precision = torch.eye(2) + params.W.T @ params.W / params.sigma**2
        optimal_scale = precision.diagonal().rsqrt()
    elbo = pyro.infer.Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    lam0 = initial_lambda(inst.spec, 8 * REPLICAS)
    lam = refine(inst.model, inst.spec, lam0, (x.repeat(REPLICAS, 1),), None, num_steps=1500, lr=0.02, elbo=elbo)
    error, sd = replicated_lambda_error(lam, torch.cat([m, optimal_scale.expand(8, 2)], -1))
    # Every run's λ within 5 standard errors of the optimum, the standard error being SGD's stationary noise
    # measured from the 16 independent runs (about 0.002-0.02; from the prior the error is about 1).
    assert (error.abs() <= 5 * sd).all(), (error.abs() / sd).max()


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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_semi_amortized_elbo_exceeds_amortized_at_the_same_parameters(optimizer):
    """The default refinement from enc(x) (plain steps; and Adam), K = 20, at the same θ and φ."""
    inst, x = small_vae()
    data = TensorDataset(x)
    amortized = evaluate(inst.model, inst.guide, data, spec=inst.spec, num_samples=200, progress=False,
                         generator=torch.Generator().manual_seed(0))
    loop = inner_loop("semi-amortized", optimizer=optimizer, num_steps=20)
    refining = RefiningGuide(inst.model, inst.spec, loop=loop, encoder=inst.modules["encoder"])
    semi = evaluate(inst.model, refining, data, spec=inst.spec, num_samples=200, progress=False,
                    generator=torch.Generator().manual_seed(0))
    gain = semi.elbo - amortized.elbo
    se = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 5 * se  # an untrained encoder leaves a large amortization gap
    # log p(x) does not depend on q: the two IWAE-200 estimates agree within 5 standard errors of their paired
    # differences (their biases, about Var(w/p) / 2K, are below that; measured 0.013 ± 0.008 and 0.021 ± 0.012).
    diff = semi.log_likelihood - amortized.log_likelihood
    assert abs(diff.mean()) <= 5 * diff.std() / len(diff) ** 0.5


def _trainer(inst, x, strategy, **kwargs):
    guide, step = make_strategy(strategy, inst.model, inst.guide, inst.spec, dict(inst.modules), num_steps=5, lr=0.1, **kwargs)
    return Trainer(inst.model, guide, TensorDataset(x), step_fn=step, batch_size=16, num_epochs=1, lr=1e-2, progress=False)


def test_a_time_limit_stops_at_the_step_where_the_clock_passes_it():
    """The strategies' wall-time budget (time_limit) read from an injected clock, so the test does not depend on
    the machine's speed: every step takes 3 fake seconds, so a 40 s budget stops after step 14 (clock at 42 s;
    39 s after step 13), 6 batches into the second epoch of 8; the first epoch took 24 fake seconds."""
    inst, x = small_vae()
    now = [1000.0]

    def three_seconds_a_step(trainer, step, loss):
        now[0] += 3.0

    trainer = Trainer(inst.model, inst.guide, TensorDataset(x), batch_size=8, num_epochs=100, time_limit=FAKE_BUDGET,
                      clock=lambda: now[0], callback=three_seconds_a_step, progress=False)
    result = trainer.fit()
    assert (result.step, result.epoch, trainer.batch_in_epoch) == (14, 1, 6)
    assert result.wall_time == 42.0 and trainer.history["epoch_time"] == [24.0]
    # max_steps, the budget in steps, wins when it comes first.
    pyro.clear_param_store()
    inst, x = small_vae()
    trainer = Trainer(inst.model, inst.guide, TensorDataset(x), batch_size=8, num_epochs=100, time_limit=FAKE_BUDGET,
                      max_steps=5, clock=lambda: now[0], callback=three_seconds_a_step, progress=False)
    assert trainer.fit().step == 5


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


# --- the inner loop per use ----------------------------------------------------------------------------------


def test_inner_loop_defaults_overrides_and_bad_values():
    for use, loops in INNER_LOOPS.items():
        assert inner_loop(use) == next(iter(loops.values()))  # the first listed optimizer is the use's default
        for optimizer, loop in loops.items():
            assert loop.optimizer == optimizer and inner_loop(use, optimizer=optimizer) == loop
    loop = inner_loop("semi-amortized", optimizer="adam", num_steps=3, lr_decay=0.5)
    assert loop == replace(INNER_LOOPS["semi-amortized"]["adam"], num_steps=3, lr_decay=0.5)
    assert loop.step_size(0) == loop.lr and loop.step_size(2) == pytest.approx(loop.lr * 0.5, rel=1e-12)
    assert loop.step_size(1) == pytest.approx(loop.lr * 0.5**0.5, rel=1e-12)  # geometric
    with pytest.raises(UnknownNameError,
                       match="unknown inner loop use 'warmup'; valid inner loop uses: semi-amortized, svi-inner, test"):
        inner_loop("warmup")
    with pytest.raises(UnknownNameError, match="unknown inner optimizer 'lbfgs'; valid inner optimizers: adam, sgd"):
        inner_loop("test", optimizer="lbfgs")
    with pytest.raises(ValueError, match="inner loop steps K: expected a non-negative integer, received -1"):
        InnerLoop(-1, 0.1)
    with pytest.raises(ValueError, match="inner loop lr: expected a positive number, received 0.0"):
        InnerLoop(5, 0.0)
    with pytest.raises(ValueError, match=r"inner loop lr_decay: expected a number in \(0, 1\], received 1.5"):
        InnerLoop(5, 0.1, lr_decay=1.5)
    with pytest.raises(ValueError, match="expected num_steps and lr, or an InnerLoop as loop"):
        RefiningGuide(None, None)


def test_make_strategy_takes_the_measured_defaults_and_the_given_fields():
    inst, _ = small_vae()
    modules = dict(inst.modules)
    guide, step = make_strategy("svi-local", inst.model, inst.guide, inst.spec, modules)
    assert guide is inst.guide and isinstance(step, LocalStep) and step.local_lr == LOCAL_LR
    _, step = make_strategy("svi-local", inst.model, inst.guide, inst.spec, modules, local_lr=0.3)
    assert step.local_lr == 0.3
    guide, step = make_strategy("svi-inner", inst.model, None, inst.spec, modules)
    assert guide.loop == inner_loop("svi-inner") and guide.encoder is None and step is None
    guide, step = make_strategy("svi-inner", inst.model, None, inst.spec, modules, num_steps=3, optimizer="adam")
    assert guide.loop == replace(INNER_LOOPS["svi-inner"]["adam"], num_steps=3)
    guide, step = make_strategy("semi-amortized", inst.model, inst.guide, inst.spec, modules)
    assert guide.loop == inner_loop("semi-amortized") and not guide.create_graph and step is not None
    guide, step = make_strategy("semi-amortized", inst.model, inst.guide, inst.spec, modules, refine_grad="end-to-end")
    assert guide.loop.optimizer == "sgd" and guide.create_graph and step is None  # the engine's joint step
    with pytest.raises(ValueError, match="inner optimizer 'adam' is not differentiable; end-to-end refinement needs"):
        make_strategy("semi-amortized", inst.model, inst.guide, inst.spec, modules, refine_grad="end-to-end",
                      optimizer="adam")


def test_inference_guide_for_unseen_data():
    inst, x = small_vae()
    assert inference_guide("amortized", inst.model, inst.spec, inst.guide) is inst.guide
    assert inference_guide("semi-amortized", inst.model, inst.spec, inst.guide) is inst.guide
    for strategy in ("svi-local", "svi-inner"):
        guide = inference_guide(strategy, inst.model, inst.spec, inst.guide)
        assert isinstance(guide, RefiningGuide) and guide.encoder is None and guide.loop == inner_loop("test")
    loop = InnerLoop(4, 0.1, "adam")
    assert inference_guide("svi-local", inst.model, inst.spec, None, loop=loop).loop is loop
    with pytest.raises(UnknownNameError, match="unknown strategy 'em'"):
        inference_guide("em", inst.model, inst.spec, None)


def test_test_time_loop_from_the_prior_reaches_the_optimal_mean_field_elbo():
    """The default test-time λ (300 Adam steps from the prior, single-sample gradients) on the conjugate model.

    ELBO(q) = log p(x) - KL(q || p(z | x)) exactly, so the ELBO lost to the optimal diagonal Gaussian q* is
    KL(q || post) - KL(q* || post) in closed form.  From the prior it is 7.3 nats per datapoint; the loop must
    leave under 0.05 (measured 0.02, and no better after 500 steps: the Adam noise floor).  16 independent copies
    of the 8 datapoints give the standard errors.
    """
    inst, params, x = conjugate_problem()
    with torch.no_grad():
        m, scale_tril = lg.exact_posterior(params, x)
        precision = torch.eye(2) + params.W.T @ params.W / params.sigma**2
        optimal_scale = precision.diagonal().rsqrt().expand(8, 2)
    posterior = MultivariateNormal(m, scale_tril=scale_tril)

    def lost(lam):  # (copies,): the ELBO lost per datapoint, averaged over the 8 datapoints of each copy
        z_loc, z_scale_raw = lam["z"].reshape(-1, 8, 4).split(2, dim=-1)
        q = MultivariateNormal(z_loc, scale_tril=torch.diag_embed(torch.nn.functional.softplus(z_scale_raw)))
        best = MultivariateNormal(m, scale_tril=torch.diag_embed(optimal_scale))
        return (kl_divergence(q, posterior) - kl_divergence(best, posterior)).mean(-1)

    lam0 = initial_lambda(inst.spec, 8)
    guide = inference_guide("svi-inner", inst.model, inst.spec, None)
    with torch.no_grad():
        lam = guide.lambda_for(x.repeat(REPLICAS, 1), None)
    assert float(lost(lam0)) > 5
    # The expected loss below 0.05 with 5 standard errors (over the copies) to spare, and every run's λ
    # within 5 standard errors (the spread of the copies' λ) of the optimum: noise, no bias.
    per_copy = lost(lam)
    assert float(per_copy.mean() + 5 * per_copy.std() / REPLICAS**0.5) < 0.05, per_copy
    error, sd = replicated_lambda_error(lam, torch.cat([m, optimal_scale], -1))
    assert (error.abs() <= 5 * sd).all(), (error.abs() / sd).max()


def test_svi_local_step_moves_the_stored_lambda_at_its_own_step_size():
    """Adam's first step moves each coordinate by lr * |g| / (|g| + eps), i.e. by lr: λ rows of the batch by
    local_lr, the other rows not at all, the decoder by the engine's lr."""
    pyro.set_rng_seed(0)
    inst = pm.instantiate("vae", "mean-field", num_data=64, model_kwargs={"z_dim": 3, "hidden_dims": [16], "x_dim": 20})
    x = torch.rand(64, 20).bernoulli(generator=torch.Generator().manual_seed(1))
    guide, step = make_strategy("svi-local", inst.model, inst.guide, inst.spec, dict(inst.modules), local_lr=0.5)
    trainer = Trainer(inst.model, guide, TensorDataset(x), step_fn=step, batch_size=16, max_steps=1, lr=1e-3,
                      progress=False)
    trainer._setup()
    table, decoder = inst.modules["local_params"].tables["z"].weight, inst.modules["decoder"].net[0].weight
    table_before, decoder_before = table.detach().clone(), decoder.detach().clone()
    trainer.fit()
    moved = (table - table_before).abs()
    rows = trainer.perm[:16]
    others = torch.ones(64, dtype=torch.bool)
    others[rows] = False
    torch.testing.assert_close(moved[rows], torch.full_like(moved[rows], 0.5), atol=1e-3, rtol=0)
    assert moved[others].max() == 0
    assert float((decoder - decoder_before).detach().abs().max()) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="svi-local local_lr: expected a positive number, received 0"):
        make_strategy("svi-local", inst.model, inst.guide, inst.spec, dict(inst.modules), local_lr=0)


# --- every strategy through `ppl-models fit` -----------------------------------------------------------------

CONFIG = str(REPO / "examples" / "configs" / "inference_strategies.toml")
TINY = ["-o", "model.z_dim=4", "-o", "model.hidden_dims=[16]", "-o", "data.limit_train=64", "-o", "data.limit_test=8",
        "-o", "train.batch_size=32", "-o", "train.num_epochs=1", "-o", "train.inner_steps=2",
        "-o", "evaluate.refine_steps=3", "-o", "evaluate.batch_size=8", "--num-samples", "4", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, refine_grad", [("svi-local", "stop"), ("svi-inner", "stop"), ("amortized", "stop"),
                                                   ("semi-amortized", "stop"), ("semi-amortized", "end-to-end")])
def test_every_strategy_runs_through_ppl_models_fit(tmp_path, shared_data, strategy, refine_grad):
    run_dir = tmp_path / "run"
    plots = "true" if strategy == "svi-local" else "false"  # test reconstructions from λ fitted from the prior
    code = cli_main(["fit", CONFIG, "--run-dir", str(run_dir), "-o", f"train.strategy={strategy}",
                     "-o", f"train.refine_grad={refine_grad}", "-o", f"output.plots={plots}", *TINY])
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_data"] == 8 and metrics["num_samples"] == 4  # the test split, also for per-datapoint λ
    # The reported test ELBO and IWAE-4 belong to the saved run: evaluating its checkpoint again (fresh draws,
    # and for svi-local/svi-inner λ refitted from the prior) gives per-image estimates of the same expectations,
    # so the mean paired difference is within 5 of its standard errors.
    reported = diagnostics.load_netcdf(run_dir / "eval.nc")
    torch.manual_seed(1)
    again = Experiment.from_run_dir(run_dir).evaluate()
    for name in ("elbo", "log_likelihood"):
        before = reported.vi_evaluation[name]
        d = getattr(again, name) - before.values.reshape(-1)
        assert abs(d.mean()) <= 5 * d.std(ddof=1) / len(d) ** 0.5, (name, d)
    history = json.loads((run_dir / "history.json").read_text())
    assert history["step"] == [2]  # 64 images, batches of 32, one epoch
    assert f'strategy = "{strategy}"' in (run_dir / "config.toml").read_text()
    assert (run_dir / "reconstructions.png").is_file() == (strategy == "svi-local")


def test_an_unknown_strategy_in_a_config_is_one_error_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(["fit", CONFIG, "--run-dir", str(run_dir), "-o", "train.strategy=svi-innr", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: overrides: [train] unknown strategy 'svi-innr'; "
                           "valid strategies: amortized, semi-amortized, svi-inner, svi-local")
    assert not run_dir.exists()
