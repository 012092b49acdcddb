"""End to end on real MNIST: the example script with tiny flags, the CLI, SIGTERM in a real process."""

import json
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from ppl_models.app.cli import main as cli_main
from ppl_models.infer.checkpoint import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

TINY = ["-o", "data.limit_train=256", "-o", "data.limit_valid=64", "-o", "data.limit_test=32", "--no-progress"]


@pytest.mark.slow
def test_vae_mnist_example_runs_with_tiny_flags(tmp_path, shared_data):
    import vae_mnist

    args = Namespace(
        config=str(vae_mnist.CONFIG), num_epochs=1, z_dim=4, guide=None, num_samples=8, seed=0, data_dir=None,
        limit_train=256, limit_valid=64, limit_test=32, run_dir=str(tmp_path / "run"), resume=False, no_progress=True,
    )
    summary = vae_mnist.main(args)
    assert summary["num_data"] == 32 and summary["num_samples"] == 8
    assert summary["log_likelihood"] >= summary["elbo"] - 3 * summary["elbo_se"]
    for name in ("config.toml", "history.json", "metrics.json", "eval.nc", "elbo.png", "prior_samples.png", "reconstructions.png"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.slow
def test_cli_fit_then_evaluate(tmp_path, shared_data, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["fit", "examples/configs/vae_mnist.toml", "--run-dir", str(run_dir), "--num-epochs", "1",
                     "--num-samples", "4", "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]",
                     "-o", "guide.hidden_dims=[32]", *TINY])
    assert code == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["num_samples"] == 4
    assert cli_main(["evaluate", str(run_dir), "--num-samples", "16", "--no-progress"]) == 0
    second = json.loads((run_dir / "metrics.json").read_text())
    assert second["num_samples"] == 16 and second["num_data"] == 32
    out = capsys.readouterr().out
    assert '"log_likelihood"' in out


@pytest.mark.slow
def test_sigterm_mid_epoch_in_a_real_process(tmp_path, shared_data):
    """SIGTERM while training: exit status 143, a loadable checkpoint, the previous one intact."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ppl_models", "fit", "examples/configs/vae_mnist.toml", "--run-dir", str(run_dir),
           "--num-epochs", "1000", "--no-evaluate", "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]",
           "-o", "guide.hidden_dims=[32]", "-o", "data.limit_train=2048", "-o", "train.batch_size=16",
           "-o", "train.validate=false", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run_dir / "checkpoints")) < 1:  # the first epoch's checkpoint
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the second epoch
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    files = list_checkpoints(run_dir / "checkpoints")
    states = [load_checkpoint(f) for f in files]
    assert len(states) == 2
    assert states[0]["batch_in_epoch"] == 0 and states[0]["epoch"] >= 1  # an epoch-end checkpoint, intact
    assert states[-1]["step"] > states[0]["step"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
def test_inference_strategies_example_runs_with_tiny_flags(tmp_path, shared_data):
    import inference_strategies

    rows = list(inference_strategies.ROWS)  # all five, end-to-end included
    args = inference_strategies.build_parser().parse_args([
        "--strategies", *rows, "--budget", "1", "--num-test", "8", "--num-samples", "4", "--limit-train", "256",
        "--refine-steps", "3", "--gap-steps", "2", "5", "--out", str(tmp_path), "--no-progress",
        "-o", "model.z_dim=4", "-o", "model.hidden_dims=[32]", "-o", "guide.hidden_dims=[32]",
        "-o", "train.batch_size=64", "-o", "train.inner_steps=2", "-o", "evaluate.batch_size=8",
    ])
    report = inference_strategies.main(args)
    assert report["settings"]["train"]["time_limit"] == 1.0 and report["settings"]["evaluate"]["num_samples"] == 4
    assert [r["strategy"] for r in report["strategies"]] == rows
    for r in report["strategies"]:
        assert r["theta_steps"] >= 1 and r["test_nll"] > 0, r
        assert r["test_elbo"] <= -r["test_nll"]  # the IWAE bound is at least the ELBO of the same draws
    assert report["strategies"][0]["test_lambda"] == "3 adam steps from the prior"
    gap = report["amortization_gap"]
    assert gap["num_test"] == 8 and {"elbo_encoder", "elbo_refined_2", "elbo_refined_5", "iwae"} <= set(gap)
    for name in ("strategies.json", "strategies.csv", "strategies.png"):
        assert (tmp_path / name).is_file()
