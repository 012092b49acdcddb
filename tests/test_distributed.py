"""Data-parallel SVI (ppl_models.infer.distributed): two gloo processes on loopback against one process.

Every multi-process run here is a real job started by torch's own launcher (``launch``, i.e. torchrun
``--standalone``) in a subprocess with a hard timeout; its processes run this file as a script
(``python tests/test_distributed.py worker SPEC``).  Models are tiny and data are simulated from the model.

Exactness.  Two processes reproduce one process up to float rounding wherever the gradient is a function
of the global batch alone: the Gaussian mixture with its discrete assignment summed out exactly
(``TraceEnum_ELBO``), either in the model (no per-datapoint parameters: batches split by position) or in
the per-datapoint mean-field guide (λ_i split by owner rank), in float64.  N = 41 rows, batch 8: the last
batch of each epoch has one row, so one rank has an empty shard there (the masked-row path).  With
Monte Carlo noise (linear-Gaussian, mean-field guide, ``Trace_ELBO``) each rank draws its own noise, so
the reference is the uninterrupted 2-process run itself: a killed job's checkpoint and its resumption
must match it bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NUM_DATA, BATCH = 41, 8  # 6 batches an epoch, the last of one row
LAUNCH_TIMEOUT_S = 90

CASES = {
    # name: model, guide, model kwargs, elbo, enumerate the guide, float64, epochs, lr
    "gmm-enumerate": ("gmm", "enumerate", {"num_components": 3, "data_dim": 2, "seed": 1}, "TraceEnum_ELBO", False, True, 2, 0.05),
    "gmm-mean-field": ("gmm", "mean-field", {"num_components": 3, "data_dim": 2, "seed": 1}, "TraceEnum_ELBO", True, True, 2, 0.05),
    "lg-mean-field": ("linear-gaussian", "mean-field", {"z_dim": 2, "x_dim": 3, "seed": 1}, "Trace_ELBO", False, False, 3, 0.05),
}


# ------------------------------------------------------------------------------------ one run
def simulated_data(case: str):
    """Data drawn from the model itself, with its own generator (the same in every process)."""
    from ppl_models.data import TensorDataset

    gen = torch.Generator().manual_seed(123)
    model_name = CASES[case][0]
    if model_name == "gmm":
        from ppl_models.gmm import GMMParams, simulate

        truth = GMMParams(3, 2, generator=gen, loc_scale=3.0)
        x, _ = simulate(truth, NUM_DATA, generator=gen)
    else:
        from ppl_models.linear_gaussian import LinearGaussianParams, simulate

        truth = LinearGaussianParams(2, 3, generator=gen, init_sigma=0.5)
        x, _ = simulate(truth, NUM_DATA, generator=gen)
    return TensorDataset(x.to(torch.get_default_dtype()))


def make_trainer(case: str, run_dir, *, distributed: bool, callback=None, **overrides):
    """The same trainer for one process (the engine's ``Trainer``) or for each of several processes."""
    import ppl_models as pm
    from ppl_models.infer import Trainer
    from ppl_models.infer.distributed import DataParallel
    from pyro.infer import config_enumerate

    model_name, guide_name, model_kwargs, elbo, enum_guide, float64, epochs, lr = CASES[case]
    torch.set_default_dtype(torch.float64 if float64 else torch.float32)
    data = simulated_data(case)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    inst = pm.instantiate(model_name, guide_name, num_data=NUM_DATA, model_kwargs=model_kwargs)
    guide = config_enumerate(inst.guide, default="parallel") if enum_guide else inst.guide
    kwargs = dict(elbo=elbo, batch_size=BATCH, num_epochs=epochs, lr=lr, seed=0, run_dir=run_dir, progress=False,
                  keep_last=20, callback=callback)
    kwargs.update(overrides)
    device = kwargs.pop("device", "cpu")
    if distributed:
        return Trainer(inst.model, guide, data, parallel=DataParallel(inst.modules, device=device), **kwargs)
    return Trainer(inst.model, guide, data, **kwargs)


def final_params(run_dir: Path) -> dict:
    from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint

    return load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])


# ------------------------------------------------------------------------------- subprocesses
def worker(spec: dict) -> None:
    """One process of a job: train each case of the spec (errors recorded for the launcher's report)."""
    from ppl_models.infer.distributed import record_errors

    record_errors(_worker)(spec)


def _worker(spec: dict) -> None:
    from ppl_models.infer.distributed import process_group

    torch.set_num_threads(1)
    with process_group("cpu"):
        rank = int(os.environ["RANK"])
        for run in spec["runs"]:
            callback = None
            kill = run.get("kill")
            if kill and rank == kill["rank"]:
                def callback(trainer, step, loss, at=kill["step"]):
                    if step == at:
                        os.kill(os.getpid(), signal.SIGKILL)
            trainer = make_trainer(run["case"], run["run_dir"], distributed=True, callback=callback)
            trainer.fit(resume=run.get("resume", False))


def launch_job(spec: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python tests/test_distributed.py launch SPEC`` (torch's launcher, 2 processes), bounded in time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "launch", str(nproc), json.dumps(spec)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the processes it started
        out, err = proc.communicate()
        pytest.fail(f"job did not finish within {LAUNCH_TIMEOUT_S} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch_main(nproc: int, spec_json: str) -> int:
    from ppl_models.infer.distributed import DistributedJobError, launch

    try:
        launch(nproc, ["worker", spec_json], script=str(Path(__file__).resolve()))
    except DistributedJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exitcode
    return 0


# ------------------------------------------------------------------------------------- fixtures
# Two jobs in all (each costs seconds of process start-up): the killed one, then one that resumes it and
# trains every case from the start.
@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A 2-process job whose rank 1 is SIGKILLed at step 9 (epoch 2; the epoch-1 checkpoint is step 6).
    Returns the run directory, the finished launcher and what its checkpoint directory held then."""
    from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint

    run_dir = tmp_path_factory.mktemp("killed") / "lg-mean-field"
    proc = launch_job({"runs": [{"case": "lg-mean-field", "run_dir": str(run_dir), "kill": {"rank": 1, "step": 9}}]})
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    kept = [load_checkpoint(p) for p in list_checkpoints(run_dir / "checkpoints")]
    return run_dir, proc, files, kept


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, killed_run):
    """One 2-process job: resume the killed run, then train every case from the start (checkpoints kept)."""
    root = tmp_path_factory.mktemp("two")
    runs = [{"case": "lg-mean-field", "run_dir": str(killed_run[0]), "resume": True}]
    runs += [{"case": case, "run_dir": str(root / case)} for case in CASES]
    proc = launch_job({"runs": runs})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def assert_close_params(got: dict, want: dict, rtol: float, atol: float):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("case", ["gmm-enumerate", "gmm-mean-field"])
def test_two_processes_equal_one_process(two_process_runs, tmp_path, case):
    two = final_params(two_process_runs / case)
    one_trainer = make_trainer(case, tmp_path / case, distributed=False)
    one_trainer.fit()
    one = final_params(tmp_path / case)
    assert two["step"] == one["step"] == 2 * 6
    assert two["distributed"]["world_size"] == 2
    # the per-datapoint table was split by rank in training and gathered whole for the checkpoint
    if case == "gmm-mean-field":
        assert two["params"]["local_params$$$tables.z.weight"].shape == (NUM_DATA, 3)
        assert two["distributed"]["bounds"] == [[0, 21], [21, 41]]
    # float64: the only difference is the summation order of the all-reduce
    assert_close_params(two["params"], one["params"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(two["history"]["train_elbo"]), torch.tensor(one["history"]["train_elbo"]),
                               rtol=1e-11, atol=0.0)
    # and the moved parameters are not the initial ones (the comparison is not vacuous)
    start = make_trainer(case, None, distributed=False)
    start._setup()
    moved = {n: p.detach() for n, p in pyro.get_param_store().named_parameters()}
    assert any((moved[n] - one["params"][n]).abs().max() > 1e-2 for n in moved)


def test_one_process_distributed_trainer_is_the_engine(tmp_path):
    """Without a process group the engine with the data-parallel option is the engine (same draws, same checkpoint format)."""
    engine = make_trainer("lg-mean-field", tmp_path / "engine", distributed=False, num_epochs=1)
    engine.fit()
    dist_one = make_trainer("lg-mean-field", tmp_path / "dist", distributed=True, num_epochs=1)
    dist_one.fit()
    a, b = final_params(tmp_path / "engine"), final_params(tmp_path / "dist")
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["history"]["train_elbo"] == b["history"]["train_elbo"]
    assert b["distributed"]["world_size"] == 1


@pytest.mark.slow
def test_killed_rank_stops_job_with_clear_error_and_keeps_checkpoint(killed_run, two_process_runs):
    _, proc, files, kept = killed_run
    assert proc.returncode != 0
    assert "rank 1" in proc.stderr and "SIGKILL" in proc.stderr and "the job was stopped" in proc.stderr, proc.stderr[-3000:]
    assert files == ["step-000000006.pt"]  # the epoch-1 checkpoint, and no temporary file left behind
    from ppl_models.infer.checkpoint import load_checkpoint

    (state,) = kept
    reference = load_checkpoint(two_process_runs / "lg-mean-field" / "checkpoints" / "step-000000006.pt")
    assert state["step"] == reference["step"] == 6
    for name in reference["params"]:
        assert torch.equal(state["params"][name], reference["params"][name]), name
    for rank in range(2):
        assert torch.equal(state["distributed"]["rng"][rank]["torch"], reference["distributed"]["rng"][rank]["torch"])


@pytest.mark.slow
def test_resume_after_kill_continues_as_uninterrupted(killed_run, two_process_runs):
    resumed = final_params(killed_run[0])
    full = final_params(two_process_runs / "lg-mean-field")
    assert resumed["step"] == full["step"] == 18
    for name in full["params"]:
        assert torch.equal(resumed["params"][name], full["params"][name]), name
    assert resumed["history"]["train_elbo"] == full["history"]["train_elbo"]
    assert torch.equal(resumed["optimizer"]["sparse"]["state"][0]["exp_avg"], full["optimizer"]["sparse"]["state"][0]["exp_avg"])


@pytest.mark.parametrize("rank", [0, 1])
def test_position_shards_are_distributed_sampler_batches(rank):
    """Without per-datapoint parameters rank r's rows of global batch b are what DistributedSampler (over the
    epoch's permutation) and a DataLoader with batch B / W give rank r as its batch b."""
    from torch.utils.data import BatchSampler, DistributedSampler

    trainer = make_trainer("gmm-enumerate", None, distributed=True, num_epochs=1)
    parallel = trainer.parallel
    parallel.world_size, parallel.rank = 2, rank  # as in a 2-process job; nothing collective is called
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    sampler = DistributedSampler(perm.tolist(), num_replicas=2, rank=rank, shuffle=False)
    loader_batches = list(BatchSampler([perm[i].item() for i in sampler], BATCH // 2, drop_last=False))
    x = torch.randn(40, 2, dtype=torch.float64)
    for b in range(5):
        idx = perm[b * BATCH:(b + 1) * BATCH]
        (local_x,), local_idx, share, masked = parallel.shard((x[idx],), idx)
        assert local_idx.tolist() == loader_batches[b] and share == 0.5 and not masked
        assert torch.equal(local_x, x[local_idx])
    # a batch with fewer rows than processes: the ranks left without a row join with one masked row
    parallel.world_size = 3
    for r in range(3):
        parallel.rank = r
        _, local_idx, share, masked = parallel.shard((x[perm[:1]],), perm[:1])
        assert masked == (r > 0) and local_idx.numel() == 1


def test_shard_bounds_and_bad_device():
    from ppl_models.infer.distributed import resolve_device, shard_bounds

    assert shard_bounds(41, 2) == [(0, 21), (21, 41)]
    assert shard_bounds(5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="3 processes but only 2 datapoints"):
        shard_bounds(2, 3)
    with pytest.raises(ValueError, match="device: expected"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_cli_nproc_is_stripped_for_the_processes_and_cuda_without_gpu_is_one_error(tmp_path, capsys):
    from ppl_models.app.cli import _strip_nproc, main

    assert _strip_nproc(["fit", "c.toml", "--nproc", "2", "--resume"]) == ["fit", "c.toml", "--resume"]
    assert _strip_nproc(["fit", "--nproc=4", "c.toml"]) == ["fit", "c.toml"]
    if torch.cuda.is_available():
        return
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nname = "vae"\n[output]\nrun_dir = "{tmp_path / "run"}"\n')
    assert main(["fit", str(config), "--device", "cuda", "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': no CUDA GPU is available") and err.count("\n") == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("case", ["gmm-enumerate", "gmm-mean-field"])
def test_cuda_one_process_equals_cpu(tmp_path, case):
    """``device="cuda"``: the same run as on the CPU (float64; the batches are drawn on the CPU and moved)."""
    make_trainer(case, tmp_path / "cuda", distributed=True, device="cuda").fit()
    cuda = final_params(tmp_path / "cuda")
    make_trainer(case, tmp_path / "cpu", distributed=False).fit()
    cpu = final_params(tmp_path / "cpu")
    assert all(v.device.type == "cpu" for v in cuda["params"].values())
    assert_close_params(cuda["params"], cpu["params"], rtol=1e-7, atol=1e-9)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]))
    elif sys.argv[1] == "launch":
        sys.exit(_launch_main(int(sys.argv[2]), sys.argv[3]))
