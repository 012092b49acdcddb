"""The engine's thread tuner: one thread or all, whichever trains faster, restored when the run ends.

Speeds are simulated (the step times fed to the tuner and its clock are given), so no test depends on the
machine's load or speed."""

import pytest
import torch

from ppl_models.infer.threads import ThreadTuner, check_threads


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def drive(tuner, clock, step_time, steps):
    """Feed ``steps`` steps whose duration is ``step_time[threads]`` (or ``step_time(i, threads)`` for the i-th
    step); returns the thread count of each step."""
    used = []
    for i in range(steps):
        n = torch.get_num_threads()
        used.append(n)
        seconds = step_time(i, n) if callable(step_time) else step_time[n]
        clock.t += seconds
        tuner.after_step(seconds)
    return used


@pytest.mark.parametrize("faster", [1, 2])
def test_auto_trains_with_the_faster_count_and_probes_again(two_threads, faster):
    clock = FakeClock()
    times = {1: 0.01, 2: 0.02} if faster == 1 else {1: 0.02, 2: 0.01}
    with ThreadTuner("auto", interval=1.0, probe_steps=4, warmup_steps=3, clock=clock) as tuner:
        assert tuner.candidates == [1, 2]
        used = drive(tuner, clock, times, 15)  # warm-up with all threads, then blocks of 1 + 2 steps: 1, 2, 1, 2
        assert used == [2] * 3 + [1] * 3 + [2] * 3 + [1] * 3 + [2] * 3
        assert torch.get_num_threads() == faster
        used = drive(tuner, clock, times, 200)
        assert used[-1] == faster and tuner.switches == 0
        assert 0.8 < sum(u == faster for u in used) / len(used) < 1  # it probes again after each interval
    assert torch.get_num_threads() == 2  # restored


def test_auto_follows_a_change_of_load(two_threads):
    clock = FakeClock()
    with ThreadTuner("auto", interval=1.0, probe_steps=4, warmup_steps=3, clock=clock) as tuner:
        drive(tuner, clock, {1: 0.02, 2: 0.01}, 100)  # idle: two threads win
        assert torch.get_num_threads() == 2
        used = drive(tuner, clock, {1: 0.02, 2: 0.08}, 200)  # busy: one thread wins from the next probe
        assert tuner.chosen == 1 and tuner.switches == 1 and sum(u == 1 for u in used[-100:]) > 80
        assert tuner.summary() == {"threads": 1, "candidates": [1, 2], "switches": 1, "policy": "auto"}


def test_a_fixed_count_is_used_and_restored(two_threads):
    with ThreadTuner(1) as tuner:
        assert torch.get_num_threads() == 1 and not tuner.active
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "fast", True, None])
def test_bad_values_name_the_setting(bad):
    with pytest.raises(ValueError, match=r"threads: expected \"auto\" or a positive integer, received"):
        check_threads(bad)


def test_the_engine_reports_and_restores_threads(two_threads):
    import pyro
    import pyro.distributions as dist

    from ppl_models.data import TensorDataset
    from ppl_models.infer import fit

    def model(x, idx=None, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", num_data or len(x), subsample=idx):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x, idx=None, num_data=None):
        pass

    result = fit(model, guide, TensorDataset(torch.randn(64)), batch_size=16, num_epochs=1, progress=False,
                 threads=1, fast_path=False)
    assert result.threads == {"threads": 1, "candidates": [1], "switches": 0, "policy": 1}
    assert result.to_metrics()["threads"]["threads"] == 1
    assert torch.get_num_threads() == 2


def test_more_threads_must_be_clearly_faster(two_threads):
    """Two threads 5 % faster is within the margin: one thread is kept (a wrong "more" costs far more)."""
    clock = FakeClock()
    with ThreadTuner("auto", interval=1.0, probe_steps=4, margin=1.1, warmup_steps=3, clock=clock) as tuner:
        drive(tuner, clock, {1: 0.0200, 2: 0.0190}, 15)
        assert torch.get_num_threads() == 1
        drive(tuner, clock, {1: 0.0200, 2: 0.0150}, 200)  # 25 % faster: chosen at the next probe
        assert torch.get_num_threads() == 2


def test_the_first_probe_waits_for_the_warm_up(two_threads):
    """A run's first steps are slow at any thread count (kernels load, caches fill): the probe must not time
    them, or a loaded machine's first probe picks two threads (measured: 2.3x slower than one)."""
    clock = FakeClock()
    busy = {1: 0.015, 2: 0.040}  # one thread wins under load

    def step_time(i, n):
        return 0.5 if i < 15 else busy[n]

    with ThreadTuner("auto", interval=30.0, probe_steps=16, clock=clock) as tuner:
        used = drive(tuner, clock, step_time, 20 + 4 * 9)  # the default warm-up of 20 steps, then one probe
        assert used[:20] == [2] * 20 and torch.get_num_threads() == 1


def test_one_slow_step_does_not_decide_a_probe(two_threads):
    """A pause inside the one-thread block (a collection, another process's burst) is one step of 8: the
    median ignores it."""
    clock = FakeClock()

    def step_time(i, n):
        return 1.0 if i == 5 else {1: 0.01, 2: 0.03}[n]  # step 5: the second timed step of the first 1-block

    with ThreadTuner("auto", interval=30.0, probe_steps=16, warmup_steps=3, clock=clock) as tuner:
        used = drive(tuner, clock, step_time, 3 + 4 * 9)
        assert used[4] == 1 and used[5] == 1 and torch.get_num_threads() == 1


def test_a_probe_near_a_tie_keeps_the_count_that_runs(two_threads):
    """Once two threads run, one thread within the margin but slower does not replace them (an idle machine's
    probe that caught slow two-thread steps switched the run to a count 1.6x slower for an interval)."""
    clock = FakeClock()
    with ThreadTuner("auto", interval=1.0, probe_steps=4, warmup_steps=3, clock=clock) as tuner:
        drive(tuner, clock, {1: 0.02, 2: 0.01}, 15)  # first probe: two threads
        assert tuner.chosen == 2
        used = drive(tuner, clock, {1: 0.0103, 2: 0.0100}, 300)  # near a tie: one thread 3 % slower
        assert tuner.chosen == 2 and tuner.switches == 0 and used[-1] == 2
        drive(tuner, clock, {1: 0.0090, 2: 0.0100}, 300)  # one thread faster: chosen
        assert tuner.chosen == 1 and tuner.switches == 1

