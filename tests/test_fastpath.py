"""The engine's fast path (ppl_models.infer.fastpath): Pyro's ELBO captured once as a tensor function.

Exact tests: for the same parameters and the same noise the captured loss and its gradients equal Pyro's
(Trace_ELBO, TraceMeanField_ELBO; amortized and per-datapoint guides); a training run with the fast path
ends at the same parameters as the engine's Pyro path.  Unsupported models fall back with one notice.
"""

from __future__ import annotations

import numpy as np

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import ppl_models as pm
from ppl_models.data import DynamicBinarized, TensorDataset
from ppl_models.infer import Trainer
from ppl_models.infer.capture import FastPathUnsupported, capture_loss
from ppl_models.infer.fastpath import FastPath

N, X_DIM = 40, 12
SMALL = dict(model_kwargs={"z_dim": 3, "hidden_dims": [8], "x_dim": X_DIM})


def small_vae(guide: str):
    guide_kwargs = {"hidden_dims": [8]} if guide == "amortized" else {}
    return pm.instantiate("vae", guide, num_data=N, guide_kwargs=guide_kwargs, **SMALL)


def pixel_data(seed: int = 0) -> DynamicBinarized:
    return DynamicBinarized(torch.rand(N, X_DIM, generator=torch.Generator().manual_seed(seed)))


def pyro_loss_and_grads(elbo, inst, x, idx, seed):
    torch.manual_seed(seed)
    with pyro.validation_enabled(False):
        loss = elbo.differentiable_loss(inst.model, inst.guide, x, idx, num_data=N)
    params = dict(pyro.get_param_store().named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.item(), dict(zip(params, grads))


@pytest.mark.parametrize("elbo_cls", [pyro.infer.Trace_ELBO, pyro.infer.TraceMeanField_ELBO])
@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_captured_loss_and_gradients_equal_pyros(elbo_cls, guide):
    inst = small_vae(guide)
    x = torch.rand(10, X_DIM).bernoulli()
    idx = torch.randperm(N)[:10]
    elbo = elbo_cls(max_plate_nesting=1)
    ref, ref_grads = pyro_loss_and_grads(elbo, inst, x, idx, seed=7)  # also registers the parameters
    cap = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": N})
    torch.manual_seed(7)
    loss = cap((x, idx))
    grads = dict(zip(cap.param_names, torch.autograd.grad(loss, cap.params)))
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert set(grads) == {k for k, g in ref_grads.items() if g is not None}
    for name, g in grads.items():
        expected = ref_grads[name].to_dense() if ref_grads[name].is_sparse else ref_grads[name]
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert cap.sparse == (guide == "mean-field")


@pytest.mark.parametrize("elbo_cls", [pyro.infer.Trace_ELBO, pyro.infer.TraceMeanField_ELBO])
@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_joint_gradient_graph_equals_pyros_gradients(elbo_cls, guide):
    """The compiled runner's graph (grad_and_value of the captured loss, traced; run here without compiling):
    Pyro's loss and gradients for the same parameters and noise, without torch's autograd engine.  The
    mean-field guide's λ table gets the sparse gradient of its batch rows, as ``embedding``'s backward gives."""
    from ppl_models.infer.fastpath import JointGradient

    inst = small_vae(guide)
    x, idx = torch.rand(10, X_DIM).bernoulli(), torch.randperm(N)[:10]
    elbo = elbo_cls(max_plate_nesting=1)
    ref, ref_grads = pyro_loss_and_grads(elbo, inst, x, idx, seed=7)
    cap = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": N})
    runner = JointGradient(cap, compile=False)
    for _ in range(2):  # traced on the first call, replayed on the second
        torch.manual_seed(7)
        loss, grads = runner(*cap.params, x, idx, *cap.noise_graph())
        assert not loss.requires_grad and loss.item() == pytest.approx(ref, rel=1e-6)
        names = {id(p): n for n, p in zip(cap.param_names, cap.params)}
        assert {names[id(p)] for p, _ in grads} == {k for k, g in ref_grads.items() if g is not None}
        for p, g in grads:
            expected = ref_grads[names[id(p)]]
            assert g.is_sparse == expected.is_sparse
            if g.is_sparse:
                assert torch.equal(g._indices(), expected._indices())
                g, expected = g._values(), expected._values()
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_capture_scales_by_num_data_over_batch():
    """The plate's N / batch scale is part of the captured graph: same rows and noise, N = 40 vs N = batch."""
    inst = small_vae("amortized")
    elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=1)
    x, idx = torch.rand(8, X_DIM).bernoulli(), torch.arange(8)
    with pyro.validation_enabled(False):
        elbo.differentiable_loss(inst.model, inst.guide, x, idx, num_data=N)
    scaled = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": N})
    unscaled = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": 8})
    torch.manual_seed(0)
    a = scaled((x, idx)).item()
    torch.manual_seed(0)
    b = unscaled((x, idx)).item()
    assert a == pytest.approx(N / 8 * b, rel=1e-6)


def fit_params(fast_path, guide: str, elbo: str):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    inst = small_vae(guide)
    trainer = Trainer(inst.model, inst.guide, pixel_data(), elbo=elbo, batch_size=16, num_epochs=2, lr=1e-2,
                      progress=False, fast_path=fast_path)
    result = trainer.fit()
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return params, result.history["train_elbo"], trainer


@pytest.mark.parametrize("guide,elbo", [("amortized", "Trace_ELBO"), ("mean-field", "TraceMeanField_ELBO")])
def test_training_trajectory_equals_pyro_path(guide, elbo, capsys):
    """2 epochs of 3 batches (16, 16, 8 rows: two batch shapes), fast path vs Pyro every step."""
    ref, ref_hist, _ = fit_params(False, guide, elbo)
    got, hist, trainer = fit_params(True, guide, elbo)
    assert "fast path" not in capsys.readouterr().err  # no fallback
    fast = trainer._fast
    assert fast.disabled is None and fast.steps == 5  # 6 steps, the first one validated by Pyro
    assert len(fast.captured) == 2 and all(fast.verified.values())
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
    assert hist == pytest.approx(ref_hist, rel=1e-6)


def test_resume_with_fast_path_is_bit_identical(tmp_path):
    def trainer(run_dir, num_epochs):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        inst = small_vae("amortized")
        return Trainer(inst.model, inst.guide, pixel_data(), batch_size=10, num_epochs=num_epochs, progress=False,
                       run_dir=run_dir, fast_path=True)

    trainer(None, 2).fit()
    straight = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    trainer(tmp_path, 1).fit()
    trainer(tmp_path, 2).fit(resume=True)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value, straight[name]), name


# ------------------------------------------------------------------------------------------- fallbacks
def coin_model(x, idx=None, num_data=None):
    """x ~ Normal(c, 1) with a discrete latent c ~ Bernoulli(p); x: (batch,)."""
    p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
    with pyro.plate("data", num_data or x.shape[0], subsample=idx):
        c = pyro.sample("c", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def coin_guide(x, idx=None, num_data=None):
    q = pyro.param("q", torch.tensor(0.3), constraint=constraints.unit_interval)
    with pyro.plate("data", num_data or x.shape[0], subsample=idx):
        pyro.sample("c", dist.Bernoulli(q))


def branchy_model(x, idx=None, num_data=None):
    """The likelihood's shift depends on the batch's values (Python control flow on data)."""
    loc = pyro.param("loc", torch.tensor(0.0))
    shift = 1.0 if float(x.mean()) > 0 else -1.0
    with pyro.plate("data", num_data or x.shape[0], subsample=idx):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)


def branchy_guide(x, idx=None, num_data=None):
    z_loc = pyro.param("z_loc", torch.tensor(0.1))
    z_scale = pyro.param("z_scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", num_data or x.shape[0], subsample=idx):
        pyro.sample("z", dist.Normal(z_loc, z_scale))


def train_steps(model, guide, x, batches, fast_path, elbo="Trace_ELBO"):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    trainer = Trainer(model, guide, TensorDataset(x), elbo=elbo, batch_size=4, progress=False, fast_path=fast_path)
    losses = [trainer.train_step((x[idx],), idx) for idx in batches]
    return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def notices(err: str):
    return [line for line in err.splitlines() if line.startswith("fast path")]


def test_discrete_guide_site_falls_back_with_one_notice(capsys):
    x = torch.randn(8)
    batches = [torch.arange(4), torch.arange(4, 8), torch.arange(4), torch.arange(4, 8)]
    ref_losses, ref = train_steps(coin_model, coin_guide, x, batches, False)
    losses, got = train_steps(coin_model, coin_guide, x, batches, True)
    (line,) = notices(capsys.readouterr().err)
    assert "guide site 'c' (Bernoulli) is not reparameterizable" in line and "Trace_ELBO" in line
    assert losses == ref_losses  # the fallback is Pyro's own step, same draws
    for name in ref:
        assert torch.equal(got[name], ref[name])


def test_structure_that_changes_between_batches_falls_back(capsys):
    x = torch.cat([torch.full((4,), 3.0), torch.full((4,), -3.0)])
    pos, neg = torch.arange(4), torch.arange(4, 8)
    batches = [pos, pos, neg, pos]  # validated Pyro step, capture on +, verify on - (differs), Pyro
    ref_losses, ref = train_steps(branchy_model, branchy_guide, x, batches, False)
    losses, got = train_steps(branchy_model, branchy_guide, x, batches, True)
    (line,) = notices(capsys.readouterr().err)
    assert "changed between batches" in line
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])


def test_unsupported_objective_and_settings_fall_back_at_set_up(capsys):
    x = torch.randn(8)
    train_steps(branchy_model, branchy_guide, x, [torch.arange(4)], True, elbo="TraceGraph_ELBO")
    (line,) = notices(capsys.readouterr().err)
    assert "objective TraceGraph_ELBO" in line
    with pytest.raises(FastPathUnsupported, match="TraceGraph_ELBO"):
        FastPath(pyro.infer.TraceGraph_ELBO(), branchy_model, branchy_guide, {})


def test_bad_fast_path_value_is_one_clear_error():
    with pytest.raises(ValueError, match="fast_path: expected one of .* received 'fastest'"):
        Trainer(coin_model, coin_guide, TensorDataset(torch.randn(8)), fast_path="fastest")


def test_config_key_reaches_the_trainer(tmp_path):
    from ppl_models.app.config import Config, to_toml
    from ppl_models.app.experiment import Experiment

    config = Config.from_dict({"train": {"fast_path": "auto", "validate": False}})
    assert config.train.fast_path == "auto"
    assert 'fast_path = "auto"' in to_toml(config)
    assert Config.from_dict({}).train.fast_path == "auto"  # the default: the fast path wherever it applies
    trainer = Experiment(config, tmp_path).trainer({"train": pixel_data()}, small_vae("amortized"))
    assert trainer.fast_path == "auto"


def test_evaluate_config_key_reaches_the_evaluator(tmp_path, monkeypatch):
    from ppl_models.infer import evaluate as evaluate_module
    from ppl_models.app.config import Config, ConfigError
    from ppl_models.app.experiment import Experiment

    with pytest.raises(ConfigError, match=r"\[evaluate\] fast_path: expected one of .* received 'fastest'"):
        Config.from_dict({"evaluate": {"fast_path": "fastest"}})
    seen = []
    real = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: seen.append(k["fast_path"]) or real(*a, **k))
    config = Config.from_dict({"train": {"num_epochs": 1, "batch_size": 20, "progress": False},
                               "evaluate": {"fast_path": "eager", "num_samples": 3, "split": "train"},
                               "output": {"plots": False}})
    inst = small_vae("amortized")
    Experiment(config, tmp_path)._evaluate({"train": pixel_data()}, inst)
    assert seen == ["eager"]


def test_auto_mode_does_not_compile_a_short_run():
    from ppl_models.infer.fastpath import AUTO_PROBE_STEPS

    inst = small_vae("amortized")
    trainer = Trainer(inst.model, inst.guide, pixel_data(), batch_size=20, max_steps=AUTO_PROBE_STEPS + 4,
                      num_epochs=100, progress=False, fast_path="auto")
    trainer.fit()
    fast = trainer._fast
    assert fast.steps == AUTO_PROBE_STEPS + 3 and not fast.compile and fast.compile_seconds is None
    assert all(run is fast.captured[key].graph for key, run in fast.runners.items())


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_compiled_fast_path_matches_eager(capsys, guide):
    """mode="compile" (the joint loss-and-gradient graph compiled by inductor, ~20 s cold): the eager captured
    path's losses to float rounding, and compiled for real (no fallback notice, a compile time recorded);
    with the mean-field guide, SparseAdam on the λ rows as in the eager path."""
    from ppl_models.infer.fastpath import CompiledGraph, JointGradient

    losses = {}
    for mode in ("eager", "compile"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        inst = small_vae(guide)
        trainer = Trainer(inst.model, inst.guide, pixel_data(), batch_size=16, max_steps=4, num_epochs=2,
                          progress=False, fast_path=mode)
        idx = torch.arange(16)
        losses[mode] = [trainer.train_step(pixel_data().batch(idx, torch.Generator().manual_seed(s)), idx)
                        for s in range(4)]
    fast = trainer._fast
    assert "fast path" not in capsys.readouterr().err
    assert fast.compile_seconds is not None and fast.steps == 3
    (runner,) = fast.runners.values()
    assert isinstance(runner, JointGradient) and any(
        isinstance(cell.cell_contents, CompiledGraph) for cell in runner.fn.__closure__)
    assert losses["compile"] == pytest.approx(losses["eager"], rel=1e-5)


@pytest.mark.slow
def test_compiled_graph_recompiles_for_other_strides():
    """Inductor's code is specialised to its example's strides and there are no dynamo guards:
    CompiledGraph checks sizes and strides itself, and a transposed input gets a program of its own."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ppl_models.infer.fastpath import CompiledGraph

    def f(a, b):
        return (torch.relu(a @ b) + a.sum(),)

    a, b = torch.randn(6, 6), torch.randn(6, 4)
    compiled = CompiledGraph(make_fx(f)(a, b))
    torch.testing.assert_close(compiled(a, b)[0], f(a, b)[0])
    a_t = a.t()  # same size, other strides
    torch.testing.assert_close(compiled(a_t, b)[0], f(a_t, b)[0])
    assert len(compiled.compiled) == 2


@pytest.mark.slow
def test_benchmark_quick_run_without_compile_reports_json(monkeypatch, tmp_path, capsys):
    """bench_fast_path.py end to end on simulated data, in-process (no compile, no memory subprocesses,
    no timing asserts): its last line is the JSON summary, with both loss checks exact."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    import bench_fast_path

    bench_fast_path.main(["--quick", "--simulated", "--no-rss", "--impls", "hand,engine_pyro,fast_eager"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "fast_path"
    assert set(result["steps_per_s"]) == {"hand", "engine_pyro", "fast_eager"}
    assert result["fast_loss_check"]["rel_diff"] < 1e-6
    assert result["loss_check"]["rel_diff"] < 1e-5


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_small(fast_path, num_samples=12, chunk_size=5, x=None, inst=None):
    from ppl_models.infer.evaluate import evaluate

    if x is None:
        gen = torch.Generator().manual_seed(1)
        x = torch.bernoulli(torch.rand(N, X_DIM, generator=gen), generator=gen)
    inst = inst or small_vae("amortized")
    return evaluate(inst.model, inst.guide, x, spec=inst.spec, num_samples=num_samples, batch_size=16,
                    chunk_size=chunk_size, generator=torch.Generator().manual_seed(0), progress=False,
                    fast_path=fast_path)


def test_captured_evaluation_equals_pyros(capsys):
    """Chunks of 5, 5, 2 samples over batches of 16, 16, 8 rows (four graph shapes), same draws: the captured
    graphs give Pyro's log-likelihoods, ELBOs and KLs exactly."""
    inst = small_vae("amortized")
    ref = evaluate_small(False, inst=inst)
    for mode in ("eager", "auto"):  # "auto": this short evaluation is not worth compiling
        got = evaluate_small(mode, inst=inst)
        assert "fast path" not in capsys.readouterr().err
        for name in ("log_likelihood", "elbo", "recon", "kl"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


def test_evaluation_structure_that_changes_between_batches_falls_back(capsys):
    """branchy_model's likelihood shift depends on the batch's mean: the second batch's capture differs, the
    evaluator says so once and finishes through Pyro with Pyro's numbers."""
    from ppl_models.infer.evaluate import evaluate
    from ppl_models.spec import LatentSite, ModelSpec, ObservedSite

    x = torch.cat([torch.full((4,), 2.0), torch.full((4,), -2.0)])
    spec = ModelSpec("branchy", observed=ObservedSite("x", ()), local_latents=(LatentSite("z", ()),))
    results = {}
    for mode in (False, "eager"):
        pyro.clear_param_store()
        results[mode] = evaluate(branchy_model, branchy_guide, x, spec=spec, num_samples=6, batch_size=4,
                                 generator=torch.Generator().manual_seed(0), progress=False, fast_path=mode)
    lines = notices(capsys.readouterr().err)
    assert lines == ["fast path off: the captured program changed between batches (control flow or constants "
                     "depend on values); evaluating through Pyro"]
    np.testing.assert_allclose(results["eager"].log_likelihood, results[False].log_likelihood, rtol=1e-6)


@pytest.mark.slow
def test_compiled_evaluation_equals_pyros_to_rounding(capsys):
    inst = small_vae("amortized")
    ref = evaluate_small(False, inst=inst)
    got = evaluate_small("compile", inst=inst)
    assert "fast path" not in capsys.readouterr().err  # compiled, not fallen back
    np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.kl, ref.kl, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------- IWAE and the estimators
@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_captured_iwae_loss_and_gradients_equal_the_pyro_paths(guide):
    """IWAE_ELBO, K = 4 vectorized particles, N/B = 4 outside the log-sum-exp: for the same parameters and noise
    the captured loss and gradients, and the joint-gradient graph's (run without compiling), equal those of
    IWAE_ELBO.differentiable_loss through Pyro."""
    from ppl_models.infer.fastpath import JointGradient
    from ppl_models.infer.objectives import IWAE_ELBO

    inst = small_vae(guide)
    x, idx = torch.rand(10, X_DIM).bernoulli(), torch.randperm(N)[:10]
    elbo = IWAE_ELBO(num_particles=4, max_plate_nesting=1)
    ref, ref_grads = pyro_loss_and_grads(elbo, inst, x, idx, seed=7)
    cap = capture_loss(elbo, inst.model, inst.guide, (x, idx), {"num_data": N})
    expected = {k: (g.to_dense() if g.is_sparse else g) for k, g in ref_grads.items() if g is not None}
    torch.manual_seed(7)
    loss = cap((x, idx))
    grads = dict(zip(cap.param_names, torch.autograd.grad(loss, cap.params)))
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert set(grads) == set(expected)
    for name, g in grads.items():
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-5 * float(expected[name].abs().max()))
    runner = JointGradient(cap, compile=False)
    torch.manual_seed(7)
    loss, grads = runner(*cap.params, x, idx, *cap.noise_graph())
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    names = {id(p): n for n, p in zip(cap.param_names, cap.params)}
    for p, g in grads:
        g = g.to_dense() if g.is_sparse else g
        e = expected[names[id(p)]]
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


@pytest.mark.parametrize("guide,elbo", [("amortized", "IWAE"), ("mean-field", "IWAE"),
                                        ("amortized", "sticking-the-landing"), ("mean-field", "analytic-kl")])
def test_iwae_and_estimator_training_trajectories_equal_pyro_path(guide, elbo, capsys):
    """2 epochs of 3 batches with K = 3 particles: the fast path (IWAE_ELBO, or the ELBO inside an estimator on
    the guide as its rule runs it) ends where Pyro's path ends."""

    def fit(fast_path):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        inst = small_vae(guide)
        trainer = Trainer(inst.model, inst.guide, pixel_data(), elbo=elbo, num_particles=3, batch_size=16,
                          num_epochs=2, lr=1e-2, progress=False, fast_path=fast_path)
        history = trainer.fit().history["train_elbo"]
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, history, trainer

    ref, ref_hist, _ = fit(False)
    got, hist, trainer = fit(True)
    assert "fast path" not in capsys.readouterr().err  # no fallback
    assert trainer._fast.disabled is None and trainer._fast.steps == 5
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
    assert hist == pytest.approx(ref_hist, rel=1e-6)


def test_renyi_elbo_falls_back_at_set_up_with_one_notice(capsys):
    x = torch.randn(8)
    ref_losses, ref = train_steps(branchy_model, branchy_guide, x, [torch.arange(4)] * 3, False, elbo="RenyiELBO")
    losses, got = train_steps(branchy_model, branchy_guide, x, [torch.arange(4)] * 3, True, elbo="RenyiELBO")
    (line,) = notices(capsys.readouterr().err)
    assert line.startswith("fast path off: objective RenyiELBO (supported: Trace_ELBO, TraceMeanField_ELBO, IWAE")
    assert losses == ref_losses


@pytest.mark.slow
def test_compiled_iwae_fast_path_matches_eager(capsys):
    """IWAE (K = 3) with mode="compile": the joint graph of IWAE_ELBO's loss compiled by inductor gives the eager
    captured path's losses to float rounding (compiled for real: no fallback notice, a compile time recorded)."""
    from ppl_models.infer.fastpath import JointGradient

    losses = {}
    for mode in ("eager", "compile"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        inst = small_vae("amortized")
        trainer = Trainer(inst.model, inst.guide, pixel_data(), elbo="IWAE", num_particles=3, batch_size=16,
                          max_steps=4, num_epochs=2, progress=False, fast_path=mode)
        idx = torch.arange(16)
        losses[mode] = [trainer.train_step(pixel_data().batch(idx, torch.Generator().manual_seed(s)), idx)
                        for s in range(4)]
    fast = trainer._fast
    assert "fast path" not in capsys.readouterr().err
    assert fast.compile_seconds is not None and fast.steps == 3
    (runner,) = fast.runners.values()
    assert isinstance(runner, JointGradient)
    assert losses["compile"] == pytest.approx(losses["eager"], rel=1e-5)
