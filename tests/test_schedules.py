"""Learning-rate schedules, the time budget's clock, validation's subset and cadence, and the run's record.

Closed forms (ppl_models/infer/schedules.py): p_s = max(s/S, t/T), lr_s = lr · w_s · d(p_s), ρ = lr_final / lr.
"""

import json
import math
import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_models as pm
from ppl_models.app.config import Config, ConfigError
from ppl_models.registry import UnknownNameError
from ppl_models.data import DynamicBinarized, TensorDataset
from ppl_models.infer import Trainer, TrainingInterrupted
from ppl_models.infer.annealing import AnnealedTrainer, KLSchedule
from ppl_models.infer.schedules import LR_SCHEDULES, LRSchedule, RunClock, make_lr_schedule, validation_rows
from ppl_models.registry import UnknownNameError

NUM_DATA = 40
SMALL_VAE = {"z_dim": 2, "hidden_dims": [8], "x_dim": 12}


class FakeClock:
    """A clock the test moves by hand (``advance``), so no assertion depends on the wall clock."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


#: the budget of the trainer tests, in seconds of an injected FakeClock (each step moves it; no wall time is read)
FAKE_BUDGET = 10.0
#: the resumed run's budget, fake seconds likewise (12 steps of 0.5 s)
RESUME_BUDGET = 6.0
#: a budget that the config test only parses (nothing is trained against it)
PARSED_BUDGET = 60


def on_fake_clock(elapsed, budget):
    """The time arguments of a schedule (``seconds``, ``time_limit``) read from a :class:`RunClock` on a
    :class:`FakeClock` moved ``elapsed`` fake seconds past the first step, with a budget of ``budget`` fake
    seconds: the schedules read t from the run's clock, and here that clock is injected (no wall time)."""
    fake = FakeClock()
    run_clock = RunClock(clock=fake)
    run_clock.start()
    fake.now += elapsed
    return {"seconds": run_clock.train_seconds(), "time_limit": budget}


# ------------------------------------------------------------------------------------------- closed forms
def test_constant_schedule_is_one_everywhere():
    schedule = make_lr_schedule("constant")
    assert schedule.is_constant
    assert [schedule(s, 100) for s in (0, 1, 50, 99, 150)] == [1.0] * 5
    assert schedule(7, 100, **on_fake_clock(9.0, 10.0)) == 1.0


def test_step_schedule_is_burdas_on_a_3280_epoch_run():
    """3 steps per epoch, 3280 epochs: stage i starts at epoch (3^i - 1)/2 with lr factor 10^(-i/7)."""
    steps_per_epoch, schedule = 3, make_lr_schedule("step")
    total = 3280 * steps_per_epoch
    for i in range(8):
        first = steps_per_epoch * (3**i - 1) // 2
        assert schedule(first, total) == (0.1 ** (i / 7) if i else 1.0), i
        if i:
            assert schedule(first - 1, total) == (0.1 ** ((i - 1) / 7) if i > 1 else 1.0), i
    assert schedule(total - 1, total) == 0.1 ** (7 / 7) == 0.1
    # the stage lengths are 3^i epochs
    stages = [schedule.stage(s, total) for s in range(total)]
    assert [stages.count(i) for i in range(8)] == [steps_per_epoch * 3**i for i in range(8)]


def test_step_schedule_over_any_length_and_lr_final():
    schedule = make_lr_schedule("step", lr=2e-3, lr_final=2e-5)  # ρ = 0.01
    total = 6560  # the boundaries fall on the steps 3^i - 1
    for i in range(1, 8):
        assert schedule(3**i - 1, total) == pytest.approx(0.01 ** (i / 7), rel=1e-14)
        assert schedule(3**i - 2, total) == pytest.approx(0.01 ** ((i - 1) / 7), rel=1e-14)
    # a short run: boundaries at s * 6560 >= (3^i - 1) * S, exactly in integers
    short = make_lr_schedule("step")
    assert [short.stage(s, 100) for s in range(100)].index(7) == math.ceil(2186 * 100 / 6560)


def test_cosine_schedule_closed_form():
    rho = 0.1
    schedule = make_lr_schedule("cosine")
    for s in (0, 1, 25, 50, 73, 99):
        expected = rho + (1 - rho) * (1 + math.cos(math.pi * s / 100)) / 2
        assert schedule(s, 100) == expected
    assert schedule(0, 100) == 1.0 and schedule(50, 100) == pytest.approx(0.55, rel=1e-15)
    assert schedule(100, 100) == pytest.approx(0.1, rel=1e-15) and schedule(500, 100) == schedule(100, 100)
    to_zero = make_lr_schedule("cosine", lr=1e-3, lr_final=0.0)
    assert to_zero(100, 100) == 0.0 and to_zero(50, 100) == (1 + math.cos(math.pi / 2)) / 2


def test_warmup_in_steps_and_as_a_fraction():
    by_steps = make_lr_schedule("constant", warmup=10)
    assert [by_steps(s, 1000) for s in (0, 4, 8, 9, 10, 500)] == [0.1, 0.5, 0.9, 1.0, 1.0, 1.0]
    by_fraction = make_lr_schedule("cosine", warmup=0.1)  # 10 % of 200 steps = 20 steps
    for s in (0, 9, 19, 20, 120):
        decay = 0.1 + 0.9 * (1 + math.cos(math.pi * s / 200)) / 2
        assert by_fraction(s, 200) == min(1.0, ((s + 1) / 200) / 0.1) * decay  # min(1, q_s / f) d(p_s)
    # warm-up multiplies the decay from step 0 (the cosine does not wait for the warm-up)
    assert by_fraction(9, 200) == 0.5 * by_fraction.decay(9, 200)


def test_time_based_progress_is_elapsed_over_the_limit():
    """With a time limit the progress is max(s/S, t/T): a budgeted run anneals by the end of its budget."""
    cosine = make_lr_schedule("cosine")
    quarter = on_fake_clock(30.0, 120.0)  # a quarter of the budget
    assert cosine(3, 10**9, **quarter) == 0.1 + 0.9 * (1 + math.cos(math.pi * 0.25)) / 2
    assert cosine(900, 1000, **quarter) == cosine(900, 1000)  # the steps end it first
    step = make_lr_schedule("step")
    assert step.stage(0, 10**9, **on_fake_clock(120.0 * 2186.01 / 6560, 120.0)) == 7
    assert step.stage(0, 10**9, **on_fake_clock(120.0 * 2185.99 / 6560, 120.0)) == 6
    warm = make_lr_schedule("constant", warmup=0.25)
    assert warm(0, 10**9, **on_fake_clock(15.0, 120.0)) == 0.5
    assert warm(0, 10**9, **on_fake_clock(0.0, 120.0)) == pytest.approx(1 / (0.25 * 10**9))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"kind": "linear"}, UnknownNameError, "unknown lr_schedule 'linear'; valid lr_schedules: "
     + ", ".join(sorted(LR_SCHEDULES))),
    ({"kind": "cosine", "warmup": 1.5}, ValueError, "warmup: expected 0, a fraction of the run in \\(0, 1\\) or a whole"),
    ({"kind": "cosine", "warmup": -0.1}, ValueError, "warmup: expected"),
    ({"kind": "constant", "lr_final": 1e-4}, ValueError, "lr_final: applies to the 'step' and 'cosine' schedules"),
    ({"kind": "step", "lr": 1e-3, "lr_final": 1e-2}, ValueError, "lr_final: expected a learning rate in \\[0, lr"),
])
def test_bad_schedule_settings_are_clear_errors(kwargs, error, message):
    kind = kwargs.pop("kind")
    with pytest.raises(error, match=message):
        make_lr_schedule(kind, **kwargs)


def test_config_keys_are_validated_and_reach_the_trainer(tmp_path):
    from ppl_models.app.experiment import Experiment

    with pytest.raises(ConfigError, match=r"\[train\] unknown lr_schedule 'exp'; valid lr_schedules: constant, "
                                          r"cosine, .*step"):
        Config.from_dict({"train": {"lr_schedule": "exp"}})
    with pytest.raises(ConfigError, match=r"\[train\] warmup: expected"):
        Config.from_dict({"train": {"lr_schedule": "cosine", "warmup": 2.5}})
    with pytest.raises(ConfigError, match=r"\[train\] valid_every: expected an integer >= 1, received 0"):
        Config.from_dict({"train": {"valid_every": 0}})
    with pytest.raises(ConfigError, match=r"\[train\] fast_path: expected one of"):
        Config.from_dict({"train": {"fast_path": "fastest"}})
    with pytest.raises(ConfigError, match=r"\[train\] unknown budget_clock 'process'; .*cpu, wall"):
        Config.from_dict({"train": {"budget_clock": "process"}})
    config = Config.from_dict({"train": {"lr_schedule": "step", "warmup": 100, "lr_final": 1e-4, "valid_subset": 50,
                                         "valid_every": 7, "time_limit": PARSED_BUDGET,
                                         "budget_clock": "cpu"}})
    assert Config.from_dict({}).train.fast_path == "auto" and Config.from_dict({}).train.valid_subset == 2000
    pyro.clear_param_store()
    inst = pm.instantiate("vae", "amortized", num_data=NUM_DATA, model_kwargs=SMALL_VAE,
                          guide_kwargs={"hidden_dims": [8]})
    trainer = Experiment(config, tmp_path).trainer({"train": pixels(), "valid": pixels()}, inst)
    assert (trainer.lr_schedule, trainer.warmup, trainer.lr_final) == ("step", 100.0, 1e-4)
    assert (trainer.valid_subset, trainer.valid_every, trainer.time_limit, trainer.budget_clock) == (50, 7, float(PARSED_BUDGET), "cpu")


# ----------------------------------------------------------------------------------- through the engine
def pixels(num_data=NUM_DATA, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return DynamicBinarized(torch.rand(num_data, SMALL_VAE["x_dim"], generator=gen))


def vae_trainer(guide="amortized", seed=0, **kwargs):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    guide_kwargs = {"hidden_dims": [8]} if guide == "amortized" else {}
    inst = pm.instantiate("vae", guide, num_data=NUM_DATA, model_kwargs=SMALL_VAE, guide_kwargs=guide_kwargs)
    options = dict(batch_size=10, num_epochs=3, lr=1e-2, seed=seed, progress=False, log_every=1)
    options.update(kwargs)
    return Trainer(inst.model, inst.guide, pixels(), **options)


def params_now():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("guide", ["amortized", "mean-field"])
def test_every_group_dense_and_sparse_steps_at_the_scheduled_lr(guide):
    """SGD: each step moves every parameter by -lr_s * gradient (the per-datapoint tables: the batch rows)."""
    checked = []
    before = {}

    def check(trainer, step, loss):
        lr_s = 0.005 * make_lr_schedule("cosine", warmup=3)(step - 1, trainer.planned_steps)
        for name, p in pyro.get_param_store().named_parameters():
            if name in before and p.grad is not None:
                grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
                torch.testing.assert_close(p.detach(), before[name] - lr_s * grad, rtol=1e-5, atol=1e-7)
                checked.append((name, p.grad.is_sparse))
        before.update(params_now())

    trainer = vae_trainer(guide, optimizer="sgd", lr=0.005, lr_schedule="cosine", warmup=3, callback=check)
    trainer.fit()
    assert trainer.step == 12 and len(checked) > 12
    assert any(sparse for _, sparse in checked) == (guide == "mean-field")
    groups = [g for opt in trainer._optim.optimizers.values() for g in opt.param_groups]
    assert all(g["lr"] == 0.005 for g in groups)  # the groups keep their base lr (and so does the checkpoint)


def test_history_records_the_scheduled_lr():
    trainer = vae_trainer(lr_schedule="step", lr=1e-2, num_epochs=4)  # S = 16 steps
    trainer.fit()
    schedule = make_lr_schedule("step", lr=1e-2)
    assert trainer.history["log_step"] == list(range(1, 17))
    assert trainer.history["log_lr"] == [1e-2 * schedule(s, 16) for s in range(16)]
    assert trainer.history["log_lr"][0] == 1e-2 and trainer.history["log_lr"][-1] == 1e-2 * 0.1 ** (7 / 7)


def test_time_budget_starts_at_the_first_step_and_drives_the_schedule():
    """A fake clock: set-up takes 30 s, each step 0.5 s; a 10 s budget is 20 steps, the cosine runs on t / T."""
    clock = FakeClock()
    trainer = vae_trainer(fast_path=False, num_epochs=10**6, time_limit=FAKE_BUDGET, lr_schedule="cosine", clock=clock,
                          callback=lambda trainer, step, loss: setattr(clock, "now", clock.now + 0.5))
    setup = trainer._setup

    def slow_setup():
        clock.now += 30.0 if trainer._optim is None else 0.0
        setup()

    trainer._setup = slow_setup
    result = trainer.fit()
    assert result.step == 20 and result.train_seconds == 10.0
    assert result.setup_seconds == 30.0 and result.wall_time == 40.0 and result.compile_seconds == 0.0
    expected = [1e-2 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.5 * s / 10.0)) / 2) for s in range(20)]
    assert trainer.history["log_lr"] == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_cpu_budget_counts_the_process_clock_not_the_wall(monkeypatch):
    """budget_clock = "cpu": the budget and train_seconds read the process's CPU clock (here a fake one that moves
    0.5 s per step while the wall clock moves 2 s, as when other processes share the cores); set-up and wall time
    still read the wall clock."""
    from ppl_models.infer import schedules

    wall, cpu = FakeClock(), FakeClock(7.0)
    monkeypatch.setitem(schedules.BUDGET_CLOCKS, "cpu", cpu)

    def tick(trainer, step, loss):
        wall.now += 2.0
        cpu.now += 0.5

    trainer = vae_trainer(fast_path=False, num_epochs=10**6, time_limit=FAKE_BUDGET, clock=wall, callback=tick,
                          budget_clock="cpu", setup_start=wall.now - 3.0)
    result = trainer.fit()
    assert result.step == 20 and result.train_seconds == 10.0
    assert result.wall_time == 40.0 and result.setup_seconds == 3.0
    with pytest.raises(UnknownNameError, match="unknown budget_clock 'process'; valid budget_clocks: cpu, wall"):
        vae_trainer(budget_clock="process")


def test_setup_start_counts_the_callers_set_up():
    clock = FakeClock(50.0)
    trainer = vae_trainer(max_steps=2, clock=clock, setup_start=20.0)
    result = trainer.fit()
    assert result.setup_seconds == 30.0 and result.train_seconds == 0.0


def test_resume_mid_schedule_is_bit_identical(tmp_path):
    """Cosine with warm-up over 3 epochs of 4 steps; SIGTERM after step 6 (mid-epoch), then --resume."""
    options = dict(lr_schedule="cosine", warmup=0.25, lr_final=1e-3)
    vae_trainer(run_dir=tmp_path / "full", **options).fit()
    full = params_now()

    def interrupt(trainer, step, loss):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        vae_trainer(run_dir=tmp_path / "split", callback=interrupt, **options).fit()
    torch.manual_seed(123)
    trainer = vae_trainer(run_dir=tmp_path / "split", **options)
    trainer.fit(resume=True)
    assert trainer.step == 12
    for name, value in params_now().items():
        assert torch.equal(value, full[name]), name
    with pytest.raises(Exception, match="setting 'lr_schedule' was 'cosine' in the checkpoint, received 'step'"):
        vae_trainer(run_dir=tmp_path / "split", lr_schedule="step").fit(resume=True)


def test_resume_of_a_time_based_schedule_continues_its_clock(tmp_path):
    """The training seconds go into the checkpoint: a resumed budgeted run continues the schedule and the budget."""

    def run(run_dir, interrupt_at=None, start=1000.0, resume=False):
        clock = FakeClock(start)

        def tick(trainer, step, loss):
            clock.now += 0.5
            if step == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer = vae_trainer(run_dir=run_dir, fast_path=False, num_epochs=10**6, time_limit=RESUME_BUDGET,
                              lr_schedule="cosine", warmup=0.2, clock=clock, callback=tick)
        return trainer, trainer.fit(resume=resume)

    full_trainer, full_result = run(tmp_path / "full")
    full = params_now()
    assert full_result.step == 12 and full_result.train_seconds == 6.0
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "split", interrupt_at=5)
    trainer, result = run(tmp_path / "split", start=-7.0, resume=True)  # another clock origin: only differences count
    assert result.step == 12 and result.train_seconds == 6.0
    assert trainer.history["log_lr"] == full_trainer.history["log_lr"]
    for name, value in params_now().items():
        assert torch.equal(value, full[name]), name


def test_kl_annealing_and_the_lr_schedule_combine():
    seen = []

    def model(x, idx=None, *, num_data=None, kl_weight=1.0, word_keep=1.0):
        seen.append(kl_weight)
        w = pyro.param("w", torch.zeros(()))
        with pyro.plate("data", num_data or x.shape[0], subsample=idx):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x, idx=None, *, num_data=None, kl_weight=1.0, word_keep=1.0):
        pass

    data = TensorDataset(torch.randn(8))
    trainer = AnnealedTrainer(model, guide, data, batch_size=2, num_epochs=2, progress=False, log_every=1, fast_path=False,
                              kl_schedule=KLSchedule("linear", warmup_steps=4), lr_schedule="cosine", lr=0.1)
    weights = []
    trainer.callback = lambda t, step, loss: weights.append(seen[-1])
    trainer.fit()
    assert weights == [min(1.0, (s + 1) / 4) for s in range(8)]
    assert trainer.history["log_lr"] == [0.1 * make_lr_schedule("cosine")(s, 8) for s in range(8)]


# ------------------------------------------------------------------------------------------- validation
class CountingRows:
    """A data set that records the rows each ``batch`` call asks for and moves a fake clock by 1 s per call."""

    def __init__(self, base, clock=None):
        self.base, self.num_data, self.clock, self.calls = base, base.num_data, clock, []

    def batch(self, idx, generator=None):
        self.calls.append(idx.tolist())
        if self.clock is not None:
            self.clock.now += 1.0
        return self.base.batch(idx, generator)


def test_validation_rows_are_a_fixed_seeded_subset():
    rows = validation_rows(100, 30, seed=3)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 30 and int(rows.max()) < 100
    assert torch.equal(rows, validation_rows(100, 30, seed=3)) and not torch.equal(rows, validation_rows(100, 30, 4))
    assert validation_rows(100, 0, 3) is None and validation_rows(100, None, 3) is None
    assert validation_rows(100, 100, 3) is None


def test_validation_subset_and_cadence_counts():
    clock = FakeClock()
    valid = CountingRows(pixels(50, seed=1), clock)
    trainer = vae_trainer(valid=valid, valid_subset=20, valid_every=3, valid_batch_size=8, clock=clock)
    result = trainer.fit()  # 3 epochs of 4 steps: validations after steps 3, 6, 9, 12
    assert trainer.history["valid_step"] == [3, 6, 9, 12]
    assert len(trainer.history["valid_step_elbo"]) == 4 and all(math.isnan(v) for v in trainer.history["valid_elbo"])
    passes = [sum(valid.calls[3 * k: 3 * k + 3], []) for k in range(4)]  # 20 rows in batches of 8, 8, 4
    assert len(valid.calls) == 12 and all(p == passes[0] for p in passes)
    assert passes[0] == validation_rows(50, 20, seed=0).tolist()
    assert result.valid_seconds == 12.0 and result.train_seconds == 12.0  # validation is part of the budget clock
    assert result.to_metrics()["valid_share"] == 1.0


def test_validation_each_epoch_by_default_is_deterministic():
    valid = CountingRows(pixels(50, seed=1))
    trainer = vae_trainer(valid=valid, num_epochs=2)
    trainer.fit()
    assert len(trainer.history["valid_elbo"]) == 2 and not trainer.history["valid_step"]
    assert len(valid.calls) == 2 and valid.calls[0] == list(range(50))  # 50 rows <= valid_subset: all, in order
    assert trainer.validation_elbo() == trainer.validation_elbo()  # the same rows and draws every time


# ----------------------------------------------------------------------------------- the path's record
def test_the_run_records_its_fast_path_and_seconds(tmp_path, capsys):
    result = vae_trainer(run_dir=tmp_path, max_steps=5).fit()  # the default: "auto"
    assert result.fast_path.startswith("eager (auto:")
    written = json.loads((tmp_path / "train.json").read_text())
    assert written["fast_path"] == result.fast_path and written["step"] == 5
    assert set(written) >= {"setup_seconds", "compile_seconds", "train_seconds", "valid_seconds", "valid_share"}
    assert vae_trainer(max_steps=2, fast_path=False).fit().fast_path == "off: fast_path = false"

    def step_rule(trainer, args, idx):
        return trainer._train_step(args, idx)

    ruled_out = vae_trainer(max_steps=2, step_fn=step_rule).fit()
    assert ruled_out.fast_path == "off: a strategy's step rule replaces the joint step"
    assert "fast path" not in capsys.readouterr().err  # "auto" records it without a notice
    vae_trainer(max_steps=2, step_fn=step_rule, fast_path=True).fit()
    assert "fast path off: a strategy's step rule" in capsys.readouterr().err


def test_lr_schedule_is_a_plain_object():
    schedule = LRSchedule("cosine", 0.0, 0.5)
    assert schedule(0, 10) == 1.0 and schedule(10, 10) == 0.5
    with pytest.raises(ValueError, match="step >= 0"):
        schedule(-1, 10)
